//! MySQL 8 and MariaDB 10.6+: the lease table ([`Lease`]), locks scoped to
//! a transaction ([`lock_in_transaction`], [`lock_in_transaction_with`]) and the schema
//! ([`migrate`]).
//!
//! # How a lease is kept
//!
//! Every name has one row in `dblock_leases` (see
//! `migrations/mysql/0001_dblock.sql`): who holds it, its last fencing
//! token, and until when, in `DATETIME(6)` UTC computed by the server from
//! `UTC_TIMESTAMP(6)`. The session `time_zone` never matters and no client
//! clock decides anything.
//!
//! - **Claim**: on MariaDB (not Galera), one autocommit statement, one
//!   round trip: `INSERT INTO t ... SELECT ... FROM t WHERE name = ? FOR
//!   UPDATE NOWAIT ON DUPLICATE KEY UPDATE ... RETURNING owner, token,
//!   expires_at`. The locking read takes the name's existing row (`NOWAIT`),
//!   the upsert then takes it over only if its lease has ended (each column
//!   `IF(expires_at <= UTC_TIMESTAMP(6), new, old)`, `expires_at` assigned
//!   last, one clock reading for the statement), and `RETURNING` tells
//!   whether the row is now ours, with its token and expiry. A name without
//!   a row inserts nothing, and its row is created as below. On MySQL
//!   (no `RETURNING`), TiDB and Galera, one short transaction: `BEGIN` (on
//!   MariaDB Galera a causal one), `SELECT ... FOR UPDATE NOWAIT` on the row
//!   (which also reads the server's clock), `UPDATE`, `COMMIT`: four round
//!   trips. Either way a row locked by someone else means the name is busy
//!   right now (another claim is deciding, or a transaction holds it
//!   through [`lock_in_transaction`]); the claim never waits on the server.
//!   The first claim of a name creates the row with an `INSERT IGNORE`
//!   outside the claim's transaction, in a short one of its own that reads
//!   the token floor first (see **Sweep**), so that no gap lock is ever held
//!   while inserting (the usual source of deadlocks with "insert if
//!   missing"). Deadlocks, snapshot conflicts and duplicate keys are retried
//!   a few times with jitter, then reported as "busy".
//! - **Renew** (background): every lease of a backend due for renewal in one
//!   short transaction per renewal tick, whatever their number: `BEGIN`; a
//!   locking read of the batch's rows that are still ours and unexpired,
//!   `FOR UPDATE SKIP LOCKED`, driven by `JSON_TABLE` over one bound JSON
//!   document (names in hex, so they reach the `VARBINARY` column byte for
//!   byte) with each row found by primary key; an `UPDATE` of exactly the
//!   rows it locked, each to the clock read under the locks plus its own
//!   ttl; `COMMIT`. Skipping locked rows matters: a transaction in
//!   [`lock_in_transaction`] may hold a lease's row for long, and waiting for it
//!   would stall every lease of the batch; the skipped lease is simply not
//!   renewed (a plain read after the transaction tells it from a lease that
//!   is gone), and runs out as before. A batch larger than half the
//!   server's `max_allowed_packet` is cut into several transactions.
//! - **Extend** and **release**: one conditional `UPDATE` each, matching the
//!   name, the owner id, the token and an unexpired lease. Release clears
//!   the owner; with `hold_at_least` it keeps the lease until
//!   `GREATEST(UTC_TIMESTAMP(6), acquired_at + hold)`.
//! - **Sweep** (background, about 2 s after releases, at most one every
//!   2 s per backend): rows whose lease ended more than 2 s ago are
//!   deleted, in one short transaction: the exclusive lock of the table's
//!   row in `dblock_token_floor` (migration 2; `NOWAIT`, retried briefly,
//!   else left to the next sweep), a cutoff from `UTC_TIMESTAMP(6)`, a
//!   locking read (`SKIP LOCKED`) of up to 10,000 rows ended before it, the
//!   floor raised to the highest of their tokens, and a `DELETE` of exactly
//!   those rows. A new name's row starts at the floor, read under a share
//!   lock in the short transaction that inserts it (and in
//!   [`lock_in_transaction`], which therefore holds back sweeps of its table until
//!   its transaction ends), so a name's token never goes back. The floor
//!   table is `dblock_token_floor` of the pool's database, keyed by the
//!   lease table's name as given. Tokens are never drawn from a counter
//!   every claim updates (nor from `AUTO_INCREMENT`, which Galera
//!   interleaves per node).
//! - **Shared (reader) leases** (`.shared()`): each reader is a row of the
//!   holders table (`max_holders = 1`, its own token), taken like a permit
//!   of a semaphore; while readers live, the name's lease row is their
//!   marker (mode `s`). A writer that finds readers and will wait marks
//!   the row (`writer_waiting_until`, migration 4) under the claim's row
//!   lock at each try, a little past its next one; new readers wait while
//!   the mark lies ahead, so readers cannot starve a writer. A writer's
//!   claim clears it, and it lapses by itself if the writer goes away.
//!
//! # Engine self-test and Galera
//!
//! At its first claim, inspection or listing a [`Lease`] asks the server
//! what it is ([`Engine`], also [`Lease::engine`] and [`engine`]): MySQL,
//! MariaDB or TiDB by `VERSION()`, and a Galera node by `wsrep_on`.
//!
//! On a **Galera cluster** (MariaDB Galera Cluster; tested with three
//! nodes, clients on every node at once) leases work unchanged, because
//! every decision is a write that the cluster certifies:
//!
//! - Row locks are local to a node. Two nodes may both find a free row and
//!   both update it; the cluster orders their write sets and fails the
//!   later one with a certification conflict (error 1213, at `COMMIT` or
//!   as a brute-force abort earlier). A claim retries it like a deadlock,
//!   and so do renewal, `extend` and release (single conditional
//!   statements, safe to run again). Tokens come from the row, so they
//!   strictly increase across nodes.
//! - A node applies other nodes' write sets asynchronously. On MariaDB
//!   Galera every statement that must see them waits until its node has
//!   applied all that the cluster committed before it (`wsrep_sync_wait`):
//!   a claim's transaction, inspection and listing, so that a name
//!   released through another node is found free and one granted there is
//!   shown held; and renewal, release and [`force_release`](crate::Locks::force_release),
//!   so that they find a lease granted through another node moments before
//!   (an operator on any node; a holder whose connections a load balancer
//!   moved to another node). Without the wait such a statement found no
//!   lease: a renewal or release reported the lock lost, and a forced
//!   release freed nothing. (Safety never depended on it: a claim based on
//!   a stale row fails certification.)
//! - Expiry is each node's own `UTC_TIMESTAMP(6)`. The nodes' clocks must
//!   be synchronised (NTP/chrony): a node whose clock runs ahead by `s`
//!   sees leases written elsewhere expire `s` early, and another client
//!   can then take a name up to `s` before its holder's lease runs out.
//!   Keep the skew well below the lease's safety margin (ttl/5); fencing
//!   tokens still refuse the superseded holder's writes.
//! - Refused with [`Error::Unsupported`](crate::Error::Unsupported): a
//!   pool whose sessions run `SET wsrep_on = OFF` (its lease rows would not
//!   replicate), and [`lock_in_transaction`] (see [`Engine::check_lock_in_tx`]):
//!   its row lock holds on one node only, so a lease claim through another
//!   node is not excluded; the cluster then aborts the transaction, and
//!   MariaDB 10.11 does not always report that abort (a prepared statement
//!   after it, and the `COMMIT`, answered OK in 2-4 of 30 runs here, the
//!   transaction's writes gone). [`Engine::check_named_locks`] refuses
//!   `GET_LOCK`, which on Galera is local to one node; dblock's leases
//!   never rely on it (their release doorbells, which only wake waiters
//!   in other processes, are turned off on Galera: waiters poll there).
//! - Because of that unreported abort, a claim's `UPDATE` repeats the
//!   token and the expiry its locking read found: run on its own after its
//!   transaction was aborted, it matches nothing rather than overwrite the
//!   lease another node granted.
//!
//! A lease backend keeps the pooled connection of its last claim or
//! release for the next one (up to 8 per backend, each for at most 20 ms
//! unused, and only while the pool has another connection idle) instead of
//! handing it back after every statement: sqlx pings a connection when it
//! leaves the pool and again when it comes back, three round trips for a
//! one-statement claim. A statement that fails without an answer on such a
//! kept connection (it died meanwhile) is sent once more on a fresh one.
//!
//! No transaction is ever left open on a pooled connection: a connection is
//! closed rather than returned to the pool whenever a statement or a
//! transaction of dblock was interrupted (the future dropped, or `COMMIT` /
//! `ROLLBACK` failed), so the server rolls the transaction back.
//!
//! sqlx always connects with `CLIENT_FOUND_ROWS`, so the affected-row count
//! of an `UPDATE` is the number of rows it *matched*; dblock also reads the
//! statement's `LAST_INSERT_ID(..)` so that its checks do not depend on it.

mod doorbell;
mod engine;
mod lease;
mod migrate;
mod xact;

pub use engine::{engine, Engine, Flavor};
#[doc(hidden)]
pub use lease::bench_claim_release_sql;
pub use lease::Lease;
pub use migrate::migrate;
pub use xact::{lock_in_transaction, lock_in_transaction_with};
#[allow(deprecated)]
pub use xact::{lock_in_tx, lock_in_tx_with};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::mysql::MySqlDatabaseError;
use sqlx::pool::PoolConnection;
use sqlx::{MySql, MySqlPool};
use tokio::time::Instant;

/// The lease table created by [`migrate`].
pub(crate) const DEFAULT_TABLE: &str = "dblock_leases";

pub(crate) const SCHEMA_MISSING: crate::Error = crate::Error::SchemaMissing {
    migrate: "dblock::mysql::migrate(&pool)",
    dir: "mysql",
};

/// Server error numbers dblock reacts to.
pub(crate) mod code {
    /// `ER_CHECKREAD`: a locking read found a row newer than the snapshot
    /// (MariaDB with `innodb_snapshot_isolation=ON`).
    pub const CHECKREAD: u16 = 1020;
    /// `ER_DUP_ENTRY`.
    pub const DUP_ENTRY: u16 = 1062;
    /// `ER_NO_SUCH_TABLE`.
    pub const NO_SUCH_TABLE: u16 = 1146;
    /// `ER_BAD_FIELD_ERROR`: an unknown column.
    pub const BAD_FIELD: u16 = 1054;
    /// `ER_LOCK_WAIT_TIMEOUT`; also what MariaDB answers to `NOWAIT`.
    pub const LOCK_WAIT_TIMEOUT: u16 = 1205;
    /// `ER_LOCK_DEADLOCK`.
    pub const DEADLOCK: u16 = 1213;
    /// `ER_LOCK_NOWAIT` (MySQL 8).
    pub const LOCK_NOWAIT: u16 = 3572;
}

/// The server's error number, for errors from the server.
pub(crate) fn error_number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number),
        _ => None,
    }
}

/// Maps "table doesn't exist" (1146) and "unknown column" (1054: a schema
/// older than this version of dblock) to
/// [`Error::SchemaMissing`](crate::Error::SchemaMissing).
pub(crate) fn map_err(e: sqlx::Error) -> crate::Error {
    if matches!(
        error_number(&e),
        Some(code::NO_SUCH_TABLE | code::BAD_FIELD)
    ) {
        return SCHEMA_MISSING;
    }
    crate::Error::Database(e)
}

/// Whether a row lock held by another transaction stopped the statement
/// (`NOWAIT`, or a lock wait that ran out).
pub(crate) fn is_lock_busy(e: &sqlx::Error) -> bool {
    matches!(
        error_number(e),
        Some(code::LOCK_WAIT_TIMEOUT | code::LOCK_NOWAIT)
    )
}

/// A pooled connection that goes back to the pool only when dblock knows
/// its state: no statement in flight, no transaction open. Otherwise (the
/// future was dropped mid-statement, or `COMMIT`/`ROLLBACK` failed) it is
/// closed, and the server rolls back whatever was open.
pub(crate) struct Conn {
    conn: Option<PoolConnection<MySql>>,
    clean: bool,
    /// Where it goes back when clean, if it is a lease's hot connection
    /// (see [`Warm`]).
    warm: Option<Arc<Warm>>,
    /// Taken from `warm` rather than from the pool (so not pinged since it
    /// was last used).
    rewarmed: bool,
}

impl Conn {
    pub(crate) async fn acquire(pool: &MySqlPool) -> Result<Conn, sqlx::Error> {
        Ok(Conn {
            // Boxed: see `acquire_warm`.
            conn: Some(Box::pin(pool.acquire()).await?),
            clean: true,
            warm: None,
            rewarmed: false,
        })
    }

    /// A connection for one of a lease's own statements: one kept warm by
    /// `warm` if there is one, else one from the pool; it goes back to
    /// `warm` when clean.
    /// With `reuse` false, always one from the pool (for a statement sent
    /// again after [`Conn::retry_elsewhere`]).
    pub(crate) async fn acquire_warm(warm: &Arc<Warm>, reuse: bool) -> Result<Conn, sqlx::Error> {
        let kept = if reuse { warm.take() } else { None };
        let (conn, rewarmed) = match kept {
            Some(conn) => (conn, true),
            // Boxed: sqlx's pool acquisition carries the state of opening
            // a connection (about 7 KB); inline, it made every statement's
            // future that large, and each layer that builds and moves one
            // copied it (a claim's and a release's future were 7.6 and
            // 8 KB). Only a statement that finds no kept connection pays
            // the box.
            None => (Box::pin(warm.pool.acquire()).await?, false),
        };
        Ok(Conn {
            conn: Some(conn),
            clean: true,
            warm: Some(warm.clone()),
            rewarmed,
        })
    }

    /// Whether a statement that failed with `e` on this connection may be
    /// sent again on another: it came from [`Warm`] (unpinged) and failed
    /// without an answer from the server, as on a connection that died
    /// while it was kept warm. Only for statements that are safe to repeat.
    pub(crate) fn retry_elsewhere(&self, e: &sqlx::Error) -> bool {
        self.rewarmed && !matches!(e, sqlx::Error::Database(_))
    }

    /// The connection, for one statement or a transaction; marks it dirty
    /// until [`Conn::done`] is called.
    pub(crate) fn begin_use(&mut self) -> &mut sqlx::MySqlConnection {
        self.clean = false;
        self.conn
            .as_mut()
            .expect("a Conn holds its connection until dropped")
    }

    /// The connection is known to be idle, outside any transaction.
    pub(crate) fn done(&mut self) {
        self.clean = true;
    }

    /// After one autocommit statement: idle again if the server answered,
    /// with a result or an error; left dirty (closed on drop) otherwise.
    pub(crate) fn settle<T>(&mut self, outcome: &Result<T, sqlx::Error>) {
        if matches!(outcome, Ok(_) | Err(sqlx::Error::Database(_))) {
            self.clean = true;
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !self.clean {
            conn.close_on_drop();
        } else if let Some(warm) = &self.warm {
            warm.put(conn);
        }
    }
}

/// How long a lease's connection stays out of the pool unused before it
/// goes back.
const WARM_IDLE: Duration = Duration::from_millis(20);

/// The most connections one lease backend keeps out of the pool.
const WARM_MAX: usize = 8;

/// The connections a lease backend keeps between its own claims and
/// releases instead of handing them back to the pool after each: sqlx pings
/// a connection when it is taken from the pool (`test_before_acquire`, on
/// by default) and again, in a task of its own, when it is given back, so
/// a one-statement claim or release costs three round trips through the
/// pool and one here. A connection goes back to the pool once unused for
/// [`WARM_IDLE`], and at once if the pool has no other connection idle (so
/// keeping one never makes an application wait on the pool, nor the pool
/// open a connection more); at most [`WARM_MAX`] are kept.
pub(crate) struct Warm {
    pool: MySqlPool,
    idle: std::sync::Mutex<Vec<(PoolConnection<MySql>, Instant)>>,
    /// A task gives back connections unused for [`WARM_IDLE`].
    reaping: AtomicBool,
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warm").finish_non_exhaustive()
    }
}

impl Warm {
    pub(crate) fn new(pool: MySqlPool) -> Arc<Warm> {
        Arc::new(Warm {
            pool,
            idle: std::sync::Mutex::default(),
            reaping: AtomicBool::new(false),
        })
    }

    /// The connection used last, if one is kept.
    fn take(&self) -> Option<PoolConnection<MySql>> {
        self.idle.lock().unwrap().pop().map(|(conn, _)| conn)
    }

    /// Keeps `conn` warm, or hands it back to the pool.
    fn put(self: &Arc<Self>, conn: PoolConnection<MySql>) {
        // Kept only while the pool has another connection idle: keeping it
        // never leaves the pool short of one, nor makes it open one more.
        let pool_short = self.pool.is_closed() || self.pool.num_idle() == 0;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut idle = self.idle.lock().unwrap();
            if pool_short || idle.len() >= WARM_MAX {
                drop(idle);
                drop(conn);
                return;
            }
            idle.push((conn, Instant::now()));
        }
        if self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(WARM_IDLE).await;
                let Some(warm) = weak.upgrade() else { return };
                let stale: Vec<_> = {
                    let mut idle = warm.idle.lock().unwrap();
                    let keep = idle.iter().position(|(_, at)| at.elapsed() < WARM_IDLE);
                    // Oldest first: the ones before `keep` are stale.
                    let stale = keep.unwrap_or(idle.len());
                    idle.drain(..stale).collect()
                };
                drop(stale);
                if !warm.idle.lock().unwrap().is_empty() {
                    continue;
                }
                warm.reaping.store(false, Ordering::Release);
                // A connection put back meanwhile found the flag still set.
                if warm.idle.lock().unwrap().is_empty() || warm.reaping.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        });
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("clean", &self.clean).finish()
    }
}

/// A duration in whole microseconds, as bound to `INTERVAL ? MICROSECOND`.
pub(crate) use crate::time::micros;

/// Quotes a table name already checked by [`crate::validate_table`]:
/// `schema.table` becomes `` `schema`.`table` ``.
pub(crate) fn quote_table(table: &str) -> String {
    table
        .split('.')
        .map(|part| format!("`{part}`"))
        .collect::<Vec<_>>()
        .join(".")
}
