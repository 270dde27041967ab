//! Session-level PostgreSQL advisory locks.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, Row};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};

use super::{advisory_key, map_err};
use crate::backend::{BoxFuture, Grant, HeldLock, LockStatus};
use crate::lease::Wakeups;
use crate::{AcquireRequest, Backend, Error, LockInfo, LockMode, Result, Wait};

/// How an [`Advisory`] acquisition waits for a held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitStrategy {
    /// Block in `pg_advisory_lock` on the server, bounded by a
    /// transaction-local `lock_timeout`: the prompt handoff. The waiting
    /// statement holds a snapshot meanwhile, which holds back
    /// `CREATE INDEX CONCURRENTLY` and vacuum's horizon on that database.
    Server,
    /// Call `pg_try_advisory_lock` with backoff between `min` and `max`
    /// (with jitter); no statement runs while waiting. Releases in this
    /// process wake local waiters at once.
    Poll {
        /// The first pause.
        min: Duration,
        /// The longest pause.
        max: Duration,
    },
}

/// Settings of an [`Advisory`] backend.
#[derive(Debug, Clone)]
pub struct AdvisoryOptions {
    /// How to wait for a held lock. Default: [`WaitStrategy::Server`].
    pub wait: WaitStrategy,
    /// How often a guard checks its connection (`SELECT 1`); a guard whose
    /// session was terminated reports itself lost within this interval.
    /// Default 5 s.
    pub heartbeat: Duration,
}

impl Default for AdvisoryOptions {
    fn default() -> Self {
        AdvisoryOptions {
            wait: WaitStrategy::Server,
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// PostgreSQL session-level advisory locks (`pg_advisory_lock` family).
///
/// Each held lock owns a connection taken from the pool for as long as it
/// is held; the lock ends when it is released or when that session ends, so
/// a crashed process never leaves it behind. Fencing tokens come from the
/// sequence `dblock_fencing_seq` in the same statement as the lock: run
/// [`migrate`](super::migrate) once. Names map to keys by
/// [`advisory_key`], so other programs can take the same locks.
///
/// - Shared (reader) locks are native.
/// - `.ttl()` does not apply (the lock lives as long as its connection);
///   [`LockGuard::expires_at`](crate::LockGuard::expires_at) is `None`.
/// - `.hold_at_least()` is not supported: a lock that must outlive its
///   process needs a lease ([`Lease`](super::Lease)).
/// - Not re-entrant: a second acquisition of a held name waits, even in the
///   same process, because each runs on its own session.
#[derive(Clone)]
pub struct Advisory {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    options: AdvisoryOptions,
    wakeups: Arc<Wakeups>,
    /// Locks held through this backend, by key: names and tokens for `list`.
    held: Mutex<HashMap<i64, Vec<(u64, String)>>>,
}

impl fmt::Debug for Advisory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Advisory")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Advisory {
    /// Advisory locks on connections from `pool`, with default options.
    pub fn new(pool: PgPool) -> Self {
        Advisory {
            inner: Arc::new(Inner {
                pool,
                options: AdvisoryOptions::default(),
                wakeups: Wakeups::new(),
                held: Mutex::default(),
            }),
        }
    }

    /// Replaces the options. Fails with [`Error::InvalidOption`] for a
    /// heartbeat outside 10 ms ..= 1 h or poll bounds out of order.
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
        Ok(Advisory {
            inner: Arc::new(Inner {
                pool: self.inner.pool.clone(),
                options,
                wakeups: Wakeups::new(),
                held: Mutex::default(),
            }),
        })
    }

    /// The pool this backend takes connections from.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }
}

/// A pooled connection that goes back to the pool only when it is known to
/// hold no lock; otherwise it is closed, which ends its locks.
struct LockConn {
    conn: Option<PoolConnection<Postgres>>,
    clean: bool,
}

impl LockConn {
    fn get(&mut self) -> &mut PoolConnection<Postgres> {
        self.conn.as_mut().expect("connection present")
    }
}

impl Drop for LockConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            if !self.clean {
                conn.close_on_drop();
            }
        }
    }
}

const TRY_EXCLUSIVE: &str =
    "SELECT CASE WHEN pg_try_advisory_lock($1) THEN nextval('dblock_fencing_seq') END";
const TRY_SHARED: &str =
    "SELECT CASE WHEN pg_try_advisory_lock_shared($1) THEN nextval('dblock_fencing_seq') END";
// The innermost subquery sets a transaction-local lock_timeout before the
// lock call runs (OFFSET 0 keeps the planner from flattening the order away);
// in autocommit the "transaction" is this one statement, so nothing leaks
// into the pooled session.
const WAIT_EXCLUSIVE: &str = "SELECT nextval('dblock_fencing_seq') FROM (SELECT pg_advisory_lock($1) FROM (SELECT set_config('lock_timeout', $2, true)) cfg OFFSET 0) l";
const WAIT_SHARED: &str = "SELECT nextval('dblock_fencing_seq') FROM (SELECT pg_advisory_lock_shared($1) FROM (SELECT set_config('lock_timeout', $2, true)) cfg OFFSET 0) l";
const UNLOCK_EXCLUSIVE: &str = "SELECT pg_advisory_unlock($1)";
// After a lock_timeout: unlock only if this session did get the lock (a
// grant racing the timeout), so no warning is raised otherwise.
const UNLOCK_LATE_EXCLUSIVE: &str = "SELECT pg_advisory_unlock($1) FROM pg_locks
  WHERE locktype = 'advisory' AND objsubid = 1 AND granted AND pid = pg_backend_pid()
    AND mode = 'ExclusiveLock' AND ((classid::bigint << 32) | objid::bigint) = $1";
const UNLOCK_LATE_SHARED: &str = "SELECT pg_advisory_unlock_shared($1) FROM pg_locks
  WHERE locktype = 'advisory' AND objsubid = 1 AND granted AND pid = pg_backend_pid()
    AND mode = 'ShareLock' AND ((classid::bigint << 32) | objid::bigint) = $1";
const UNLOCK_SHARED: &str = "SELECT pg_advisory_unlock_shared($1)";

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

type Reply = oneshot::Sender<Result<Option<Grant>>>;

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
            // The attempt runs in a task that owns the connection and the
            // outcome, so dropping this future can never strand a lock.
            let (tx, rx) = oneshot::channel();
            tokio::spawn(acquire_task(self.inner.clone(), request, tx));
            rx.await
                .unwrap_or_else(|_| Err(Error::Database(sqlx::Error::WorkerCrashed)))
        })
    }

    fn inspect<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LockInfo>>> {
        Box::pin(async move {
            let key = advisory_key(name);
            let mut infos = self.inner.query_locks(Some(key)).await?;
            Ok(infos.pop().map(|mut info| {
                info.name = Some(name.to_owned());
                info
            }))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<LockInfo>>> {
        Box::pin(self.inner.query_locks(None))
    }

    fn force_release<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let (classid, objid) = split_key(advisory_key(name));
            let killed: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_locks
                  WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND classid::bigint = $1 AND objid::bigint = $2",
            )
            .bind(classid)
            .bind(objid)
            .fetch_all(&self.inner.pool)
            .await?;
            Ok(killed.iter().any(|k| *k))
        })
    }
}

/// `pg_locks` shows a bigint key as two oids: the high and the low 32 bits.
fn split_key(key: i64) -> (i64, i64) {
    let k = key as u64;
    ((k >> 32) as i64, (k & 0xffff_ffff) as i64)
}

impl Inner {
    async fn query_locks(&self, key: Option<i64>) -> Result<Vec<LockInfo>> {
        let (classid, objid) = key.map(split_key).unzip();
        let rows = sqlx::query(
            "SELECT ((l.classid::bigint << 32) | l.objid::bigint) AS key,
                    bool_or(l.mode = 'ExclusiveLock') AS exclusive,
                    count(*)::bigint AS holders,
                    string_agg(format('pid %s%s%s', l.pid,
                        ' (' || nullif(a.application_name, '') || ')',
                        ' from ' || host(a.client_addr)), ', ' ORDER BY l.pid) AS holder
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ($1::bigint IS NULL OR (l.classid::bigint = $1 AND l.objid::bigint = $2))
              GROUP BY 1 ORDER BY 1",
        )
        .bind(classid)
        .bind(objid)
        .fetch_all(&self.pool)
        .await?;
        let held = self.held.lock().unwrap();
        rows.into_iter()
            .map(|row| {
                let key: i64 = row.try_get("key")?;
                let exclusive: bool = row.try_get("exclusive")?;
                let mode = if exclusive {
                    LockMode::Exclusive
                } else {
                    LockMode::Shared
                };
                let ours = held.get(&key);
                let mut info = LockInfo::new(
                    ours.and_then(|v| v.first()).map(|(_, n)| n.clone()),
                    row.try_get::<Option<String>, _>("holder")?
                        .unwrap_or_default(),
                    mode,
                );
                info.key = Some(key);
                info.holders = row.try_get::<i64, _>("holders")? as u32;
                info.token = ours.and_then(|v| v.iter().map(|(t, _)| *t).max());
                Ok(info)
            })
            .collect()
    }

    fn remember(&self, key: i64, token: u64, name: &str) {
        self.held
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push((token, name.to_owned()));
    }

    fn forget(&self, key: i64, token: u64) {
        let mut held = self.held.lock().unwrap();
        if let Some(v) = held.get_mut(&key) {
            v.retain(|(t, _)| *t != token);
            if v.is_empty() {
                held.remove(&key);
            }
        }
    }
}

async fn acquire_task(inner: Arc<Inner>, request: AcquireRequest, mut reply: Reply) {
    let name = request.name().to_owned();
    let key = advisory_key(&name);
    let mode = request.mode();
    let deadline = match request.wait() {
        Wait::For(d) => Some(Instant::now() + d),
        _ => None,
    };
    let conn = tokio::select! {
        conn = inner.pool.acquire() => conn,
        _ = reply.closed() => return,
    };
    let mut conn = match conn {
        Ok(c) => LockConn {
            conn: Some(c),
            clean: true,
        },
        Err(e) => {
            let _ = reply.send(Err(e.into()));
            return;
        }
    };
    let subscription = inner.wakeups.subscribe(&name);
    let (mut pause, cap) = match inner.options.wait {
        WaitStrategy::Poll { min, max } => (min, max),
        WaitStrategy::Server => (Duration::ZERO, Duration::ZERO),
    };
    let mut first = true;
    let token = loop {
        let notified = subscription.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let server_wait = !first && inner.options.wait == WaitStrategy::Server;
        first = false;
        let attempt = if server_wait {
            wait_on_server(&mut conn, key, mode, deadline, &mut reply).await
        } else {
            conn.clean = false;
            let sql = match mode {
                LockMode::Exclusive => TRY_EXCLUSIVE,
                LockMode::Shared => TRY_SHARED,
            };
            let r = sqlx::query_scalar::<_, Option<i64>>(sql)
                .bind(key)
                .fetch_one(&mut **conn.get())
                .await;
            match r {
                Ok(None) => {
                    conn.clean = true;
                    Attempt::Busy
                }
                Ok(Some(t)) => Attempt::Granted(t as u64),
                // An error after the lock call (say, the sequence is
                // missing) may leave the lock held: the dirty connection
                // is closed on drop.
                Err(e) => Attempt::Failed(map_err(e)),
            }
        };
        match attempt {
            Attempt::Granted(t) => break t,
            Attempt::Failed(e) => {
                let _ = reply.send(Err(e));
                return;
            }
            Attempt::Abandoned => return,
            Attempt::Busy => {}
        }
        let now = Instant::now();
        match (request.wait(), deadline) {
            (Wait::No, _) => {
                let _ = reply.send(Ok(None));
                return;
            }
            (Wait::For(waited), Some(deadline)) if now >= deadline => {
                let _ = reply.send(Err(Error::Timeout { name, waited }));
                return;
            }
            _ => {}
        }
        if inner.options.wait == WaitStrategy::Server {
            continue;
        }
        let mut wake_at = now + pause.mul_f64(rand::random_range(0.5..=1.0));
        if let Some(deadline) = deadline {
            wake_at = wake_at.min(deadline);
        }
        tokio::select! {
            _ = reply.closed() => return,
            _ = &mut notified => {}
            _ = sleep_until(wake_at) => {}
        }
        pause = (pause * 2).min(cap);
    };
    drop(subscription);
    grant(inner, name, key, mode, token, conn, reply).await;
}

enum Attempt {
    Granted(u64),
    Busy,
    Failed(Error),
    Abandoned,
}

/// One server-side wait, bounded by what is left of the deadline.
async fn wait_on_server(
    conn: &mut LockConn,
    key: i64,
    mode: LockMode,
    deadline: Option<Instant>,
    reply: &mut Reply,
) -> Attempt {
    // lock_timeout takes whole milliseconds up to i32::MAX; a longer wait is
    // done in several rounds. "0" waits forever.
    let timeout_ms = match deadline {
        None => 0,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now()).as_millis();
            if left == 0 {
                return Attempt::Busy;
            }
            left.min(i32::MAX as u128) as i64
        }
    };
    let sql = match mode {
        LockMode::Exclusive => WAIT_EXCLUSIVE,
        LockMode::Shared => WAIT_SHARED,
    };
    conn.clean = false;
    let statement = sqlx::query_scalar::<_, i64>(sql)
        .bind(key)
        .bind(format!("{timeout_ms}ms"))
        .fetch_one(&mut **conn.get());
    let outcome = tokio::select! {
        r = statement => r,
        // The acquirer is gone. The statement may yet be granted, so the
        // connection stays dirty and is closed: its session's locks end.
        _ = reply.closed() => return Attempt::Abandoned,
    };
    match outcome {
        Ok(t) => Attempt::Granted(t as u64),
        Err(e) if is_lock_timeout(&e) => {
            // A grant can race the timeout: PostgreSQL then keeps the
            // session-level lock (LockErrorCleanup remembers a lock granted
            // while the wait was being cancelled) yet reports the timeout.
            // Give such a late grant back before the connection counts as
            // clean; if that fails, the dirty connection is closed.
            let unlock = match mode {
                LockMode::Exclusive => UNLOCK_LATE_EXCLUSIVE,
                LockMode::Shared => UNLOCK_LATE_SHARED,
            };
            match sqlx::query(unlock)
                .bind(key)
                .execute(&mut **conn.get())
                .await
            {
                Ok(_) => {
                    conn.clean = true;
                    Attempt::Busy
                }
                Err(e) => Attempt::Failed(map_err(e)),
            }
        }
        Err(e) => Attempt::Failed(map_err(e)),
    }
}

enum Command {
    Release(oneshot::Sender<Result<()>>),
    Check(oneshot::Sender<Result<Option<DateTime<Utc>>>>),
}

#[derive(Debug)]
struct Held {
    name: String,
    commands: mpsc::Sender<Command>,
}

impl HeldLock for Held {
    fn extend(&self, _by: Duration) -> BoxFuture<'_, Result<Option<DateTime<Utc>>>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let gone = || Error::lost(&self.name, "the advisory lock's connection is gone");
            self.commands
                .send(Command::Check(tx))
                .await
                .map_err(|_| gone())?;
            rx.await.map_err(|_| gone())?
        })
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let gone = || Error::lost(&self.name, "the advisory lock's connection is gone");
            self.commands
                .send(Command::Release(tx))
                .await
                .map_err(|_| gone())?;
            rx.await.map_err(|_| gone())?
        })
    }

    fn release_on_drop(self: Box<Self>) {
        // Closing the command channel makes the keeper unlock.
    }
}

async fn grant(
    inner: Arc<Inner>,
    name: String,
    key: i64,
    mode: LockMode,
    token: u64,
    conn: LockConn,
    reply: Reply,
) {
    let (commands, rx) = mpsc::channel(4);
    let (grant, status) = Grant::new(
        token,
        None,
        Box::new(Held {
            name: name.clone(),
            commands,
        }),
    );
    inner.remember(key, token, &name);
    // If the acquirer is gone, the grant (and its channel) drops with the
    // failed send and the keeper unlocks at once.
    let _ = reply.send(Ok(Some(grant)));
    let keeper = Keeper {
        inner,
        name,
        key,
        mode,
        token,
        status,
    };
    keeper.run(conn, rx).await;
}

struct Keeper {
    inner: Arc<Inner>,
    name: String,
    key: i64,
    mode: LockMode,
    token: u64,
    status: LockStatus,
}

impl Keeper {
    async fn run(self, conn: LockConn, mut commands: mpsc::Receiver<Command>) {
        let heartbeat = self.inner.options.heartbeat;
        let mut conn = Some(conn);
        loop {
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    None => {
                        self.release(conn.take()).await.ok();
                        break;
                    }
                    Some(Command::Release(reply)) => {
                        let _ = reply.send(self.release(conn.take()).await);
                        break;
                    }
                    Some(Command::Check(reply)) => {
                        let alive = self.ping(&mut conn, heartbeat).await;
                        let _ = reply.send(if alive {
                            Ok(None)
                        } else {
                            Err(Error::lost(&self.name, self.status.lost_reason().unwrap_or_default()))
                        });
                    }
                },
                _ = tokio::time::sleep(heartbeat), if conn.is_some() => {
                    self.ping(&mut conn, heartbeat).await;
                }
            }
        }
        self.inner.forget(self.key, self.token);
        self.inner.wakeups.wake(&self.name);
    }

    /// Checks the session; on failure marks the lock lost and closes the
    /// connection (it is dirty, so it is not returned to the pool).
    async fn ping(&self, conn: &mut Option<LockConn>, limit: Duration) -> bool {
        let Some(c) = conn.as_mut() else {
            return false;
        };
        let outcome = timeout(limit, sqlx::query("SELECT 1").execute(&mut **c.get())).await;
        let reason = match outcome {
            Ok(Ok(_)) => return true,
            Ok(Err(e)) => format!("the session holding the advisory lock failed: {e}"),
            Err(_) => {
                format!("the session holding the advisory lock did not answer within {limit:?}")
            }
        };
        self.status.mark_lost(reason);
        *conn = None;
        false
    }

    async fn release(&self, conn: Option<LockConn>) -> Result<()> {
        let Some(mut conn) = conn else {
            return Err(Error::lost(
                &self.name,
                self.status.lost_reason().unwrap_or_default(),
            ));
        };
        let sql = match self.mode {
            LockMode::Exclusive => UNLOCK_EXCLUSIVE,
            LockMode::Shared => UNLOCK_SHARED,
        };
        match sqlx::query_scalar::<_, bool>(sql)
            .bind(self.key)
            .fetch_one(&mut **conn.get())
            .await
        {
            Ok(true) => {
                conn.clean = true;
                Ok(())
            }
            Ok(false) => {
                let reason = "the session no longer held the advisory lock";
                self.status.mark_lost(reason);
                Err(Error::lost(&self.name, reason))
            }
            // The session failed (it was terminated, or the connection
            // died): the lock ended with it, perhaps well before this call,
            // so the guard reports it lost like a failed heartbeat would.
            // The dirty connection is closed, which ends the lock if the
            // session somehow still has it.
            Err(e) => {
                let reason = format!("the session holding the advisory lock failed: {e}");
                self.status.mark_lost(reason.clone());
                Err(Error::lost(&self.name, reason))
            }
        }
    }
}
