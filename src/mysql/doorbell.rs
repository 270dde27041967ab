//! Release doorbells for [`Lease`](super::Lease) waiters in other
//! processes: a named lock (`GET_LOCK`) beside each lease (see
//! [`crate::lease::doorbell`]).
//!
//! - **Holder**: while a process holds a lease, one connection of its own
//!   (the *ringer*, outside the application's pool) holds the named lock
//!   `dblock:<hash>`, derived from the database, the table and the lease's
//!   name (MySQL limits lock names to 64 characters). It takes the lock
//!   right after a claim commits, never waiting (`GET_LOCK(.., 0)`, retried
//!   briefly), and lets it go right after the release statement (or when a
//!   renewal finds the lease gone).
//! - **Waiter**: a watch blocks in `GET_LOCK(bell, 1)` on a connection of
//!   its own and lets go at once in the same statement; when it returns,
//!   the holder has released. One watch per name per backend, at most
//!   [`WATCHES`] at once (each occupies a connection of its own while it
//!   waits: `GET_LOCK` waits for one name per session); past that, waiters
//!   poll.
//! - **Never a dependency**: on a Galera cluster (where `GET_LOCK` is local
//!   to one node) no bell is rung or watched; any error of a bell
//!   connection is logged at debug level and leaves waiters polling.
//!   Bell connections lift `max_statement_time` / `max_execution_time` for
//!   their session so that a server setting never cuts a wait short.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, MySql, MySqlConnection, MySqlPool};
use tokio::sync::{mpsc, OnceCell};

use super::engine::Engine;
use crate::lease::doorbell::{Bell, Doorbells, Ring};

/// The most names one backend watches at once (one connection each).
pub(crate) const WATCHES: usize = 4;

/// How long the ringer keeps its connection with no bell held.
const RINGER_IDLE: Duration = Duration::from_secs(60);

/// Waits up to a second for the bell, and lets go of it in the same
/// statement: -1 nobody holds it, 1 it was let go, 0 still held.
const WAIT: &str = "SELECT CAST(CASE WHEN IS_USED_LOCK(?) IS NULL THEN -1 \
                      WHEN GET_LOCK(?, 1) = 1 THEN RELEASE_LOCK(?) ELSE 0 END AS SIGNED)";

/// The bells of one backend: the ringer for the leases it holds, the
/// watches for its waiters.
pub(crate) struct Bells {
    /// `database \0 table \0`, the prefix of every bell's hash.
    scope: Vec<u8>,
    engine: Arc<OnceCell<Engine>>,
    ringer: Mutex<Option<mpsc::UnboundedSender<Cmd>>>,
    connect: MySqlConnectOptions,
    watches: Doorbells<Watcher>,
}

impl fmt::Debug for Bells {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bells")
            .field("watches", &self.watches)
            .finish_non_exhaustive()
    }
}

impl Bells {
    pub(crate) fn new(pool: &MySqlPool, table: &str, engine: Arc<OnceCell<Engine>>) -> Self {
        let connect = (*pool.connect_options()).clone();
        let mut scope = connect.get_database().unwrap_or("").as_bytes().to_vec();
        scope.push(0);
        scope.extend_from_slice(table.as_bytes());
        scope.push(0);
        Bells {
            watches: Doorbells::new(
                Watcher {
                    connect: connect.clone(),
                    pool: OnceLock::new(),
                    engine: engine.clone(),
                    scope: scope.clone(),
                },
                WATCHES,
            ),
            scope,
            engine,
            ringer: Mutex::new(None),
            connect,
        }
    }

    /// Whether bells may be used: not on Galera, and not before the engine
    /// self-test has answered.
    fn usable(&self) -> bool {
        usable(&self.engine)
    }

    /// The lease `name` / `token` was granted to this process.
    pub(crate) fn arm(&self, name: &str, token: u64) {
        if self.usable() {
            self.send(Cmd::Arm(bell_name(&self.scope, name), token));
        }
    }

    /// This process is done with the lease `name` / `token` (released, or
    /// found gone).
    pub(crate) fn disarm(&self, name: &str, token: u64) {
        if self.usable() {
            self.send(Cmd::Disarm(bell_name(&self.scope, name), token));
        }
    }

    /// A guard that disarms when dropped: after the release statement, or
    /// when the release is given up mid-way (the lease then runs out).
    pub(crate) fn disarm_on_drop<'a>(&'a self, name: &'a str, token: u64) -> DisarmOnDrop<'a> {
        DisarmOnDrop {
            bells: self,
            name,
            token,
        }
    }

    /// Resolves when the holder of `name` in another process may have
    /// released it.
    pub(crate) fn released(&self, name: &str) -> impl std::future::Future<Output = ()> + Send {
        let usable = self.usable();
        let watch = usable.then(|| self.watches.released(name));
        async move {
            match watch {
                Some(watch) => watch.await,
                None => std::future::pending().await,
            }
        }
    }

    fn send(&self, cmd: Cmd) {
        let mut ringer = self.ringer.lock().unwrap();
        if let Some(tx) = ringer.as_ref() {
            if let Err(mpsc::error::SendError(cmd)) = tx.send(cmd) {
                *ringer = None;
                drop(ringer);
                return self.send(cmd);
            }
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(cmd);
        *ringer = Some(tx);
        runtime.spawn(ring(self.connect.clone(), rx));
    }
}

/// See [`Bells::disarm_on_drop`].
pub(crate) struct DisarmOnDrop<'a> {
    bells: &'a Bells,
    name: &'a str,
    token: u64,
}

impl Drop for DisarmOnDrop<'_> {
    fn drop(&mut self) {
        self.bells.disarm(self.name, self.token);
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

enum Cmd {
    Arm(String, u64),
    Disarm(String, u64),
}

/// The ringer task: holds the bell of every lease this backend holds, on
/// one connection of its own; ends when the backend is dropped.
async fn ring(connect: MySqlConnectOptions, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    // Bell → the tokens of this process's leases behind it.
    let mut held: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut conn: Option<MySqlConnection> = None;
    loop {
        let cmd = match tokio::time::timeout(RINGER_IDLE, rx.recv()).await {
            Ok(Some(cmd)) => cmd,
            Ok(None) => break,
            Err(_) => {
                if held.is_empty() {
                    if let Some(c) = conn.take() {
                        let _ = c.close().await;
                    }
                }
                continue;
            }
        };
        match cmd {
            Cmd::Arm(bell, token) => {
                let tokens = held.entry(bell.clone()).or_default();
                let first = tokens.is_empty();
                tokens.insert(token);
                if first {
                    take(&connect, &mut conn, &held, &bell).await;
                }
            }
            Cmd::Disarm(bell, token) => {
                let Some(tokens) = held.get_mut(&bell) else {
                    continue;
                };
                if !tokens.remove(&token) || !tokens.is_empty() {
                    continue;
                }
                held.remove(&bell);
                if let Some(c) = conn.as_mut() {
                    let done = sqlx::query("DO RELEASE_LOCK(?)")
                        .bind(&bell)
                        .execute(&mut *c)
                        .await;
                    if let Err(e) = done {
                        // The connection is gone, and with it every bell
                        // it held; the others are taken again on the next
                        // connection.
                        tracing::debug!(error = %e, "dblock: releasing a doorbell failed");
                        conn = None;
                    }
                }
            }
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

/// Takes `bell` on the ringer's connection, connecting (and taking every
/// bell held) first if needed. Never waits for the bell: a watch holds it
/// only for an instant, so a few quick tries suffice; a bell still taken
/// after them (by a stale holder) is left, and that name's waiters poll.
async fn take(
    connect: &MySqlConnectOptions,
    conn: &mut Option<MySqlConnection>,
    held: &HashMap<String, HashSet<u64>>,
    bell: &str,
) {
    if conn.is_none() {
        match MySqlConnection::connect_with(connect).await {
            Ok(mut c) => {
                let _ = unbounded(&mut c).await;
                *conn = Some(c);
                // A new connection holds nothing: take every bell again.
                for other in held.keys().filter(|b| *b != bell) {
                    try_take(conn, other).await;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "dblock: no connection for release doorbells; waiters elsewhere poll");
                return;
            }
        }
    }
    try_take(conn, bell).await;
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
}
