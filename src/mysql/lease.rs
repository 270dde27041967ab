//! `dblock::mysql::Lease`: lease rows claimed under `SELECT ... FOR UPDATE`.

use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::MySqlArguments;
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, MySql, MySqlPool, Row, Transaction};

use super::doorbell::{bells, Bells};
use super::engine::Engine;
#[path = "lease_permits.rs"]
mod permits;
use super::{
    code, error_number, is_lock_busy, map_err, micros, quote_table, Conn, Warm, DEFAULT_TABLE,
};
use crate::lease::permits::{holders_table, merge_list};
use crate::lease::{
    lease_backend, Claim, Claimed, LeaseEngine, LeaseId, LeaseOptions, LeaseStore, NewExpiry,
    Renewal, Renewed, Wakeups, SWEEP_BATCH,
};
use crate::{validate_table, LockInfo, LockMode, Result, Wait};
use permits::PermitSql;

/// MySQL / MariaDB leases: one row per name in a lease table, claimed in a
/// short transaction under a `SELECT ... FOR UPDATE` row lock, renewed in
/// the background, expiring by the server's `UTC_TIMESTAMP(6)`.
///
/// Works with MySQL 8.0 and MariaDB 10.6 or later. Run
/// [`migrate`](super::migrate) once (or apply `migrations/mysql/`), or a
/// backend used before will answer
/// [`Error::SchemaMissing`](crate::Error::SchemaMissing).
///
/// - `.ttl()` is the lease length (default 30 s); the lease is renewed every
///   ttl/3 and the guard reports itself lost when a renewal fails or does
///   not complete before its local deadline. Renewal is batched: every lease
///   due is renewed in one short transaction per renewal tick (see the
///   [module docs](super)).
/// - `.hold_at_least(d)` keeps the lease until `acquired_at + d` (database
///   clock) even when released sooner.
/// - **Semaphores** (`max_holders(n)`): each permit is a row of
///   `dblock_leases_holders` (migration 3; for a table of your own, the
///   same name with `_holders` appended), its token the name's next; the
///   name's lease row is the semaphore's marker while permits are live. A
///   permit claim is one short transaction under the marker's row lock
///   (`NOWAIT`, like a plain claim), so claims of one name never grant more
///   than `n`. The permits (and readers) due at a renewal tick renew in one
///   transaction of their own (their markers locked first, in key order),
///   beside the batch of
///   plain leases.
/// - **Shared (reader) leases** (`.shared()`): readers are rows of the
///   holders table, taken like permits; a waiting writer keeps new readers
///   out (see the [module docs](super)). Readers and permits ring release
///   doorbells too, so a writer waiting in another process wakes when the
///   last reader's process lets go (if readers of one name live in several
///   processes, only the first one's bell rings; the others' releases are
///   noticed within `max_poll`).
/// - Waiting polls the row with backoff between
///   [`LeaseOptions::min_poll`] and [`LeaseOptions::max_poll`]; a release in
///   this process wakes local waiters at once, and a release in another
///   process wakes them through a doorbell: the holder's process holds the
///   named lock `GET_LOCK('dblock:<hash of database, table and name>')` on
///   a connection of its own (outside the pool) while it holds the lease,
///   and a waiting process blocks in `GET_LOCK` for it on another
///   connection of its own, one per waited name, at most 4 per backend
///   (past that, waiters poll). Not on Galera, where `GET_LOCK` is local
///   to one node: there waiters poll. Bell connections lift
///   `max_statement_time` / `max_execution_time` for their own session.
/// - Not re-entrant: a second acquisition of a held name waits.
/// - A transaction holding the name through [`lock_in_transaction`](super::lock_in_transaction)
///   excludes leases of that name until it ends. While it holds the row, a
///   lease of the name that was live before cannot be renewed (the batch
///   renewal skips the locked row; `extend` and release wait for the row
///   lock): it runs out, its guard reports itself lost, and the transaction
///   takes the name over. The other leases of the batch are not held up.
///
/// The session settings of the pool do not matter: isolation level
/// (`REPEATABLE READ` or `READ COMMITTED`), `time_zone`, `sql_mode`.
/// Sessions must be in autocommit mode, as sqlx leaves them (renewal and
/// release are single statements outside any transaction); a pool whose
/// `after_connect` runs `SET autocommit = 0` would keep row locks open.
///
/// Tokens are counted per name in its row, starting at 1. A row whose
/// lease ended is deleted by a background sweep about 2 s later; the
/// highest token swept from the table is kept in `dblock_token_floor`
/// (migration 2) and a new row starts above it, so a name's token never
/// goes back. Do not prune the table yourself: a row deleted without
/// raising the floor lets its name's tokens go back.
///
/// ```no_run
/// # async fn demo(pool: sqlx::MySqlPool) -> dblock::Result<()> {
/// use std::time::Duration;
/// dblock::mysql::migrate(&pool).await?;
/// let locks = dblock::Locks::new(dblock::mysql::Lease::new(pool));
/// let guard = locks.acquire("reports:nightly").ttl(Duration::from_secs(30)).await?;
/// // ... work, passing guard.token() to what you write ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Lease {
    engine: LeaseEngine<MySqlStore>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("table", &self.engine.store().sql.table)
            .field("options", self.engine.options())
            .finish()
    }
}

impl Lease {
    /// Leases in the table `dblock_leases` of the pool's database, with
    /// default [`LeaseOptions`].
    pub fn new(pool: MySqlPool) -> Lease {
        let engine = Arc::default();
        Lease::build(
            MySqlStore {
                bells: Arc::new(bells(&pool, DEFAULT_TABLE, Arc::clone(&engine))),
                warm: Warm::new(pool.clone()),
                pool,
                sql: Arc::new(Sql::new(DEFAULT_TABLE)),
                permits: permit_sql(DEFAULT_TABLE),
                packet_budget: Arc::default(),
                engine,
            },
            LeaseOptions::default(),
        )
        .expect("the default options are valid")
    }

    /// Uses another lease table, `table` or `schema.table`, which must have
    /// the columns of `migrations/mysql/0001_dblock.sql` ([`migrate`](super::migrate)
    /// creates only `dblock_leases`). Its token floor is kept in the pool's
    /// database's `dblock_token_floor` (migration 2) under `table` as given. Fails with
    /// [`Error::InvalidOption`](crate::Error::InvalidOption) unless the name
    /// is a plain identifier (see [`validate_table`]).
    pub fn with_table(self, table: impl Into<String>) -> Result<Self> {
        let table = table.into();
        let table = table.as_str();
        validate_table(table)?;
        let store = MySqlStore {
            bells: Arc::new(bells(
                &self.engine.store().pool,
                table,
                self.engine.store().engine.clone(),
            )),
            pool: self.engine.store().pool.clone(),
            sql: Arc::new(Sql::new(table)),
            permits: permit_sql(table),
            packet_budget: self.engine.store().packet_budget.clone(),
            engine: self.engine.store().engine.clone(),
            warm: self.engine.store().warm.clone(),
        };
        Lease::build(store, self.engine.options().clone())
    }

    /// Replaces the options (see [`LeaseOptions`]) after checking them:
    /// [`Error::InvalidOption`](crate::Error::InvalidOption) unless
    /// `0 < min_poll <= max_poll`. Like `with_options` on every backend, it
    /// returns a new backend over the same pool and table: locks held through `self`
    /// stay with `self` (configure the backend before taking locks).
    pub fn with_options(self, options: LeaseOptions) -> Result<Self> {
        Lease::build(self.engine.store().clone(), options)
    }

    fn build(store: MySqlStore, options: LeaseOptions) -> Result<Self> {
        // A fresh engine, so that settings never change under a clone that
        // is already in use.
        Ok(Lease {
            engine: LeaseEngine::new(store, Wakeups::new(), options)?,
        })
    }

    /// The pool this backend uses.
    pub fn pool(&self) -> &MySqlPool {
        &self.engine.store().pool
    }

    /// The lease table's name, as given.
    pub fn table(&self) -> &str {
        &self.engine.store().sql.table
    }

    /// What the server is (see [`Engine`]), asked once per backend and its
    /// clones: the engine self-test the first claim, inspection or listing
    /// runs before anything else.
    ///
    /// # Cancel safety
    /// Cancel safe: a plain read, remembered only once it completes.
    pub async fn engine(&self) -> Result<Engine> {
        self.engine.store().engine().await.cloned()
    }

    /// [`lock_in_transaction_with`](super::lock_in_transaction_with) on this backend's table:
    /// locks `name` for the rest of `tx`, excluding this backend's leases of
    /// the same name, and returns a fencing token (`Ok(None)` for
    /// [`Wait::No`] when the name is held elsewhere).
    ///
    /// # Cancel safety
    /// As for [`lock_in_transaction_with`](super::lock_in_transaction_with): if dropped, roll
    /// the transaction back.
    pub async fn lock_in_transaction_with(
        &self,
        tx: &mut Transaction<'_, MySql>,
        name: &str,
        wait: Wait,
    ) -> Result<Option<u64>> {
        super::xact::lock(tx, &self.engine.store().sql, name, wait).await
    }

    /// Renamed [`lock_in_transaction_with`](Self::lock_in_transaction_with),
    /// after the free function it mirrors.
    ///
    /// # Cancel safety
    /// As for [`lock_in_transaction_with`](Self::lock_in_transaction_with).
    #[deprecated(since = "0.2.0", note = "renamed `lock_in_transaction_with`")]
    pub async fn lock_in_tx(
        &self,
        tx: &mut Transaction<'_, MySql>,
        name: &str,
        wait: Wait,
    ) -> Result<Option<u64>> {
        self.lock_in_transaction_with(tx, name, wait).await
    }
}

lease_backend!(Lease);

/// The statements for one lease table, built once per table.
pub(crate) struct Sql {
    pub table: String,
    claim_lock: Arc<str>,
    claim_take: Arc<str>,
    claim_mark: Arc<str>,
    claim_one: Arc<str>,
    create_row: Arc<str>,
    pub floor_read: Arc<str>,
    pub floor_ensure: Arc<str>,
    sweep_floor: Arc<str>,
    sweep_cutoff: Arc<str>,
    sweep_candidates: Arc<str>,
    sweep_rows: Arc<str>,
    sweep_raise: Arc<str>,
    sweep_delete: Arc<str>,
    renew: Causal,
    renew_read: Causal,
    renew_lock: Arc<str>,
    renew_apply: Arc<str>,
    renew_check: Causal,
    release: Causal,
    force_release: Causal,
    inspect: Causal,
    list: Causal,
    pub tx_lock: Arc<str>,
    pub tx_read: Arc<str>,
    pub tx_take: Arc<str>,
}

/// The statements on `dblock_leases`, for the free functions.
pub(crate) static DEFAULT_SQL: LazyLock<Sql> = LazyLock::new(|| Sql::new(DEFAULT_TABLE));

/// The one-statement MariaDB claim and the release on `table`, exactly as
/// a lease pair sends them, for the benchmark's "raw, same work" baseline
/// (`benches/compare/limit.rs`). Binds: claim (owner, holder, ttl µs, name,
/// and twice the writer's wait in µs, `NULL` for a plain claim), release
/// (hold µs, name, owner, token). Not a stable interface.
#[doc(hidden)]
pub fn bench_claim_release_sql(table: &str) -> Result<[String; 2]> {
    validate_table(table)?;
    let sql = Sql::new(table);
    Ok([sql.claim_one.to_string(), sql.release.on(false).to_string()])
}

/// The columns of a batch's JSON document, `[[name in hex, owner, token,
/// ttl µs], ...]`, numbered from 1. Names go in hex so that they reach the
/// `VARBINARY` column byte for byte, whatever the character sets.
const BATCH_ROWS: &str = "'$[*]' COLUMNS (i FOR ORDINALITY, \
    name VARCHAR(510) PATH '$[0]', owner VARCHAR(64) PATH '$[1]', \
    token BIGINT UNSIGNED PATH '$[2]', ttl BIGINT PATH '$[3]')";

/// `BEGIN` of a claim on a Galera node: first wait until the node has
/// applied every write set the cluster committed before it
/// (`wsrep_sync_wait`). A Galera node applies other nodes' write sets
/// asynchronously, so a plain read there may miss a release (or a grant)
/// that already committed elsewhere. Safety never depends on it (a claim
/// writes, and a write based on a stale row fails certification), but a
/// caller told "released" by a client of another node must find the name
/// free, and inspect must show a lease granted elsewhere. On a statement
/// inside a transaction the server skips the wait: it has to be the
/// transaction's start.
const BEGIN_CAUSAL: &str = "SET STATEMENT wsrep_sync_wait = 3 FOR START TRANSACTION";

/// `BEGIN`, or on a Galera node [`BEGIN_CAUSAL`].
pub(super) fn begin_sql(galera: bool) -> &'static str {
    if galera {
        BEGIN_CAUSAL
    } else {
        "BEGIN"
    }
}

/// A statement that must see every write committed before it, whichever
/// node of a Galera cluster committed it, and the same statement as sent
/// to a Galera node: prefixed with the wait of [`BEGIN_CAUSAL`]
/// (`wsrep_sync_wait = 3`: before reads, updates and deletes).
///
/// Inspection and listing need it to show a lease granted elsewhere; a
/// holder's renewal and release and an operator's forced release need it
/// to find the lease at all. Without it, a node that has not yet applied
/// the grant answers from its stale copy: the lease seems gone, a
/// renewal or release reports the lock lost and a forced release frees
/// nothing. A holder meets that when a load balancer moves its
/// connections to another node; an operator on any node but the
/// holder's. In an open transaction the server does not wait: those
/// start with [`BEGIN_CAUSAL`] instead.
#[derive(Debug)]
pub(crate) struct Causal {
    plain: Arc<str>,
    galera: Arc<str>,
}

impl Causal {
    pub(crate) fn new(sql: String) -> Causal {
        Causal {
            galera: format!("SET STATEMENT wsrep_sync_wait = 3 FOR {sql}").into(),
            plain: sql.into(),
        }
    }

    /// The statement to send: causal (`galera`, from
    /// [`MySqlStore::checked`]) or plain.
    pub(crate) fn on(&self, galera: bool) -> &Arc<str> {
        if galera {
            &self.galera
        } else {
            &self.plain
        }
    }
}

/// The table of each lease table's token floor (see
/// `migrations/mysql/0002_token_floor.sql`), in the pool's database.
const FLOOR: &str = "dblock_token_floor";

/// The epoch as a `DATETIME` literal: `TIMESTAMPDIFF` from it gives
/// microseconds since 1970 in UTC without any time zone conversion.
const EPOCH: &str = "TIMESTAMP'1970-01-01 00:00:00'";

impl Sql {
    pub(crate) fn new(table: &str) -> Sql {
        let t = quote_table(table);
        let s = |sql: String| -> Arc<str> { sql.into() };
        // Locks the row (never waiting for another transaction's lock),
        // and reads the server clock for the new lease in passing.
        let claim_lock = format!(
            "SELECT token, expires_at > UTC_TIMESTAMP(6) AS live, \
                    UTC_TIMESTAMP(6) AS now, \
                    UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND AS until, \
                    mode = 's' AS readers \
               FROM {t} WHERE name = ? FOR UPDATE NOWAIT"
        );
        let inspect = format!(
            "SELECT holder, token, acquired_at, expires_at FROM {t} \
              WHERE name = ? AND expires_at > UTC_TIMESTAMP(6)"
        );
        let list = format!(
            "SELECT name, holder, token, acquired_at, expires_at FROM {t} \
              WHERE expires_at > UTC_TIMESTAMP(6) ORDER BY name"
        );
        Sql {
            table: table.to_owned(),
            claim_lock: s(claim_lock),
            // Repeats what the locking read found (the token, no live
            // lease): under the row lock that changes nothing, but on Galera
            // a transaction aborted by another node's write (a brute-force
            // abort) can go unreported to a prepared statement, which then
            // runs on its own in autocommit; this one must not then
            // overwrite the lease that other node just granted.
            claim_take: s(format!(
                "UPDATE {t} SET owner = ?, holder = ?, mode = 'x', token = token + 1, \
                        acquired_at = ?, expires_at = ?, writer_waiting_until = NULL \
                  WHERE name = ? AND token = ? AND expires_at <= UTC_TIMESTAMP(6)"
            )),
            // Under the claim's row lock, on a name held by readers: a
            // writer that is going to wait keeps new readers out (see
            // `lease::permits`, "Readers").
            claim_mark: s(format!(
                "UPDATE {t} SET writer_waiting_until = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                  WHERE name = ? AND mode = 's' AND expires_at > UTC_TIMESTAMP(6)"
            )),
            // MariaDB, not Galera: the whole claim in one autocommit
            // statement. The row is read with `FOR UPDATE NOWAIT` (busy at
            // once if another transaction holds it, as in the transaction
            // above), so it cannot be swept or changed before the upsert
            // decides; a name without a row inserts nothing (the row is
            // then created as below). The row is taken only if its lease
            // has ended: every condition reads the old `expires_at`, which
            // is assigned last, and `UTC_TIMESTAMP(6)` is one instant for
            // the whole statement. `RETURNING` answers the row as it is
            // afterwards: ours (owner) with its new token and expiry, or
            // someone else's. A writer that is going to wait (the mark's
            // length in µs, bound twice, not NULL) marks a name held by
            // readers (see `claim_mark`); a take clears the mark. It is
            // assigned first, while `mode` is still the old one.
            claim_one: s(format!(
                "INSERT INTO {t} (name, owner, holder, mode, token, acquired_at, expires_at) \
                 SELECT s.name, ?, ?, 'x', s.token + 1, UTC_TIMESTAMP(6), \
                        UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                   FROM {t} AS s WHERE s.name = ? FOR UPDATE NOWAIT \
                 ON DUPLICATE KEY UPDATE \
                    writer_waiting_until = IF({t}.expires_at <= UTC_TIMESTAMP(6), NULL, \
                        IF(? IS NOT NULL AND {t}.mode = 's', \
                           UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, {t}.writer_waiting_until)), \
                    owner = IF({t}.expires_at <= UTC_TIMESTAMP(6), VALUES(owner), {t}.owner), \
                    holder = IF({t}.expires_at <= UTC_TIMESTAMP(6), VALUES(holder), {t}.holder), \
                    mode = IF({t}.expires_at <= UTC_TIMESTAMP(6), 'x', {t}.mode), \
                    token = IF({t}.expires_at <= UTC_TIMESTAMP(6), {t}.token + 1, {t}.token), \
                    acquired_at = IF({t}.expires_at <= UTC_TIMESTAMP(6), VALUES(acquired_at), {t}.acquired_at), \
                    expires_at = IF({t}.expires_at <= UTC_TIMESTAMP(6), VALUES(expires_at), {t}.expires_at) \
                 RETURNING owner, token, expires_at"
            )),
            // Outside the claim's transaction: a free row whose token is
            // the table's floor (bound, read under a share lock in the same
            // short transaction), so the first holder gets a token above
            // every token ever swept from the table.
            create_row: s(format!(
                "INSERT IGNORE INTO {t} (name, owner, holder, mode, token, acquired_at, expires_at) \
                 VALUES (?, NULL, NULL, 'x', ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"
            )),
            // The floor, under a share lock: a sweep holds the row's
            // exclusive lock from before it deletes anything until it
            // commits, so a new row starts at the floor that sweep left.
            floor_read: s(format!(
                "SELECT floor FROM {FLOOR} WHERE lease_table = ? LOCK IN SHARE MODE"
            )),
            // Autocommit, once per table: under READ COMMITTED a locking
            // read of a missing row locks nothing, so the row must exist.
            floor_ensure: s(format!(
                "INSERT IGNORE INTO {FLOOR} (lease_table, floor) VALUES (?, 0)"
            )),
            // The sweep. Outside its transaction: a cutoff fixed from the
            // server clock (no write ever sets an expiry in the past, so no
            // row enters the range below it later), ...
            sweep_cutoff: s("SELECT UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND".to_owned()),
            // ... and the rows ended before it, read without locking
            // anything (nothing to sweep: no transaction at all). A locking
            // read of that range would take next-key locks on the
            // `expires_at` index under REPEATABLE READ, up to the first
            // entry past the range, often a lease just released (or, with
            // every row ended, the end of the index, where each claim
            // enters its new expiry): a claim of another name, whose
            // statement may not wait (`NOWAIT`), was refused as busy.
            sweep_candidates: s(format!(
                "SELECT HEX(name) FROM {t} WHERE expires_at < ? \
                  ORDER BY expires_at LIMIT {SWEEP_BATCH}"
            )),
            // Then one transaction: the floor row's exclusive lock first
            // (never waiting: creators hold it in share briefly, a
            // transaction in lock_in_tx for as long as it runs), ...
            sweep_floor: s(format!(
                "SELECT floor FROM {FLOOR} WHERE lease_table = ? FOR UPDATE NOWAIT"
            )),
            // ... those rows locked one by one by primary key (a record lock
            // each, no gap), skipping rows another transaction holds (a
            // claim deciding, a lock_in_tx), and kept only if still ended
            // before the cutoff, as read under the lock, ...
            sweep_rows: s(format!(
                "SELECT HEX(l.name), l.token \
                   FROM JSON_TABLE(?, '$[*]' COLUMNS (name VARCHAR(510) PATH '$')) AS j \
                   STRAIGHT_JOIN {t} AS l FORCE INDEX (PRIMARY) ON l.name = UNHEX(j.name) \
                  WHERE l.expires_at < ? FOR UPDATE SKIP LOCKED"
            )),
            // ... the floor raised to the highest of their tokens, ...
            sweep_raise: s(format!(
                "UPDATE {FLOOR} SET floor = GREATEST(floor, ?) WHERE lease_table = ?"
            )),
            // ... and exactly those rows deleted, found by primary key.
            sweep_delete: s(format!(
                "DELETE l FROM JSON_TABLE(?, '$[*]' COLUMNS (name VARCHAR(510) PATH '$')) AS j \
                   STRAIGHT_JOIN {t} AS l FORCE INDEX (PRIMARY) ON l.name = UNHEX(j.name) \
                  WHERE l.expires_at < ?"
            )),
            // The new expiry goes through LAST_INSERT_ID(µs since 1970), which
            // the server returns with the statement's OK: one round trip
            // yields both "still ours" (non-zero) and the new expiry.
            renew: Causal::new(format!(
                "UPDATE {t} SET expires_at = {EPOCH} + INTERVAL LAST_INSERT_ID(\
                        TIMESTAMPDIFF(MICROSECOND, {EPOCH}, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND)\
                    ) MICROSECOND \
                  WHERE name = ? AND owner = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)"
            )),
            renew_read: Causal::new(format!(
                "SELECT expires_at FROM {t} WHERE name = ? AND owner = ? AND token = ?"
            )),
            // Batch renewal, in one short transaction: lock the rows of the
            // batch that are still ours and live, skipping rows another
            // transaction has locked (a transaction in lock_in_tx may hold
            // one for long: waiting for it would stall the whole batch).
            // JSON_TABLE drives and each row is found by primary key, so
            // no other row is read or locked. Also reads the server clock.
            renew_lock: s(format!(
                "SELECT CAST(j.i AS SIGNED), TIMESTAMPDIFF(MICROSECOND, {EPOCH}, UTC_TIMESTAMP(6)) \
                   FROM JSON_TABLE(?, {BATCH_ROWS}) AS j \
                   STRAIGHT_JOIN {t} AS l FORCE INDEX (PRIMARY) ON l.name = UNHEX(j.name) \
                  WHERE l.owner = CAST(j.owner AS BINARY) AND l.token = j.token \
                    AND l.expires_at > UTC_TIMESTAMP(6) \
                    FOR UPDATE SKIP LOCKED"
            )),
            // Then renew exactly the rows locked, each to the clock read
            // under the locks (bound, in µs since 1970) plus its own ttl.
            renew_apply: s(format!(
                "UPDATE JSON_TABLE(?, {BATCH_ROWS}) AS j \
                   STRAIGHT_JOIN {t} AS l FORCE INDEX (PRIMARY) ON l.name = UNHEX(j.name) \
                    SET l.expires_at = {EPOCH} + INTERVAL (? + j.ttl) MICROSECOND \
                  WHERE l.owner = CAST(j.owner AS BINARY) AND l.token = j.token"
            )),
            // Of the leases the locking read did not return: those still
            // ours and live were skipped because locked (unknown, retried);
            // the others are gone. A plain read, which never waits.
            renew_check: Causal::new(format!(
                "SELECT CAST(j.i AS SIGNED) \
                   FROM JSON_TABLE(?, {BATCH_ROWS}) AS j \
                   STRAIGHT_JOIN {t} AS l FORCE INDEX (PRIMARY) ON l.name = UNHEX(j.name) \
                  WHERE l.owner = CAST(j.owner AS BINARY) AND l.token = j.token \
                    AND l.expires_at > UTC_TIMESTAMP(6)"
            )),
            // `token = LAST_INSERT_ID(token)` changes nothing but reports a
            // match (tokens are >= 1) whatever the affected-rows semantics.
            // The owner is cleared so that no renewal (a batch in flight,
            // say) can match the row again, even while `hold` keeps it.
            release: Causal::new(format!(
                "UPDATE {t} SET expires_at = GREATEST(UTC_TIMESTAMP(6), acquired_at + INTERVAL ? MICROSECOND), \
                        owner = NULL, token = LAST_INSERT_ID(token) \
                  WHERE name = ? AND owner = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)"
            )),
            force_release: Causal::new(format!(
                "UPDATE {t} SET expires_at = UTC_TIMESTAMP(6), owner = NULL, \
                        token = LAST_INSERT_ID(token) \
                  WHERE name = ? AND expires_at > UTC_TIMESTAMP(6)"
            )),
            inspect: Causal::new(inspect),
            list: Causal::new(list),
            // lock_in_tx: creates the row or takes its lock in one statement
            // (an X record lock on the primary key either way, never a gap
            // lock), bumping the token if no lease is live. A new row's
            // token is one above the table's floor (bound: read under a
            // share lock first, see `floor_read`).
            tx_lock: s(format!(
                "INSERT INTO {t} (name, owner, holder, mode, token, acquired_at, expires_at) \
                 VALUES (?, ?, ?, 'x', ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)) \
                 ON DUPLICATE KEY UPDATE \
                    token = IF(expires_at <= UTC_TIMESTAMP(6), token + 1, token), \
                    owner = IF(expires_at <= UTC_TIMESTAMP(6), ?, owner), \
                    holder = IF(expires_at <= UTC_TIMESTAMP(6), ?, holder), \
                    acquired_at = IF(expires_at <= UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), acquired_at)"
            )),
            // Run while holding the row lock, so it never waits; a locking
            // read sees the latest version whatever the snapshot.
            tx_read: s(format!(
                "SELECT token, owner <=> ? AS mine, expires_at > UTC_TIMESTAMP(6) AS live, \
                        TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at) AS left_us \
                   FROM {t} WHERE name = ? FOR UPDATE"
            )),
            tx_take: s(format!(
                "UPDATE {t} SET token = token + 1, owner = ?, holder = ?, acquired_at = UTC_TIMESTAMP(6) \
                  WHERE name = ?"
            )),
        }
    }
}

/// A prepared statement from one of the strings built at construction.
pub(crate) fn q(sql: &Arc<str>) -> Query<'static, MySql, MySqlArguments> {
    sqlx::query(AssertSqlSafe(sql.clone()))
}

/// Binds a lease's name, owner and token, the three parameters that pick
/// one lease (or holder) row in the statements that renew or release it.
pub(crate) fn bind_lease<'q>(
    q: Query<'q, MySql, MySqlArguments>,
    lease: LeaseId<'_>,
) -> Query<'q, MySql, MySqlArguments> {
    q.bind(lease.name.as_bytes())
        .bind(lease.owner.as_bytes())
        .bind(lease.token)
}

/// The lease store on one table.
#[derive(Clone)]
pub(crate) struct MySqlStore {
    pool: MySqlPool,
    sql: Arc<Sql>,
    /// The statements of semaphores' permits; `None` when the holders
    /// table's name would be too long.
    permits: Option<Arc<PermitSql>>,
    /// Bytes of JSON one batch statement may carry: half the server's
    /// `max_allowed_packet`, read at the first batch (0 until then).
    packet_budget: Arc<AtomicUsize>,
    /// The engine self-test's answer, once it has one.
    engine: Arc<tokio::sync::OnceCell<Engine>>,
    /// Release doorbells for waiters in other processes.
    bells: Arc<Bells>,
    /// Connections kept between claims and releases (see [`Warm`]).
    warm: Arc<Warm>,
}

/// The permit statements of lease table `table`, if its holders table has
/// a valid name.
fn permit_sql(table: &str) -> Option<Arc<PermitSql>> {
    holders_table(table).map(|h| Arc::new(PermitSql::new(table, &h)))
}

impl fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlStore")
            .field("table", &self.sql.table)
            .finish_non_exhaustive()
    }
}

/// How often a claim is retried after a deadlock, a snapshot conflict or a
/// duplicate key before it reports the name as busy.
const MAX_RETRIES: u32 = 8;

/// How many times a claim looks again at a row another transaction has
/// locked (after pauses of 2 to 28 ms in all) before answering busy. A
/// lease holder holds no row lock: the lock is a claim, renewal or release
/// of the name deciding, the sweep deleting its ended row, on Galera the
/// applier of a write set that committed on another node, all of which end
/// within milliseconds, or a transaction in `lock_in_transaction`, which
/// holds the name for as long as it runs (busy, then, after these pauses).
const LOCKED_RETRIES: u32 = 3;

/// What one claim transaction found.
enum Attempt {
    Done(Option<Claimed>),
    /// Held by readers, and marked by this waiting writer: commit the mark.
    Marked,
    Missing,
}

/// Errors that mean "contended, try again": deadlock, snapshot conflict,
/// duplicate key.
fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(
        error_number(e),
        Some(code::DEADLOCK | code::CHECKREAD | code::DUP_ENTRY)
    )
}

/// A short random pause before retry `attempt` (1-based): 2-4 ms, doubling
/// up to 32-64 ms.
async fn retry_pause(attempt: u32) {
    let cap = Duration::from_millis(2 << attempt.min(5));
    tokio::time::sleep(crate::retry::jitter(cap, 0.5)).await;
}

/// JSON bytes per batch statement until the server's `max_allowed_packet`
/// is known.
const DEFAULT_PACKET_BUDGET: usize = 4 << 20;

/// Appends `bytes` in lowercase hex.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
}

/// JSON arrays of `names` (hex, as `HEX()` answers them), as many names
/// per array as fit `budget` bytes (at least one).
fn names_json(names: &[String], budget: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = names;
    while !rest.is_empty() {
        let mut bytes = 2;
        let n = rest
            .iter()
            .take_while(|name| {
                bytes += name.len() + 3;
                bytes <= budget
            })
            .count()
            .max(1);
        let mut json = String::from("[");
        for (k, name) in rest[..n].iter().enumerate() {
            if k > 0 {
                json.push(',');
            }
            json.push('"');
            json.push_str(name);
            json.push('"');
        }
        json.push(']');
        out.push(json);
        rest = &rest[n..];
    }
    out
}

/// About how many bytes a lease takes in a batch's JSON document.
fn json_len(r: &Renewal) -> usize {
    2 * r.name.len() + r.owner.len() + 50
}

/// The JSON document of a batch: `[["name in hex","owner",token,ttl µs],...]`.
/// Owner ids are hex too (see [`new_owner`](crate::lease::new_owner)).
fn batch_json<'a>(batch: impl Iterator<Item = &'a Renewal>) -> String {
    let mut json = String::from("[");
    for (k, r) in batch.enumerate() {
        if k > 0 {
            json.push(',');
        }
        json.push_str("[\"");
        push_hex(&mut json, r.name.as_bytes());
        json.push_str("\",");
        crate::lease::push_json_str(&mut json, &r.owner);
        let _ = write!(json, ",{},{}]", r.token, micros(r.ttl));
    }
    json.push(']');
    json
}

fn utc(at: NaiveDateTime) -> DateTime<Utc> {
    at.and_utc()
}

/// `host:pid` fits the 255-character column.
fn clip(holder: &str) -> &str {
    match holder.char_indices().nth(255) {
        Some((i, _)) => &holder[..i],
        None => holder,
    }
}

impl MySqlStore {
    /// The engine self-test, run once: what the server is.
    async fn engine(&self) -> Result<&Engine> {
        if let Some(engine) = self.engine.get() {
            return Ok(engine);
        }
        // Boxed: the detection runs once, and every claim's future would
        // otherwise carry (and copy) its state.
        Box::pin(self.engine.get_or_try_init(|| super::engine(&self.pool))).await
    }

    /// The engine self-test's verdict on leases, and whether reads should
    /// be causal (see [`Sql`]'s `*_causal` statements).
    async fn checked(&self) -> Result<bool> {
        let engine = self.engine().await?;
        engine.check_leases()?;
        Ok(engine.causal_reads())
    }

    /// Whether claims run as one statement ([`Sql`]'s `claim_one`): on
    /// MariaDB (`INSERT ... RETURNING`, 10.5 and later) that is not a
    /// Galera node. Galera keeps the transaction, whose causal `BEGIN`
    /// and guarded `UPDATE` it needs; MySQL and TiDB have no `RETURNING`.
    async fn claims_in_one_statement(&self) -> Result<bool> {
        let engine = self.engine().await?;
        Ok(engine.flavor() == super::Flavor::MariaDb && !engine.is_galera())
    }

    /// One claim statement (MariaDB): the upsert of `claim_one`.
    async fn attempt_one(&self, claim: &Claim<'_>, ttl_us: i64) -> Result<Attempt, sqlx::Error> {
        let mut reuse = true;
        let outcome = loop {
            let mut conn = Conn::acquire_warm(&self.warm, reuse).await?;
            // Waiting for a connection can take long when the pool is busy; an
            // acquirer that left meanwhile gets nothing claimed for it.
            if (claim.abandoned)() {
                return Ok(Attempt::Done(None));
            }
            let outcome = q(&self.sql.claim_one)
                .bind(claim.owner.as_bytes())
                .bind(clip(claim.holder))
                .bind(ttl_us)
                .bind(claim.name.as_bytes())
                .bind(claim.writer_waits.map(micros))
                .bind(claim.writer_waits.map(micros))
                .fetch_optional(&mut *conn.begin_use())
                .await;
            conn.settle(&outcome);
            match outcome {
                // Safe to repeat: a claim that went through left the row
                // ours and live, and the same claim then answers it as it
                // is (our owner, token and expiry).
                Err(e) if reuse && conn.retry_elsewhere(&e) => {
                    tracing::debug!(error = %e, "dblock: a kept connection failed; claiming on a fresh one");
                    reuse = false;
                }
                outcome => break outcome,
            }
        };
        let Some(row) = outcome? else {
            return Ok(Attempt::Missing);
        };
        let owner: Option<Vec<u8>> = row.try_get(0)?;
        if owner.as_deref() != Some(claim.owner.as_bytes()) {
            return Ok(Attempt::Done(None));
        }
        Ok(Attempt::Done(Some(Claimed {
            token: row.try_get(1)?,
            expires_at: utc(row.try_get(2)?),
        })))
    }

    /// One claim transaction: BEGIN, locking read, UPDATE, COMMIT.
    async fn attempt(
        &self,
        claim: &Claim<'_>,
        ttl_us: i64,
        causal: bool,
    ) -> Result<Attempt, sqlx::Error> {
        let mut conn = Conn::acquire(&self.pool).await?;
        // Waiting for a connection can take long when the pool is busy; an
        // acquirer that left meanwhile gets nothing claimed for it.
        if (claim.abandoned)() {
            return Ok(Attempt::Done(None));
        }
        let c = conn.begin_use();
        let begin = begin_sql(causal);
        sqlx::raw_sql(begin).execute(&mut *c).await?;
        let outcome = self.in_transaction(c, claim, ttl_us).await;
        let end = match outcome {
            Ok(Attempt::Done(Some(_)) | Attempt::Marked) => "COMMIT",
            _ => "ROLLBACK",
        };
        // If COMMIT or ROLLBACK fails, the state of the transaction is
        // unknown: the connection stays dirty and is closed on drop, which
        // rolls back whatever is still open (a claimed lease that did commit
        // is then owned by nobody and runs out after its ttl). A deadlock
        // error is the exception: the server has rolled the transaction
        // back, as Galera does when a COMMIT fails certification (another
        // node's write to the row was ordered first).
        if let Err(e) = sqlx::raw_sql(end).execute(&mut *c).await {
            if error_number(&e) == Some(code::DEADLOCK) {
                conn.done();
            }
            return Err(e);
        }
        conn.done();
        outcome
    }

    async fn in_transaction(
        &self,
        c: &mut sqlx::MySqlConnection,
        claim: &Claim<'_>,
        ttl_us: i64,
    ) -> Result<Attempt, sqlx::Error> {
        let row = q(&self.sql.claim_lock)
            .bind(ttl_us)
            .bind(claim.name.as_bytes())
            .fetch_optional(&mut *c)
            .await?;
        let Some(row) = row else {
            return Ok(Attempt::Missing);
        };
        let token: u64 = row.try_get(0)?;
        let live: i64 = row.try_get(1)?;
        if live != 0 {
            let readers: i64 = row.try_get(4)?;
            if let (Some(mark), true) = (claim.writer_waits, readers != 0) {
                q(&self.sql.claim_mark)
                    .bind(micros(mark))
                    .bind(claim.name.as_bytes())
                    .execute(&mut *c)
                    .await?;
                return Ok(Attempt::Marked);
            }
            return Ok(Attempt::Done(None));
        }
        let now: NaiveDateTime = row.try_get(2)?;
        let until: NaiveDateTime = row.try_get(3)?;
        let taken = q(&self.sql.claim_take)
            .bind(claim.owner.as_bytes())
            .bind(clip(claim.holder))
            .bind(now)
            .bind(until)
            .bind(claim.name.as_bytes())
            .bind(token)
            .execute(&mut *c)
            .await?;
        if taken.rows_affected() != 1 {
            return Ok(Attempt::Done(None));
        }
        Ok(Attempt::Done(Some(Claimed {
            token: token + 1,
            expires_at: utc(until),
        })))
    }

    /// Creates the row of a new name, free, its token at the table's
    /// floor, in a short transaction of its own.
    async fn create_row(&self, name: &str) -> Result<(), sqlx::Error> {
        let mut conn = Conn::acquire(&self.pool).await?;
        let c = conn.begin_use();
        let outcome = async {
            loop {
                sqlx::raw_sql("BEGIN").execute(&mut *c).await?;
                let floor =
                    sqlx::query_scalar::<_, u64>(AssertSqlSafe(self.sql.floor_read.clone()))
                        .bind(self.sql.table.as_bytes())
                        .fetch_optional(&mut *c)
                        .await;
                let floor = match floor {
                    Ok(Some(floor)) => floor,
                    Ok(None) => {
                        // First use of this table: create its floor row.
                        sqlx::raw_sql("ROLLBACK").execute(&mut *c).await?;
                        q(&self.sql.floor_ensure)
                            .bind(self.sql.table.as_bytes())
                            .execute(&mut *c)
                            .await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let inserted = q(&self.sql.create_row)
                    .bind(name.as_bytes())
                    .bind(floor)
                    .execute(&mut *c)
                    .await;
                return match inserted {
                    Ok(_) => sqlx::raw_sql("COMMIT").execute(&mut *c).await.map(drop),
                    Err(e) => Err(e),
                };
            }
        }
        .await;
        if outcome.is_err() {
            // Ends whatever is open; if that fails too, the connection
            // stays dirty and is closed on drop.
            if sqlx::raw_sql("ROLLBACK").execute(&mut *c).await.is_err() {
                return outcome;
            }
        }
        conn.done();
        outcome
    }

    /// One sweep transaction (see [`Sql`]'s `sweep_*` statements); how many
    /// rows it deleted. `Ok(None)` if another transaction holds the floor.
    async fn sweep_transaction(&self, grace: Duration) -> Result<Option<u64>, sqlx::Error> {
        let mut conn = Conn::acquire(&self.pool).await?;
        let c = conn.begin_use();
        let (cutoff, candidates) = self.sweep_candidates(c, grace).await?;
        if candidates.is_empty() {
            conn.done();
            return Ok(Some(0));
        }
        sqlx::raw_sql("BEGIN").execute(&mut *c).await?;
        let outcome = self.sweep_locked(c, cutoff, &candidates).await;
        let end = match outcome {
            Ok(Some(n)) if n > 0 => "COMMIT",
            _ => "ROLLBACK",
        };
        sqlx::raw_sql(end).execute(&mut *c).await?;
        conn.done();
        match outcome {
            Err(e) if is_lock_busy(&e) => Ok(None),
            outcome => outcome,
        }
    }

    /// Before the sweep's transaction: the floor row made sure of, the
    /// cutoff, and the rows ended before it (hex names), read without
    /// locking anything.
    async fn sweep_candidates(
        &self,
        c: &mut sqlx::MySqlConnection,
        grace: Duration,
    ) -> Result<(NaiveDateTime, Vec<String>), sqlx::Error> {
        q(&self.sql.floor_ensure)
            .bind(self.sql.table.as_bytes())
            .execute(&mut *c)
            .await?;
        let cutoff: NaiveDateTime =
            sqlx::query_scalar(AssertSqlSafe(self.sql.sweep_cutoff.clone()))
                .bind(micros(grace))
                .fetch_one(&mut *c)
                .await?;
        let candidates = sqlx::query_scalar(AssertSqlSafe(self.sql.sweep_candidates.clone()))
            .bind(cutoff)
            .fetch_all(&mut *c)
            .await?;
        Ok((cutoff, candidates))
    }

    /// The sweep's transaction, begun: the floor locked, the candidates
    /// that are still ended locked, the floor raised above their tokens,
    /// and they deleted; how many rows went.
    async fn sweep_locked(
        &self,
        c: &mut sqlx::MySqlConnection,
        cutoff: NaiveDateTime,
        candidates: &[String],
    ) -> Result<Option<u64>, sqlx::Error> {
        let table = self.sql.table.as_bytes();
        let budget = match self.packet_budget.load(Ordering::Relaxed) {
            0 => DEFAULT_PACKET_BUDGET,
            known => known,
        };
        q(&self.sql.sweep_floor)
            .bind(table)
            .fetch_one(&mut *c)
            .await?;
        let mut rows: Vec<(String, u64)> = Vec::with_capacity(candidates.len());
        for json in names_json(candidates, budget) {
            let locked: Vec<(String, u64)> =
                sqlx::query_as(AssertSqlSafe(self.sql.sweep_rows.clone()))
                    .bind(json)
                    .bind(cutoff)
                    .fetch_all(&mut *c)
                    .await?;
            rows.extend(locked);
        }
        let Some(highest) = rows.iter().map(|(_, token)| *token).max() else {
            return Ok(Some(0));
        };
        q(&self.sql.sweep_raise)
            .bind(highest)
            .bind(table)
            .execute(&mut *c)
            .await?;
        let names: Vec<String> = rows.into_iter().map(|(name, _)| name).collect();
        let mut deleted = 0;
        for json in names_json(&names, budget) {
            let done = q(&self.sql.sweep_delete)
                .bind(json)
                .bind(cutoff)
                .execute(&mut *c)
                .await?;
            deleted += done.rows_affected();
        }
        Ok(Some(deleted))
    }

    /// The JSON budget of one batch statement; reads the server's
    /// `max_allowed_packet` the first time.
    async fn packet_budget(&self) -> usize {
        let known = self.packet_budget.load(Ordering::Relaxed);
        if known > 0 {
            return known;
        }
        let Ok(mut conn) = Conn::acquire(&self.pool).await else {
            return DEFAULT_PACKET_BUDGET;
        };
        let outcome = sqlx::query_scalar::<_, u64>("SELECT @@max_allowed_packet")
            .fetch_one(&mut *conn.begin_use())
            .await;
        conn.settle(&outcome);
        match outcome {
            Ok(max) => {
                // Half of it: the statement text and the protocol take some,
                // and the second statement of a batch binds a subset.
                let budget = usize::try_from(max / 2)
                    .unwrap_or(usize::MAX)
                    .clamp(64 << 10, 64 << 20);
                self.packet_budget.store(budget, Ordering::Relaxed);
                budget
            }
            Err(_) => DEFAULT_PACKET_BUDGET,
        }
    }

    /// One batch transaction: BEGIN (causal on Galera), the locking read,
    /// the UPDATE of the rows it locked, COMMIT. Leases not locked come back
    /// as `None`.
    async fn renew_transaction(
        &self,
        batch: &[Renewal],
        json: &str,
        galera: bool,
    ) -> Result<Vec<Option<Renewed>>, sqlx::Error> {
        let mut conn = Conn::acquire(&self.pool).await?;
        let c = conn.begin_use();
        sqlx::raw_sql(begin_sql(galera)).execute(&mut *c).await?;
        let outcome = self.renew_locked(c, batch, json).await;
        let end = if outcome.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        // If COMMIT fails, whether the renewals happened is unknown: the
        // error leaves every lease of the batch to its local deadline, and
        // the dirty connection is closed on drop.
        sqlx::raw_sql(end).execute(&mut *c).await?;
        conn.done();
        outcome
    }

    async fn renew_locked(
        &self,
        c: &mut sqlx::MySqlConnection,
        batch: &[Renewal],
        json: &str,
    ) -> Result<Vec<Option<Renewed>>, sqlx::Error> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(AssertSqlSafe(self.sql.renew_lock.clone()))
            .bind(json)
            .fetch_all(&mut *c)
            .await?;
        let mut answers = vec![None; batch.len()];
        let mut locked = Vec::with_capacity(rows.len());
        let mut now_us = 0;
        for (i, now) in rows {
            // FOR ORDINALITY counts from 1.
            let Some(k) = usize::try_from(i - 1).ok().filter(|&k| k < batch.len()) else {
                continue;
            };
            if answers[k].is_none() {
                answers[k] = Some(Renewed::Unknown);
                locked.push(k);
                now_us = now;
            }
        }
        if locked.is_empty() {
            return Ok(answers);
        }
        let done = q(&self.sql.renew_apply)
            .bind(batch_json(locked.iter().map(|&k| &batch[k])))
            .bind(now_us)
            .execute(&mut *c)
            .await?;
        // Under our row locks every one of them matches (sqlx connects with
        // CLIENT_FOUND_ROWS); if not, trust none of them.
        if done.rows_affected() == locked.len() as u64 {
            for k in locked {
                let until = now_us.saturating_add(micros(batch[k].ttl));
                answers[k] = Some(
                    DateTime::from_timestamp_micros(until).map_or(Renewed::Unknown, Renewed::Until),
                );
            }
        }
        Ok(answers)
    }

    /// Which of `batch`, not returned by the locking read, are still ours
    /// (skipped because another transaction had their row locked: unknown)
    /// and which are gone.
    async fn renew_check(&self, batch: &[Renewal], ks: &[usize], galera: bool) -> Vec<Renewed> {
        let json = batch_json(ks.iter().map(|&k| &batch[k]));
        let sql = self.sql.renew_check.on(galera).clone();
        let outcome = async {
            let mut conn = Conn::acquire(&self.pool).await?;
            let outcome = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                .bind(json)
                .fetch_all(&mut *conn.begin_use())
                .await;
            conn.settle(&outcome);
            outcome
        }
        .await;
        match outcome {
            Ok(mine) => {
                let mut answers = vec![Renewed::Gone; ks.len()];
                for i in mine {
                    if let Some(a) = usize::try_from(i - 1).ok().and_then(|j| answers.get_mut(j)) {
                        *a = Renewed::Unknown;
                    }
                }
                answers
            }
            Err(e) => {
                tracing::debug!(error = %e, "dblock: could not tell skipped leases from gone ones");
                vec![Renewed::Unknown; ks.len()]
            }
        }
    }

    /// One conditional statement in autocommit on a guarded connection
    /// (kept warm between statements, see [`Warm`]), retried after a
    /// deadlock. On Galera that is a certification conflict the server's
    /// own `wsrep_retry_autocommit` did not absorb: the statement did
    /// nothing, and its conditions (owner, token, live lease) make running
    /// it again safe. Sent once more on a connection from the pool if a
    /// kept one failed without an answer (it died while kept).
    async fn execute(
        &self,
        query: impl Fn() -> Query<'static, MySql, MySqlArguments>,
    ) -> Result<sqlx::mysql::MySqlQueryResult> {
        let mut retries = 0;
        let mut reuse = true;
        loop {
            let mut conn = Conn::acquire_warm(&self.warm, reuse).await?;
            let outcome = query().execute(&mut *conn.begin_use()).await;
            conn.settle(&outcome);
            match outcome {
                Err(e) if error_number(&e) == Some(code::DEADLOCK) && retries < MAX_RETRIES => {
                    retries += 1;
                    retry_pause(retries).await;
                }
                // A kept connection that died while kept (it was not
                // pinged): once more on one from the pool.
                Err(e) if reuse && conn.retry_elsewhere(&e) => {
                    tracing::debug!(error = %e, "dblock: a kept connection failed; sending again on a fresh one");
                    reuse = false;
                }
                outcome => return outcome.map_err(map_err),
            }
        }
    }
}

impl LeaseStore for MySqlStore {
    fn kind(&self) -> &'static str {
        "mysql-lease"
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
        if claim.is_holder() {
            // Permits and readers ring their bell like plain leases: a
            // waiter elsewhere (a writer waiting for the last reader) wakes
            // when this process lets its share go.
            // Boxed, as the other paths an uncontended exclusive claim does
            // not take: its future should neither carry nor copy their state.
            let claimed = Box::pin(self.claim_permit(claim)).await?;
            return Ok(self.bells.armed(claim.name, claimed));
        }
        let causal = self.checked().await?;
        let one = claim.mode == LockMode::Exclusive && self.claims_in_one_statement().await?;
        let ttl_us = micros(claim.ttl);
        let mut retries = 0;
        let mut locked_retries = 0;
        let mut created = 0;
        loop {
            let attempt = if one {
                self.attempt_one(claim, ttl_us).await
            } else {
                Box::pin(self.attempt(claim, ttl_us, causal)).await
            };
            let outcome = match attempt {
                Ok(Attempt::Done(claimed)) => return Ok(self.bells.armed(claim.name, claimed)),
                Ok(Attempt::Marked) => return Ok(None),
                Ok(Attempt::Missing) if created < MAX_RETRIES => {
                    created += 1;
                    Box::pin(self.create_row(claim.name)).await
                }
                // The row keeps disappearing (someone deletes rows): report
                // the name as busy rather than spin.
                Ok(Attempt::Missing) => return Ok(None),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => {}
                // Another transaction holds the row lock (see
                // `LOCKED_RETRIES`): a free name is not refused because a
                // sweep, say, was deleting its ended row. On Galera the lock
                // may also be the applier's, applying a write set (a
                // release, a sweep) that committed elsewhere just before:
                // the causal BEGIN waits for it to be applied, not always
                // for its locks to be gone. Look again briefly.
                Err(e) if is_lock_busy(&e) && locked_retries < LOCKED_RETRIES => {
                    locked_retries += 1;
                    retry_pause(locked_retries).await;
                }
                // Still locked: a transaction in lock_in_tx holds the name.
                Err(e) if is_lock_busy(&e) => return Ok(None),
                Err(e) if is_retryable(&e) => {
                    retries += 1;
                    if retries > MAX_RETRIES {
                        tracing::debug!(name = claim.name, error = %e, "dblock: claim still contended after retries; reporting busy");
                        return Ok(None);
                    }
                    retry_pause(retries).await;
                }
                Err(e) => return Err(map_err(e)),
            }
        }
    }

    async fn renew(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        let galera = self.checked().await?;
        let done = self
            .execute(|| bind_lease(q(self.sql.renew.on(galera)).bind(micros(ttl)), lease))
            .await?;
        let us = done.last_insert_id();
        if us > 0 {
            return Ok(DateTime::from_timestamp_micros(us as i64));
        }
        if done.rows_affected() == 0 {
            self.bells.disarm(lease.name, lease.token);
            return Ok(None);
        }
        // Matched, but the server did not pass LAST_INSERT_ID on (a proxy?):
        // read the expiry back.
        let mut conn = Conn::acquire(&self.pool).await?;
        let outcome = bind_lease(q(self.sql.renew_read.on(galera)), lease)
            .fetch_optional(&mut *conn.begin_use())
            .await
            .and_then(|row| {
                row.map(|row| row.try_get::<NaiveDateTime, _>(0))
                    .transpose()
            });
        conn.settle(&outcome);
        Ok(outcome.map_err(map_err)?.map(utc))
    }

    async fn renew_permit(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        let at = self.renew_holder(lease, ttl).await?;
        Ok(self.bells.renewed(lease.name, lease.token, at))
    }

    async fn renew_many(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        self.packet_budget().await;
        let galera = self.checked().await?;
        let json = batch_json(batch.iter());
        let mut retries = 0;
        let answers = loop {
            match self.renew_transaction(batch, &json, galera).await {
                Ok(answers) => break answers,
                Err(e) if is_retryable(&e) && retries < MAX_RETRIES => {
                    retries += 1;
                    retry_pause(retries).await;
                }
                Err(e) => return Err(map_err(e)),
            }
        };
        let skipped: Vec<usize> = (0..batch.len()).filter(|&k| answers[k].is_none()).collect();
        let checked = if skipped.is_empty() {
            Vec::new()
        } else {
            self.renew_check(batch, &skipped, galera).await
        };
        let mut checked = skipped.iter().zip(checked);
        let answers: Vec<Renewed> = answers
            .into_iter()
            .enumerate()
            .map(|(k, answer)| match answer {
                Some(answer) => answer,
                None => match checked.next() {
                    Some((&j, answer)) if j == k => answer,
                    _ => Renewed::Unknown,
                },
            })
            .collect();
        self.bells.disarm_gone(batch, &answers);
        Ok(answers)
    }

    async fn renew_holders(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let answers = self.renew_holders_batch(batch).await?;
        self.bells.disarm_gone(batch, &answers);
        Ok(answers)
    }

    fn batch_len(&self, batch: &[Renewal]) -> usize {
        let budget = match self.packet_budget.load(Ordering::Relaxed) {
            0 => DEFAULT_PACKET_BUDGET,
            known => known,
        };
        let mut bytes = 2;
        batch
            .iter()
            .take_while(|r| {
                bytes += json_len(r);
                bytes <= budget
            })
            .count()
            .max(1)
    }

    async fn release(&self, lease: LeaseId<'_>, hold: Option<Duration>) -> Result<bool> {
        // The bell goes after the release statement (or if it is given up).
        let _disarm = self.bells.disarm_on_drop(lease.name, lease.token);
        let galera = self.checked().await?;
        let done = self
            .execute(|| {
                bind_lease(
                    q(self.sql.release.on(galera)).bind(hold.map(micros).unwrap_or(0)),
                    lease,
                )
            })
            .await?;
        Ok(done.last_insert_id() > 0 || done.rows_affected() > 0)
    }

    async fn release_permit(&self, lease: LeaseId<'_>, hold: Option<Duration>) -> Result<bool> {
        let _disarm = self.bells.disarm_on_drop(lease.name, lease.token);
        self.release_holder(lease, hold).await
    }

    async fn force_release(&self, name: &str) -> Result<bool> {
        let galera = self.checked().await?;
        if let Some(broken) = self.force_release_all(name, galera).await? {
            return Ok(broken);
        }
        let done = self
            .execute(|| q(self.sql.force_release.on(galera)).bind(name.as_bytes()))
            .await?;
        Ok(done.last_insert_id() > 0 || done.rows_affected() > 0)
    }

    async fn sweep(&self, grace: Duration) -> Result<u64> {
        // Asked here, never while the sweep holds the floor: that would
        // take a second connection while creators wait for the floor on
        // theirs.
        self.packet_budget().await;
        let mut retries = 0;
        loop {
            match self.sweep_transaction(grace).await {
                Ok(Some(n)) => return Ok(n + self.sweep_permits(grace).await?),
                // The floor is held (a new name being created, a
                // transaction in lock_in_tx): try again shortly, then leave
                // the rows to a later sweep.
                Ok(None) if retries < MAX_RETRIES => {}
                Ok(None) => return Ok(0),
                Err(e) if is_retryable(&e) && retries < MAX_RETRIES => {}
                Err(e) => return Err(map_err(e)),
            }
            retries += 1;
            retry_pause(retries).await;
        }
    }

    fn released(&self, name: &str) -> impl std::future::Future<Output = ()> + Send {
        self.bells.released(name)
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        // Microseconds since the epoch, computed in UTC by the server: no
        // session time zone takes part.
        let micros: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, {EPOCH}, UTC_TIMESTAMP(6)) AS SIGNED)"
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        DateTime::from_timestamp_micros(micros).ok_or_else(|| {
            crate::Error::internal(format!("database time {micros} µs is out of range"))
        })
    }

    async fn inspect(&self, name: &str) -> Result<Option<LockInfo>> {
        if let Some(info) = self.inspect_permits(name).await? {
            return Ok(Some(info));
        }
        let sql = self.sql.inspect.on(self.checked().await?);
        let mut conn = Conn::acquire(&self.pool).await?;
        let outcome = q(sql)
            .bind(name.as_bytes())
            .fetch_optional(&mut *conn.begin_use())
            .await;
        conn.settle(&outcome);
        let row = outcome.map_err(map_err)?;
        row.map(|row| info(name.to_owned(), &row, 0)).transpose()
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let sql = self.sql.list.on(self.checked().await?);
        let mut conn = Conn::acquire(&self.pool).await?;
        let outcome = q(sql).fetch_all(&mut *conn.begin_use()).await;
        conn.settle(&outcome);
        let rows = outcome.map_err(map_err)?;
        let plain = rows
            .iter()
            .map(|row| {
                let name: Vec<u8> = row.try_get(0)?;
                let name = String::from_utf8(name)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                info(name, row, 1)
            })
            .collect::<Result<_>>()?;
        Ok(merge_list(plain, self.list_permits().await?))
    }
}

/// A `LockInfo` from `holder, token, acquired_at, expires_at` starting at
/// column `first`.
fn info(name: String, row: &sqlx::mysql::MySqlRow, first: usize) -> Result<LockInfo> {
    let holder: Option<String> = row.try_get(first)?;
    let mut info = LockInfo::new(Some(name), holder.unwrap_or_default(), LockMode::Exclusive);
    info.token = Some(row.try_get::<u64, _>(first + 1)?);
    info.acquired_at = Some(utc(row.try_get(first + 2)?));
    info.expires_at = Some(utc(row.try_get(first + 3)?));
    Ok(info)
}
