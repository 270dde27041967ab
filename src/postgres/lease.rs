//! Leases in a PostgreSQL table, timed by `clock_timestamp()`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::OnceCell;

use super::notify::{Listener, CHANNEL};
#[path = "lease_permits.rs"]
mod permits;
use super::token::sequence_token;
use super::{engine, map_err};
use crate::lease::permits::{holders_table, merge_list};
use crate::lease::{
    lease_backend, Claim, Claimed, LeaseEngine, LeaseId, LeaseOptions, LeaseStore, NewExpiry,
    Renewal, Renewed, Wakeups, SWEEP_BATCH,
};
use crate::name::{quote_table, validate_table};
use crate::retry::Backoff;
use crate::{LockInfo, LockMode, Result};
use permits::PermitSql;

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
/// - **Fencing tokens** come from the sequence `dblock_fencing_seq`, shared
///   with [`Advisory`](super::Advisory) and [`lock_in_transaction`](super::lock_in_transaction),
///   with the server's timeline in the high bits (failover-safe: see the
///   crate's failover notes): each grant's token is greater than every token
///   handed out before it in the database, so it increases per name whatever
///   the kind of holder.
/// - **Bounded table.** A row whose lease ended (released, or expired) is
///   deleted by a background sweep a couple of seconds later (at most one
///   sweep every 2 s per backend, started by releases), so the table holds
///   about the names held now, not every name ever used.
/// - **Waiting** polls with backoff (see [`LeaseOptions`]), and a release
///   anywhere wakes waiters at once: releases send `NOTIFY` on the channel
///   `dblock_lease_released` with the lock name as payload, and a backend
///   with waiters keeps one extra connection (made with the pool's connect
///   options, outside the pool, closed after a minute without waiters or
///   when the backend is dropped) that `LISTEN`s. If listening fails,
///   waiters just poll; behind a transaction-pooling proxy, turn it off
///   with [`transaction_pooling`](Lease::transaction_pooling). A lease that runs out rather than being released is noticed at
///   the next poll.
/// - **Semaphores** (`max_holders(n)`): each permit is a row of
///   `dblock_leases_holders` (migration 3; for a table of your own, the
///   same name with `_holders` appended), with its own token from the
///   sequence; the name's `dblock_leases` row is the semaphore's marker
///   while permits are live. A permit claim is one transaction under the
///   marker's row lock, so claims of one name never grant more than `n`.
///   The permits (and readers) due at a renewal tick renew in one
///   statement of their own, beside the batch of plain leases.
/// - **Shared (reader) leases** (`.shared()`): each reader is a row of the
///   holders table with `max_holders = 1` and its own token, the name's row
///   their marker (mode `s`); a reader claim is one transaction under the
///   marker's row lock, like a permit's, and every holder row due at a
///   renewal tick is renewed by one statement. A writer is a plain claim:
///   it takes the name once the last reader is gone. A writer that finds
///   readers and will wait sets the marker's `writer_waiting_until`
///   (migration 5) in the same claim statement, at each try, a little past
///   its next try; reader claims wait while it lies ahead, so readers
///   cannot starve a writer, and a writer's claim clears it. The release of
///   the last reader notifies waiters, the writer included.
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
    pooled: bool,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("table", &self.table)
            .field("options", self.engine.options())
            .field("transaction_pooling", &self.pooled)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Leases in `dblock_leases`, through `pool`, with default options.
    /// Run [`migrate`](super::migrate) once beforehand.
    pub fn new(pool: PgPool) -> Self {
        Lease::assemble(
            pool,
            DEFAULT_TABLE.to_owned(),
            LeaseOptions::default(),
            false,
        )
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
        let options = self.engine.options().clone();
        Lease::assemble(self.pool, table, options, self.pooled)
    }

    /// Replaces the options (see [`LeaseOptions`]) after checking them:
    /// [`Error::InvalidOption`](crate::Error::InvalidOption) unless
    /// `0 < min_poll <= max_poll`. Like `with_options` on every backend, it
    /// returns a new backend over the same pool and table: locks held through `self`
    /// stay with `self` (configure the backend before taking locks).
    ///
    /// With LISTEN/NOTIFY working, `max_poll` bounds only how late an
    /// expiry (not a release) is noticed.
    pub fn with_options(self, options: LeaseOptions) -> Result<Self> {
        Lease::assemble(self.pool, self.table, options, self.pooled)
    }

    /// For a pool whose connections go through a transaction-pooling proxy
    /// (PgBouncer `pool_mode=transaction`, Supavisor, RDS Proxy), which
    /// hands each transaction whichever server connection is free.
    ///
    /// With `true`, every statement runs inside its own transaction, as an
    /// unnamed statement: the proxy keeps one server connection for the
    /// whole exchange, and no prepared statement has to survive on a
    /// server connection another client may use next. (By default sqlx
    /// names and caches prepared statements per connection; through such a
    /// proxy that fails with `prepared statement "sqlx_s_1" already
    /// exists`.) It costs three more round trips per statement (BEGIN, the
    /// unnamed statement's separate parse, COMMIT), so leave it off on a
    /// direct connection or a session-pooling proxy. It also turns LISTEN
    /// off (a LISTEN would stay on a server connection that other clients
    /// get next): waiters poll (see [`LeaseOptions`]).
    ///
    /// The result is a new backend: leases held through `self` are not
    /// seen by it (configure the backend before taking leases).
    pub fn transaction_pooling(self, on: bool) -> Self {
        let options = self.engine.options().clone();
        Lease::assemble(self.pool, self.table, options, on).expect("the options were valid already")
    }

    /// The pool the leases are taken through.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The lease table's name, as given.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn assemble(pool: PgPool, table: String, options: LeaseOptions, pooled: bool) -> Result<Self> {
        let wakeups = Wakeups::new();
        let store = PgStore {
            pool: pool.clone(),
            sql: Sql::new(&quote_table(&table)),
            permits: holders_table(&table)
                .map(|h| PermitSql::new(&quote_table(&table), &quote_table(&h))),
            table: table.clone(),
            listener: Listener::new(pool.clone(), &wakeups),
            pooled,
            engine: OnceCell::new(),
        };
        Ok(Lease {
            engine: LeaseEngine::new(store, wakeups, options)?,
            pool,
            table,
            pooled,
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
    sweep: Arc<str>,
    inspect: Arc<str>,
    list: Arc<str>,
}

impl Sql {
    fn new(t: &str) -> Self {
        // $4 is always a length in microseconds.
        const MICROS: &str = "$4::bigint * interval '1 microsecond'";
        const COLUMNS: &str = "name, holder, mode, token, acquired_at, expires_at";
        let token = sequence_token();
        Sql {
            // One statement: a fresh name is inserted; a known name is
            // taken over only if its lease has run out. A held name returns
            // no row. Tokens come from the database's fencing sequence
            // (drawn again, after the row is locked, for a takeover), so a
            // name whose row was swept still gets a greater token.
            //
            // A writer that misses a name held by readers and is going to
            // wait ($5, the mark's length in µs, not NULL) marks it in the
            // same statement, so that new readers stay out (see
            // `lease::permits`, "Readers"); a claim that takes the name
            // clears the mark. The mark updates only a row the claim left
            // unchanged (locked, not modified, by the upsert), never a
            // row it took or inserted.
            claim: format!(
                "WITH claimed AS (
                    INSERT INTO {t} AS l (name, owner, holder, mode, token, acquired_at, expires_at)
                    VALUES ($1, $2, $3, 'x', {token}, clock_timestamp(),
                            clock_timestamp() + {MICROS})
                    ON CONFLICT (name) DO UPDATE
                       SET owner = excluded.owner, holder = excluded.holder, mode = excluded.mode,
                           token = {token}, acquired_at = clock_timestamp(),
                           expires_at = clock_timestamp() + {MICROS},
                           writer_waiting_until = NULL
                     WHERE l.expires_at <= clock_timestamp()
                    RETURNING token, expires_at),
                 marked AS (
                    UPDATE {t} SET writer_waiting_until =
                           clock_timestamp() + $5::bigint * interval '1 microsecond'
                     WHERE $5::bigint IS NOT NULL AND name = $1 AND mode = 's'
                       AND expires_at > clock_timestamp()
                       AND NOT EXISTS (SELECT 1 FROM claimed))
                 SELECT token, expires_at FROM claimed"
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
            // Rows whose lease ended more than $1 µs ago, a batch at a time;
            // rows being claimed or renewed right now are skipped.
            sweep: format!(
                "DELETE FROM {t} WHERE name IN (
                    SELECT name FROM {t}
                     WHERE expires_at < clock_timestamp() - $1::bigint * interval '1 microsecond'
                     LIMIT {SWEEP_BATCH} FOR UPDATE SKIP LOCKED)
                   AND expires_at < clock_timestamp() - $1::bigint * interval '1 microsecond'"
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
    /// The statements of semaphores' permits; `None` when the holders
    /// table's name would be too long.
    permits: Option<PermitSql>,
    /// The lease table, as given.
    table: String,
    listener: Listener,
    /// Whether statements run as unnamed ones in their own transaction
    /// (behind a transaction-pooling proxy).
    pooled: bool,
    /// The engine self-test's verdict, taken at the first claim.
    engine: OnceCell<Option<&'static str>>,
}

/// A connection for one statement: from the pool, or (behind a
/// transaction-pooling proxy) a transaction of its own.
enum Conn {
    Plain(PoolConnection<Postgres>),
    Tx(Transaction<'static, Postgres>),
}

impl Conn {
    fn get(&mut self) -> &mut PgConnection {
        match self {
            Conn::Plain(c) => c,
            Conn::Tx(t) => t,
        }
    }

    /// Commits the statement's transaction, if it has one.
    async fn done(self) -> sqlx::Result<()> {
        match self {
            Conn::Plain(_) => Ok(()),
            Conn::Tx(t) => t.commit().await,
        }
    }
}

impl PgStore {
    async fn conn(&self) -> sqlx::Result<Conn> {
        // Boxed: sqlx's pool acquisition carries the state of opening a
        // connection (about 9 KB); inline, it made every statement's
        // future that large, and each layer that builds and moves one (the
        // retry, the store's call, the engine's, the box that finishes an
        // abandoned call) copied it.
        Ok(if self.pooled {
            Conn::Tx(Box::pin(self.pool.begin()).await?)
        } else {
            Conn::Plain(Box::pin(self.pool.acquire()).await?)
        })
    }

    /// Runs one statement, built by `query`, and returns its rows.
    async fn fetch_all(&self, query: impl Fn() -> Query) -> sqlx::Result<Vec<PgRow>> {
        let mut conn = self.conn().await?;
        let rows = query()
            .persistent(!self.pooled)
            .fetch_all(conn.get())
            .await?;
        conn.done().await?;
        Ok(rows)
    }

    /// Runs one statement, built by `query`, for its effect: unnamed and in
    /// a transaction of its own behind a transaction pooler, as every
    /// statement of this store.
    async fn execute(
        &self,
        query: impl Fn() -> Query,
    ) -> sqlx::Result<sqlx::postgres::PgQueryResult> {
        let mut conn = self.conn().await?;
        let done = query().persistent(!self.pooled).execute(conn.get()).await?;
        conn.done().await?;
        Ok(done)
    }

    /// [`fetch_all`](Self::fetch_all) for at most one row.
    async fn fetch_optional(&self, query: impl Fn() -> Query) -> sqlx::Result<Option<PgRow>> {
        Ok(self.fetch_all(query).await?.into_iter().next())
    }

    /// Runs the renewal statement `sql` of one lease or permit ($1 name,
    /// $2 owner, $3 token, $4 ttl in microseconds): its new expiry, or
    /// `None` if it is no longer theirs.
    async fn renew_one(&self, sql: &Arc<str>, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        let row = retrying(|| {
            self.fetch_optional(|| {
                bind_lease(sqlx::query(AssertSqlSafe(sql.clone())), lease).bind(micros(ttl))
            })
        })
        .await?;
        row.map(|row| row.try_get(0)).transpose().map_err(map_err)
    }

    /// Refuses engines that cannot carry leases safely; asks once.
    async fn check_engine(&self) -> Result<()> {
        // Boxed: asked once, and every claim's future would otherwise carry
        // (and copy) its state.
        let verdict = match self.engine.get() {
            Some(verdict) => verdict,
            None => {
                Box::pin(self.engine.get_or_try_init(|| async {
                    let row = self
                        .fetch_optional(|| sqlx::query("SELECT version()"))
                        .await
                        .map_err(lease_err)?;
                    let version: String = match row {
                        Some(row) => row.try_get(0)?,
                        None => String::new(),
                    };
                    Ok::<_, crate::Error>(engine::refusal(&version))
                }))
                .await?
            }
        };
        match verdict {
            Some(why) => Err(engine::unsupported("postgres-lease", why)),
            None => Ok(()),
        }
    }
}

type Query = sqlx::query::Query<'static, Postgres, PgArguments>;

/// Binds a lease's name, owner and token (`$1`, `$2`, `$3` of the
/// statements that renew or release one lease).
fn bind_lease(q: Query, lease: LeaseId<'_>) -> Query {
    q.bind(lease.name.to_owned())
        .bind(lease.owner.to_owned())
        .bind(lease.token as i64)
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
async fn retrying<T, F, Fut>(op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<T>>,
{
    let backoff = Backoff::new(Duration::from_millis(4), Duration::from_millis(128));
    let again = |e: &sqlx::Error, attempt| {
        let again = attempt < MAX_ATTEMPTS && is_transient(e);
        if again {
            tracing::debug!(error = %e, attempt, "dblock: retrying a lease statement");
        }
        again
    };
    crate::retry::retrying(backoff, again, op)
        .await
        .map_err(lease_err)
}

/// [`map_err`], and a clear error for named statements that clashed on a
/// transaction pooler.
fn lease_err(e: sqlx::Error) -> crate::Error {
    if engine::is_statement_clash(&e) {
        return engine::lease_needs_transaction_pooling(&e);
    }
    map_err(e)
}

use crate::time::micros;

/// The answers of a batch renewal of `n` leases whose rows came back as
/// `(ordinal, new expiry)`: renewed if returned, gone otherwise.
fn ordinal_answers(n: usize, rows: &[PgRow]) -> Result<Vec<Renewed>> {
    let mut answers = vec![Renewed::Gone; n];
    for row in rows {
        let (i, at): (i64, DateTime<Utc>) = (
            row.try_get(0).map_err(map_err)?,
            row.try_get(1).map_err(map_err)?,
        );
        // WITH ORDINALITY counts from 1.
        if let Some(answer) = usize::try_from(i - 1).ok().and_then(|i| answers.get_mut(i)) {
            *answer = Renewed::Until(at);
        }
    }
    Ok(answers)
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
        if claim.is_holder() {
            return self.claim_permit(claim).await;
        }
        self.check_engine().await?;
        let row: Option<PgRow> = retrying(|| async {
            // Waiting for a connection can take long when the pool is busy;
            // an acquirer that left meanwhile gets nothing claimed for it.
            let mut conn = self.conn().await?;
            if (claim.abandoned)() {
                return Ok(None);
            }
            let row = sqlx::query(AssertSqlSafe(self.sql.claim.clone()))
                .persistent(!self.pooled)
                .bind(claim.name)
                .bind(claim.owner)
                .bind(claim.holder)
                .bind(micros(claim.ttl))
                .bind(claim.writer_waits.map(micros))
                .fetch_optional(conn.get())
                .await?;
            conn.done().await?;
            Ok(row)
        })
        .await?;
        row.map(|row| {
            Ok(Claimed {
                token: row.try_get::<i64, _>(0)? as u64,
                expires_at: row.try_get(1)?,
            })
        })
        .transpose()
        .map_err(map_err)
    }

    async fn renew(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        self.renew_one(&self.sql.renew, lease, ttl).await
    }

    async fn renew_permit(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        self.renew_holder(lease, ttl).await
    }

    async fn renew_many(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let names: Vec<&str> = batch.iter().map(|r| &*r.name).collect();
        let owners: Vec<&str> = batch.iter().map(|r| &*r.owner).collect();
        let tokens: Vec<i64> = batch.iter().map(|r| r.token as i64).collect();
        let ttls: Vec<i64> = batch.iter().map(|r| micros(r.ttl)).collect();
        let rows = retrying(|| {
            self.fetch_all(|| {
                sqlx::query(AssertSqlSafe(self.sql.renew_many.clone()))
                    .bind(&names)
                    .bind(&owners)
                    .bind(&tokens)
                    .bind(&ttls)
            })
        })
        .await?;
        ordinal_answers(batch.len(), &rows)
    }

    async fn renew_holders(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        self.renew_holders_batch(batch).await
    }

    async fn release(&self, lease: LeaseId<'_>, hold: Option<Duration>) -> Result<bool> {
        let row = retrying(|| {
            self.fetch_optional(|| {
                bind_lease(sqlx::query(AssertSqlSafe(self.sql.release.clone())), lease)
                    .bind(micros(hold.unwrap_or_default()))
            })
        })
        .await?;
        Ok(row.is_some())
    }

    async fn release_permit(&self, lease: LeaseId<'_>, hold: Option<Duration>) -> Result<bool> {
        self.release_holder(lease, hold).await
    }

    async fn force_release(&self, name: &str) -> Result<bool> {
        if let Some(broken) = self.force_release_all(name).await? {
            return Ok(broken);
        }
        let row = retrying(|| {
            self.fetch_optional(|| {
                sqlx::query(AssertSqlSafe(self.sql.force_release.clone())).bind(name.to_owned())
            })
        })
        .await?;
        Ok(row.is_some())
    }

    async fn inspect(&self, name: &str) -> Result<Option<LockInfo>> {
        if let Some(info) = self.inspect_permits(name).await? {
            return Ok(Some(info));
        }
        let row = self
            .fetch_optional(|| {
                sqlx::query(AssertSqlSafe(self.sql.inspect.clone())).bind(name.to_owned())
            })
            .await
            .map_err(lease_err)?;
        row.as_ref().map(info).transpose().map_err(map_err)
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let rows = self
            .fetch_all(|| sqlx::query(AssertSqlSafe(self.sql.list.clone())))
            .await
            .map_err(lease_err)?;
        let plain = rows
            .iter()
            .map(info)
            .collect::<sqlx::Result<_>>()
            .map_err(map_err)?;
        Ok(merge_list(plain, self.list_permits().await?))
    }

    async fn sweep(&self, grace: Duration) -> Result<u64> {
        let done = retrying(|| {
            self.execute(|| sqlx::query(AssertSqlSafe(self.sql.sweep.clone())).bind(micros(grace)))
        })
        .await?;
        Ok(done.rows_affected() + self.sweep_permits(grace).await?)
    }

    fn waiting(&self) {
        // Never LISTEN through a transaction pooler: the LISTEN would stay
        // on a server connection other clients use next, and they would
        // get notifications they do not expect.
        if !self.pooled {
            self.listener.ensure_running();
        }
    }
}
