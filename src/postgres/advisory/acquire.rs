//! One acquisition: tries on a holder session, then waits by polling or on
//! a connection of its own, blocked on the server.
//!
//! It runs in the caller's task and reads top to bottom: [`acquire`] makes
//! a first attempt ([`try_on_session`]: the registry routes it to a holder
//! session, then [`lock_on`] or [`permit_on`] takes the session's
//! connection, sends the one statement and records its outcome in the
//! registry), and only if that misses and the request waits, sets up the
//! wait. The uncontended path is that one statement, with no task spawned
//! and no message to another task. Dropping the caller's future never
//! strands a lock: an attempt under way is finished by a task of its own
//! ([`Detached`]), which records its outcome and drops a grant nobody takes
//! (queueing its unlock on its session), and a server-side wait whose
//! caller is gone has its connection closed (see `WaitConn`).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnection;
use sqlx::Postgres;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep_until, Instant};

use super::registry::{Hold, LockId, Permit, Route};
use super::release::Held;
use super::semaphore;
use super::session::permit::{PermitTried, Verdict};
use super::session::{self, Conn, Session, Tried};
use super::{lock_table_full, Inner, Refusal, WaitStrategy, LOCK_TABLE_FULL};
use crate::backend::{BoxFuture, Grant};
use crate::detach::Detached;
use crate::error::Loss;
use crate::lease::permits::disagreement;
use crate::postgres::key::PermitKeys;
use crate::postgres::token::{fence, sequence_token, TIMELINE_OR_NULL};
use crate::postgres::{advisory_key, engine, map_err};
use crate::{AcquireRequest, Error, LockMode, LostReason, Result, Wait};

// A server-side wait is two statements on a connection of the pool, which
// becomes a holder session when the wait is granted.
//
// First `LIFT_FOR_WAIT`, off the handoff's path. If the server session
// carries no other holder's marker (`ours`, as when opening a holder
// session), it sets this session's marker ($1), lifts the role's
// statement_timeout (and PostgreSQL 17's transaction_timeout, which also
// bounds an autocommit statement) for the session, and answers their old
// values, the pid and the server session's timeline (NULL in recovery). A
// statement's timeout is armed when it starts, so the lift must come in a
// statement before the wait.
//
// Then the wait, one autocommit statement, so that its grant, its token
// and their commit come back in one round trip: it checks that it runs on
// the server session `LIFT_FOR_WAIT` marked ($3, $4: a transaction-pooling
// proxy could hand it another), sets a statement-local lock_timeout before
// the lock call (OFFSET 0 keeps the planner from flattening the order
// away), and after the grant draws the token. It sets nothing for the
// session: a session-level setting made in a statement is settled at its
// commit, after the grant, and each one set there (the marker, the
// timeouts put back) cost the handoff about 10 us of the server's time
// (docs/performance.md, issue 14, tenth pass).
//
// The lifted timeouts are put back when the connection goes back to the
// pool: by `UNLOCK_LATE_*` after a wait that failed (which also clears the
// marker), or when the holder session a granted wait became is retired
// (`Conn::lifted`); meanwhile only dblock's own statements, bounded by its
// own timer, run on it. A connection left with them lifted any other way
// stays dirty and is closed.
//
// The token: the raw value drawn from the fencing sequence, fenced in Rust
// with the timeline `LIFT_FOR_WAIT` read on the same server session just
// before (`token::fence`; a server session that can draw a token never
// changes its timeline); where that read found the server in recovery,
// the token is fenced in SQL (`token_sql`), as the server may be promoted
// while the statement waits.
fn wait_sql(lock: &str, token: &str) -> String {
    format!(
        "SELECT ours, CASE WHEN ours THEN {token} END
           FROM (SELECT ours, CASE WHEN ours THEN {lock}($1) END
                   FROM (SELECT current_setting('dblock.session', true) IS NOT DISTINCT FROM $3
                                AND pg_backend_pid() = $4 AS ours,
                                set_config('lock_timeout', $2, true)
                         OFFSET 0) cfg
                 OFFSET 0) l"
    )
}
/// The raw value of the fencing sequence (fenced in Rust).
const RAW_TOKEN: &str = "nextval('dblock_fencing_seq')";
static WAIT_EXCLUSIVE: LazyLock<String> = LazyLock::new(|| wait_sql("pg_advisory_lock", RAW_TOKEN));
static WAIT_SHARED: LazyLock<String> =
    LazyLock::new(|| wait_sql("pg_advisory_lock_shared", RAW_TOKEN));
static WAIT_EXCLUSIVE_FENCED: LazyLock<String> =
    LazyLock::new(|| wait_sql("pg_advisory_lock", &sequence_token()));
static WAIT_SHARED_FENCED: LazyLock<String> =
    LazyLock::new(|| wait_sql("pg_advisory_lock_shared", &sequence_token()));
/// Marks the session for the wait that follows and lifts its timeouts,
/// unless another holder's marker is on it (see `wait_sql`); answers
/// `ours`, the pid, the timeouts' values before, and the server session's
/// timeline (NULL in recovery).
static LIFT_FOR_WAIT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT ours, pg_backend_pid(),
                current_setting('statement_timeout'),
                current_setting('transaction_timeout', true),
                CASE WHEN ours THEN set_config('dblock.session', $1, false) END,
                CASE WHEN ours THEN set_config('statement_timeout', '0', false) END,
                CASE WHEN ours AND current_setting('transaction_timeout', true) IS NOT NULL
                     THEN set_config('transaction_timeout', '0', false) END,
                {}
           FROM (SELECT coalesce(current_setting('dblock.session', true), '') = '' AS ours
                 OFFSET 0) c",
        *TIMELINE_OR_NULL
    )
});
/// What `LIFT_FOR_WAIT` answers.
type Lifted = (
    bool,
    i32,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

/// The exclusive wait's two statements, for the benchmark's mimic.
pub(super) fn wait_exclusive_sql() -> (&'static str, &'static str) {
    (LIFT_FOR_WAIT.as_str(), WAIT_EXCLUSIVE.as_str())
}

/// How often a server-side waiter that cannot get a connection (the pool
/// is exhausted) tries again on the holder sessions meanwhile.
const POOL_RETRY_MIN: Duration = Duration::from_millis(20);
const POOL_RETRY_MAX: Duration = Duration::from_secs(1);

/// How a permit waits with [`WaitStrategy::Server`]: it polls, between
/// these pauses (with jitter), and releases in this process wake it at
/// once. A semaphore has `n` keys, and a wait on one of them would miss
/// the others' releases.
const PERMIT_POLL_MIN: Duration = Duration::from_millis(10);
const PERMIT_POLL_MAX: Duration = Duration::from_millis(250);

/// How many holder sessions may fail (or be opened) under one attempt
/// before it gives up.
const SESSION_RETRIES: usize = 4;

// After a lock_timeout: unlock only if this session did get the lock (a
// grant racing the timeout), so no warning is raised otherwise; put back
// the timeouts `LIFT_FOR_WAIT` lifted ($2, $3) and clear its marker.
const UNLOCK_LATE_EXCLUSIVE: &str = "SELECT (SELECT bool_or(pg_advisory_unlock($1)) FROM pg_locks
  WHERE locktype = 'advisory' AND objsubid = 1 AND granted AND pid = pg_backend_pid()
    AND mode = 'ExclusiveLock' AND ((classid::bigint << 32) | objid::bigint) = $1),
  set_config('dblock.session', '', false), set_config('statement_timeout', $2, false),
  CASE WHEN $3::text IS NOT NULL THEN set_config('transaction_timeout', $3, false) END";
const UNLOCK_LATE_SHARED: &str =
    "SELECT (SELECT bool_or(pg_advisory_unlock_shared($1)) FROM pg_locks
  WHERE locktype = 'advisory' AND objsubid = 1 AND granted AND pid = pg_backend_pid()
    AND mode = 'ShareLock' AND ((classid::bigint << 32) | objid::bigint) = $1),
  set_config('dblock.session', '', false), set_config('statement_timeout', $2, false),
  CASE WHEN $3::text IS NOT NULL THEN set_config('transaction_timeout', $3, false) END";

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

fn is_lock_table_full(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(LOCK_TABLE_FULL))
}

/// Takes the lock as `request` says, in the caller's task.
pub(super) async fn acquire(inner: &Arc<Inner>, request: AcquireRequest) -> Result<Option<Grant>> {
    let name = request.name();
    let key = advisory_key(name);
    let mode = request.mode();
    let permit = request
        .is_permit()
        .then(|| Arc::new(PermitKeys::new(name, request.max_holders())));
    let attempt = Attempt {
        key,
        mode,
        permit: permit.as_ref(),
        name: request.shared_name(),
    };
    let deadline = match request.wait() {
        Wait::For(d) => Some(Instant::now() + d),
        _ => None,
    };
    // The uncontended path: one attempt, nothing else set up. A lock or a
    // reader lock that finds the name held by permits at this first miss is
    // refused (its statement looks; a permit checks for itself, see
    // `session::permit`).
    if let Some(grant) = try_on_session(inner, &attempt, true).await? {
        return Ok(Some(grant));
    }
    match (request.wait(), deadline) {
        (Wait::No, _) => return Ok(None),
        (Wait::For(waited), Some(deadline)) if Instant::now() >= deadline => {
            return Err(Error::Timeout {
                name: name.to_owned(),
                waited,
            })
        }
        _ => {}
    }
    // Boxed: the wait's state (its server-side wait, the pool's queue) is
    // large, and the uncontended path should neither carry nor copy it.
    Box::pin(wait(inner, &request, &attempt, deadline)).await
}

/// The wait after a first attempt missed: releases in this process wake
/// it, and it tries again on the holder sessions, or waits on the server
/// on a connection of its own (see [`WaitStrategy`]).
async fn wait(
    inner: &Arc<Inner>,
    request: &AcquireRequest,
    attempt: &Attempt<'_>,
    deadline: Option<Instant>,
) -> Result<Option<Grant>> {
    let Attempt {
        key,
        mode,
        permit,
        name,
    } = *attempt;
    // The loop tries again at once after subscribing, so a release since
    // the first attempt is not missed.
    let subscription = inner.wakeups.subscribe(name);
    let (mut pause, cap) = match inner.options.wait {
        WaitStrategy::Poll { min, max } => (min, max),
        WaitStrategy::Server if permit.is_some() => (PERMIT_POLL_MIN, PERMIT_POLL_MAX),
        WaitStrategy::Server => (POOL_RETRY_MIN, POOL_RETRY_MAX),
    };
    // The connection of a server-side wait, and its acquisition from the
    // pool while that is under way (kept across rounds, so as not to lose
    // the place in the pool's queue).
    let mut waiter: Option<WaitConn> = None;
    // This acquisition's right to wait on the server (see `WaitSlot`).
    let mut slot: Option<WaitSlot> = None;
    // What a grant on the server will need, made before the first
    // server-side wait (see `session::Adoption`).
    let mut adoption: Option<session::Adoption> = None;
    let mut from_pool: Option<
        BoxFuture<'static, std::result::Result<PoolConnection<Postgres>, sqlx::Error>>,
    > = None;
    loop {
        // Dropped (set to None) for a server-side wait, which local
        // releases do not concern (the server grants it), so that a release
        // here does not wake this task in vain as the grant comes in.
        let mut armed = std::pin::pin!(Some(subscription.notified()));
        let mut notified = armed.as_mut().as_pin_mut().expect("just armed");
        notified.as_mut().enable();

        if let Some(grant) = try_on_session(inner, attempt, false).await? {
            return Ok(Some(grant));
        }
        let now = Instant::now();
        if let (Wait::For(waited), Some(deadline)) = (request.wait(), deadline) {
            if now >= deadline {
                return Err(Error::Timeout {
                    name: name.to_string(),
                    waited,
                });
            }
        }
        let mut wake_at = now + pause.mul_f64(rand::random_range(0.5..=1.0));
        if let Some(deadline) = deadline {
            wake_at = wake_at.min(deadline);
        }
        // A server-side wait happens on a connection of its own so that
        // nothing else queues behind it. Only one acquisition per key waits
        // on the server, and only as many as the backend has wait slots:
        // the others poll here like `WaitStrategy::Poll`, woken by releases
        // in this process, so waiters never take more than a bounded share
        // of the pool.
        // A permit has no one key to wait on: it polls (see
        // `PERMIT_POLL_MIN`).
        let server_side = matches!(inner.options.wait, WaitStrategy::Server) && permit.is_none();
        if server_side && slot.is_none() {
            slot = WaitSlot::take(inner, key);
        }
        if slot.is_none() {
            tokio::select! {
                _ = &mut notified => {}
                _ = sleep_until(wake_at) => {}
            }
            pause = (pause * 2).min(cap);
            continue;
        }
        // While the pool has none to spare, keep trying on the holder
        // sessions (a release here wakes us; others are polled).
        if waiter.is_none() {
            let pending = from_pool.get_or_insert_with(|| Box::pin(inner.pool.acquire()));
            tokio::select! {
                conn = pending => {
                    from_pool = None;
                    match conn {
                        Ok(conn) => waiter = Some(WaitConn { conn: Some(conn), clean: true }),
                        // The pool stayed exhausted for its acquire_timeout:
                        // go on trying on the holder sessions meanwhile (a
                        // database that cannot be reached fails them).
                        Err(sqlx::Error::PoolTimedOut) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                _ = &mut notified => continue,
                _ = sleep_until(wake_at) => {
                    pause = (pause * 2).min(cap);
                    continue;
                }
            }
        }
        armed.set(None);
        let conn = waiter.as_mut().expect("a waiting connection");
        if adoption.is_none() {
            adoption = Some(session::Adoption::prepare(inner, name));
        }
        match wait_on_server(inner, conn, key, mode, deadline).await {
            Waited::Granted {
                token,
                pid,
                marker,
                timeline,
                lifted,
            } => {
                if mode == LockMode::Shared {
                    let conn = waiter.as_mut().expect("a waiting connection");
                    reader_beside_permits(conn, name).await?;
                }
                let conn = waiter
                    .take()
                    .and_then(|mut w| w.conn.take())
                    .expect("a waiting connection");
                let permit = slot.as_mut().and_then(|s| s.permit.take());
                let adoption = adoption.take().expect("prepared before the wait");
                return Ok(Some(session::adopt(
                    inner, adoption, conn, permit, pid, marker, timeline, lifted, key, mode, token,
                )));
            }
            Waited::Busy => {}
            Waited::Failed(e) => return Err(e),
        }
    }
}

/// What one acquisition tries to take.
struct Attempt<'a> {
    key: i64,
    mode: LockMode,
    /// The semaphore's keys, for a permit.
    permit: Option<&'a Arc<PermitKeys>>,
    name: &'a Arc<str>,
}

/// A reader granted by a server-side wait, which shares the name's key
/// with a semaphore's permits: it looks for their marker on its wait's
/// connection, as a reader granted on a holder session does in its
/// statement (see `session`), and if it finds it is refused. The
/// connection, which holds the lock and carries a holder session's marker,
/// stays dirty: it is closed, which ends the lock.
async fn reader_beside_permits(conn: &mut WaitConn, name: &str) -> Result<()> {
    let raw = &mut **conn.conn.as_mut().expect("connection present");
    match semaphore::capacity_held(raw, name).await? {
        None => Ok(()),
        Some(found) => Err(disagreement(name, 1, found)),
    }
}

/// One attempt on a holder session, opening one if needed. `Ok(None)` if
/// the lock is held (by us or anyone), or every permit is. With `first`, a
/// lock's miss looks for a semaphore's permits (see `Session::try_lock`).
async fn try_on_session(
    inner: &Arc<Inner>,
    attempt: &Attempt<'_>,
    first: bool,
) -> Result<Option<Grant>> {
    let Attempt {
        key,
        mode,
        permit,
        name,
    } = *attempt;
    // A permit is a shared hold on the name's key (see `registry`).
    let hold_mode = if permit.is_some() {
        LockMode::Shared
    } else {
        mode
    };
    let mut grow = true;
    let mut failed = None;
    let mut gone = 0;
    while gone < SESSION_RETRIES {
        if let Some(refusal) = inner.refusal() {
            return Err(refusal);
        }
        let lock = inner.next_id();
        let route =
            inner
                .registry()
                .route(key, hold_mode, permit, lock, inner.target_sessions(), grow);
        match route {
            Route::Busy => return Ok(None),
            Route::Disagree(found) => {
                let asked = permit.map_or(1, |k| k.slots.len() as u32);
                return Err(disagreement(name, asked, found));
            }
            Route::Open => {
                // Counted too: a session that dies as soon as it is opened
                // must not be reopened forever.
                // Boxed: rare, and its state (the pool's queue) is large.
                if let Err(reason) = Box::pin(open_session(inner)).await? {
                    failed = Some(reason);
                }
                gone += 1;
            }
            Route::Grow => {
                grow = false;
                inner.grow();
            }
            Route::Send(session) => {
                // The attempt runs here, on the session's connection; if
                // this future is dropped mid-statement, a task finishes it
                // and releases a grant nobody takes.
                let reply = match permit {
                    Some(keys) => {
                        let attempt = permit_on(session, lock, keys.clone(), name.clone());
                        Detached::new(attempt).await
                    }
                    None => {
                        let attempt = lock_on(session, lock, key, mode, name.clone(), first);
                        Detached::new(attempt).await
                    }
                };
                match reply {
                    LockReply::Granted(grant) => return Ok(Some(grant)),
                    LockReply::Busy => return Ok(None),
                    LockReply::Failed(e) => return Err(e),
                    LockReply::Gone(loss) => failed = Some(loss.detail),
                }
                gone += 1;
            }
        }
    }
    if let Some(refusal) = inner.refusal() {
        return Err(refusal);
    }
    let reason = failed.unwrap_or_else(|| "their tasks ended".into());
    Err(Error::Unavailable(format!(
        "the advisory lock's holder sessions kept failing: {reason}"
    )))
}

/// The answer to one attempt on a holder session.
enum LockReply {
    Granted(Grant),
    Busy,
    Failed(Error),
    /// The session failed before or while trying (why); nothing is held
    /// (the session is closed). Try elsewhere.
    Gone(Loss),
}

/// One lock attempt on the holder session the registry routed it to, for
/// the pending hold `lock` it recorded there. Runs in the caller's task,
/// inside [`Detached`]: if the caller's future is dropped mid-statement, a
/// task finishes it, records its outcome, and drops a grant nobody takes
/// (which queues its unlock on the session). With `look`, a miss looks for
/// a semaphore's permits on the name (and is refused if it finds them).
async fn lock_on(
    session: Arc<Session>,
    lock: LockId,
    key: i64,
    mode: LockMode,
    name: Arc<str>,
    look: bool,
) -> LockReply {
    // 1. The session's connection, behind its async mutex. A session that
    //    ended took the pending hold with it: the attempt goes elsewhere.
    let mut c = match session.conn().await {
        Ok(c) => c,
        Err(loss) => {
            not_granted(&session, key, lock);
            return LockReply::Gone(loss);
        }
    };
    // 2. The lock statement. A reader beside a shared hold of ours on this
    //    session stacks on it (the statement then gives way to waiters).
    let stacked = mode == LockMode::Shared
        && session
            .inner
            .registry()
            .stacked(session.id, key, mode, lock);
    let tried = session
        .try_lock(&mut c, key, mode, stacked, &name, look)
        .await;
    // 3. Its outcome, recorded in the registry while the connection is
    //    still held, so that the next statement on the session finds the
    //    registry as the server has it.
    match tried {
        Tried::Granted(token) => granted(&session, key, lock, mode, None, token, name),
        Tried::Missed => {
            not_granted(&session, key, lock);
            LockReply::Busy
        }
        Tried::MissedBesidePermits => {
            not_granted(&session, key, lock);
            refused_beside_permits(c.pg(), &name).await
        }
        Tried::GrantedBesidePermits => match session.give_back_shared(&mut c, key).await {
            Ok(()) => {
                not_granted(&session, key, lock);
                refused_beside_permits(c.pg(), &name).await
            }
            Err(loss) => LockReply::Gone(loss),
        },
        Tried::NotOurs => {
            not_granted(&session, key, lock);
            session.close_pooled(&mut c);
            LockReply::Failed(engine::transaction_pooler())
        }
        Tried::Refused(e) => undo_lock(&session, &mut c, lock, key, mode, e).await,
        // The session's end took the pending hold with it.
        Tried::Closed(loss) => LockReply::Gone(loss),
    }
}

/// One permit attempt on the holder session the registry routed it to, as
/// [`lock_on`] for a lock. The pending hold `lock` is a shared hold on the
/// name's key (`keys.name`).
async fn permit_on(
    session: Arc<Session>,
    lock: LockId,
    keys: Arc<PermitKeys>,
    name: Arc<str>,
) -> LockReply {
    let key = keys.name;
    // 1. The session's connection, as for a lock.
    let mut c = match session.conn().await {
        Ok(c) => c,
        Err(loss) => {
            not_granted(&session, key, lock);
            return LockReply::Gone(loss);
        }
    };
    // 2. The slots to try: not those our permits hold (on their own
    //    session PostgreSQL would grant them again, as locks stack;
    //    elsewhere they are known to be taken).
    let (stacked, slots) = {
        let registry = session.inner.registry();
        let held = registry.slots_held(key);
        let slots: Vec<i64> = keys
            .slots
            .iter()
            .filter(|s| !held.contains(s))
            .copied()
            .collect();
        let stacked = registry.stacked(session.id, key, LockMode::Shared, lock);
        (stacked, slots)
    };
    if slots.is_empty() {
        not_granted(&session, key, lock);
        return LockReply::Busy;
    }
    // 3. The permit's statement.
    let tried = session.try_permit(&mut c, &keys, &slots).await;
    // 4. Its outcome, recorded while the connection is held.
    let n = keys.slots.len() as u32;
    match tried {
        PermitTried::Granted { slot, token } => {
            let permit = Permit {
                keys: keys.clone(),
                slot: Some(slot),
            };
            granted(
                &session,
                key,
                lock,
                LockMode::Shared,
                Some(permit),
                token,
                name,
            )
        }
        PermitTried::Missed(verdict) => {
            not_granted(&session, key, lock);
            match verdict {
                Verdict::Agree => LockReply::Busy,
                // Looked at again: an ending holder session can look like
                // a lock for an instant (see `semaphore::lock_beside`).
                Verdict::Lock => {
                    semaphore::paused_before_second_look(&name).await;
                    match semaphore::lock_beside(c.pg(), &keys).await {
                        Ok(true) => LockReply::Failed(disagreement(&name, n, 1)),
                        // Gone meanwhile: try again.
                        Ok(false) => LockReply::Busy,
                        Err(e) => LockReply::Failed(e),
                    }
                }
                // Read on this session: the pool may have no connection to
                // spare.
                Verdict::OtherCapacity => match semaphore::capacity_held(c.pg(), &name).await {
                    Ok(Some(found)) if found != n => {
                        LockReply::Failed(disagreement(&name, n, found))
                    }
                    // Gone meanwhile: try again.
                    Ok(_) => LockReply::Busy,
                    Err(e) => LockReply::Failed(e),
                },
            }
        }
        PermitTried::NotOurs => {
            not_granted(&session, key, lock);
            session.close_pooled(&mut c);
            LockReply::Failed(engine::transaction_pooler())
        }
        PermitTried::Refused(e) => undo_permit(&session, &mut c, lock, &keys, stacked, e).await,
        PermitTried::Closed(loss) => LockReply::Gone(loss),
    }
}

/// The pending hold `lock` on `key` was granted: records it as held and
/// makes its grant, whose guard releases it through `release::unlock`.
fn granted(
    session: &Arc<Session>,
    key: i64,
    lock: LockId,
    mode: LockMode,
    permit: Option<Permit>,
    token: u64,
    name: Arc<str>,
) -> LockReply {
    let (status, pending) = Grant::status(None);
    let hold = Hold::held(
        lock,
        session.id,
        mode,
        permit,
        token,
        name.clone(),
        status.clone(),
    );
    session.inner.registry().granted(key, hold);
    let held = Held::new(name, key, lock, session, status);
    LockReply::Granted(pending.grant(token, Box::new(held)))
}

/// The attempt was answered without a grant: its pending hold goes.
fn not_granted(session: &Session, key: i64, lock: LockId) {
    session.inner.registry().not_granted(session.id, key, lock);
}

/// The answer to a lock or reader lock of `name` that found permits of a
/// semaphore on it: refused, with their capacity (read on `conn`, a holder
/// session's, so as not to wait for the pool); busy if they are gone.
async fn refused_beside_permits(conn: &mut PgConnection, name: &str) -> LockReply {
    match semaphore::capacity_held(conn, name).await {
        Ok(Some(found)) => LockReply::Failed(disagreement(name, 1, found)),
        // Gone meanwhile: try again.
        Ok(None) => LockReply::Busy,
        Err(e) => LockReply::Failed(e),
    }
}

/// A lock statement failed, maybe after the lock was taken (the lock
/// table fills up in the lock call, but nextval may fail after it). One
/// unlock undoes it exactly if nothing else of ours holds the key in this
/// mode on this session; beside a stacked shared hold, only "out of shared
/// memory" is known to come after the lock (a stacked lock needs no new
/// entry), so any other error leaves the session uncertain and closes it.
async fn undo_lock(
    session: &Session,
    c: &mut Conn,
    lock: LockId,
    key: i64,
    mode: LockMode,
    e: sqlx::Error,
) -> LockReply {
    let full = is_lock_table_full(&e);
    if !full
        && session
            .inner
            .registry()
            .stacked(session.id, key, mode, lock)
    {
        session.die(
            c,
            &Loss::new(
                LostReason::Other,
                "a lock statement failed beside a stacked shared lock: the session's locks are uncertain",
            ),
        );
        return LockReply::Failed(map_err(e));
    }
    let undone = session.undo_lock(c, key, mode).await.is_ok();
    if undone {
        not_granted(session, key, lock);
    }
    LockReply::Failed(if full && undone {
        lock_table_full(&session::lock_table_size(session, c).await)
    } else if full {
        lock_table_full("")
    } else {
        map_err(e)
    })
}

/// A permit's statement failed after it may have taken some of its locks
/// (the lock table fills up in a lock call). Alone on its session the
/// permit's locks are given back as `pg_locks` shows them; beside another
/// permit of the name (`stacked`), whose locks stack with them, the
/// session is uncertain and closed.
async fn undo_permit(
    session: &Session,
    c: &mut Conn,
    lock: LockId,
    keys: &PermitKeys,
    stacked: bool,
    e: sqlx::Error,
) -> LockReply {
    let error = if is_lock_table_full(&e) {
        lock_table_full("")
    } else {
        map_err(e)
    };
    if stacked {
        session.die(
            c,
            &Loss::new(
                LostReason::Other,
                "a permit's statement failed beside another permit of its name: the \
                 session's locks are uncertain",
            ),
        );
        return LockReply::Failed(error);
    }
    if session.undo_permit(c, keys).await.is_ok() {
        not_granted(session, keys.name, lock);
    }
    LockReply::Failed(error)
}

/// Opens a core holder session when there is none, waiting for a
/// connection from the pool (unless another task opens one meanwhile).
/// The inner `Err` tells why the session failed to open.
async fn open_session(inner: &Arc<Inner>) -> Result<std::result::Result<(), String>> {
    let _opening = inner.opening.lock().await;
    if inner.registry().core_count() > 0 {
        return Ok(Ok(()));
    }
    let conn = inner.pool.acquire().await?;
    // Finished even if this acquisition is dropped: a half-opened session
    // would hand a marked connection back to the pool.
    Ok(Detached::new(session::open(inner.clone(), conn)).await)
}

/// The right of one acquisition to wait on the server for `key`: the key's
/// single server-side waiter in this process, holding one of the backend's
/// wait slots. The permit moves to the holder session when the wait is
/// granted (the lock then lives on the wait's connection); the key is
/// freed for the next waiter when this is dropped.
struct WaitSlot {
    inner: Arc<Inner>,
    key: i64,
    permit: Option<OwnedSemaphorePermit>,
}

impl WaitSlot {
    fn take(inner: &Arc<Inner>, key: i64) -> Option<WaitSlot> {
        let mut keys = inner.server_waits.lock().unwrap_or_else(|e| e.into_inner());
        if keys.contains(&key) {
            return None;
        }
        let permit = inner.wait_slots.clone().try_acquire_owned().ok()?;
        keys.insert(key);
        Some(WaitSlot {
            inner: inner.clone(),
            key,
            permit: Some(permit),
        })
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        let mut keys = self
            .inner
            .server_waits
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        keys.remove(&self.key);
    }
}

/// A connection used for a server-side wait. It goes back to the pool only
/// when it is known to hold no lock; otherwise it is closed.
struct WaitConn {
    conn: Option<PoolConnection<Postgres>>,
    clean: bool,
}

impl Drop for WaitConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            if !self.clean {
                conn.close_on_drop();
            }
        }
    }
}

enum Waited {
    Granted {
        token: u64,
        pid: i32,
        marker: String,
        /// The server session's timeline, if it was read before the wait.
        timeline: Option<i64>,
        /// The session's timeouts before the wait lifted them.
        lifted: (String, Option<String>),
    },
    Busy,
    Failed(Error),
}

/// One server-side wait, bounded by what is left of the deadline.
async fn wait_on_server(
    inner: &Inner,
    conn: &mut WaitConn,
    key: i64,
    mode: LockMode,
    deadline: Option<Instant>,
) -> Waited {
    // lock_timeout takes whole milliseconds up to i32::MAX; a longer wait is
    // done in several rounds. "0" waits forever.
    let timeout_ms = match deadline {
        None => 0,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now()).as_millis();
            if left == 0 {
                return Waited::Busy;
            }
            left.min(i32::MAX as u128) as i64
        }
    };
    // Dirty from here until the timeouts are put back (or the lift found
    // another holder's server session, where it set nothing).
    conn.clean = false;
    let marker = session::new_marker();
    let raw = &mut **conn.conn.as_mut().expect("connection present");
    // Only the lock_timeout set from the deadline bounds the wait: the
    // session's own timeouts are lifted for it (see `wait_sql`). The lock
    // is session-level, so it outlives the statement.
    let (pid, lifted, timeline) = match sqlx::query_as::<_, Lifted>(LIFT_FOR_WAIT.as_str())
        .bind(&marker)
        .fetch_one(&mut *raw)
        .await
    {
        Ok((true, pid, statement_timeout, transaction_timeout, _, _, _, timeline)) => {
            (pid, (statement_timeout, transaction_timeout), timeline)
        }
        // Another holder's server session: nothing was set.
        Ok((false, ..)) => {
            conn.clean = true;
            inner.refuse(Refusal::Pooler);
            return Waited::Failed(engine::transaction_pooler());
        }
        Err(e) if engine::is_statement_clash(&e) => {
            conn.clean = true;
            inner.refuse(Refusal::Pooler);
            return Waited::Failed(engine::transaction_pooler());
        }
        // The connection is dirty (its timeouts may be lifted): closed.
        Err(e) => return Waited::Failed(map_err(e)),
    };
    // The token drawn raw and fenced here with the timeline just read, or
    // (the server was in recovery) fenced in the statement.
    let sql = match (mode, timeline.is_some()) {
        (LockMode::Exclusive, true) => &*WAIT_EXCLUSIVE,
        (LockMode::Shared, true) => &*WAIT_SHARED,
        (LockMode::Exclusive, false) => &*WAIT_EXCLUSIVE_FENCED,
        (LockMode::Shared, false) => &*WAIT_SHARED_FENCED,
    };
    // If the acquirer is dropped meanwhile, the statement may yet be
    // granted: the connection stays dirty and is closed, which ends its
    // session's locks.
    let outcome = sqlx::query_as::<_, (bool, Option<i64>)>(sql.as_str())
        .bind(key)
        .bind(format!("{timeout_ms}ms"))
        .bind(&marker)
        .bind(pid)
        .fetch_one(&mut *raw)
        .await;
    match outcome {
        Ok((true, Some(drawn))) => {
            // Fenced in the statement (no timeline read), or here.
            let token = match timeline {
                None => u64::try_from(drawn).ok(),
                Some(timeline) => fence(drawn, timeline),
            };
            match (token, timeline) {
                (Some(token), _) => Waited::Granted {
                    token,
                    pid,
                    marker,
                    timeline,
                    lifted,
                },
                // The lock is held: the connection stays dirty and is
                // closed, which ends it.
                (None, Some(timeline)) => Waited::Failed(Error::internal(format!(
                    "the server's timeline {timeline} is above 32767, the most fencing tokens \
                     can carry"
                ))),
                (None, None) => Waited::Failed(Error::internal(
                    "a granted advisory lock wait answered a negative fencing token",
                )),
            }
        }
        // Another server session than the one marked: a transaction-pooling
        // proxy. The connection stays dirty and is closed.
        Ok((false, _)) => {
            inner.refuse(Refusal::Pooler);
            Waited::Failed(engine::transaction_pooler())
        }
        // A granted wait always has a token; the connection stays dirty.
        Ok((true, None)) => Waited::Failed(Error::internal(
            "a granted advisory lock wait answered no fencing token",
        )),
        Err(e) if is_lock_timeout(&e) => {
            // A grant can race the timeout: PostgreSQL then keeps the
            // session-level lock (LockErrorCleanup remembers a lock granted
            // while the wait was being cancelled) yet reports the timeout.
            // Give such a late grant back before the connection counts as
            // clean; if that fails, the dirty connection is closed. Found by
            // the torture test's cancellation storm.
            match undo_wait(conn, key, mode, &lifted).await {
                Ok(()) => Waited::Busy,
                Err(e) => Waited::Failed(e),
            }
        }
        // A transaction pooler: the statement never ran. The connection
        // stays dirty (its timeouts lifted) and is closed.
        Err(e) if engine::is_statement_clash(&e) => {
            inner.refuse(Refusal::Pooler);
            Waited::Failed(engine::transaction_pooler())
        }
        // The lock could not even be queued for: nothing is held.
        Err(e) if is_lock_table_full(&e) => match undo_wait(conn, key, mode, &lifted).await {
            Ok(()) => Waited::Failed(lock_table_full("")),
            Err(e) => Waited::Failed(e),
        },
        // Otherwise the lock may have been taken before the error: the
        // dirty connection is closed.
        Err(e) => Waited::Failed(map_err(e)),
    }
}

/// After a wait statement that failed: gives back a grant that raced its
/// failure and puts the session's timeouts back (see `UNLOCK_LATE_*`); the
/// connection is then clean.
async fn undo_wait(
    conn: &mut WaitConn,
    key: i64,
    mode: LockMode,
    lifted: &(String, Option<String>),
) -> Result<()> {
    let sql = match mode {
        LockMode::Exclusive => UNLOCK_LATE_EXCLUSIVE,
        LockMode::Shared => UNLOCK_LATE_SHARED,
    };
    let raw = &mut **conn.conn.as_mut().expect("connection present");
    sqlx::query(sql)
        .bind(key)
        .bind(&lifted.0)
        .bind(&lifted.1)
        .execute(raw)
        .await
        .map_err(map_err)?;
    conn.clean = true;
    Ok(())
}
