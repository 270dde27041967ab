//! Session-level PostgreSQL advisory locks, many to a connection.
//!
//! - [`acquire`]: one acquisition, top to bottom: its attempts on holder
//!   sessions, then its polling or server-side wait.
//! - [`release`]: one release: the guard's handle and its unlock.
//! - [`registry`]: which locks this backend holds on which session, and the
//!   routing that keeps PostgreSQL's lock stacking from making them
//!   re-entrant.
//! - [`session`]: the holder sessions: a connection behind an async mutex,
//!   the statements sent on it (from the caller's task), and a keeper task
//!   for heartbeats.
//!
//! An uncontended `try_acquire` + `release` reads, end to end, in two
//! files: [`Backend::acquire`] → `acquire::acquire` (the caller's task) →
//! `try_on_session`: `Registry::route` picks a holder session and records a
//! pending hold → `lock_on`: the session's connection (its mutex), one
//! lock statement (`Session::try_lock`), then `granted` records the hold
//! (`Registry::granted`) and makes the guard. Its release, in `release`:
//! `Held::release` → `unlock`: the same mutex, one unlock statement
//! (`Session::unlock`), `Registry::release`. The session's lock and
//! unlock methods only send statements; the locks' records in the registry
//! are kept by those two files. No task is
//! spawned and no message goes to another task on that path; an attempt
//! or release whose caller is dropped mid-statement is finished by a task
//! of its own ([`Detached`](crate::detach::Detached)).

mod acquire;
mod holders;
mod registry;
mod release;
pub(crate) mod semaphore;
mod session;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use tokio::sync::Semaphore;

use super::{advisory_key, engine};
use crate::backend::{BoxFuture, Grant};
use crate::detach::Detached;
use crate::lease::Wakeups;
use crate::{AcquireRequest, Backend, Error, LockInfo, LockMode, Result};
use registry::{Registry, SessionId};
use release::Released;

/// dblock's exclusive advisory try-lock statement, for the benchmark's
/// "raw, same work" baseline: the bench sends it by hand with the
/// parameters a holder session gives it (`$1` the key, `$2` the session's
/// marker, `$3` its backend pid). It answers -1 (another server session),
/// NULL (busy) or the raw value drawn from the fencing sequence. Not a
/// stable interface.
#[doc(hidden)]
pub fn bench_try_exclusive_sql() -> &'static str {
    session::try_exclusive_sql()
}

/// dblock's exclusive server-side wait, for the benchmark's "raw, same
/// work" handoff: the statement that marks the session and lifts its
/// timeouts (`$1` the holder session's marker; it answers whether the
/// session was free of another holder's marker, its pid, the timeouts'
/// values before, what it set, and the server session's timeline), and the
/// waiting statement (`$1` the key, `$2` the lock_timeout, `$3` the marker,
/// `$4` the pid; it answers whether it ran on the session marked, and the
/// raw value of the fencing sequence). Not a stable interface.
#[doc(hidden)]
pub fn bench_wait_exclusive_sql() -> (&'static str, &'static str) {
    acquire::wait_exclusive_sql()
}

/// How an [`Advisory`] acquisition waits for a held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitStrategy {
    /// Block in `pg_advisory_lock` on the server, bounded by a
    /// statement-local `lock_timeout` (a role's `statement_timeout` is
    /// lifted for the wait, so only `.wait(d)` bounds it, and put back
    /// before the connection returns to the pool): the prompt
    /// handoff. At most one acquisition per name per process waits this
    /// way, and only as many as the backend's wait slots allow (see
    /// [`Advisory`]); the others wait in-process. Each waiting
    /// acquisition takes a connection of its own from the pool for the wait,
    /// so that nothing else queues behind it; when the wait is granted, that
    /// connection carries the lock (see [`Advisory`]). The waiting statement
    /// holds a snapshot meanwhile, which holds back
    /// `CREATE INDEX CONCURRENTLY` and vacuum's horizon on that database.
    Server,
    /// Call `pg_try_advisory_lock` with backoff between `min` and `max`
    /// (with jitter); no statement runs while waiting and no connection is
    /// taken for it. Releases in this process wake local waiters at once.
    Poll {
        /// The first pause.
        min: Duration,
        /// The longest pause.
        max: Duration,
    },
}

/// Settings of an [`Advisory`] backend.
///
/// Built from [`Default`] with the builder methods, so that options added
/// later do not break existing code; checked by
/// [`Advisory::with_options`].
///
/// ```
/// use std::time::Duration;
/// use dblock::postgres::{AdvisoryOptions, WaitStrategy};
/// let options = AdvisoryOptions::default()
///     .heartbeat(Duration::from_secs(2))
///     .wait(WaitStrategy::Server);
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AdvisoryOptions {
    /// How to wait for a held lock. Default: [`WaitStrategy::Server`].
    pub wait: WaitStrategy,
    /// How often each holder session is checked (`SELECT 1`) when no other
    /// statement has run on it meanwhile. The loss bound it gives: when a
    /// session is terminated or its connection is closed, every guard on
    /// it reports itself lost within one heartbeat of the session's last
    /// successful statement; when the session stops answering (a
    /// black-holed network, a stopped server), within one heartbeat plus
    /// the answer bound, which is the heartbeat and at least 2 s (so 10 s
    /// by default). Until then a guard may still say it holds a lock the
    /// server has already ended; fence writes with the token. It also
    /// bounds how long an empty session lingers before it goes back to the
    /// pool. Default 5 s.
    pub heartbeat: Duration,
}

impl AdvisoryOptions {
    /// Sets how to wait for a held lock (see [`WaitStrategy`]).
    pub fn wait(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }

    /// Sets the heartbeat (see [`heartbeat`](Self::heartbeat)): 10 ms ..= 1 h
    /// (checked by [`Advisory::with_options`]).
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }
}

impl Default for AdvisoryOptions {
    fn default() -> Self {
        AdvisoryOptions {
            wait: WaitStrategy::Server,
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// The default number of holder sessions.
const DEFAULT_HOLDER_SESSIONS: usize = 2;
/// The most holder sessions accepted.
const MAX_HOLDER_SESSIONS: usize = 64;

/// PostgreSQL's SQLSTATE for "out of shared memory": the lock table is full.
const LOCK_TABLE_FULL: &str = "53200";

/// PostgreSQL session-level advisory locks (`pg_advisory_lock` family),
/// many of them on few connections.
///
/// # Connections
///
/// Locks are taken on a few long-lived **holder sessions**: connections
/// taken from the pool and kept while they carry locks, each carrying any
/// number of them (2 by default, see [`with_holder_sessions`]). A held lock
/// therefore does not pin a pool connection of its own: a pool of 10 can
/// hold thousands of locks. A lock ends when it is released or when its
/// session ends, so a crashed process never leaves it behind. A holder
/// session that holds nothing goes back to the pool after a heartbeat,
/// clean (`pg_advisory_unlock_all()` first): a connection that may hold a
/// lock is never returned to the pool, it is closed instead.
///
/// With [`WaitStrategy::Server`], an acquisition that has to wait takes a
/// connection of its own from the pool and blocks on it, so that releases
/// and other acquisitions never queue behind it. When the wait is granted,
/// the lock lives on that connection, which becomes a holder session: it
/// joins the holder sessions if there are fewer than configured, and
/// otherwise carries just that lock and goes back to the pool when it is
/// released. (Moving the lock onto an existing holder session is not
/// possible without a moment where neither session holds it, which another
/// contender could use: PostgreSQL does not let two sessions hold an
/// exclusive lock at once.) So each granted server-side wait still held,
/// and each wait under way, uses a connection; polling waits use none.
///
/// Server-side waits use a bounded share of the pool: at most one per name
/// in this process (the other acquisitions of that name wait in-process,
/// woken by releases here and polling the holder sessions), and at most
/// half of what the holder sessions leave of the pool (at least one),
/// counting the waits under way and the locks they were granted that
/// still live on their own connection. Past that, waiters poll. So a pool
/// of 4 with 2 holder sessions keeps at least one connection for the
/// application however many tasks wait.
///
/// Size the pool for the holder sessions, the server-side waits under way
/// and the locks they were granted, plus `inspect`, `list` and
/// `force_release` and whatever else the application runs on it. The
/// number of holder sessions is capped at the pool's size minus one. If
/// the pool is exhausted, a server-side waiter keeps trying on the holder
/// sessions until a connection is free.
///
/// An acquisition runs in the caller's task: an uncontended
/// `try_acquire` is one statement on a holder session's connection (taken
/// behind an async mutex, which the session's heartbeat takes too), and a
/// `release` is one more; neither spawns a task nor messages one. If the
/// caller's future is dropped while such a statement is under way, a task
/// finishes it and releases a lock it took. Acquisitions on one holder
/// session queue for its connection; more holder sessions
/// ([`with_holder_sessions`]) let more of them run at once.
///
/// # Semantics
///
/// - Fencing tokens come from the sequence `dblock_fencing_seq` in the same
///   statement as the lock: run [`migrate`](super::migrate) once. Names map
///   to keys by [`advisory_key`], so other programs can take the same locks.
/// - Shared (reader) locks are native.
/// - **Semaphores** (`max_holders(n)`): a permit is an exclusive advisory
///   lock on one of `n` slot keys derived from the name, tried in turn,
///   with its own token; it also holds, shared, the name's own key (so a
///   plain lock and permits exclude each other on the server), a semaphore
///   marker and a marker of its `n` (keys in the README, beside the
///   name's). A permit, plain lock or reader that finds the name held with
///   another `n` sees it by these markers in `pg_locks`, in any process,
///   and fails with [`Error::InvalidOption`]; two such acquisitions racing
///   may both fail, never both succeed. A permit takes four entries of the
///   lock table. Permits wait by polling (the poll bounds of
///   [`WaitStrategy::Poll`], or 10 to 250 ms with
///   [`WaitStrategy::Server`]), woken at once by releases in this process:
///   a wait on one slot would miss the others' releases. `inspect` counts
///   the slots held; `list` shows the semaphores this backend holds permits
///   of by name, others' as the bare keys they hold. A reader's lock
///   statement reads `pg_locks` for the semaphore marker after it takes
///   the name's key (a reader beside permits gives way), as does the first
///   attempt of any lock that misses: the price of locks and permits
///   sharing that key.
/// - `.ttl()` and `.hold_at_least()` are refused with
///   [`Error::Unsupported`] before anything is sent to the database: the
///   lock lives as long as its session, so neither a lease length nor a
///   minimum hold can be kept (a lock that must expire by itself, or
///   outlive its process, needs a lease: [`Lease`](super::Lease)).
///   [`LockGuard::expires_at`](crate::LockGuard::expires_at) is `None`.
///   An election's ttl ([`Election::ttl`](crate::Election::ttl)) only paces
///   its observers here.
/// - Not re-entrant, although PostgreSQL stacks session locks: the backend
///   records which locks it holds on which session, and a second
///   acquisition of a name it holds waits like any other contender (shared
///   beside shared is granted, as between processes; several shared guards
///   of one name may share a session, each releasing its own hold).
///
/// # Loss
///
/// Each holder session is checked once per heartbeat (when nothing else ran
/// on it). When a session dies or is terminated, every guard on it reports
/// itself lost within a heartbeat. A session is also closed, with the same
/// effect on all its guards, when an unlock's outcome is unknown or a
/// statement gets no answer within the heartbeat (at least 2 s).
///
/// [`Locks::force_release`](crate::Locks::force_release) breaks a lock held
/// by this backend by unlocking it on its session: only that lock's guards
/// report lost. A lock held by another process (or another `Advisory`) can
/// only be broken by terminating the session that holds it, since only the
/// owning session can unlock it; **that ends every other lock on that
/// session too**, and their guards report lost as well.
///
/// # Poolers, failover and other engines
///
/// Session-level locks need a session of their own. Through a
/// transaction-pooling proxy (PgBouncer `pool_mode=transaction`,
/// Supavisor), which hands each transaction whichever server connection is
/// free, the backend refuses with [`Error::Unsupported`] naming the
/// alternatives ([`Lease`](super::Lease) with
/// [`transaction_pooling`](super::Lease::transaction_pooling),
/// [`lock_in_transaction`](super::lock_in_transaction), a session-pooling port). Each holder
/// session marks its server session (a random value in the session setting
/// `dblock.session`, set by its first statement only if no other holder's
/// mark is there) and every lock statement and heartbeat checks that mark
/// and the backend pid in the same statement, before it locks; the first
/// holder session also looks from a second pooled connection whether it
/// sees the same server session. Nothing is locked on a server session
/// that is not the holder's own. A session-pooling proxy works as a direct
/// connection.
///
/// Tokens carry the server's timeline in their high bits, so they keep
/// increasing across the promotion of an asynchronous standby that lost the
/// primary's last commits (the old primary must be fenced off by the
/// failover tool). CockroachDB, whose advisory locks are stubs, and
/// YugabyteDB are refused with [`Error::Unsupported`]. See
/// `docs/topologies.md`.
///
/// # Capacity
///
/// Every advisory lock takes an entry in PostgreSQL's shared lock table,
/// which has room for about `max_locks_per_transaction ×
/// (max_connections + max_prepared_transactions)` locks (6,400 on a default
/// configuration, with some slack) for all sessions of the server together.
/// When it is full an acquisition fails at once with
/// [`Error::LockTableFull`], which names the setting to raise; locks
/// already held stay held and others can be taken once some are released.
/// Other applications on the server share the same table.
///
/// [`with_holder_sessions`]: Advisory::with_holder_sessions
#[derive(Clone)]
pub struct Advisory {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    pool: PgPool,
    options: AdvisoryOptions,
    holder_sessions: usize,
    wakeups: Arc<Wakeups>,
    registry: Mutex<Registry>,
    /// Held while the first core holder session is being opened.
    opening: tokio::sync::Mutex<()>,
    /// Whether another core holder session is being opened in the
    /// background.
    growing: AtomicBool,
    ids: AtomicU64,
    /// Keys with a server-side waiter in this process: at most one per key,
    /// the others wait in-process (see [`acquire`]).
    server_waits: Mutex<HashSet<i64>>,
    /// Connections that server-side waits may take from the pool, held
    /// while waiting and while the lock a wait was granted lives on its
    /// connection.
    wait_slots: Arc<Semaphore>,
    /// Set once a session found the engine or the connection unfit; every
    /// acquisition is refused from then on.
    refused: OnceLock<Refusal>,
    /// Whether the first holder session probed for a transaction pooler.
    probed: AtomicBool,
}

/// Why an [`Advisory`] backend refuses to take locks.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refusal {
    /// The engine is not PostgreSQL's (see `engine::refusal`).
    Engine(&'static str),
    /// A statement ran on a server session other than its holder
    /// session's: a transaction-pooling proxy.
    Pooler,
}

impl fmt::Debug for Advisory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Advisory")
            .field("options", &self.inner.options)
            .field("holder_sessions", &self.inner.holder_sessions)
            .finish_non_exhaustive()
    }
}

impl Advisory {
    /// Advisory locks on connections from `pool`, with default options.
    pub fn new(pool: PgPool) -> Self {
        Self::build(pool, AdvisoryOptions::default(), DEFAULT_HOLDER_SESSIONS)
    }

    fn build(pool: PgPool, options: AdvisoryOptions, holder_sessions: usize) -> Self {
        let size = pool.options().get_max_connections() as usize;
        let wait_slots = server_wait_slots(size, holder_sessions);
        Advisory {
            inner: Arc::new(Inner {
                pool,
                options,
                holder_sessions,
                wakeups: Wakeups::new(),
                registry: Mutex::default(),
                opening: tokio::sync::Mutex::new(()),
                growing: AtomicBool::new(false),
                ids: AtomicU64::new(1),
                server_waits: Mutex::default(),
                wait_slots: Arc::new(Semaphore::new(wait_slots)),
                refused: OnceLock::new(),
                probed: AtomicBool::new(false),
            }),
        }
    }

    /// Replaces the options (see [`AdvisoryOptions`]) after checking them:
    /// [`Error::InvalidOption`] for a heartbeat outside 10 ms ..= 1 h or
    /// poll bounds out of order. Like `with_options` on every backend, it
    /// returns a new backend over the same pool: locks held through `self`
    /// stay with `self` (configure the backend before taking locks).
    pub fn with_options(self, options: AdvisoryOptions) -> Result<Self> {
        let hb = options.heartbeat;
        if hb < Duration::from_millis(10) || hb > Duration::from_secs(3600) {
            return Err(Error::InvalidOption(format!(
                "heartbeat of {hb:?} is outside 10 ms ..= 1 h"
            )));
        }
        if let WaitStrategy::Poll { min, max } = options.wait {
            if min.is_zero() || min > max || max > Duration::from_secs(3600) {
                return Err(Error::InvalidOption(format!(
                    "poll bounds must satisfy 0 < min <= max <= 1 h (got {min:?} and {max:?})"
                )));
            }
        }
        Ok(Self::build(
            self.inner.pool.clone(),
            options,
            self.inner.holder_sessions,
        ))
    }

    /// Sets how many holder sessions new locks are spread over (default 2). Sessions are opened as the load needs
    /// them, at most this many and at most the pool's size minus one; more
    /// sessions take locks faster when many tasks acquire at once, fewer
    /// leave more of the pool to the rest of the application. Fails with
    /// [`Error::InvalidOption`] outside 1 ..= 64.
    ///
    /// The result is a new backend: locks held through `self` are not seen
    /// by it (configure the backend before taking locks).
    pub fn with_holder_sessions(self, sessions: usize) -> Result<Self> {
        if sessions == 0 || sessions > MAX_HOLDER_SESSIONS {
            return Err(Error::InvalidOption(format!(
                "holder sessions must lie within 1 ..= {MAX_HOLDER_SESSIONS} (got {sessions})"
            )));
        }
        Ok(Self::build(
            self.inner.pool.clone(),
            self.inner.options.clone(),
            sessions,
        ))
    }

    /// The pool this backend takes connections from.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }
}

/// How many connections server-side waits may use at once: half of what the
/// holder sessions leave of the pool, at least one. The rest stays for the
/// application's own queries (and `inspect`, `list`, `force_release`).
fn server_wait_slots(pool_size: usize, holder_sessions: usize) -> usize {
    let sessions = core_sessions(pool_size, holder_sessions);
    (pool_size.saturating_sub(sessions) / 2).max(1)
}

/// How many core holder sessions to open at most: as configured, and at
/// most the pool's size minus one.
fn core_sessions(pool_size: usize, holder_sessions: usize) -> usize {
    holder_sessions.min(pool_size.saturating_sub(1).max(1))
}

/// The error for a full lock table; `size` tells the configured size, if
/// known.
fn lock_table_full(size: &str) -> Error {
    Error::LockTableFull {
        detail: format!(
            "PostgreSQL's shared lock table has no room for another advisory lock \
             (SQLSTATE 53200, \"out of shared memory\"). It holds \
             max_locks_per_transaction x (max_connections + max_prepared_transactions) \
             locks for all sessions on the server together{size}. Release locks, or raise \
             max_locks_per_transaction in postgresql.conf (a server restart is needed)"
        ),
    }
}

impl Inner {
    fn refuse(&self, why: Refusal) {
        let _ = self.refused.set(why);
    }

    /// The error every acquisition answers once the backend refused.
    fn refusal(&self) -> Option<Error> {
        self.refused.get().map(|why| match why {
            Refusal::Engine(why) => engine::unsupported("postgres-advisory", why),
            Refusal::Pooler => engine::transaction_pooler(),
        })
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many core holder sessions to open at most.
    fn target_sessions(&self) -> usize {
        let pool = self.pool.options().get_max_connections() as usize;
        core_sessions(pool, self.holder_sessions)
    }

    /// Opens another core holder session in the background, if the pool
    /// has a connection to spare at once (idle, or room to open one): the
    /// sessions there are have a backlog.
    fn grow(self: &Arc<Self>) {
        if let Some(conn) = self.pool.try_acquire() {
            tokio::spawn(session::open(self.clone(), conn));
            return;
        }
        if self.pool.size() >= self.pool.options().get_max_connections()
            || self.growing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            let conn = inner.pool.acquire().await;
            inner.growing.store(false, Ordering::Release);
            if let Ok(conn) = conn {
                let _ = session::open(inner, conn).await;
            }
        });
    }

    /// How long a holder session may take to answer a statement before it
    /// is considered dead.
    fn answer_within(&self) -> Duration {
        self.options.heartbeat.max(Duration::from_secs(2))
    }

    /// The session is gone (or being closed): forget it, report its locks
    /// lost and wake whoever waits for them here. Idempotent.
    fn session_gone(&self, session: SessionId, loss: &crate::error::Loss) {
        let lost = self.registry().remove_session(session);
        for (name, status) in lost.into_iter().flatten() {
            status.mark(loss.clone());
            self.wakeups.wake(&name);
        }
    }

    async fn query_locks(&self, key: Option<i64>) -> Result<Vec<LockInfo>> {
        let (classid, objid) = key.map(split_key).unzip();
        let rows = sqlx::query(
            "SELECT ((l.classid::bigint << 32) | l.objid::bigint) AS key,
                    bool_or(l.mode = 'ExclusiveLock') FILTER (WHERE l.granted) AS exclusive,
                    count(*) FILTER (WHERE l.granted) AS holders,
                    count(*) FILTER (WHERE NOT l.granted) AS waiters,
                    string_agg(format('pid %s%s%s', l.pid,
                        ' (' || nullif(a.application_name, '') || ')',
                        ' from ' || host(a.client_addr)), ', ' ORDER BY l.pid)
                        FILTER (WHERE l.granted) AS holder
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.objsubid = 1
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ($1::bigint IS NULL OR (l.classid::bigint = $1 AND l.objid::bigint = $2))
              GROUP BY 1 HAVING bool_or(l.granted) ORDER BY 1",
        )
        .bind(classid)
        .bind(objid)
        .fetch_all(&self.pool)
        .await?;
        let registry = self.registry();
        rows.into_iter()
            .map(|row| {
                let key: i64 = row.try_get("key")?;
                let exclusive: bool = row.try_get("exclusive")?;
                let mode = if exclusive {
                    LockMode::Exclusive
                } else {
                    LockMode::Shared
                };
                let ours = registry.ours(key);
                let mut info = LockInfo::new(
                    ours.as_ref().map(|o| o.name.clone()),
                    row.try_get::<Option<String>, _>("holder")?
                        .unwrap_or_default(),
                    mode,
                );
                info.key = Some(key);
                // pg_locks shows one row per session; guards of ours that
                // share a session (stacked shared locks) count each.
                info.holders = row.try_get::<i64, _>("holders")? as u32
                    + ours.as_ref().map_or(0, |o| o.stacked);
                info.token = ours.map(|o| o.token);
                // Sessions blocked in pg_advisory_lock on this key (one
                // ungranted pg_locks row each).
                info.waiters = Some(row.try_get::<i64, _>("waiters")? as u32);
                Ok(info)
            })
            .collect()
    }
}

/// `pg_locks` shows a bigint key as two oids: the high and the low 32 bits.
fn split_key(key: i64) -> (i64, i64) {
    let k = key as u64;
    ((k >> 32) as i64, (k & 0xffff_ffff) as i64)
}

impl Backend for Advisory {
    fn kind(&self) -> &'static str {
        "postgres-advisory"
    }

    fn acquire(&self, request: AcquireRequest) -> BoxFuture<'_, Result<Option<Grant>>> {
        Box::pin(async move {
            if request.hold_at_least().is_some() {
                return Err(Error::Unsupported {
                    backend: self.kind(),
                    what:
                        "hold_at_least: an advisory lock ends with its session; use postgres::Lease"
                            .into(),
                });
            }
            if request.ttl_is_explicit() {
                return Err(Error::Unsupported {
                    backend: self.kind(),
                    what: "ttl: an advisory lock lasts as long as its session, it has no lease \
                           length; leave .ttl() unset, or use postgres::Lease"
                        .into(),
                });
            }
            if let Some(refusal) = self.inner.refusal() {
                return Err(refusal);
            }
            // A holder identity is recorded beside an exclusive lock (see
            // `holders`); dropping the grant on failure unlocks it.
            let holder = (request.mode() == LockMode::Exclusive && !request.is_permit())
                .then(|| {
                    request
                        .holder()
                        .map(|h| (request.name().to_owned(), h.to_owned()))
                })
                .flatten();
            let grant = acquire::acquire(&self.inner, request).await?;
            if let (Some(grant), Some((name, holder))) = (&grant, holder) {
                // Boxed: only leaders take this path.
                Box::pin(holders::record(
                    &self.inner.pool,
                    &name,
                    &holder,
                    grant.token,
                ))
                .await?;
            }
            Ok(grant)
        })
    }

    fn inspect<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LockInfo>>> {
        Box::pin(async move {
            let key = advisory_key(name);
            let Some(mut info) = self.inner.query_locks(Some(key)).await?.pop() else {
                return Ok(None);
            };
            info.name = Some(name.to_owned());
            semaphore::inspect(&self.inner.pool, name, &mut info).await?;
            if info.mode == LockMode::Exclusive && info.max_holders == Some(1) {
                // A recorded identity, unless it is an older holder's on the
                // session this backend holds the lock on now.
                if let Some((holder, token, since)) =
                    holders::recorded(&self.inner.pool, name).await?
                {
                    if info.token.is_none_or(|t| t == token) {
                        info.holder = holder;
                        info.token = Some(token);
                        info.acquired_at = Some(since);
                    }
                }
            }
            Ok(Some(info))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<LockInfo>>> {
        Box::pin(async move {
            let all = self.inner.query_locks(None).await?;
            let ours = self.inner.registry().semaphores();
            semaphore::list(&self.inner.pool, all, ours).await
        })
    }

    fn now(&self) -> BoxFuture<'_, Result<DateTime<Utc>>> {
        Box::pin(super::clock_timestamp(&self.inner.pool))
    }

    /// Locks of this backend are unlocked on their own session (only their
    /// guards report lost); any other holder's session is terminated, which
    /// ends every lock on it.
    fn force_release<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let key = advisory_key(name);
            let ours = self.inner.registry().held_on_key(key);
            let mut broke = false;
            for (lock, session) in ours {
                let loss = crate::error::Loss::new(
                    crate::LostReason::ForceReleased,
                    "the lock was broken by force_release",
                );
                let unlock = async move { release::unlock(&session, lock, key, Some(&loss)).await };
                broke |= !matches!(Detached::new(unlock).await, Released::NotHeld(_));
            }
            let (classid, objid) = split_key(key);
            let pids = self.inner.registry().pids();
            let killed: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_locks
                  WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND classid::bigint = $1 AND objid::bigint = $2
                    AND pid <> ALL($3)",
            )
            .bind(classid)
            .bind(objid)
            .bind(pids)
            .fetch_all(&self.inner.pool)
            .await?;
            Ok(broke || killed.iter().any(|k| *k))
        })
    }
}
