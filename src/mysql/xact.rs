//! Locks held by the caller's transaction: [`lock_in_transaction`].

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::{AssertSqlSafe, MySql, MySqlConnection, Row, Transaction};
use tokio::time::Instant;

use super::lease::{q, Sql, DEFAULT_SQL};
use super::{is_lock_busy, map_err};
use crate::lease::{new_owner, this_holder};
use crate::request::MAX_DURATION;
use crate::{validate_name, Error, Result, Wait};

/// Whether the server is MariaDB, which can set variables for one statement.
const IS_MARIADB: &str = "SELECT VERSION() LIKE '%MariaDB%'";

/// MySQL: shortens the session's lock wait for one statement, keeping the
/// old value. MariaDB takes 0 as "do not wait"; MySQL's minimum is 1 s.
const SET_LOCK_WAIT: &str = "SET @dblock_lock_wait = @@SESSION.innodb_lock_wait_timeout, \
                             SESSION innodb_lock_wait_timeout = \
                                 GREATEST(?, IF(VERSION() LIKE '%MariaDB%', 0, 1))";
/// Puts it back.
const RESTORE_LOCK_WAIT: &str = "SET SESSION innodb_lock_wait_timeout = @dblock_lock_wait, \
                                 @dblock_lock_wait = NULL";
const ROLLBACK_ON_TIMEOUT: &str = "SELECT @@GLOBAL.innodb_rollback_on_timeout";

static HOLDER: LazyLock<String> = LazyLock::new(|| {
    let holder = format!("{} (transaction)", this_holder());
    match holder.char_indices().nth(255) {
        Some((i, _)) => holder[..i].to_owned(),
        None => holder,
    }
});

/// Locks `name` until the end of `tx` (its `COMMIT` or `ROLLBACK`) and
/// returns a fencing token; waits as long as it takes. See
/// [`lock_in_transaction_with`] for the details and a bounded wait.
///
/// # Cancel safety
/// Not cancel safe: if dropped, the transaction may or may not hold the
/// lock; roll it back (dropping a `Transaction` does) to be sure it holds
/// nothing.
pub async fn lock_in_transaction(tx: &mut Transaction<'_, MySql>, name: &str) -> Result<u64> {
    match lock(tx, &DEFAULT_SQL, name, Wait::Forever).await? {
        Some(token) => Ok(token),
        None => unreachable!("a lock waited for forever is granted or fails"),
    }
}

/// Locks `name` until the end of `tx` (its `COMMIT` or `ROLLBACK`) and
/// returns a fencing token, waiting as `wait` says: [`Wait::No`] answers
/// `Ok(None)` when the name is held elsewhere, [`Wait::For`] fails with
/// [`Error::Timeout`] when the time runs out.
///
/// Within one transaction the lock is re-entrant (the transaction is the
/// holder); each call returns a new token.
///
/// On a Galera node it fails with [`Error::Unsupported`]: a row lock there
/// holds on one node only (see [`Engine::check_lock_in_tx`](super::Engine::check_lock_in_tx)).
/// It asks the server first (one `SHOW GLOBAL VARIABLES`), which leaves the
/// transaction as it was.
///
/// The lock is the row lock (`SELECT ... FOR UPDATE` semantics) on the
/// name's row in `dblock_leases`, so it shares names, and tokens, with
/// [`Lease`](super::Lease): while the transaction holds the row, lease
/// acquisitions of the name see it as held (a `try_acquire` answers busy
/// after looking again for about 28 ms at most, as it does for every row
/// lock: most are held for milliseconds); a live lease of the name makes
/// this function wait. Use [`Lease::lock_in_transaction_with`](super::Lease::lock_in_transaction_with)
/// for a lease table other than `dblock_leases`.
///
/// - **Token.** The returned token is greater than every token handed out
///   for the name before, by leases or by this function, *that was
///   committed*: the increment is part of the caller's transaction. If the
///   transaction rolls back, the increment goes with it and the next holder
///   may receive the same token. That is safe for data written in the same
///   transaction (it was rolled back too), but a token shown to anything
///   outside the database before `COMMIT` may be issued again.
/// - **Waiting for another transaction** that holds the name happens in the
///   server, so the lock is handed over as soon as that transaction ends.
///   A bounded wait sets `innodb_lock_wait_timeout` for that one statement
///   (whole seconds, rounded up: the server's unit; `0` for [`Wait::No`],
///   which MySQL 8 raises to its minimum of 1 s): on MariaDB with `SET
///   STATEMENT ... FOR`, which also lifts a configured
///   `max_statement_time` so that only the wait bounds it; on MySQL by
///   changing the session's value and restoring it afterwards.
/// - **Waiting for a lease.** Once the transaction holds the row, a live
///   lease of the name can no longer be renewed or released (those are
///   updates of the same row), so it can only run out: the function waits
///   for its expiry by the database clock, and the lease's guard reports
///   itself lost meanwhile. A bounded wait that cannot outlast the lease
///   gives up at once (`Ok(None)` or [`Error::Timeout`]). Either way the
///   transaction keeps the row lock until it ends, and the lease cannot be
///   renewed or released meanwhile: end the transaction promptly after
///   giving up on a lease. (The row cannot be checked without locking it
///   first: under `REPEATABLE READ` a plain read sees the transaction's
///   snapshot, and under MariaDB's `innodb_snapshot_isolation` a locking
///   read after such a read fails once the row has changed.)
/// - **No poisoning.** Failures that the server confines to the statement,
///   such as a lock wait timeout, leave the transaction as it was: after
///   [`Error::Timeout`] it can go on and commit. The server itself rolls
///   back the *whole* transaction on a deadlock (1213), on a snapshot
///   conflict under MariaDB's `innodb_snapshot_isolation=ON` (1020: call
///   this before the transaction reads anything), and on a lock wait
///   timeout when `innodb_rollback_on_timeout=ON`; these are reported as
///   [`Error::Database`] with the server's error, never as a timeout, and
///   the transaction must be rolled back.
/// - **The row** of a new name is created in the caller's transaction with
///   `INSERT ... ON DUPLICATE KEY UPDATE`, which takes a record lock on the
///   primary key and no gap lock; a rollback removes it again.
/// - The lock is not visible to [`Locks::inspect`](crate::Locks::inspect)
///   and `list`, which report leases.
///
/// Fails with [`Error::InvalidName`] or [`Error::InvalidOption`] (a wait
/// over 366 days) before sending anything, and with
/// [`Error::SchemaMissing`] when the table does not exist.
///
/// ```no_run
/// # async fn demo(pool: sqlx::MySqlPool) -> dblock::Result<()> {
/// use std::time::Duration;
/// let mut tx = pool.begin().await?;
/// let token = dblock::mysql::lock_in_transaction_with(&mut tx, "invoice:42", dblock::Wait::For(Duration::from_secs(5)))
///     .await?
///     .expect("a bounded wait either locks or fails with Error::Timeout");
/// sqlx::query("UPDATE invoices SET fence = ? WHERE id = 42").bind(token).execute(&mut *tx).await?;
/// tx.commit().await?; // releases the lock
/// # Ok(()) }
/// ```
///
/// # Cancel safety
/// Not cancel safe: if dropped, the transaction may or may not hold the
/// lock. Roll the transaction back (dropping a `Transaction` does) to
/// release whatever it holds. On MariaDB the bounded wait's
/// `innodb_lock_wait_timeout` is set with `SET STATEMENT ... FOR`, for the
/// one statement, so a dropped call leaves no changed setting on the
/// connection; on MySQL, which cannot do that, a call dropped during a
/// bounded wait for another transaction may leave the session's
/// `innodb_lock_wait_timeout` shortened (and `@dblock_lock_wait` set):
/// close such a connection rather than reuse it.
pub async fn lock_in_transaction_with(
    tx: &mut Transaction<'_, MySql>,
    name: &str,
    wait: Wait,
) -> Result<Option<u64>> {
    lock(tx, &DEFAULT_SQL, name, wait).await
}

/// What a wait that ran out answers.
fn busy(name: &str, wait: Wait) -> Result<Option<u64>> {
    match wait {
        Wait::For(waited) => Err(Error::Timeout {
            name: name.to_owned(),
            waited,
        }),
        _ => Ok(None),
    }
}

pub(crate) async fn lock(
    tx: &mut Transaction<'_, MySql>,
    sql: &Sql,
    name: &str,
    wait: Wait,
) -> Result<Option<u64>> {
    validate_name(name)?;
    let deadline = match wait {
        Wait::No => Some(Instant::now()),
        Wait::For(d) if d > MAX_DURATION => {
            return Err(Error::InvalidOption(format!(
                "wait of {d:?} is above the maximum of 366 days"
            )))
        }
        Wait::For(d) => Some(Instant::now() + d),
        Wait::Forever => None,
    };
    let marker = new_owner();
    let conn: &mut MySqlConnection = tx;
    if super::engine::is_galera_node(conn).await.map_err(map_err)? {
        return Err(super::engine::lock_in_tx_on_galera());
    }

    // 0. The table's token floor, under a share lock held to the end of the
    //    transaction: a new row starts above every token a sweep deleted,
    //    and no sweep of the table runs meanwhile.
    let floor = loop {
        let floor = sqlx::query_scalar::<_, u64>(AssertSqlSafe(sql.floor_read.clone()))
            .bind(sql.table.as_bytes())
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err)?;
        match floor {
            Some(floor) => break floor,
            // First use of this table: its floor row, inside this
            // transaction (it holds the new row until it ends).
            None => {
                q(&sql.floor_ensure)
                    .bind(sql.table.as_bytes())
                    .execute(&mut *conn)
                    .await
                    .map_err(map_err)?;
            }
        }
    };

    // 1. The row lock, creating the row if needed; bumps the token unless a
    //    lease is live.
    loop {
        match take_row(conn, sql, name, &marker, floor + 1, deadline).await {
            Ok(()) => break,
            Err(e) if is_lock_busy(&e) => {
                // The statement was rolled back, and only the statement,
                // unless the server is set to roll back the transaction.
                let whole: i64 = sqlx::query_scalar(ROLLBACK_ON_TIMEOUT)
                    .fetch_one(&mut *conn)
                    .await?;
                if whole != 0 {
                    return Err(Error::Database(e));
                }
                if deadline.is_some() {
                    return busy(name, wait);
                }
            }
            Err(e) => return Err(map_err(e)),
        }
    }

    // 2. Under the row lock nobody else can change the row: if a lease is
    //    live, it runs out at the time it says.
    loop {
        let row = q(&sql.tx_read)
            .bind(marker.as_bytes())
            .bind(name.as_bytes())
            .fetch_one(&mut *conn)
            .await
            .map_err(map_err)?;
        let token: u64 = row.try_get(0)?;
        let mine: i64 = row.try_get(1)?;
        let live: i64 = row.try_get(2)?;
        let left_us: Option<i64> = row.try_get(3)?;
        if mine != 0 {
            return Ok(Some(token));
        }
        if live == 0 {
            q(&sql.tx_take)
                .bind(marker.as_bytes())
                .bind(HOLDER.as_str())
                .bind(name.as_bytes())
                .execute(&mut *conn)
                .await
                .map_err(map_err)?;
            return Ok(Some(token + 1));
        }
        // A millisecond past the expiry, so the next look finds it passed.
        let left =
            Duration::from_micros(left_us.unwrap_or(0).max(0) as u64) + Duration::from_millis(1);
        if let Some(deadline) = deadline {
            if Instant::now() + left > deadline {
                return busy(name, wait);
            }
        }
        tokio::time::sleep(left).await;
    }
}

/// Takes the row's lock with `INSERT ... ON DUPLICATE KEY UPDATE`, the
/// server-side wait bounded by `deadline`.
async fn take_row(
    conn: &mut MySqlConnection,
    sql: &Sql,
    name: &str,
    marker: &str,
    first_token: u64,
    deadline: Option<Instant>,
) -> Result<(), sqlx::Error> {
    let mariadb: bool = sqlx::query_scalar(IS_MARIADB).fetch_one(&mut *conn).await?;
    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let secs = left.map(|left| left.as_secs() + u64::from(left.subsec_nanos() > 0));
    let statement = if mariadb {
        // MariaDB sets the lock wait, and lifts a configured
        // max_statement_time, for this one statement only: nothing is left
        // on the connection, even if this future is dropped mid-wait. SET
        // STATEMENT takes no placeholders; `secs` is an integer computed
        // here, never the caller's text.
        let vars = match secs {
            Some(secs) => format!("innodb_lock_wait_timeout = {secs}, max_statement_time = 0"),
            None => "max_statement_time = 0".to_owned(),
        };
        let sql = format!("SET STATEMENT {vars} FOR {}", sql.tx_lock);
        sqlx::query(AssertSqlSafe(sql))
    } else {
        q(&sql.tx_lock)
    };
    let statement = statement
        .bind(name.as_bytes())
        .bind(marker.as_bytes())
        .bind(HOLDER.as_str())
        .bind(first_token)
        .bind(marker.as_bytes())
        .bind(HOLDER.as_str());
    let Some(secs) = secs.filter(|_| !mariadb) else {
        statement.execute(&mut *conn).await?;
        return Ok(());
    };
    // MySQL has no SET STATEMENT for this variable: the session's value is
    // changed around the statement (and left changed if this is dropped
    // mid-wait; see the cancel safety note).
    sqlx::query(SET_LOCK_WAIT)
        .bind(secs)
        .execute(&mut *conn)
        .await?;
    let outcome = statement.execute(&mut *conn).await;
    let restored = sqlx::query(RESTORE_LOCK_WAIT).execute(&mut *conn).await;
    outcome?;
    restored?;
    Ok(())
}

/// Renamed [`lock_in_transaction`]: the same name on PostgreSQL and MySQL.
///
/// # Cancel safety
/// As for [`lock_in_transaction`].
#[deprecated(since = "0.2.0", note = "renamed `lock_in_transaction`")]
pub async fn lock_in_tx(tx: &mut Transaction<'_, MySql>, name: &str) -> Result<u64> {
    lock_in_transaction(tx, name).await
}

/// Renamed [`lock_in_transaction_with`]: the same name on PostgreSQL and
/// MySQL.
///
/// # Cancel safety
/// As for [`lock_in_transaction_with`].
#[deprecated(since = "0.2.0", note = "renamed `lock_in_transaction_with`")]
pub async fn lock_in_tx_with(
    tx: &mut Transaction<'_, MySql>,
    name: &str,
    wait: Wait,
) -> Result<Option<u64>> {
    lock_in_transaction_with(tx, name, wait).await
}
