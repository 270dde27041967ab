//! Release doorbells for [`Lease`](super::Lease) waiters in other
//! processes: a named lock (`GET_LOCK`) beside each lease (see
//! [`crate::lease::doorbell`]).
//!
//! - **Holder**: while a process holds a lease, one connection of its own
//!   (the *ringer*, outside the application's pool) holds the named lock
//!   `dblock:<hash>`, derived from the database, the table and the lease's
//!   name (MySQL limits lock names to 64 characters). It takes the lock
//!   once the lease has been held for [`ARM_AFTER`] (1 ms; a lease whose
//!   release begins sooner never takes it), never waiting (`GET_LOCK(.., 0)`, retried
//!   briefly), and lets it go right after the release statement (or when a
//!   renewal finds the lease gone).
//! - **Waiter**: a watch blocks in `GET_LOCK(bell, 1)` on a connection of
//!   its own and lets go at once in the same statement; when it returns,
//!   the holder has released. One watch per name per backend, at most
//!   [`WATCHES`] at once (each occupies a connection of its own while it
//!   waits: `GET_LOCK` waits for one name per session); past that, waiters
//!   poll.
//! - **What a waiter elsewhere can miss** (the precise bound): a waiter is
//!   woken by a release at once only if its watch saw the bell held, i.e.
//!   its `GET_LOCK` was waiting when the holder let the bell go. The bell
//!   is taken [`ARM_AFTER`] into a hold plus the ringer's latency (one
//!   `GET_LOCK` round trip; an idle ringer opens its connection first).
//!   A watch that finds the bell free rings once, then re-checks it after
//!   1 ms, doubling up to 250 ms between checks, without ringing, until
//!   it sees it held (`crate::lease::doorbell`). So a release rings the
//!   waiter whenever the hold outlasted the sum of `ARM_AFTER`, the
//!   ringer's latency and the watch's current re-check gap (1 ms after a
//!   ring or a wait that timed out, at most 250 ms); a shorter hold, or
//!   one taken and let go between two re-checks, reaches the waiter by its
//!   own poll: within
//!   its current pause, which starts at `min_poll` and doubles at every
//!   wake-up up to `max_poll` (250 ms by default). Such a waiter can
//!   therefore sleep up to one full `max_poll` for the release of a lease
//!   held for more than 1 ms (but less than 1 ms + latency + 250 ms): the
//!   bound is `max_poll`, as without doorbells, not the doorbell's round
//!   trip.
//! - **Never a dependency**: on a Galera cluster (where `GET_LOCK` is local
//!   to one node) no bell is rung or watched; any error of a bell
//!   connection is logged at debug level and leaves waiters polling.
//!   Bell connections lift `max_statement_time` / `max_execution_time` for
//!   their session so that a server setting never cuts a wait short.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rustc_hash::FxHashSet;
use sha2::{Digest, Sha256};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, MySql, MySqlConnection, MySqlPool};
use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;

use super::engine::Engine;
use crate::lease::doorbell::{self, Bell, Holder, Ring};
use crate::name::{NameMap, NameSet};

/// The most names one backend watches at once (one connection each).
pub(crate) const WATCHES: usize = 4;

/// How long the ringer keeps its connection with no bell held.
const RINGER_IDLE: Duration = Duration::from_secs(60);

/// How long a lease is held before its bell is taken. Most uncontended
/// leases are released sooner, and their bell then costs no statement at
/// all (a `GET_LOCK` and a `RELEASE_LOCK` per pair otherwise, on the
/// ringer's connection: as much server work as the lease's own claim and
/// release). A waiter elsewhere that finds the bell not yet taken looks at
/// the lease again and re-checks the bell with backoff (1 ms doubling), so
/// it waits on the bell from about this long into a hold; a lease released
/// sooner reaches it by its poll.
const ARM_AFTER: Duration = Duration::from_millis(1);

/// Waits up to a second for the bell, and lets go of it in the same
/// statement: -1 nobody holds it, 1 it was let go, 0 still held.
const WAIT: &str = "SELECT CAST(CASE WHEN IS_USED_LOCK(?) IS NULL THEN -1 \
                      WHEN GET_LOCK(?, 1) = 1 THEN RELEASE_LOCK(?) ELSE 0 END AS SIGNED)";

/// The bells of one backend (see [`Holding`]).
pub(crate) type Bells = doorbell::Bells<Holding>;

/// Bells for the leases of `table` in the pool's database.
pub(crate) fn bells(pool: &MySqlPool, table: &str, engine: Arc<OnceCell<Engine>>) -> Bells {
    let connect = (*pool.connect_options()).clone();
    let mut scope = connect.get_database().unwrap_or("").as_bytes().to_vec();
    scope.push(0);
    scope.extend_from_slice(table.as_bytes());
    scope.push(0);
    Bells::new(
        Holding {
            scope: scope.clone(),
            engine: engine.clone(),
            ringer: Arc::default(),
            connect: connect.clone(),
        },
        Watcher {
            connect,
            pool: OnceLock::new(),
            engine,
            scope,
        },
        WATCHES,
    )
}

/// The holding side: the ringer, for the leases this backend holds.
pub(crate) struct Holding {
    /// `database \0 table \0`, the prefix of every bell's hash.
    scope: Vec<u8>,
    engine: Arc<OnceCell<Engine>>,
    ringer: Arc<Ringer>,
    connect: MySqlConnectOptions,
}

/// What the holder's side shares with its ringer task. Claims and releases
/// update the ledger in the caller's task, under a plain mutex; the ringer
/// task is woken only when it must act sooner than it meant to (a bell due
/// before its next look, a bell to let go). A lease released within
/// [`ARM_AFTER`] costs no statement, but a claim that finds the ringer idle
/// still wakes it (to look again when the bell falls due), and it wakes
/// again then: two wake-ups of another task per short lease, unless claims
/// follow each other within [`ARM_AFTER`] (measured in docs/performance.md:
/// about 15–20 µs of client CPU a pair on a 2-core VM, beside the caller's
/// path, so the pair's throughput barely moves).
#[derive(Debug, Default)]
struct Ringer {
    state: Mutex<RingerState>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct RingerState {
    ledger: Ledger,
    /// Whether the ringer task runs.
    running: bool,
    /// When the ringer task looks at the ledger next on its own (`None`
    /// while it is not running).
    looks_at: Option<Instant>,
    /// Set when the backend is dropped: the ringer ends, and its
    /// connection with the bells on it.
    closed: bool,
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.ringer.state.lock().unwrap().closed = true;
        self.ringer.wake.notify_one();
    }
}

impl Holder for Holding {
    type Watcher = Watcher;

    /// Not on Galera, and not before the engine self-test has answered.
    fn usable(&self) -> bool {
        usable(&self.engine)
    }

    /// The bell is taken once the lease has been held for [`ARM_AFTER`].
    fn arm(&self, name: &str, token: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let now = Instant::now();
        let due = now + ARM_AFTER;
        let mut state = self.ringer.state.lock().unwrap();
        state.ledger.arm(name.to_owned(), token, now);
        if !state.running {
            state.running = true;
            state.looks_at = Some(now);
            drop(state);
            runtime.spawn(ring(
                Arc::downgrade(&self.ringer),
                self.connect.clone(),
                self.scope.clone(),
            ));
        } else if state.looks_at.is_none_or(|at| at > due) {
            state.looks_at = Some(due);
            drop(state);
            self.ringer.wake.notify_one();
        }
    }

    fn disarm(&self, name: &str, token: u64) {
        let mut state = self.ringer.state.lock().unwrap();
        if !state.ledger.disarm(name, token) {
            return;
        }
        state.ledger.to_let_go.push(name.to_owned());
        let now = Instant::now();
        if state.running && state.looks_at.is_none_or(|at| at > now) {
            state.looks_at = Some(now);
            drop(state);
            self.ringer.wake.notify_one();
        }
    }

    /// A bell not taken yet is then never taken (a release statement that
    /// waits for the disk can take longer than [`ARM_AFTER`]).
    fn releasing(&self, name: &str, token: u64) {
        self.ringer
            .state
            .lock()
            .unwrap()
            .ledger
            .releasing(name, token);
    }
}

fn usable(engine: &OnceCell<Engine>) -> bool {
    engine.get().is_some_and(|e| !e.is_galera())
}

/// `dblock:` and 57 hex digits of SHA-256 over the scope and the name: 64
/// characters, MySQL's limit for lock names.
fn bell_name(scope: &[u8], name: &str) -> String {
    let digest = Sha256::new()
        .chain_update(scope)
        .chain_update(name.as_bytes())
        .finalize();
    let mut out = String::with_capacity(64);
    out.push_str("dblock:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out.truncate(64);
    out
}

/// Lifts the server's statement time limits for this session: a bell's
/// wait is bounded by its own timeout. Which variable exists depends on the
/// server; the other one's error is ignored.
async fn unbounded(conn: &mut MySqlConnection) -> Result<(), sqlx::Error> {
    for set in [
        "SET SESSION max_statement_time = 0",
        "SET SESSION max_execution_time = 0",
    ] {
        let _ = sqlx::raw_sql(set).execute(&mut *conn).await;
    }
    Ok(())
}

/// What the ringer knows, by lease name (a bell's name is derived from it
/// only when a statement needs it): the leases behind each bell, the bells
/// taken, the bells to take once their lease has been held for
/// [`ARM_AFTER`], and those to let go.
#[derive(Debug, Default)]
struct Ledger {
    /// Name → the tokens of this process's leases behind its bell.
    held: NameMap<FxHashSet<u64>>,
    /// The bells taken on the ringer's connection.
    taken: NameSet,
    /// Bells to take once due, in the order they were armed.
    due: VecDeque<(Instant, String)>,
    /// Bells to let go (their last lease here ended), in order.
    to_let_go: Vec<String>,
}

impl Ledger {
    fn arm(&mut self, bell: String, token: u64, now: Instant) {
        self.held.entry(bell.clone()).or_default().insert(token);
        if !self.taken.contains(&bell) {
            self.due.push_back((now + ARM_AFTER, bell));
        }
    }

    /// The release of a lease has begun: if its bell is not taken yet, it
    /// is not taken for this lease any more (nor let go after it).
    fn releasing(&mut self, bell: &str, token: u64) {
        if self.taken.contains(bell) {
            return;
        }
        if let Some(tokens) = self.held.get_mut(bell) {
            tokens.remove(&token);
            if tokens.is_empty() {
                self.held.remove(bell);
            }
        }
    }

    /// Whether the bell must be let go now (it was taken, and its last
    /// lease here ended). A bell never taken (its lease ended within
    /// [`ARM_AFTER`]) costs nothing; its entry in `due` is skipped.
    fn disarm(&mut self, bell: &str, token: u64) -> bool {
        let Some(tokens) = self.held.get_mut(bell) else {
            return false;
        };
        if !tokens.remove(&token) || !tokens.is_empty() {
            return false;
        }
        self.held.remove(bell);
        self.taken.remove(bell)
    }

    /// When the next bell falls due, if any.
    fn next_due(&self) -> Option<Instant> {
        self.due.front().map(|(at, _)| *at)
    }

    /// The next bell due by `now` whose lease is still held, now counted
    /// as taken.
    fn take_due(&mut self, now: Instant) -> Option<String> {
        while self.due.front().is_some_and(|(at, _)| *at <= now) {
            let (_, bell) = self.due.pop_front()?;
            if self.held.contains_key(&bell) && self.taken.insert(bell.clone()) {
                return Some(bell);
            }
        }
        None
    }
}

/// The ringer task: holds the bell of every lease this backend has held
/// for [`ARM_AFTER`], on one connection of its own; ends when the backend
/// is dropped. It looks at the ledger when a bell falls due, when woken
/// (a bell to let go, or one due sooner than it meant to look), and after
/// [`RINGER_IDLE`] with nothing to do, when it closes its connection.
async fn ring(ringer: Weak<Ringer>, connect: MySqlConnectOptions, scope: Vec<u8>) {
    // However the task ends (its runtime may be dropped under it), the
    // next bell armed starts another.
    let _stopped = Stopped(ringer.clone());
    let mut conn: Option<MySqlConnection> = None;
    let mut idle_since = Instant::now();
    loop {
        let Some(shared) = ringer.upgrade() else {
            break;
        };
        let now = Instant::now();
        let (let_go, take_now, wake_at) = {
            let mut state = shared.state.lock().unwrap();
            if state.closed {
                state.running = false;
                state.looks_at = None;
                break;
            }
            let ledger = &mut state.ledger;
            let let_go = std::mem::take(&mut ledger.to_let_go);
            let mut take_now = Vec::new();
            while let Some(name) = ledger.take_due(now) {
                take_now.push(name);
            }
            let busy = !let_go.is_empty() || !take_now.is_empty();
            if busy || !ledger.held.is_empty() || ledger.next_due().is_some() {
                idle_since = now;
            }
            let wake_at = match ledger.next_due() {
                _ if busy => now,
                Some(at) => at,
                None => idle_since + RINGER_IDLE,
            };
            state.looks_at = Some(wake_at);
            (let_go, take_now, wake_at)
        };
        if let_go.is_empty() && take_now.is_empty() {
            if wake_at <= now {
                // RINGER_IDLE with no bell held: the connection goes.
                if let Some(c) = conn.take() {
                    let _ = c.close().await;
                }
                idle_since = now;
                continue;
            }
            // Dropping the backend wakes it too (`closed`).
            let woken = shared.wake.notified();
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
            continue;
        }
        for name in &let_go {
            let Some(c) = conn.as_mut() else { break };
            let done = sqlx::query("DO RELEASE_LOCK(?)")
                .bind(bell_name(&scope, name))
                .execute(&mut *c)
                .await;
            if let Err(e) = done {
                // The connection is gone, and with it every bell it held;
                // the others are taken again on the next connection.
                tracing::debug!(error = %e, "dblock: releasing a doorbell failed");
                conn = None;
            }
        }
        for name in &take_now {
            // A new connection holds nothing: every other bell taken is
            // taken again on it.
            let others: Vec<String> = if conn.is_none() {
                let state = shared.state.lock().unwrap();
                state
                    .ledger
                    .taken
                    .iter()
                    .filter(|n| *n != name)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            take(&connect, &mut conn, &scope, &others, name).await;
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

/// Marks the ringer task not running when it ends.
struct Stopped(Weak<Ringer>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(ringer) = self.0.upgrade() {
            let mut state = ringer.state.lock().unwrap_or_else(|e| e.into_inner());
            state.running = false;
            state.looks_at = None;
        }
    }
}

/// Takes `bell` on the ringer's connection, connecting (and taking every
/// bell held) first if needed. Never waits for the bell: a watch holds it
/// only for an instant, so a few quick tries suffice; a bell still taken
/// after them (by a stale holder) is left, and that name's waiters poll.
async fn take(
    connect: &MySqlConnectOptions,
    conn: &mut Option<MySqlConnection>,
    scope: &[u8],
    taken: &[String],
    name: &str,
) {
    if conn.is_none() {
        match MySqlConnection::connect_with(connect).await {
            Ok(mut c) => {
                let _ = unbounded(&mut c).await;
                *conn = Some(c);
                // A new connection holds nothing: take every bell again.
                for other in taken {
                    try_take(conn, &bell_name(scope, other)).await;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "dblock: no connection for release doorbells; waiters elsewhere poll");
                return;
            }
        }
    }
    try_take(conn, &bell_name(scope, name)).await;
}

async fn try_take(conn: &mut Option<MySqlConnection>, bell: &str) {
    for attempt in 0..5u32 {
        let Some(c) = conn.as_mut() else { return };
        let got = sqlx::query_scalar::<_, Option<i64>>("SELECT GET_LOCK(?, 0)")
            .bind(bell)
            .fetch_one(&mut *c)
            .await;
        match got {
            Ok(Some(1)) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(1 << attempt)).await,
            Err(e) => {
                tracing::debug!(error = %e, "dblock: taking a doorbell failed");
                *conn = None;
                return;
            }
        }
    }
}

/// The waiting side: `GET_LOCK` on a connection of its own per watch.
pub(crate) struct Watcher {
    connect: MySqlConnectOptions,
    /// The watches' own connections, made at the first watch (a pool
    /// needs a runtime, which `Lease::new` does not).
    pool: OnceLock<MySqlPool>,
    engine: Arc<OnceCell<Engine>>,
    scope: Vec<u8>,
}

impl Bell for Watcher {
    type Session = PoolConnection<MySql>;

    async fn open(&self) -> Option<PoolConnection<MySql>> {
        if !usable(&self.engine) {
            return None;
        }
        let pool = self.pool.get_or_init(|| {
            MySqlPoolOptions::new()
                .max_connections(WATCHES as u32)
                .min_connections(0)
                .idle_timeout(Some(Duration::from_secs(60)))
                .acquire_timeout(Duration::from_secs(10))
                .after_connect(|conn, _| Box::pin(async move { unbounded(conn).await }))
                .connect_lazy_with(self.connect.clone())
        });
        match pool.acquire().await {
            Ok(conn) => Some(conn),
            Err(e) => {
                tracing::debug!(error = %e, "dblock: no connection to watch a doorbell; waiters poll");
                None
            }
        }
    }

    async fn wait(&self, conn: &mut PoolConnection<MySql>, name: &str) -> Result<Ring, String> {
        let bell = bell_name(&self.scope, name);
        let found = sqlx::query_scalar::<_, Option<i64>>(WAIT)
            .bind(&bell)
            .bind(&bell)
            .bind(&bell)
            .fetch_one(&mut **conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(match found {
            Some(-1) => Ring::Unarmed,
            Some(1) => Ring::Rang,
            _ => Ring::Quiet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bell_names_fit_mysql_and_differ_by_scope() {
        let a = bell_name(b"db\0t\0", "x");
        assert_eq!(a.len(), 64);
        assert!(a.starts_with("dblock:"));
        assert_ne!(a, bell_name(b"db2\0t\0", "x"));
        assert_ne!(a, bell_name(b"db\0t\0", "y"));
        assert_eq!(bell_name(b"db\0t\0", &"é".repeat(200)).len(), 64);
    }

    #[test]
    fn a_bell_is_taken_only_for_a_lease_held_past_arm_after() {
        let t0 = Instant::now();
        let mut ledger = Ledger::default();
        // Released within ARM_AFTER: never taken, nothing to let go.
        ledger.arm("a".into(), 1, t0);
        assert_eq!(ledger.take_due(t0), None);
        assert!(!ledger.disarm("a", 1));
        assert_eq!(ledger.take_due(t0 + ARM_AFTER), None);
        // Held past it: taken once, let go at its release.
        ledger.arm("b".into(), 2, t0);
        assert_eq!(ledger.next_due(), Some(t0 + ARM_AFTER));
        assert_eq!(ledger.take_due(t0 + ARM_AFTER), Some("b".to_owned()));
        assert_eq!(ledger.take_due(t0 + ARM_AFTER * 2), None);
        assert!(ledger.disarm("b", 2));
        // Two leases behind one bell (a token change): let go after both.
        ledger.arm("c".into(), 3, t0);
        ledger.arm("c".into(), 4, t0);
        assert_eq!(ledger.take_due(t0 + ARM_AFTER), Some("c".to_owned()));
        assert_eq!(ledger.take_due(t0 + ARM_AFTER), None);
        assert!(!ledger.disarm("c", 3));
        assert!(ledger.disarm("c", 4));
        assert!(ledger.held.is_empty() && ledger.taken.is_empty());
        // A release begun before the bell was due: never taken, even if
        // the release statement outlasts ARM_AFTER.
        ledger.arm("d".into(), 5, t0);
        ledger.releasing("d", 5);
        assert_eq!(ledger.take_due(t0 + ARM_AFTER * 10), None);
        assert!(!ledger.disarm("d", 5));
        // Begun after it was taken: let go after the release.
        ledger.arm("e".into(), 6, t0);
        assert_eq!(ledger.take_due(t0 + ARM_AFTER), Some("e".to_owned()));
        ledger.releasing("e", 6);
        assert!(ledger.disarm("e", 6));
        assert!(ledger.held.is_empty() && ledger.taken.is_empty());
    }
}
