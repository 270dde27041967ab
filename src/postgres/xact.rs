//! Transaction-scoped advisory locks.

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::{Connection, Postgres, Transaction};
use tokio::time::Instant;

use super::token::sequence_token;
use super::{advisory_key, engine, map_err, Lifted, LIFT_SERVER_TIMEOUTS};
use crate::name::validate_name;
use crate::{Error, Result, Wait};

// The lock runs inside a savepoint so that a timeout or an error rolls back
// only the savepoint, never the caller's transaction. A statement before it
// lifts statement_timeout (a role's setting must not cut the wait short;
// PostgreSQL arms it when a statement starts) and reports the old values,
// $3 (and idle_in_transaction_session_timeout, $4). lock_timeout is set for
// the wait; all three are put back to their previous values in the same
// statement, after the wait, so the caller's later statements keep their own
// settings (a rolled-back savepoint puts them back by itself).
static WAIT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, set_config('lock_timeout', old, true),
       set_config('statement_timeout', $3, true),
       set_config('idle_in_transaction_session_timeout', $4, true)
  FROM (SELECT old, pg_advisory_xact_lock($1)
          FROM (SELECT old, set_config('lock_timeout', $2, true)
                  FROM (SELECT current_setting('lock_timeout') AS old) o OFFSET 0) cfg
        OFFSET 0) l",
        sequence_token()
    )
});
static TRY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT CASE WHEN pg_try_advisory_xact_lock($1) THEN {} END",
        sequence_token()
    )
});

/// SQLSTATE 42883: a function the statement calls does not exist (on an
/// engine that is not PostgreSQL, `pg_walfile_name` for one).
fn is_undefined_function(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42883"))
}

/// Takes the exclusive advisory lock `name` for the rest of the caller's
/// transaction (`pg_advisory_xact_lock`): COMMIT or ROLLBACK releases it.
/// Waits until the lock is free and returns a fencing token from the same
/// sequence as [`Advisory`](super::Advisory), so the two kinds of holder of a
/// name see increasing tokens. The key is [`advisory_key`], so a session lock
/// taken by [`Advisory`](super::Advisory) and this lock exclude each other.
///
/// Within one transaction the lock is re-entrant (the transaction is the
/// holder); each call returns a new token.
///
/// The wait is bounded by the `wait` given and nothing else: a role's or
/// database's `statement_timeout` (and `idle_in_transaction_session_timeout`)
/// is lifted for the waiting statement and put back afterwards, so the
/// caller's later statements keep their own settings.
///
/// Works through a transaction-pooling proxy (PgBouncer
/// `pool_mode=transaction`): its statements are unnamed, so they need no
/// prepared statement to survive on a server connection, and the
/// transaction keeps one server connection throughout. On CockroachDB or
/// YugabyteDB it fails with [`Error::Unsupported`].
///
/// ```no_run
/// # async fn job(pool: sqlx::PgPool) -> dblock::Result<()> {
/// let mut tx = pool.begin().await?;
/// let token = dblock::postgres::lock_in_transaction(&mut tx, "billing:2026-11-24").await?;
/// sqlx::query("UPDATE invoices SET fence = $1 WHERE fence < $1").bind(token as i64).execute(&mut *tx).await?;
/// tx.commit().await?; // releases the lock
/// # Ok(()) }
/// ```
///
/// # Cancel safety
/// If dropped while waiting, the savepoint it opened is rolled back the next
/// time the transaction is used (sqlx first waits for the pending
/// statement), which releases the lock if it was granted meanwhile. The
/// caller's transaction stays usable.
pub async fn lock_in_transaction(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<u64> {
    match lock_in_transaction_with(tx, name, Wait::Forever).await? {
        Some(token) => Ok(token),
        None => unreachable!("a lock waited for forever is granted or fails"),
    }
}

/// [`lock_in_transaction`] with a bound on the wait: [`Wait::No`] answers `Ok(None)`
/// when the lock is held elsewhere, [`Wait::For`] fails with
/// [`Error::Timeout`] when the time runs out. Neither outcome, nor any error,
/// aborts the caller's transaction.
///
/// # Cancel safety
/// As for [`lock_in_transaction`].
pub async fn lock_in_transaction_with(
    tx: &mut Transaction<'_, Postgres>,
    name: &str,
    wait: Wait,
) -> Result<Option<u64>> {
    validate_name(name)?;
    let key = advisory_key(name);
    let deadline = match wait {
        Wait::For(d) => {
            if d > crate::request::MAX_DURATION {
                return Err(Error::InvalidOption(format!(
                    "wait of {d:?} is above the maximum of 366 days"
                )));
            }
            Some(Instant::now() + d)
        }
        _ => None,
    };
    loop {
        let mut savepoint = tx.begin().await?;
        let outcome = match (wait, deadline) {
            (Wait::No, _) => sqlx::query_scalar::<_, Option<i64>>(TRY.as_str())
                .persistent(false)
                .bind(key)
                .fetch_one(&mut *savepoint)
                .await
                .map(|t| t.map(|t| t as u64)),
            (_, deadline) => {
                let ms = match deadline {
                    None => 0,
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now()).as_millis();
                        // "0" would mean forever: a spent deadline still
                        // gets one minimal try.
                        left.clamp(1, i32::MAX as u128) as i64
                    }
                };
                match sqlx::query_as::<_, Lifted>(LIFT_SERVER_TIMEOUTS)
                    .persistent(false)
                    .fetch_one(&mut *savepoint)
                    .await
                {
                    Ok((statement_timeout, idle_timeout, _, _)) => {
                        sqlx::query_as::<_, (i64, String, String, String)>(WAIT.as_str())
                            .persistent(false)
                            .bind(key)
                            .bind(format!("{ms}ms"))
                            .bind(statement_timeout)
                            .bind(idle_timeout)
                            .fetch_one(&mut *savepoint)
                            .await
                            .map(|(t, _, _, _)| Some(t as u64))
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match outcome {
            Ok(token) => {
                savepoint.commit().await?;
                return Ok(token);
            }
            Err(e) => {
                savepoint.rollback().await?;
                let timed_out = matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"));
                match (timed_out, deadline) {
                    (true, Some(d)) if Instant::now() >= d => {
                        return Err(Error::Timeout {
                            name: name.to_owned(),
                            waited: match wait {
                                Wait::For(w) => w,
                                _ => Duration::ZERO,
                            },
                        })
                    }
                    // lock_timeout caps at about 24 days: wait another round.
                    (true, _) => continue,
                    (false, _) if is_undefined_function(&e) => {
                        // Not PostgreSQL? Only now, off the common path, is
                        // the engine asked.
                        let version: String = sqlx::query_scalar("SELECT version()")
                            .persistent(false)
                            .fetch_one(&mut **tx)
                            .await?;
                        return Err(match engine::refusal(&version) {
                            Some(why) => engine::unsupported("postgres-xact", why),
                            None => map_err(e),
                        });
                    }
                    (false, _) => return Err(map_err(e)),
                }
            }
        }
    }
}

/// Renamed [`lock_in_transaction`]: the same name on PostgreSQL and MySQL.
///
/// # Cancel safety
/// As for [`lock_in_transaction`].
#[deprecated(since = "0.2.0", note = "renamed `lock_in_transaction`")]
pub async fn lock_xact(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<u64> {
    lock_in_transaction(tx, name).await
}

/// Renamed [`lock_in_transaction_with`]: the same name on PostgreSQL and
/// MySQL.
///
/// # Cancel safety
/// As for [`lock_in_transaction_with`].
#[deprecated(since = "0.2.0", note = "renamed `lock_in_transaction_with`")]
pub async fn lock_xact_with(
    tx: &mut Transaction<'_, Postgres>,
    name: &str,
    wait: Wait,
) -> Result<Option<u64>> {
    lock_in_transaction_with(tx, name, wait).await
}
