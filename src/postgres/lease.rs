//! Leases in a PostgreSQL table, timed by `clock_timestamp()`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::map_err;
use super::notify::{Listener, CHANNEL};
use crate::lease::{
    lease_backend, Claim, Claimed, LeaseEngine, LeaseOptions, LeaseStore, Renewal, Renewed, Wakeups,
};
use crate::name::{quote_table, validate_table};
use crate::{LockInfo, LockMode, Result};

/// The table [`migrate`](super::migrate) creates and [`Lease`] uses unless
/// told otherwise.
const DEFAULT_TABLE: &str = "dblock_leases";

/// Leases in a PostgreSQL table: locks that outlive a connection, expire by
/// the database clock, and can be kept past release with `hold_at_least`.
///
/// Each lock is a row of `dblock_leases` (created by
/// [`migrate`](super::migrate)). Taking a lease is one `INSERT .. ON
/// CONFLICT .. DO UPDATE .. WHERE expires_at <= clock_timestamp()`; it is
/// renewed every ttl/3, and the guard reports itself lost if a renewal
/// fails or comes too late. Renewal is batched: one `UPDATE .. FROM
/// unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])` per renewal
/// tick renews every lease due that this backend holds (up to 250,000 per
/// statement), each with its own ttl, and answers per lease. Every expiry is computed and compared with
/// `clock_timestamp()`, the database's wall clock at the moment of the
/// statement: client clocks never decide who holds a lock.
///
/// - **Fencing tokens** are per name: each grant is the previous token + 1.
///   Rows are never deleted, so a name's token never goes back.
/// - **Waiting** polls with backoff (see [`LeaseOptions`]), and a release
///   anywhere wakes waiters at once: releases send `NOTIFY` on the channel
///   `dblock_lease_released` with the lock name as payload, and a backend
///   with waiters keeps one extra connection (made with the pool's connect
///   options, outside the pool, closed after a minute without waiters or
///   when the backend is dropped) that `LISTEN`s. If listening fails (or
///   never delivers, as behind a transaction-pooling proxy), waiters just
///   poll. A lease that runs out rather than being released is noticed at
///   the next poll.
/// - **Shared (reader) leases are not supported**: `.shared()` fails with
///   [`Error::Unsupported`](crate::Error::Unsupported). Use
///   [`Advisory`](super::Advisory) for reader locks.
/// - **Isolation levels**: statements run in autocommit, so a pool whose
///   `default_transaction_isolation` is REPEATABLE READ or SERIALIZABLE
///   works too; serialization failures are retried.
/// - Without the table, calls fail with
///   [`Error::SchemaMissing`](crate::Error::SchemaMissing).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> dblock::Result<()> {
/// use std::time::Duration;
/// dblock::postgres::migrate(&pool).await?;
/// let locks = dblock::Locks::new(dblock::postgres::Lease::new(pool));
/// let guard = locks
///     .acquire("billing:2026-11-24")
///     .ttl(Duration::from_secs(30))
///     .hold_at_least(Duration::from_secs(3600)) // once per hour across nodes
///     .await?;
/// // ... run the job, passing guard.token() to what it writes ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Lease {
    engine: LeaseEngine<PgStore>,
    pool: PgPool,
    table: String,
    options: LeaseOptions,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("table", &self.table)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Leases in `dblock_leases`, through `pool`, with default options.
    /// Run [`migrate`](super::migrate) once beforehand.
    pub fn new(pool: PgPool) -> Self {
        Lease::assemble(pool, DEFAULT_TABLE.to_owned(), LeaseOptions::default())
            .expect("the default options are valid")
    }

    /// Uses another table, `table` or `schema.table`, with the same columns
    /// as `dblock_leases` (for instance
    /// `CREATE TABLE my_locks (LIKE dblock_leases INCLUDING ALL)`).
    ///
    /// The name is checked by [`validate_table`](crate::validate_table)
    /// ([`Error::InvalidOption`](crate::Error::InvalidOption) otherwise) and
    /// quoted, so it is case sensitive: `"MyLocks"` is not `mylocks`.
    pub fn with_table(self, table: impl Into<String>) -> Result<Self> {
        let table = table.into();
        validate_table(&table)?;
        Lease::assemble(self.pool, table, self.options)
    }

    /// Sets how waiting polls (see [`LeaseOptions`]). With LISTEN/NOTIFY
    /// working, `max_poll` bounds only how late an expiry (not a release)
    /// is noticed.
    pub fn with_options(self, options: LeaseOptions) -> Result<Self> {
        Lease::assemble(self.pool, self.table, options)
    }

    /// The pool the leases are taken through.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The lease table's name, as given.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn assemble(pool: PgPool, table: String, options: LeaseOptions) -> Result<Self> {
        let wakeups = Wakeups::new();
        let store = PgStore {
            pool: pool.clone(),
            sql: Sql::new(&quote_table(&table)),
            listener: Listener::new(pool.clone(), &wakeups),
        };
        let mut engine = LeaseEngine::new(store, wakeups);
        engine.set_options(options.clone())?;
        Ok(Lease {
            engine,
            pool,
            table,
            options,
        })
    }
}

lease_backend!(Lease);

/// The statements for one table, built once.
#[derive(Debug)]
struct Sql {
    claim: Arc<str>,
    renew: Arc<str>,
    renew_many: Arc<str>,
    release: Arc<str>,
    force_release: Arc<str>,
    inspect: Arc<str>,
    list: Arc<str>,
}

impl Sql {
    fn new(t: &str) -> Self {
        // $4 is always a length in microseconds.
        const MICROS: &str = "$4::bigint * interval '1 microsecond'";
        const COLUMNS: &str = "name, holder, mode, token, acquired_at, expires_at";
        Sql {
            // One statement: a fresh name is inserted with token 1; a known
            // name is taken over only if its lease has run out, with the next
            // token. A held name returns no row. Rows are never deleted, so
            // tokens never go back.
            claim: format!(
                "INSERT INTO {t} AS l (name, owner, holder, mode, token, acquired_at, expires_at)
                 VALUES ($1, $2, $3, 'x', 1, clock_timestamp(), clock_timestamp() + {MICROS})
                 ON CONFLICT (name) DO UPDATE
                    SET owner = excluded.owner, holder = excluded.holder, mode = excluded.mode,
                        token = l.token + 1, acquired_at = clock_timestamp(),
                        expires_at = clock_timestamp() + {MICROS}
                  WHERE l.expires_at <= clock_timestamp()
                 RETURNING token, expires_at"
            )
            .into(),
            renew: format!(
                "UPDATE {t} SET expires_at = clock_timestamp() + {MICROS}
                  WHERE name = $1 AND owner = $2 AND token = $3
                    AND expires_at > clock_timestamp()
                 RETURNING expires_at"
            )
            .into(),
            // Every lease of a batch in one statement: four parallel arrays
            // (names, owners, tokens, ttls in µs), unnested into rows and
            // joined to the table by primary key. Each row gets its own
            // ttl from clock_timestamp() and is renewed only if still
            // ours and unexpired; a released row has no owner, so a batch
            // landing after a release cannot revive it. The ordinal says
            // which lease each returned row is.
            renew_many: format!(
                "UPDATE {t} AS l
                    SET expires_at = clock_timestamp() + r.ttl * interval '1 microsecond'
                   FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                        WITH ORDINALITY AS r(name, owner, token, ttl, i)
                  WHERE l.name = r.name AND l.owner = r.owner AND l.token = r.token
                    AND l.expires_at > clock_timestamp()
                 RETURNING r.i, l.expires_at"
            )
            .into(),
            // $4 is hold_at_least (0 without): the lease ends now or at
            // acquired_at + hold, whichever is later. Waiters are notified
            // in the same statement when the name is free at once.
            //
            // A release that frees the name commits without waiting for the
            // WAL flush (synchronous_commit off, for this statement only):
            // losing it in a crash only leaves the lease to run out, and a
            // claim that saw it flushes it with its own commit. This takes
            // a disk flush off the handoff and, since PostgreSQL serializes
            // the commits of transactions that NOTIFY, keeps concurrent
            // releases from queueing behind each other's flush. A release
            // that keeps the lease for hold_at_least commits durably.
            release: format!(
                "WITH released AS (
                    UPDATE {t}
                       SET owner = NULL,
                           expires_at = greatest(clock_timestamp(), acquired_at + {MICROS})
                     WHERE name = $1 AND owner = $2 AND token = $3
                       AND expires_at > clock_timestamp()
                    RETURNING expires_at <= clock_timestamp() AS free)
                 SELECT free, CASE WHEN free THEN pg_notify('{CHANNEL}', $1) END,
                        CASE WHEN free THEN set_config('synchronous_commit', 'off', true) END
                   FROM released"
            )
            .into(),
            force_release: format!(
                "WITH broken AS (
                    UPDATE {t} SET owner = NULL, expires_at = clock_timestamp()
                     WHERE name = $1 AND expires_at > clock_timestamp()
                    RETURNING name)
                 SELECT pg_notify('{CHANNEL}', name) FROM broken"
            )
            .into(),
            inspect: format!(
                "SELECT {COLUMNS} FROM {t} WHERE name = $1 AND expires_at > clock_timestamp()"
            )
            .into(),
            list: format!(
                "SELECT {COLUMNS} FROM {t} WHERE expires_at > clock_timestamp()
                  ORDER BY name COLLATE \"C\""
            )
            .into(),
        }
    }
}

/// The PostgreSQL dialect of the lease protocol.
#[derive(Debug)]
pub(crate) struct PgStore {
    pool: PgPool,
    sql: Sql,
    listener: Listener,
}

/// Attempts at one statement that keeps failing with a serialization
/// failure, a deadlock or a unique violation.
const MAX_ATTEMPTS: u32 = 10;

/// Serialization failures (REPEATABLE READ and SERIALIZABLE pools see one
/// when two claims race on a row), deadlocks, and unique violations (an
/// insert racing another): each statement is its own transaction, so it is
/// safe to run again.
fn is_transient(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if matches!(db.code().as_deref(), Some("40001" | "40P01" | "23505")))
}

/// Runs `op` again after transient failures, with jittered backoff.
async fn retrying<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<T>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < MAX_ATTEMPTS && is_transient(&e) => {
                let cap = Duration::from_millis(2 << attempt.min(6));
                let pause = cap.mul_f64(rand::rng().random_range(0.1..=1.0));
                tracing::debug!(error = %e, attempt, "dblock: retrying a lease statement");
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
            Err(e) => return Err(map_err(e)),
        }
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn info(row: &PgRow) -> sqlx::Result<LockInfo> {
    let mode: String = row.try_get("mode")?;
    let mode = if mode.trim() == "s" {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let holder: Option<String> = row.try_get("holder")?;
    let mut info = LockInfo::new(Some(row.try_get("name")?), holder.unwrap_or_default(), mode);
    info.token = Some(row.try_get::<i64, _>("token")? as u64);
    info.acquired_at = Some(row.try_get("acquired_at")?);
    info.expires_at = Some(row.try_get("expires_at")?);
    Ok(info)
}

impl LeaseStore for PgStore {
    fn kind(&self) -> &'static str {
        "postgres-lease"
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        super::clock_timestamp(&self.pool).await
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
        let row: Option<(i64, DateTime<Utc>)> = retrying(|| async {
            // Waiting for a connection can take long when the pool is busy;
            // an acquirer that left meanwhile gets nothing claimed for it.
            let mut conn = self.pool.acquire().await?;
            if (claim.abandoned)() {
                return Ok(None);
            }
            sqlx::query_as(AssertSqlSafe(self.sql.claim.clone()))
                .bind(claim.name)
                .bind(claim.owner)
                .bind(claim.holder)
                .bind(micros(claim.ttl))
                .fetch_optional(&mut *conn)
                .await
        })
        .await?;
        Ok(row.map(|(token, expires_at)| Claimed {
            token: token as u64,
            expires_at,
        }))
    }

    async fn renew(
        &self,
        name: &str,
        owner: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<Option<DateTime<Utc>>> {
        retrying(|| {
            sqlx::query_scalar(AssertSqlSafe(self.sql.renew.clone()))
                .bind(name)
                .bind(owner)
                .bind(token as i64)
                .bind(micros(ttl))
                .fetch_optional(&self.pool)
        })
        .await
    }

    async fn renew_many(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let names: Vec<&str> = batch.iter().map(|r| &*r.name).collect();
        let owners: Vec<&str> = batch.iter().map(|r| &*r.owner).collect();
        let tokens: Vec<i64> = batch.iter().map(|r| r.token as i64).collect();
        let ttls: Vec<i64> = batch.iter().map(|r| micros(r.ttl)).collect();
        let rows: Vec<(i64, DateTime<Utc>)> = retrying(|| {
            sqlx::query_as(AssertSqlSafe(self.sql.renew_many.clone()))
                .bind(&names)
                .bind(&owners)
                .bind(&tokens)
                .bind(&ttls)
                .fetch_all(&self.pool)
        })
        .await?;
        let mut answers = vec![Renewed::Gone; batch.len()];
        for (i, at) in rows {
            // WITH ORDINALITY counts from 1.
            if let Some(answer) = usize::try_from(i - 1).ok().and_then(|i| answers.get_mut(i)) {
                *answer = Renewed::Until(at);
            }
        }
        Ok(answers)
    }

    async fn release(
        &self,
        name: &str,
        owner: &str,
        token: u64,
        hold: Option<Duration>,
    ) -> Result<bool> {
        let row: Option<PgRow> = retrying(|| {
            sqlx::query(AssertSqlSafe(self.sql.release.clone()))
                .bind(name)
                .bind(owner)
                .bind(token as i64)
                .bind(micros(hold.unwrap_or_default()))
                .fetch_optional(&self.pool)
        })
        .await?;
        Ok(row.is_some())
    }

    async fn force_release(&self, name: &str) -> Result<bool> {
        let row: Option<PgRow> = retrying(|| {
            sqlx::query(AssertSqlSafe(self.sql.force_release.clone()))
                .bind(name)
                .fetch_optional(&self.pool)
        })
        .await?;
        Ok(row.is_some())
    }

    async fn inspect(&self, name: &str) -> Result<Option<LockInfo>> {
        let row = sqlx::query(AssertSqlSafe(self.sql.inspect.clone()))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(info).transpose().map_err(map_err)
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let rows = sqlx::query(AssertSqlSafe(self.sql.list.clone()))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(info)
            .collect::<sqlx::Result<_>>()
            .map_err(map_err)
    }

    fn waiting(&self) {
        self.listener.ensure_running();
    }
}
