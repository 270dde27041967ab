//! Holder sessions: long-lived connections taken from the pool, each
//! carrying many session-level advisory locks.
//!
//! A session's connection sits behind an async mutex. Whoever needs it
//! takes the mutex and runs the statement from their own task: an
//! acquisition its lock statement (`acquire::lock_on`), a release its
//! unlock (`release::unlock`), the session's keeper task its heartbeat.
//! Statements on a session therefore never interleave, and the uncontended
//! path hands nothing to another task. The lock and unlock statements here
//! ([`Session::try_lock`], [`Session::unlock`], `Session::try_permit`)
//! answer what the server said and leave the registry to their callers,
//! which record the outcome while they still hold the connection, inside
//! [`Detached`](crate::detach::Detached): if the caller is dropped
//! mid-statement, a task finishes it and resolves the outcome (a grant
//! nobody takes is released).
//!
//! The keeper task checks the session when it has been idle for a
//! heartbeat (any statement that succeeds proves it alive), unlocks the
//! locks of guards that were dropped, and sends the session back to the
//! pool once it holds nothing.
//!
//! When a statement fails in a way that leaves the session's state unknown
//! (a connection error, no answer in time, an unlock whose outcome is
//! unknown, a statement abandoned without a runtime to finish it), the
//! session is closed and every lock on it is reported lost: a connection
//! that may hold a lock never goes back to the pool. A session that holds
//! nothing goes back to the pool (core sessions after a heartbeat without
//! locks, sessions adopted from a wait as soon as their lock is released),
//! after a `pg_advisory_unlock_all()` for good measure.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::Poll;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnection, PgQueryResult, PgRow};
use sqlx::query::Query;
use sqlx::{Executor, Postgres, Row};
use tokio::sync::{mpsc, oneshot, MutexGuard, OwnedSemaphorePermit};
use tokio::time::{sleep_until, timeout, Instant, Sleep};

pub(super) mod permit;

use super::registry::{Hold, LockId, Permit, SessionEntry, SessionId};
use super::release::{self, Held};
use super::{split_key, Inner, Refusal};
use crate::backend::{BoxFuture, Grant, LockStatus, PendingGrant};
use crate::error::Loss;
use crate::postgres::engine::{self, is_statement_clash};
use crate::postgres::key::semaphore_key;
use crate::postgres::token::sequence_token;
use crate::{LockMode, LostReason};

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
// After its lock call, a reader lock statement may look for a semaphore's
// marker ($4 and $5, its key's halves), which every permit takes before the
// name's key (see `permit`): a reader that was granted looks when $7 is set
// (always: it shares the name's key with permits, and gives way if it finds
// them), and one that missed when $6 is set (an acquisition's first attempt:
// a reader lock that finds the name held by permits is refused rather than
// wait; an exclusive lock looks with `LOOK`, after its statement). It looks
// in `pg_locks` after the lock call, as a permit looks after its own.
fn looking(sql: String) -> String {
    format!(
        "SELECT ours, token,
                CASE WHEN (token IS NOT NULL AND $7) OR (token IS NULL AND ours AND $6) THEN
                    EXISTS (SELECT 1 FROM pg_locks
                             WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                               AND database = (SELECT oid FROM pg_database
                                                WHERE datname = current_database())
                               AND classid::bigint = $4 AND objid::bigint = $5 AND t.ours)
                END
           FROM ({sql} OFFSET 0) t"
    )
}
// An exclusive lock: the hot path of every `try_acquire`, kept to what it
// must do. One bigint answers everything: -1 when the statement ran on
// another server session than this session's own (the OURS check, written
// flat: WHEN runs in order, so nothing is taken then), NULL when the key is
// held elsewhere, else the raw value drawn from the fencing sequence, which
// `Session::try_lock` makes the token (`token::fence`) with the timeline the
// session read once. A miss that is to look for a semaphore's marker does so
// in a second statement (`LOOK`), sent only then: the look, idle in the
// statement of a grant, made every grant about a quarter slower
// (benches/compare/advisory_limit.rs, docs/performance.md).
const TRY_EXCLUSIVE: &str = "SELECT CASE
    WHEN current_setting('dblock.session', true) IS DISTINCT FROM $2 OR pg_backend_pid() <> $3 THEN -1
    WHEN pg_try_advisory_lock($1) THEN nextval('dblock_fencing_seq') END";
/// The answer of [`TRY_EXCLUSIVE`] when it ran on another server session.
const NOT_OURS: i64 = -1;
// After an exclusive lock missed, on a first attempt: whether a semaphore's
// permits hold the name (their marker, $1 and $2 its key's halves).
const LOOK: &str = "SELECT EXISTS (SELECT 1 FROM pg_locks
                     WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                       AND database = (SELECT oid FROM pg_database
                                        WHERE datname = current_database())
                       AND classid::bigint = $1 AND objid::bigint = $2)";
/// dblock's exclusive try-lock statement, for the benchmark's "raw, same
/// work" baseline (`benches/compare/advisory_limit.rs`), which sends it by
/// hand with the parameters `Session::try_lock` gives it: `$1` the key, `$2`
/// the session's marker, `$3` its pid. It answers -1 (not this session), NULL
/// (busy) or the raw value of the fencing sequence. Not a stable interface.
pub(super) fn try_exclusive_sql() -> &'static str {
    TRY_EXCLUSIVE
}
static TRY_SHARED: LazyLock<String> = LazyLock::new(|| {
    looking(format!(
        "SELECT ours, CASE WHEN NOT ours THEN NULL
                           WHEN pg_try_advisory_lock_shared($1) THEN {} END AS token FROM {OURS}",
        sequence_token()
    ))
});
// A shared lock stacked on a session that holds the key shared already: the
// server would grant it at once, ahead of any waiter queued for the key (a
// session never waits for a lock it holds), so a stream of readers in this
// process could starve a writer queued on the server. It is taken only if
// nobody waits for the key ($8 and $9, its halves).
static TRY_SHARED_STACKED: LazyLock<String> = LazyLock::new(|| {
    looking(format!(
        "SELECT ours, CASE
    WHEN NOT ours THEN NULL
    WHEN EXISTS (SELECT 1 FROM pg_locks
                  WHERE locktype = 'advisory' AND objsubid = 1 AND NOT granted
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND classid::bigint = $8 AND objid::bigint = $9) THEN NULL
    WHEN pg_try_advisory_lock_shared($1) THEN {} END AS token FROM {OURS}",
        sequence_token()
    ))
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
// the pool and on the session itself (see `shares_its_server_session`):
// another connection can only see this session's pid or marker, and the
// session only see someone else's, if statements of different connections
// run on the same server session, which a transaction-pooling proxy does
// (PgBouncer hands the server connection just released to the next
// transaction); two connections of a direct or session-pooled pool never
// share one. A simple query, as OPEN.
const PROBE: &str =
    "SELECT pg_backend_pid(), coalesce(current_setting('dblock.session', true), '')";
// Back to the pool: no lock, no marker, and the TCP settings back to the
// session's defaults.
const RETIRE: &str = "SELECT pg_advisory_unlock_all(), set_config('dblock.session', '', false), (
    SELECT count(set_config(name, reset_val, false))
      FROM pg_settings
     WHERE name IN ('tcp_keepalives_idle', 'tcp_keepalives_interval',
                    'tcp_keepalives_count', 'tcp_user_timeout'))";
// The same for a session adopted from a server-side wait, which also puts
// back the timeouts the wait lifted ($1 statement_timeout, $2
// transaction_timeout or NULL; see `acquire::wait_sql`).
static RETIRE_RESTORING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{RETIRE}, set_config('statement_timeout', $1, false),
         CASE WHEN $2::text IS NOT NULL THEN set_config('transaction_timeout', $2, false) END"
    )
});
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

/// What a lock statement answered (see [`Session::try_lock`]).
pub(super) enum Tried {
    /// Granted, with its fencing token.
    Granted(u64),
    /// Not granted: someone else holds the key.
    Missed,
    /// A reader was granted, but a semaphore's permits hold the name: it
    /// is to give its lock back and be refused.
    GrantedBesidePermits,
    /// Not granted, and a semaphore's permits hold the name.
    MissedBesidePermits,
    /// The statement ran on another server session than this session's
    /// own (a transaction-pooling proxy): nothing of it was taken.
    NotOurs,
    /// The server refused the statement, maybe after it took the lock.
    Refused(sqlx::Error),
    /// The session failed and was closed (why): nothing is held on it.
    Closed(Loss),
}

/// Work for a session's keeper task.
enum Chore {
    /// Release the lock of a guard that was dropped.
    Unlock { lock: LockId, key: i64 },
    /// A lock was released: a session adopted from a wait goes back to the
    /// pool once it holds nothing.
    Tidy,
}

/// How a statement on a session went wrong.
pub(super) enum Failure {
    /// The server refused the statement; the session is fine.
    Server(sqlx::Error),
    /// The session is suspect: it must be closed.
    Broken(Loss),
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

/// Why a session whose statement failed with `e` (a [`fatal`] error) is
/// lost: terminated by an operator (`pg_terminate_backend`: SQLSTATE 57P01),
/// or a failed connection.
fn fatal_reason(e: &sqlx::Error) -> LostReason {
    match e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("57P01") => {
            LostReason::Terminated
        }
        _ => LostReason::ConnectionLost,
    }
}

/// A session closed because it turned out to be shared ([`POOLED`]).
fn pooled() -> Loss {
    Loss::new(LostReason::ConnectionLost, POOLED)
}

/// A session whose statement the server refused in a way that leaves its
/// locks uncertain.
fn failed(e: &sqlx::Error) -> Loss {
    Loss::new(
        LostReason::ConnectionLost,
        format!("the holder session failed: {e}"),
    )
}

/// Runs `statement` with a bound on how long the session may take to
/// answer (`limit`, on the session's statement timer), and classifies its
/// failure.
async fn bounded<T>(
    timer: &mut StatementTimer,
    limit: Duration,
    statement: impl Future<Output = std::result::Result<T, sqlx::Error>>,
) -> std::result::Result<T, Failure> {
    let mut deadline = timer.armed(limit);
    let mut statement = std::pin::pin!(statement);
    let answer = std::future::poll_fn(|cx| match statement.as_mut().poll(cx) {
        Poll::Ready(answer) => Poll::Ready(Some(answer)),
        Poll::Pending => deadline.as_mut().poll(cx).map(|()| None),
    })
    .await;
    match answer {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(classify(e)),
        None => Err(Failure::Broken(Loss::new(
            LostReason::ConnectionLost,
            format!("the holder session of the advisory lock did not answer within {limit:?}"),
        ))),
    }
}

/// A session's one timer for the answer bound of its statements.
///
/// A tokio timer set and cleared per statement (two per lock and unlock)
/// was about a tenth of the client's own work on the uncontended path
/// (docs/performance.md, issue 14, eighth pass). Statements in quick
/// succession share one setting of this one instead: it is moved only when
/// it would go off earlier than a new statement's full bound minus a
/// fortieth of it, or later than that bound. A statement is therefore given
/// up between 0.975 and 1 times its bound after it started; a timer that
/// goes off between statements wakes nobody who waits for it.
#[derive(Default)]
pub(super) struct StatementTimer {
    /// Made at the first statement (a timer needs the runtime at hand).
    sleep: Option<Pin<Box<Sleep>>>,
    /// When `sleep` goes off.
    at: Option<Instant>,
}

impl StatementTimer {
    /// The timer, set to go off between `limit` minus a fortieth of it and
    /// `limit` from now.
    fn armed(&mut self, limit: Duration) -> Pin<&mut Sleep> {
        let due = Instant::now() + limit;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(sleep_until(due)));
        match self.at {
            Some(at) if at <= due && at + limit / 40 >= due => {}
            _ => {
                sleep.as_mut().reset(due);
                self.at = Some(due);
            }
        }
        sleep.as_mut()
    }
}

/// What a statement's error `e` makes of the session: broken by a
/// [`fatal`] error (a decoding error included: the session's answers can
/// no longer be trusted), else refused by the server.
fn classify(e: sqlx::Error) -> Failure {
    if fatal(&e) {
        Failure::Broken(Loss::new(
            fatal_reason(&e),
            format!("the holder session of the advisory lock failed: {e}"),
        ))
    } else {
        Failure::Server(e)
    }
}

/// Sends `query` on `conn` and answers its first row (`None`: no row), as
/// the future sqlx's executor boxes. The statements of a session go through
/// here rather than through the typed `query_scalar(..).fetch_one(..)`,
/// whose future (552 bytes: it keeps the query beside the executor's
/// future) sits inline in every state machine above it, `bounded`, the
/// lock statement and the box that `Detached` makes, and was copied into
/// each: on the uncontended path that was about 5 KB of copies and two
/// allocations too large for the allocator's per-thread cache per pair.
/// sqlx boxes the statement's own future either way.
fn first_row<'c>(
    conn: &'c mut PgConnection,
    query: Query<'c, Postgres, PgArguments>,
) -> BoxFuture<'c, sqlx::Result<Option<PgRow>>> {
    conn.fetch_optional(query)
}

/// A statement's one row, as [`first_row`] answered it through
/// [`bounded`], decoded as `T`; a missing row or a value that does not
/// decode breaks the session, as it did inside the typed `fetch_one`.
fn decoded<T>(row: std::result::Result<Option<PgRow>, Failure>) -> std::result::Result<T, Failure>
where
    T: for<'r> sqlx::FromRow<'r, PgRow>,
{
    row?.ok_or(sqlx::Error::RowNotFound)
        .and_then(|row| T::from_row(&row))
        .map_err(classify)
}

/// The first column of a statement's one row (see [`decoded`]).
fn scalar<T>(row: std::result::Result<Option<PgRow>, Failure>) -> std::result::Result<T, Failure>
where
    T: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    decoded::<(T,)>(row).map(|(v,)| v)
}

/// Runs a statement that returns no rows on `conn`, as the future sqlx's
/// executor boxes (see [`first_row`]).
fn run<'c>(
    conn: &'c mut PgConnection,
    query: Query<'c, Postgres, PgArguments>,
) -> BoxFuture<'c, sqlx::Result<PgQueryResult>> {
    conn.execute(query)
}

/// A new holder session's marker: random, so that no other holder (in
/// this process or another) has the same.
pub(super) fn new_marker() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A holder session's connection and what is known of its server session.
pub(super) struct Conn {
    /// `None` once the session went back to the pool or was closed.
    conn: Option<PoolConnection<Postgres>>,
    /// The answer bound of the statements sent on `conn`.
    timer: StatementTimer,
    /// The marker this session set on its server session.
    marker: String,
    /// Its server session's pid.
    pid: i32,
    /// Its server session's timeline (see `token::fence`), read at its
    /// first exclusive grant.
    timeline: Option<i64>,
    /// A lock or unlock statement was started and its outcome not yet
    /// recorded: if the next user finds this set, that statement was
    /// abandoned without a runtime to finish it, and the session's locks
    /// are uncertain.
    in_doubt: bool,
    /// The wait slot of the server-side wait this session was adopted
    /// from, freed when the session ends.
    wait_slot: Option<OwnedSemaphorePermit>,
    /// The server session's `statement_timeout` and `transaction_timeout`
    /// before the server-side wait this session was adopted from lifted
    /// them: put back when it goes back to the pool.
    lifted: Option<(String, Option<String>)>,
}

impl Conn {
    pub(super) fn pg(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("an open session has its connection")
    }

    /// The connection and the timer that bounds its statements (borrowed
    /// apart, for [`bounded`]).
    fn split(&mut self) -> (&mut PgConnection, &mut StatementTimer) {
        let conn = self
            .conn
            .as_mut()
            .expect("an open session has its connection");
        (conn, &mut self.timer)
    }

    /// [`Conn::split`], with the marker and pid that its statements check
    /// (borrowed apart, so that the marker is bound by reference, not
    /// copied per statement).
    fn checked(&mut self) -> (&mut PgConnection, &str, i32, &mut StatementTimer) {
        let conn = self
            .conn
            .as_mut()
            .expect("an open session has its connection");
        (conn, self.marker.as_str(), self.pid, &mut self.timer)
    }
}

impl Drop for Conn {
    /// A connection still here was not handed back by `retire`: it may
    /// hold locks, so it is closed, never returned to the pool.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// A holder session. Its keeper task owns it; statements under way hold it
/// too, guards and the registry only weakly: when the keeper task ends
/// abnormally (its runtime is dropped, as in a crash), the session is
/// dropped, which closes its connection and reports its guards lost.
pub(super) struct Session {
    /// The backend it belongs to.
    pub(super) inner: Arc<Inner>,
    pub(super) id: SessionId,
    conn: tokio::sync::Mutex<Conn>,
    /// Set once the session went back to the pool or was closed.
    ended: AtomicBool,
    /// When a statement last succeeded (the session was alive then), as
    /// nanoseconds since `epoch`.
    last_ok: AtomicU64,
    epoch: Instant,
    keeper: mpsc::UnboundedSender<Chore>,
    /// Unlocks under way or waiting for the connection, which the registry
    /// counts in the session's backlog when it routes new locks.
    unlocking: Arc<AtomicUsize>,
}

/// Counts one unlock in its session's backlog while it lives.
pub(super) struct Unlocking<'a>(&'a AtomicUsize);

impl<'a> Unlocking<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Unlocking(count)
    }
}

impl Drop for Unlocking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Session {
    /// A session ends by going back to the pool clean (`retire`) or by
    /// being closed (`die`), both of which take the connection. One that
    /// still has it here ended abnormally (its keeper task was dropped with
    /// its runtime, or panicked): its connection is closed and its guards
    /// report lost.
    fn drop(&mut self) {
        if self.conn.get_mut().conn.is_some() {
            self.inner.session_gone(
                self.id,
                &Loss::new(
                    LostReason::ConnectionLost,
                    "the holder session's task ended abnormally",
                ),
            );
        }
    }
}

/// Opens a core holder session on `conn` and registers it, unless the
/// configured number is open already (the connection goes back to the pool
/// then). `Err` tells why the session could not be opened; the backend
/// refuses further acquisitions if the reason is the engine or a pooler.
pub(super) async fn open(
    inner: Arc<Inner>,
    conn: PoolConnection<Postgres>,
) -> std::result::Result<(), String> {
    let limit = inner.answer_within();
    let mut c = Conn {
        conn: Some(conn),
        timer: StatementTimer::default(),
        marker: String::new(),
        pid: 0,
        timeline: None,
        in_doubt: false,
        wait_slot: None,
        lifted: None,
    };
    let (pg, timer) = c.split();
    let row = match bounded(timer, limit, sqlx::raw_sql(OPEN).fetch_one(pg)).await {
        Ok(row) => row,
        Err(Failure::Server(e)) => return Err(format!("the holder session failed: {e}")),
        Err(Failure::Broken(loss)) => return Err(loss.detail),
    };
    let (pid, version, marker) =
        decode_open(&row).map_err(|e| format!("the holder session failed: {e}"))?;
    if let Some(why) = engine::refusal(&version) {
        inner.refuse(Refusal::Engine(why));
        return Err(why.to_owned());
    }
    let Some(marker) = marker else {
        // Another holder's marker: this server session is shared. Nothing
        // was set or taken.
        inner.refuse(Refusal::Pooler);
        return Err(POOLED.to_owned());
    };
    c.marker = marker;
    c.pid = pid;
    if shares_its_server_session(&inner, &mut c).await {
        inner.refuse(Refusal::Pooler);
        return Err(POOLED.to_owned());
    }
    let (keeper, chores) = mpsc::unbounded_channel();
    let session = Arc::new(Session::new(inner.clone(), c, keeper));
    let registered = {
        let mut registry = inner.registry();
        if registry.core_count() < inner.target_sessions() {
            registry.add_session(
                session.id,
                SessionEntry {
                    session: Arc::downgrade(&session),
                    core: true,
                    pid: Some(pid),
                    holds: 0,
                    queued: 0,
                    unlocking: session.unlocking.clone(),
                },
            );
            true
        } else {
            false
        }
    };
    if !registered {
        // Enough sessions opened meanwhile.
        session.retire_unregistered().await;
        return Ok(());
    }
    tracing::debug!(
        session = session.id,
        "dblock: advisory holder session opened"
    );
    tokio::spawn(session.keep(chores));
    Ok(())
}

/// At the backend's first holder session: whether its statements and
/// another connection's run on shared server sessions, as through a
/// transaction-pooling proxy. Skipped when the pool has no second
/// connection to spare at once.
///
/// Such a proxy hands each transaction the server connection released last
/// (PgBouncer's default), so the other connection's probe lands on this
/// session's server session and sees its pid or marker; and if another
/// client took that server connection meanwhile, the probe lands elsewhere,
/// and this session's own next statement then follows the probe's server
/// connection, not its own. Two rounds of the two looks: one alone missed
/// now and then while other clients used the proxy.
async fn shares_its_server_session(inner: &Inner, c: &mut Conn) -> bool {
    if inner.probed.swap(true, Ordering::AcqRel) {
        return false;
    }
    if inner.pool.options().get_max_connections() < 2 {
        return false;
    }
    let limit = inner.answer_within();
    let Ok(Ok(mut other)) = timeout(limit, inner.pool.acquire()).await else {
        return false;
    };
    let (pid, marker) = (c.pid, c.marker.clone());
    for _ in 0..2 {
        match probe(&mut other, limit).await {
            Some((p, m)) if p == pid || m == marker => return true,
            Some(_) => {}
            None => return false,
        }
        match probe(c.pg(), limit).await {
            Some((p, m)) if p != pid || m != marker => return true,
            Some(_) => {}
            None => return false,
        }
    }
    false
}

/// The server session a statement on `conn` runs on: its pid and marker;
/// `None` if it did not answer in time.
async fn probe(conn: &mut PgConnection, limit: Duration) -> Option<(i32, String)> {
    let row = timeout(limit, sqlx::raw_sql(PROBE).fetch_one(conn))
        .await
        .ok()?
        .ok()?;
    Some((row.try_get(0).ok()?, row.try_get(1).ok()?))
}

/// What a server-side wait sets up before its statement is sent, so that
/// little is left to do between the grant and the caller: the lock's id,
/// name and status channel, and the keeper task of the holder session the
/// wait's connection becomes (spawned now, it starts keeping the session
/// when handed it; dropped unused, it ends). Kept across the rounds of one
/// acquisition's wait.
pub(super) struct Adoption {
    lock: LockId,
    name: Arc<str>,
    status: LockStatus,
    pending: PendingGrant,
    keeper: mpsc::UnboundedSender<Chore>,
    start: oneshot::Sender<Arc<Session>>,
}

impl Adoption {
    pub(super) fn prepare(inner: &Inner, name: &Arc<str>) -> Self {
        let (status, pending) = Grant::status(None);
        let (keeper, chores) = mpsc::unbounded_channel();
        let (start, started) = oneshot::channel::<Arc<Session>>();
        tokio::spawn(async move {
            if let Ok(session) = started.await {
                session.keep(chores).await;
            }
        });
        Adoption {
            lock: inner.next_id(),
            name: name.clone(),
            status,
            pending,
            keeper,
            start,
        }
    }
}

/// Makes the connection of a granted server-side wait a holder session
/// that carries the lock, and returns the lock's grant. The wait set the
/// session's `marker`, read its `timeline` (unless the server was in
/// recovery then), and lifted its timeouts (`lifted`, their values before:
/// put back when the session goes back to the pool).
#[allow(clippy::too_many_arguments)]
pub(super) fn adopt(
    inner: &Arc<Inner>,
    adoption: Adoption,
    conn: PoolConnection<Postgres>,
    permit: Option<OwnedSemaphorePermit>,
    pid: i32,
    marker: String,
    timeline: Option<i64>,
    lifted: (String, Option<String>),
    key: i64,
    mode: LockMode,
    token: u64,
) -> Grant {
    let Adoption {
        lock,
        name,
        status,
        pending,
        keeper,
        start,
    } = adoption;
    let (session, core) = {
        let mut registry = inner.registry();
        let core = registry.core_count() < inner.target_sessions();
        // A session that joins the core ones is counted there; any other
        // keeps its wait slot until it goes back to the pool.
        let c = Conn {
            conn: Some(conn),
            timer: StatementTimer::default(),
            marker,
            pid,
            timeline,
            in_doubt: false,
            wait_slot: if core { None } else { permit },
            lifted: Some(lifted),
        };
        let session = Arc::new(Session::new(inner.clone(), c, keeper));
        registry.add_session(
            session.id,
            SessionEntry {
                session: Arc::downgrade(&session),
                core,
                pid: Some(pid),
                holds: 1,
                queued: 0,
                unlocking: session.unlocking.clone(),
            },
        );
        let hold = Hold::held(
            lock,
            session.id,
            mode,
            None,
            token,
            name.clone(),
            status.clone(),
        );
        registry.add_held(key, hold);
        (session, core)
    };
    tracing::debug!(
        session = session.id,
        pid,
        core,
        "dblock: advisory wait granted; its session holds the lock"
    );
    let held = Box::new(Held::new(name, key, lock, &session, status));
    // The keeper was spawned before the wait; it only goes away with the
    // runtime (then nothing is kept anyway).
    let _ = start.send(session);
    pending.grant(token, held)
}

impl Session {
    fn new(inner: Arc<Inner>, conn: Conn, keeper: mpsc::UnboundedSender<Chore>) -> Self {
        Session {
            id: inner.next_id(),
            inner,
            conn: tokio::sync::Mutex::new(conn),
            ended: AtomicBool::new(false),
            last_ok: AtomicU64::new(0),
            epoch: Instant::now(),
            keeper,
            unlocking: Arc::default(),
        }
    }

    /// A statement just succeeded: the session is alive.
    fn alive(&self) {
        let nanos = self.epoch.elapsed().as_nanos() as u64;
        self.last_ok.store(nanos, Ordering::Relaxed);
    }

    fn last_ok(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_ok.load(Ordering::Relaxed))
    }

    /// The session's connection, for one use; `Err` (why) if the session
    /// has ended. A statement found abandoned mid-flight closes it.
    pub(super) async fn conn(&self) -> std::result::Result<MutexGuard<'_, Conn>, Loss> {
        let ended = || Loss::new(LostReason::ConnectionLost, "the holder session has ended");
        if self.ended.load(Ordering::Acquire) {
            return Err(ended());
        }
        // Uncontended, the mutex is taken without building and polling the
        // wait's future (tokio hands a released mutex to queued waiters
        // first, so this never jumps the queue).
        let mut c = match self.conn.try_lock() {
            Ok(c) => c,
            Err(_) => self.conn.lock().await,
        };
        if c.conn.is_none() {
            return Err(ended());
        }
        if c.in_doubt {
            let loss = Loss::new(
                LostReason::ConnectionLost,
                "a statement on the holder session was abandoned before its answer",
            );
            self.die(&mut c, &loss);
            return Err(loss);
        }
        Ok(c)
    }

    /// Closes the session: every lock on it is reported lost, and its
    /// connection is closed.
    pub(super) fn die(&self, c: &mut Conn, loss: &Loss) {
        self.ended.store(true, Ordering::Release);
        tracing::warn!(
            session = self.id,
            cause = loss.reason.as_str(),
            reason = %loss.detail,
            "dblock: advisory holder session closed"
        );
        self.inner.session_gone(self.id, loss);
        c.in_doubt = false;
        if let Some(mut conn) = c.conn.take() {
            conn.close_on_drop();
        }
        c.wait_slot = None;
    }

    /// The keeper task: the TCP settings, then heartbeats, dropped guards'
    /// unlocks, and the way back to the pool.
    async fn keep(self: Arc<Self>, mut chores: mpsc::UnboundedReceiver<Chore>) {
        if self.keepalives_on().await.is_err() {
            return;
        }
        let heartbeat = self.inner.options.heartbeat;
        loop {
            let chore = tokio::select! {
                biased;
                chore = chores.recv() => chore,
                _ = sleep_until(self.last_ok() + heartbeat) => None,
            };
            match chore {
                Some(Chore::Unlock { lock, key }) => {
                    release::unlock(&self, lock, key, None).await;
                }
                Some(Chore::Tidy) => {}
                None => {
                    // Used meanwhile: that proved it alive.
                    if self.last_ok() + heartbeat > Instant::now() {
                        continue;
                    }
                    let empty = self.inner.registry().holds_on(self.id) == Some(0);
                    if empty && self.retire().await {
                        return;
                    }
                    let _ = self.check().await;
                }
            }
            if self.ended.load(Ordering::Acquire) {
                return;
            }
            // A session adopted from a wait goes back to the pool as soon
            // as it holds nothing; core sessions linger for a heartbeat.
            if self.inner.registry().idle_extra(self.id) && self.retire().await {
                return;
            }
        }
    }

    /// Sets the server-side TCP settings (see [`KEEPALIVES_ON`]).
    async fn keepalives_on(&self) -> std::result::Result<(), Loss> {
        let mut c = self.conn().await?;
        let limit = self.inner.answer_within();
        let (pg, timer) = c.split();
        let statement = first_row(pg, sqlx::query(KEEPALIVES_ON));
        match scalar::<i32>(bounded(timer, limit, statement).await) {
            Ok(_) => {
                self.alive();
                Ok(())
            }
            Err(Failure::Server(e)) => {
                let loss = failed(&e);
                self.die(&mut c, &loss);
                Err(loss)
            }
            Err(Failure::Broken(loss)) => {
                self.die(&mut c, &loss);
                Err(loss)
            }
        }
    }

    /// Checks that the session is alive and still our own server session;
    /// closes it otherwise.
    pub(super) async fn check(&self) -> std::result::Result<(), Loss> {
        let mut c = self.conn().await?;
        let limit = self.inner.answer_within();
        let answer = {
            let (pg, marker, pid, timer) = c.checked();
            let query = sqlx::query(PING).bind(marker).bind(pid);
            scalar::<bool>(bounded(timer, limit, first_row(pg, query)).await)
        };
        let reason = match answer {
            Ok(true) => {
                self.alive();
                return Ok(());
            }
            Ok(false) => {
                self.inner.refuse(Refusal::Pooler);
                pooled()
            }
            Err(Failure::Server(e)) if is_statement_clash(&e) => {
                self.inner.refuse(Refusal::Pooler);
                pooled()
            }
            Err(Failure::Server(e)) => failed(&e),
            Err(Failure::Broken(loss)) => loss,
        };
        self.die(&mut c, &reason);
        Err(reason)
    }

    /// Sends one lock statement for `key` on this session's connection `c`
    /// (it never waits on the server) and tells what it answered; the
    /// registry is left to the caller. `stacked`: a shared hold of ours on
    /// `key` sits on this session already (see `TRY_SHARED_STACKED`). With
    /// `look`, a miss looks for a semaphore's permits on the name.
    pub(super) async fn try_lock(
        &self,
        c: &mut Conn,
        key: i64,
        mode: LockMode,
        stacked: bool,
        name: &str,
        look: bool,
    ) -> Tried {
        if mode == LockMode::Exclusive {
            return self.try_exclusive(c, key, name, look).await;
        }
        let limit = self.inner.answer_within();
        let sql = if stacked {
            &*TRY_SHARED_STACKED
        } else {
            &*TRY_SHARED
        };
        c.in_doubt = true;
        let outcome = {
            let (pg, marker, pid, timer) = c.checked();
            let mut query = sqlx::query(sql.as_str()).bind(key).bind(marker).bind(pid);
            let (classid, objid) = split_key(semaphore_key(name));
            query = query.bind(classid).bind(objid).bind(look).bind(true);
            if stacked {
                let (classid, objid) = split_key(key);
                query = query.bind(classid).bind(objid);
            }
            decoded::<(bool, Option<i64>, Option<bool>)>(
                bounded(timer, limit, first_row(pg, query)).await,
            )
        };
        c.in_doubt = false;
        match outcome {
            Ok((false, ..)) => Tried::NotOurs,
            Ok((true, token, beside_permits)) => {
                self.alive();
                match (token, beside_permits) {
                    (Some(_), Some(true)) => Tried::GrantedBesidePermits,
                    (None, Some(true)) => Tried::MissedBesidePermits,
                    (Some(token), _) => Tried::Granted(token as u64),
                    (None, _) => Tried::Missed,
                }
            }
            Err(failure) => self.failed_try(c, failure),
        }
    }

    /// [`Session::try_lock`] of an exclusive lock: [`TRY_EXCLUSIVE`], then
    /// on a miss that is to `look`, [`LOOK`]; on a grant the token is made
    /// from the raw value drawn and the session's timeline (read once, at
    /// its first grant).
    async fn try_exclusive(&self, c: &mut Conn, key: i64, name: &str, look: bool) -> Tried {
        let limit = self.inner.answer_within();
        c.in_doubt = true;
        let outcome = {
            let (pg, marker, pid, timer) = c.checked();
            let query = sqlx::query(TRY_EXCLUSIVE).bind(key).bind(marker).bind(pid);
            scalar::<Option<i64>>(bounded(timer, limit, first_row(pg, query)).await)
        };
        let tried = match outcome {
            Ok(Some(NOT_OURS)) => Tried::NotOurs,
            Ok(Some(raw)) => {
                self.alive();
                // Still in doubt: the lock is held and not yet recorded.
                match self.timeline(c).await {
                    Ok(timeline) => match crate::postgres::token::fence(raw, timeline) {
                        Some(token) => Tried::Granted(token),
                        None => Tried::Refused(sqlx::Error::Protocol(format!(
                            "dblock: the server's timeline {timeline} is above 32767, \
                             the most fencing tokens can carry"
                        ))),
                    },
                    Err(failure) => self.failed_try(c, failure),
                }
            }
            Ok(None) if !look => {
                self.alive();
                Tried::Missed
            }
            Ok(None) => {
                self.alive();
                let (classid, objid) = split_key(semaphore_key(name));
                let (pg, timer) = c.split();
                let looked = first_row(pg, sqlx::query(LOOK).bind(classid).bind(objid));
                match scalar::<bool>(bounded(timer, limit, looked).await) {
                    Ok(true) => Tried::MissedBesidePermits,
                    Ok(false) => Tried::Missed,
                    Err(failure) => self.failed_try(c, failure),
                }
            }
            Err(failure) => self.failed_try(c, failure),
        };
        c.in_doubt = false;
        tried
    }

    /// This server session's timeline, read the first time it is needed.
    async fn timeline(&self, c: &mut Conn) -> std::result::Result<i64, Failure> {
        if let Some(timeline) = c.timeline {
            return Ok(timeline);
        }
        let limit = self.inner.answer_within();
        // A simple query (no prepared statement): the lock is held, so the
        // read must not be mistaken for a statement that took nothing.
        let (pg, timer) = c.split();
        let read = sqlx::raw_sql(sqlx::AssertSqlSafe(
            crate::postgres::token::TIMELINE_NOW.as_str(),
        ))
        .fetch_one(pg);
        let row = bounded(timer, limit, read).await?;
        let timeline: Option<i64> = row
            .try_get(0)
            .map_err(|e| Failure::Server(sqlx::Error::Protocol(e.to_string())))?;
        match timeline {
            Some(timeline) => {
                c.timeline = Some(timeline);
                Ok(timeline)
            }
            // A token was just drawn, so the server is no standby.
            None => Err(Failure::Server(sqlx::Error::Protocol(
                "dblock: the server reports recovery in progress right after drawing a fencing \
                 token"
                    .to_owned(),
            ))),
        }
    }

    /// What a failed lock statement (or the look or timeline read after
    /// it) makes of the attempt.
    fn failed_try(&self, c: &mut Conn, failure: Failure) -> Tried {
        match failure {
            // Not our server session (a named statement of ours is missing
            // or taken there): nothing of this statement ran.
            Failure::Server(e) if is_statement_clash(&e) => Tried::NotOurs,
            Failure::Server(e) => {
                // The server answered: the session is alive.
                self.alive();
                Tried::Refused(e)
            }
            Failure::Broken(reason) => {
                self.die(c, &reason);
                Tried::Closed(reason)
            }
        }
    }

    /// Gives back one level of a shared lock on `key` (a reader granted
    /// beside a semaphore's permits). `Err`: the session was closed (why).
    pub(super) async fn give_back_shared(
        &self,
        c: &mut Conn,
        key: i64,
    ) -> std::result::Result<(), Loss> {
        let limit = self.inner.answer_within();
        c.in_doubt = true;
        let (pg, timer) = c.split();
        let undone = bounded(timer, limit, run(pg, sqlx::query(UNLOCK_SHARED).bind(key))).await;
        c.in_doubt = false;
        self.settle(c, undone, "giving back a reader's lock")
            .map(drop)
    }

    /// Undoes a lock statement that failed (see [`Tried::Refused`]): one
    /// unlock of `key` in `mode`, without a warning if it was not taken.
    /// `Err`: the session was closed (why).
    pub(super) async fn undo_lock(
        &self,
        c: &mut Conn,
        key: i64,
        mode: LockMode,
    ) -> std::result::Result<(), Loss> {
        let limit = self.inner.answer_within();
        let undo = match mode {
            LockMode::Exclusive => UNDO_EXCLUSIVE,
            LockMode::Shared => UNDO_SHARED,
        };
        c.in_doubt = true;
        let (pg, timer) = c.split();
        let outcome = bounded(timer, limit, run(pg, sqlx::query(undo).bind(key))).await;
        c.in_doubt = false;
        self.settle(c, outcome, "undoing a failed lock").map(drop)
    }

    /// Sends the unlock statement of a hold on `key` in `mode` (a permit's:
    /// its slot and markers) and tells whether the session held it. The
    /// caller closes the session on `Err` (the lock's fate is unknown).
    pub(super) async fn unlock(
        &self,
        c: &mut Conn,
        key: i64,
        mode: LockMode,
        permit: Option<&Permit>,
    ) -> std::result::Result<bool, Failure> {
        let limit = self.inner.answer_within();
        let sql = match mode {
            LockMode::Exclusive => UNLOCK_EXCLUSIVE,
            LockMode::Shared => UNLOCK_SHARED,
        };
        c.in_doubt = true;
        let (pg, timer) = c.split();
        let outcome = match permit {
            Some(permit) => {
                scalar::<bool>(bounded(timer, limit, permit::unlock(pg, permit, permit::ALL)).await)
            }
            None => scalar::<bool>(
                bounded(timer, limit, first_row(pg, sqlx::query(sql).bind(key))).await,
            ),
        };
        c.in_doubt = false;
        if outcome.is_ok() {
            self.alive();
        }
        outcome
    }

    /// After a statement that must succeed for the session to be trusted
    /// (giving back or undoing locks): records the session alive, or closes
    /// it and returns why (`doing` names the statement).
    fn settle<T>(
        &self,
        c: &mut Conn,
        outcome: std::result::Result<T, Failure>,
        doing: &str,
    ) -> std::result::Result<T, Loss> {
        match outcome {
            Ok(v) => {
                self.alive();
                Ok(v)
            }
            Err(Failure::Server(e)) => {
                let loss = Loss::new(LostReason::Other, format!("{doing} failed: {e}"));
                self.die(c, &loss);
                Err(loss)
            }
            Err(Failure::Broken(reason)) => {
                self.die(c, &reason);
                Err(reason)
            }
        }
    }

    /// A statement found itself on another server session than this
    /// session's own (a transaction-pooling proxy): what this session took
    /// before may sit on a server connection other clients use. Closes it,
    /// and the backend refuses from now on.
    pub(super) fn close_pooled(&self, c: &mut Conn) {
        self.inner.refuse(Refusal::Pooler);
        self.die(c, &pooled());
    }

    /// Counts one unlock in the session's backlog while the result lives.
    pub(super) fn unlocking(&self) -> Unlocking<'_> {
        Unlocking::new(&self.unlocking)
    }

    /// Has the keeper task unlock `lock` on `key` (a guard was dropped). If
    /// the keeper is gone, so is the session, and with it the lock.
    pub(super) fn unlock_later(&self, lock: LockId, key: i64) {
        let _ = self.keeper.send(Chore::Unlock { lock, key });
    }

    /// Has the keeper task look whether the session, adopted from a wait,
    /// now holds nothing and goes back to the pool.
    pub(super) fn tidy(&self) {
        let _ = self.keeper.send(Chore::Tidy);
    }

    /// Goes back to the pool if the session holds nothing; `false` if it
    /// still has locks (or was given some meanwhile).
    async fn retire(&self) -> bool {
        let Ok(mut c) = self.conn().await else {
            return true;
        };
        // Unregistered under the registry's lock: nothing new can be
        // routed here from now on.
        if !self.inner.registry().retire(self.id) {
            return false;
        }
        self.hand_back(&mut c).await;
        true
    }

    /// Goes back to the pool without ever having been registered.
    async fn retire_unregistered(&self) {
        let mut c = self.conn.lock().await;
        self.hand_back(&mut c).await;
    }

    /// Cleans the connection and returns it to the pool (closes it if the
    /// cleaning fails).
    async fn hand_back(&self, c: &mut Conn) {
        self.ended.store(true, Ordering::Release);
        c.wait_slot = None;
        let limit = self.inner.answer_within();
        let Some(mut conn) = c.conn.take() else {
            return;
        };
        let retire = match c.lifted.take() {
            None => sqlx::query(RETIRE),
            Some((statement, transaction)) => sqlx::query(RETIRE_RESTORING.as_str())
                .bind(statement)
                .bind(transaction),
        };
        if bounded(&mut c.timer, limit, run(&mut conn, retire))
            .await
            .is_err()
        {
            conn.close_on_drop();
        }
        tracing::debug!(
            session = self.id,
            "dblock: advisory holder session went back to the pool"
        );
    }
}

/// The lock table's size as configured, for the error message.
pub(super) async fn lock_table_size(session: &Session, c: &mut Conn) -> String {
    let limit = session.inner.answer_within();
    let query = sqlx::query(
        "SELECT current_setting('max_locks_per_transaction'),
                current_setting('max_connections'),
                current_setting('max_prepared_transactions')",
    );
    let (pg, timer) = c.split();
    match decoded::<(String, String, String)>(bounded(timer, limit, first_row(pg, query)).await) {
        Ok((per_tx, conns, prepared)) => {
            session.alive();
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
