//! Holder sessions: long-lived connections taken from the pool, each
//! carrying many session-level advisory locks.
//!
//! Each session is run by one task that owns the connection and serves
//! commands one at a time (lock, unlock, break, check), so statements on a
//! session never interleave. The same task checks the session when it has
//! been idle for a heartbeat; any statement that succeeds proves it alive.
//!
//! When a statement fails in a way that leaves the session's state unknown
//! (a connection error, no answer in time, an unlock whose outcome is
//! unknown), the session is closed and every lock on it is reported lost:
//! a connection that may hold a lock never goes back to the pool. A session
//! that holds nothing goes back to the pool (core sessions after a heartbeat
//! without locks, sessions adopted from a wait as soon as their lock is
//! released), after a `pg_advisory_unlock_all()` for good measure.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::time::{sleep_until, timeout, Instant};

use super::registry::{Hold, HoldState, LockId, SessionEntry, SessionId};
use super::{lock_table_full, split_key, Inner, Refusal, LOCK_TABLE_FULL};
use crate::backend::{BoxFuture, Grant, HeldLock, LockStatus};
use crate::postgres::engine::{self, is_statement_clash};
use crate::postgres::map_err;
use crate::postgres::token::sequence_token;
use crate::{Error, LockMode, Result};

// Every lock statement first checks that it runs on this holder session's
// own server session: the marker the session set when it started (a
// session-level setting, $2) and its backend pid ($3), read in the same
// statement, so the check costs no round trip. Through a
// transaction-pooling proxy a statement can land on another server
// connection: it then takes nothing and answers `ours = false`, and the
// backend refuses to go on (see `engine::transaction_pooler`). CASE fixes
// the order of evaluation.
const OURS: &str = "(SELECT current_setting('dblock.session', true) IS NOT DISTINCT FROM $2
                            AND pg_backend_pid() = $3 AS ours OFFSET 0) s";
static TRY_EXCLUSIVE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT ours, CASE WHEN NOT ours THEN NULL
                           WHEN pg_try_advisory_lock($1) THEN {} END FROM {OURS}",
        sequence_token()
    )
});
static TRY_SHARED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT ours, CASE WHEN NOT ours THEN NULL
                           WHEN pg_try_advisory_lock_shared($1) THEN {} END FROM {OURS}",
        sequence_token()
    )
});
// A shared lock stacked on a session that holds the key shared already: the
// server would grant it at once, ahead of any waiter queued for the key (a
// session never waits for a lock it holds), so a stream of readers in this
// process could starve a writer queued on the server. It is taken only if
// nobody waits for the key.
static TRY_SHARED_STACKED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT ours, CASE
    WHEN NOT ours THEN NULL
    WHEN EXISTS (SELECT 1 FROM pg_locks
                  WHERE locktype = 'advisory' AND objsubid = 1 AND NOT granted
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND classid::bigint = $4 AND objid::bigint = $5) THEN NULL
    WHEN pg_try_advisory_lock_shared($1) THEN {} END FROM {OURS}",
        sequence_token()
    )
});
// A session's first statement: its pid, the engine, and its marker (a random
// one made by the server), set only if the server session carries none yet.
// A direct connection, or one through a session-pooling proxy (which runs
// DISCARD ALL between clients), never carries another holder's marker; a
// server connection shared by a transaction-pooling proxy may. It has no
// parameters and runs as a simple query (no prepared statement), so that
// it also answers through a transaction pooler, where named prepared
// statements clash.
const OPEN: &str = "SELECT pg_backend_pid(), version(),
    CASE WHEN coalesce(current_setting('dblock.session', true), '') = ''
         THEN set_config('dblock.session', md5(random()::text || clock_timestamp()::text), false) END";
// The heartbeat: the session is alive, and still our own server session
// (a proxy may have closed the server connection that held our locks).
const PING: &str = "SELECT current_setting('dblock.session', true) IS NOT DISTINCT FROM $1
                           AND pg_backend_pid() = $2";
// The probe at a backend's first holder session, on another connection of
// the pool: it can only see this session's pid or marker if both
// connections' statements run on the same server session, which a
// transaction-pooling proxy does (PgBouncer hands the server connection just
// released to the next transaction); two connections of a direct or
// session-pooled pool never share one. A simple query, as OPEN.
const PROBE: &str =
    "SELECT pg_backend_pid(), coalesce(current_setting('dblock.session', true), '')";
// Back to the pool: no lock, no marker, and the TCP settings back to the
// session's defaults.
const RETIRE: &str = "SELECT pg_advisory_unlock_all(), set_config('dblock.session', '', false), (
    SELECT count(set_config(name, reset_val, false))
      FROM pg_settings
     WHERE name IN ('tcp_keepalives_idle', 'tcp_keepalives_interval',
                    'tcp_keepalives_count', 'tcp_user_timeout'))";
const UNLOCK_EXCLUSIVE: &str = "SELECT pg_advisory_unlock($1)";
const UNLOCK_SHARED: &str = "SELECT pg_advisory_unlock_shared($1)";
// Undoing a lock statement that failed: one unlock, without the WARNING the
// server sends the client when the lock was not taken after all
// (client_min_messages is set for this one-statement transaction only).
const UNDO_EXCLUSIVE: &str = "SELECT pg_advisory_unlock($1) FROM (SELECT set_config('client_min_messages', 'error', true)) cfg OFFSET 0";
const UNDO_SHARED: &str = "SELECT pg_advisory_unlock_shared($1) FROM (SELECT set_config('client_min_messages', 'error', true)) cfg OFFSET 0";

/// The server-side TCP settings of a holder session (PostgreSQL lets any
/// session set its own): when the client's host vanishes, the server
/// notices within about 25 s and ends the session, which releases its
/// locks, instead of after the kernel's default of about two hours (idle
/// keepalives) or fifteen minutes (unacknowledged data). Idle: a probe after
/// 10 s of silence, then every 5 s, 3 unanswered probes end it. Data
/// unacknowledged for 25 s ends it (`tcp_user_timeout`, PostgreSQL 12 and
/// later; skipped where the setting does not exist). Ignored on Unix-socket
/// connections. Answers the session's pid.
const KEEPALIVES_ON: &str = "SELECT pg_backend_pid() FROM (
    SELECT count(set_config(name, CASE name
               WHEN 'tcp_keepalives_idle' THEN '10'
               WHEN 'tcp_keepalives_interval' THEN '5'
               WHEN 'tcp_keepalives_count' THEN '3'
               ELSE '25000' END, false))
      FROM pg_settings
     WHERE name IN ('tcp_keepalives_idle', 'tcp_keepalives_interval',
                    'tcp_keepalives_count', 'tcp_user_timeout')) s";

/// Why a session found to be shared is closed.
const POOLED: &str = "the holder session's statements do not all run on one server session \
                      (a transaction-pooling proxy)";

/// The first statement's answer: pid, `version()`, and the marker it set
/// (`None` if the server session carried another holder's).
fn decode_open(row: &PgRow) -> sqlx::Result<(i32, String, Option<String>)> {
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
}

/// What a session is asked to do.
pub(super) enum Cmd {
    /// Try to take `key` (never waits on the server).
    Lock {
        lock: LockId,
        key: i64,
        mode: LockMode,
        name: String,
        reply: oneshot::Sender<LockReply>,
    },
    /// Release a held lock (no reply when its guard was dropped).
    Unlock {
        lock: LockId,
        key: i64,
        reply: Option<oneshot::Sender<Released>>,
    },
    /// Release a held lock on an operator's behalf; its guard reports lost.
    Break {
        lock: LockId,
        key: i64,
        reply: oneshot::Sender<bool>,
    },
    /// Check the session now (`extend` on an advisory guard).
    Check { reply: oneshot::Sender<Result<()>> },
}

/// The answer to [`Cmd::Lock`].
pub(super) enum LockReply {
    Granted(Grant),
    Busy,
    Failed(Error),
    /// The session failed before or while trying (why); nothing is held
    /// (the session is closed). Try elsewhere.
    Gone(String),
}

/// The answer to [`Cmd::Unlock`].
pub(super) enum Released {
    Yes,
    /// The lock was not held any more (lost or broken before): why.
    NotHeld(String),
    /// The unlock's outcome is unknown; the session was closed, which ends
    /// the lock.
    Failed(sqlx::Error),
}

/// How a statement on a session went wrong.
enum Failure {
    /// The server refused the statement; the session is fine.
    Server(sqlx::Error),
    /// The session is suspect: it must be closed.
    Broken(String),
}

/// Error classes after which a session is not to be trusted: connection
/// exceptions, operator intervention (`pg_terminate_backend`), system and
/// internal errors.
fn fatal(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let class = code.as_deref().map(|c| &c[..c.len().min(2)]);
            matches!(class, Some("08" | "57" | "58" | "XX") | None)
        }
        _ => true,
    }
}

fn is_lock_table_full(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(LOCK_TABLE_FULL))
}

/// Runs `statement` with a bound on how long the session may take to
/// answer, and classifies its failure.
async fn bounded<T>(
    limit: Duration,
    statement: impl Future<Output = std::result::Result<T, sqlx::Error>>,
) -> std::result::Result<T, Failure> {
    match timeout(limit, statement).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if fatal(&e) => Err(Failure::Broken(format!(
            "the holder session of the advisory lock failed: {e}"
        ))),
        Ok(Err(e)) => Err(Failure::Server(e)),
        Err(_) => Err(Failure::Broken(format!(
            "the holder session of the advisory lock did not answer within {limit:?}"
        ))),
    }
}

/// Starts a core session on `conn`, unless the configured number is open
/// already (the connection goes back to the pool then). New locks are
/// routed to it at once: they queue behind its first statement.
pub(super) fn open(inner: &Arc<Inner>, conn: PoolConnection<Postgres>) {
    let id = inner.next_id();
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let mut registry = inner.registry();
        if registry.core_count() >= inner.target_sessions() {
            return;
        }
        registry.add_session(
            id,
            SessionEntry {
                tx: tx.clone(),
                core: true,
                pid: None,
                holds: 0,
                queued: 0,
            },
        );
    }
    tracing::debug!(session = id, "dblock: advisory holder session opened");
    // The marker is set by the session's first statement.
    tokio::spawn(Session::new(inner.clone(), id, conn, tx, rx, String::new(), None).run());
}

/// A new holder session's marker: random, so that no other holder (in
/// this process or another) has the same.
pub(super) fn new_marker() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Makes the connection of a granted server-side wait a holder session
/// that carries the lock, and returns the lock's grant. The wait set the
/// session's `marker`.
#[allow(clippy::too_many_arguments)]
pub(super) fn adopt(
    inner: &Arc<Inner>,
    conn: PoolConnection<Postgres>,
    permit: Option<OwnedSemaphorePermit>,
    pid: i32,
    marker: String,
    key: i64,
    mode: LockMode,
    token: u64,
    name: &str,
) -> Grant {
    let id = inner.next_id();
    let lock = inner.next_id();
    let (tx, rx) = mpsc::unbounded_channel();
    let (status, pending) = Grant::status(None);
    let core = {
        let mut registry = inner.registry();
        let core = registry.core_count() < inner.target_sessions();
        registry.add_session(
            id,
            SessionEntry {
                tx: tx.clone(),
                core,
                pid: Some(pid),
                holds: 1,
                queued: 0,
            },
        );
        registry.add_held(
            key,
            Hold {
                lock,
                session: id,
                mode,
                state: HoldState::Held {
                    token,
                    name: name.to_owned(),
                    status: status.clone(),
                },
            },
        );
        core
    };
    tracing::debug!(
        session = id,
        pid,
        "dblock: advisory wait granted; its session holds the lock"
    );
    let mut session = Session::new(inner.clone(), id, conn, tx.clone(), rx, marker, Some(pid));
    // A session that joins the core ones is counted there; any other keeps
    // its wait slot until it goes back to the pool.
    if !core {
        session.wait_slot = permit;
    }
    tokio::spawn(session.run());
    pending.grant(
        token,
        Box::new(Held {
            name: name.to_owned(),
            key,
            lock,
            tx,
            status,
            armed: true,
        }),
    )
}

struct Session {
    inner: Arc<Inner>,
    id: SessionId,
    conn: Option<PoolConnection<Postgres>>,
    /// Our own address, for the handles of the locks granted here.
    tx: mpsc::UnboundedSender<Cmd>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    /// When a statement last succeeded: the session was alive then.
    last_ok: Instant,
    /// The marker this session set on its server session.
    marker: String,
    /// Its server session's pid, once known.
    pid: Option<i32>,
    /// The wait slot of the server-side wait this session was adopted
    /// from, freed when the session ends.
    wait_slot: Option<OwnedSemaphorePermit>,
}

impl Drop for Session {
    /// A session ends by going back to the pool clean (`retire`) or by
    /// being closed (`die`), both of which take the connection. One that
    /// still has it here ended abnormally (its task panicked, or was dropped
    /// with its runtime): it may hold locks, so the connection is closed,
    /// never returned to the pool, and its guards report lost.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
            self.inner
                .session_gone(self.id, "the holder session's task ended abnormally");
        }
    }
}

enum Next {
    Cmd(Cmd),
    Beat,
    Closed,
}

impl Session {
    fn new(
        inner: Arc<Inner>,
        id: SessionId,
        conn: PoolConnection<Postgres>,
        tx: mpsc::UnboundedSender<Cmd>,
        rx: mpsc::UnboundedReceiver<Cmd>,
        marker: String,
        pid: Option<i32>,
    ) -> Self {
        Session {
            inner,
            id,
            conn: Some(conn),
            tx,
            rx,
            last_ok: Instant::now(),
            wait_slot: None,
            marker,
            pid,
        }
    }

    fn conn(&mut self) -> &mut PoolConnection<Postgres> {
        self.conn.as_mut().expect("connection present")
    }

    async fn run(mut self) {
        if self.pid.is_none() {
            let limit = self.inner.answer_within();
            let statement = sqlx::raw_sql(OPEN).fetch_one(&mut **self.conn());
            match bounded(limit, statement).await {
                Ok(row) => {
                    let (pid, version, marker) = match decode_open(&row) {
                        Ok(v) => v,
                        Err(e) => return self.die(format!("the holder session failed: {e}")),
                    };
                    self.last_ok = Instant::now();
                    if let Some(why) = engine::refusal(&version) {
                        self.inner.refuse(Refusal::Engine(why));
                        return self.die(why.to_owned());
                    }
                    let Some(marker) = marker else {
                        // Another holder's marker: this server session is
                        // shared. Nothing was set or taken.
                        self.inner.refuse(Refusal::Pooler);
                        return self.die(POOLED.to_owned());
                    };
                    self.marker = marker;
                    self.pid = Some(pid);
                    self.inner.registry().set_pid(self.id, pid);
                    if self.shares_its_server_session().await {
                        self.inner.refuse(Refusal::Pooler);
                        return self.die(POOLED.to_owned());
                    }
                }
                Err(Failure::Server(e)) => {
                    return self.die(format!("the holder session failed: {e}"));
                }
                Err(Failure::Broken(reason)) => return self.die(reason),
            }
        }
        // Known to be our own server session now: its TCP settings.
        {
            let limit = self.inner.answer_within();
            let statement =
                sqlx::query_scalar::<_, i32>(KEEPALIVES_ON).fetch_one(&mut **self.conn());
            match bounded(limit, statement).await {
                Ok(_) => self.last_ok = Instant::now(),
                Err(Failure::Server(e)) => {
                    return self.die(format!("the holder session failed: {e}"));
                }
                Err(Failure::Broken(reason)) => return self.die(reason),
            }
        }
        let heartbeat = self.inner.options.heartbeat;
        loop {
            let next = tokio::select! {
                biased;
                cmd = self.rx.recv() => cmd.map_or(Next::Closed, Next::Cmd),
                _ = sleep_until(self.last_ok + heartbeat) => Next::Beat,
            };
            let outcome = match next {
                Next::Cmd(cmd) => self.serve(cmd).await,
                Next::Beat => {
                    let empty = self.inner.registry().holds_on(self.id) == Some(0);
                    if empty && self.retire().await {
                        return;
                    }
                    self.ping().await
                }
                Next::Closed => Err("the holder session's channel closed".to_owned()),
            };
            if let Err(reason) = outcome {
                return self.die(reason);
            }
            // A session adopted from a wait goes back to the pool as soon
            // as it holds nothing; core sessions linger for a heartbeat.
            let (empty, core) = {
                let registry = self.inner.registry();
                (
                    registry.holds_on(self.id) == Some(0),
                    registry.is_core(self.id),
                )
            };
            if empty && !core && self.retire().await {
                return;
            }
        }
    }

    /// Serves one command. `Err` means the session must be closed.
    async fn serve(&mut self, cmd: Cmd) -> std::result::Result<(), String> {
        match cmd {
            Cmd::Lock {
                lock,
                key,
                mode,
                name,
                reply,
            } => self.lock(lock, key, mode, name, reply).await,
            Cmd::Unlock { lock, key, reply } => {
                let (released, outcome) = self.unlock(lock, key, None).await;
                if let Some(reply) = reply {
                    let _ = reply.send(released);
                }
                outcome
            }
            Cmd::Break { lock, key, reply } => {
                let reason = "the lock was broken by force_release";
                let (released, outcome) = self.unlock(lock, key, Some(reason)).await;
                let _ = reply.send(!matches!(released, Released::NotHeld(_)));
                outcome
            }
            Cmd::Check { reply } => {
                let outcome = self.ping().await;
                let _ = reply.send(match &outcome {
                    Ok(()) => Ok(()),
                    Err(reason) => Err(Error::lost("", reason.clone())),
                });
                outcome
            }
        }
    }

    /// At the backend's first holder session: whether another connection
    /// of the pool runs its statements on this session's server session.
    /// Skipped when the pool has no second connection to spare at once.
    async fn shares_its_server_session(&self) -> bool {
        if self
            .inner
            .probed
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return false;
        }
        if self.inner.pool.options().get_max_connections() < 2 {
            return false;
        }
        let limit = self.inner.answer_within();
        let wait = limit.min(Duration::from_millis(500));
        let Ok(Ok(mut other)) = timeout(wait, self.inner.pool.acquire()).await else {
            return false;
        };
        let statement = sqlx::raw_sql(PROBE).fetch_one(&mut *other);
        let Ok(Ok(row)) = timeout(limit, statement).await else {
            return false;
        };
        let (pid, marker): (i32, String) = match (row.try_get(0), row.try_get(1)) {
            (Ok(pid), Ok(marker)) => (pid, marker),
            _ => return false,
        };
        Some(pid) == self.pid || marker == self.marker
    }

    async fn ping(&mut self) -> std::result::Result<(), String> {
        let limit = self.inner.answer_within();
        let statement = sqlx::query_scalar::<_, bool>(PING)
            .bind(self.marker.clone())
            .bind(self.pid.unwrap_or_default())
            .fetch_one(&mut **self.conn());
        match bounded(limit, statement).await {
            Ok(true) => {
                self.last_ok = Instant::now();
                Ok(())
            }
            Ok(false) => {
                self.inner.refuse(Refusal::Pooler);
                Err(POOLED.to_owned())
            }
            Err(Failure::Server(e)) if is_statement_clash(&e) => {
                self.inner.refuse(Refusal::Pooler);
                Err(POOLED.to_owned())
            }
            Err(Failure::Server(e)) => Err(format!("the holder session failed: {e}")),
            Err(Failure::Broken(reason)) => Err(reason),
        }
    }

    async fn lock(
        &mut self,
        lock: LockId,
        key: i64,
        mode: LockMode,
        name: String,
        reply: oneshot::Sender<LockReply>,
    ) -> std::result::Result<(), String> {
        let limit = self.inner.answer_within();
        let stacked =
            mode == LockMode::Shared && self.inner.registry().stacked(self.id, key, mode, lock);
        let sql = match mode {
            LockMode::Exclusive => &*TRY_EXCLUSIVE,
            LockMode::Shared if stacked => &*TRY_SHARED_STACKED,
            LockMode::Shared => &*TRY_SHARED,
        };
        let mut query = sqlx::query_as::<_, (bool, Option<i64>)>(sql.as_str())
            .bind(key)
            .bind(self.marker.clone())
            .bind(self.pid.unwrap_or_default());
        if stacked {
            let (classid, objid) = split_key(key);
            query = query.bind(classid).bind(objid);
        }
        let statement = query.fetch_one(&mut **self.conn());
        match bounded(limit, statement).await {
            Ok((false, _)) => {
                // Not our server session: nothing was taken by this
                // statement, and what this session took before may sit on
                // a server connection other clients use. Close it.
                self.inner.registry().not_granted(self.id, key, lock);
                self.inner.refuse(Refusal::Pooler);
                let _ = reply.send(LockReply::Failed(engine::transaction_pooler()));
                Err(POOLED.to_owned())
            }
            Ok((true, Some(token))) => {
                self.last_ok = Instant::now();
                let token = token as u64;
                let (status, pending) = Grant::status(None);
                self.inner.registry().granted(
                    key,
                    Hold {
                        lock,
                        session: self.id,
                        mode,
                        state: HoldState::Held {
                            token,
                            name: name.clone(),
                            status: status.clone(),
                        },
                    },
                );
                let grant = pending.grant(
                    token,
                    Box::new(Held {
                        name,
                        key,
                        lock,
                        tx: self.tx.clone(),
                        status,
                        armed: true,
                    }),
                );
                // If the acquirer is gone, the grant comes back and drops
                // here, which queues its unlock on this session.
                let _ = reply.send(LockReply::Granted(grant));
                Ok(())
            }
            Ok((true, None)) => {
                self.last_ok = Instant::now();
                self.inner.registry().not_granted(self.id, key, lock);
                let _ = reply.send(LockReply::Busy);
                Ok(())
            }
            Err(Failure::Server(e)) if is_statement_clash(&e) => {
                // Not our server session (a named statement of ours is
                // missing or taken there): nothing of this statement ran.
                self.inner.registry().not_granted(self.id, key, lock);
                self.inner.refuse(Refusal::Pooler);
                let _ = reply.send(LockReply::Failed(engine::transaction_pooler()));
                Err(POOLED.to_owned())
            }
            Err(Failure::Server(e)) => {
                // The statement failed, maybe after the lock was taken (the
                // lock table fills up in the lock call, but nextval may fail
                // after it). One unlock undoes it exactly if nothing else of
                // ours holds the key in this mode on this session; beside a
                // stacked shared hold, only "out of shared memory" is known
                // to come after the lock (a stacked lock needs no new
                // entry), so any other error leaves the session uncertain.
                self.last_ok = Instant::now();
                let full = is_lock_table_full(&e);
                if !full && self.inner.registry().stacked(self.id, key, mode, lock) {
                    let _ = reply.send(LockReply::Failed(map_err(e)));
                    return Err(
                        "a lock statement failed beside a stacked shared lock: the session's locks are uncertain"
                            .to_owned(),
                    );
                }
                let undo = match mode {
                    LockMode::Exclusive => UNDO_EXCLUSIVE,
                    LockMode::Shared => UNDO_SHARED,
                };
                let statement = sqlx::query(undo).bind(key).execute(&mut **self.conn());
                let outcome = match bounded(limit, statement).await {
                    Ok(_) => {
                        self.last_ok = Instant::now();
                        self.inner.registry().not_granted(self.id, key, lock);
                        Ok(())
                    }
                    Err(Failure::Server(e)) => Err(format!("undoing a failed lock failed: {e}")),
                    Err(Failure::Broken(reason)) => Err(reason),
                };
                let error = if full && outcome.is_ok() {
                    lock_table_full(&self.lock_table_size().await)
                } else if full {
                    lock_table_full("")
                } else {
                    map_err(e)
                };
                let _ = reply.send(LockReply::Failed(error));
                outcome
            }
            Err(Failure::Broken(reason)) => {
                let _ = reply.send(LockReply::Gone(reason.clone()));
                Err(reason)
            }
        }
    }

    /// Releases the lock `lock` on `key`. With `broken`, its guard is
    /// reported lost for that reason (an operator broke it).
    async fn unlock(
        &mut self,
        lock: LockId,
        key: i64,
        broken: Option<&str>,
    ) -> (Released, std::result::Result<(), String>) {
        let mode = {
            let registry = self.inner.registry();
            match registry.hold(key, lock) {
                Some(h) if h.session == self.id => h.mode,
                _ => {
                    return (
                        Released::NotHeld("the advisory lock was lost or broken before".into()),
                        Ok(()),
                    )
                }
            }
        };
        let limit = self.inner.answer_within();
        let sql = match mode {
            LockMode::Exclusive => UNLOCK_EXCLUSIVE,
            LockMode::Shared => UNLOCK_SHARED,
        };
        let statement = sqlx::query_scalar::<_, bool>(sql)
            .bind(key)
            .fetch_one(&mut **self.conn());
        match bounded(limit, statement).await {
            Ok(true) => {
                self.last_ok = Instant::now();
                let hold = self.inner.registry().remove(key, lock);
                if let Some(Hold {
                    state: HoldState::Held { name, status, .. },
                    ..
                }) = hold
                {
                    if let Some(reason) = broken {
                        status.mark_lost(reason);
                    }
                    self.inner.wakeups.wake(&name);
                }
                (Released::Yes, Ok(()))
            }
            Ok(false) => {
                self.last_ok = Instant::now();
                let reason = broken.unwrap_or("the session no longer held the advisory lock");
                let hold = self.inner.registry().remove(key, lock);
                if let Some(Hold {
                    state: HoldState::Held { name, status, .. },
                    ..
                }) = hold
                {
                    status.mark_lost(reason);
                    self.inner.wakeups.wake(&name);
                }
                (Released::NotHeld(reason.to_owned()), Ok(()))
            }
            // The unlock's outcome is unknown (or the server refused it,
            // which leaves the lock in doubt too): close the session, which
            // ends every lock on it.
            Err(Failure::Server(e)) => {
                let reason = format!("an unlock failed on the holder session: {e}");
                self.mark_lost(key, lock, &reason);
                (Released::Failed(e), Err(reason))
            }
            Err(Failure::Broken(reason)) => {
                self.mark_lost(key, lock, &reason);
                (
                    Released::Failed(sqlx::Error::Io(std::io::Error::other(reason.clone()))),
                    Err(reason),
                )
            }
        }
    }

    /// The lock table's size as configured, for the error message.
    async fn lock_table_size(&mut self) -> String {
        let limit = self.inner.answer_within();
        let statement = sqlx::query_as::<_, (String, String, String)>(
            "SELECT current_setting('max_locks_per_transaction'),
                    current_setting('max_connections'),
                    current_setting('max_prepared_transactions')",
        )
        .fetch_one(&mut **self.conn());
        match bounded(limit, statement).await {
            Ok((per_tx, conns, prepared)) => {
                self.last_ok = Instant::now();
                let total = per_tx.parse::<u64>().ok().and_then(|p| {
                    Some(p * (conns.parse::<u64>().ok()? + prepared.parse::<u64>().ok()?))
                });
                match total {
                    Some(total) => format!(
                        " (here {per_tx} x ({conns} + {prepared}) = {total} entries, plus some slack)"
                    ),
                    None => String::new(),
                }
            }
            Err(_) => String::new(),
        }
    }

    /// Goes back to the pool if the session holds nothing; `false` if it
    /// still has locks (or was given some meanwhile).
    async fn retire(&mut self) -> bool {
        if !self.inner.registry().retire(self.id) {
            return false;
        }
        // Unregistered: nothing new can be routed here. Anything already
        // sent (not expected when it held nothing) is answered as gone.
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            answer_gone(cmd, "the holder session went back to the pool");
        }
        let limit = self.inner.answer_within();
        let mut conn = self.conn.take().expect("connection present");
        let statement = sqlx::query(RETIRE).execute(&mut *conn);
        if bounded(limit, statement).await.is_err() {
            conn.close_on_drop();
        }
        tracing::debug!(
            session = self.id,
            "dblock: advisory holder session went back to the pool"
        );
        true
    }

    /// Marks one lock lost before its release is answered, so the guard
    /// reports the loss (the session is about to be closed, which ends the
    /// lock; it may have ended earlier, when another holder could take it).
    fn mark_lost(&self, key: i64, lock: LockId, reason: &str) {
        if let Some(Hold {
            state: HoldState::Held { status, .. },
            ..
        }) = self.inner.registry().hold(key, lock)
        {
            status.mark_lost(reason);
        }
    }

    /// Closes the session: every lock on it is reported lost.
    fn die(mut self, reason: String) {
        tracing::warn!(session = self.id, %reason, "dblock: advisory holder session closed");
        self.inner.session_gone(self.id, &reason);
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            answer_gone(cmd, &reason);
        }
        if let Some(mut conn) = self.conn.take() {
            conn.close_on_drop();
        }
    }
}

fn answer_gone(cmd: Cmd, reason: &str) {
    match cmd {
        Cmd::Lock { reply, .. } => {
            let _ = reply.send(LockReply::Gone(reason.to_owned()));
        }
        Cmd::Unlock { reply, .. } => {
            if let Some(reply) = reply {
                let _ = reply.send(Released::NotHeld(reason.to_owned()));
            }
        }
        // The session's end ended the lock.
        Cmd::Break { reply, .. } => {
            let _ = reply.send(true);
        }
        Cmd::Check { reply } => {
            let _ = reply.send(Err(Error::lost("", reason)));
        }
    }
}

/// A guard's handle on its lock: commands to the session that holds it.
pub(super) struct Held {
    name: String,
    key: i64,
    lock: LockId,
    tx: mpsc::UnboundedSender<Cmd>,
    status: LockStatus,
    /// Whether dropping the handle should release the lock.
    armed: bool,
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("name", &self.name)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Held {
    fn gone(&self) -> Error {
        Error::lost(
            &self.name,
            self.status
                .lost_reason()
                .unwrap_or_else(|| "the advisory lock's holder session is gone".into()),
        )
    }
}

impl HeldLock for Held {
    fn extend(&self, _by: Duration) -> BoxFuture<'_, Result<Option<DateTime<Utc>>>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            self.tx
                .send(Cmd::Check { reply: tx })
                .map_err(|_| self.gone())?;
            match rx.await {
                Ok(Ok(())) if !self.status.is_lost() => Ok(None),
                Ok(Ok(())) => Err(self.gone()),
                Ok(Err(Error::Lost { reason, .. })) => Err(Error::lost(&self.name, reason)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(self.gone()),
            }
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        self.armed = false;
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            self.tx
                .send(Cmd::Unlock {
                    lock: self.lock,
                    key: self.key,
                    reply: Some(tx),
                })
                .map_err(|_| self.gone())?;
            match rx.await {
                Ok(Released::Yes) => Ok(()),
                Ok(Released::NotHeld(reason)) => Err(Error::lost(&self.name, reason)),
                Ok(Released::Failed(e)) => Err(Error::Database(e)),
                Err(_) => Err(self.gone()),
            }
        })
    }

    fn release_on_drop(self: Box<Self>) {
        // Dropping the armed handle queues the unlock.
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Cmd::Unlock {
                lock: self.lock,
                key: self.key,
                reply: None,
            });
        }
    }
}
