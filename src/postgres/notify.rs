//! Cross-process wake-ups for [`Lease`](super::Lease) waiters through
//! PostgreSQL's LISTEN/NOTIFY.
//!
//! A release (or a forced release) sends `pg_notify(CHANNEL, name)` in the
//! same statement that frees the lease, so the notification is delivered
//! exactly when the release commits. Each backend that has waiters runs one
//! listener task that turns notifications into in-process wake-ups.
//!
//! The listener is a convenience on top of polling, never a dependency:
//! - it takes its own single connection, built from the pool's connect
//!   options, so it never holds one of the application's pooled connections
//!   (a pool of one would otherwise starve) and a failing LISTEN cannot
//!   disturb the pool;
//! - it starts when a waiter first has to wait, stops after a minute with
//!   nobody waiting, and stops when the backend is dropped or its pool is
//!   closed;
//! - if it cannot connect or listen it logs, waiters keep polling (bounded
//!   by `LeaseOptions::max_poll`), and it tries again with backoff;
//! - after any reconnect it wakes every waiter, since releases sent while it
//!   was not listening are lost.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::time::{interval, sleep, timeout, MissedTickBehavior};

use crate::lease::Wakeups;

/// The channel every dblock lease table notifies on; the payload is the
/// lock name. One channel for all tables: a release in another table only
/// costs a waiter for the same name one extra claim attempt.
pub(crate) const CHANNEL: &str = "dblock_lease_released";

/// How long the listener stays connected with nobody waiting.
const IDLE_FOR: Duration = Duration::from_secs(60);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The stop signal of the running listener task, if any. Dropping the
/// sender stops the task.
type Slot = Mutex<Option<oneshot::Sender<()>>>;

/// The backend's handle on its listener task. Dropping it stops the task.
#[derive(Debug)]
pub(crate) struct Listener {
    pool: PgPool,
    wakeups: Weak<Wakeups>,
    slot: Arc<Slot>,
}

impl Listener {
    pub(crate) fn new(pool: PgPool, wakeups: &Arc<Wakeups>) -> Self {
        Listener {
            pool,
            wakeups: Arc::downgrade(wakeups),
            slot: Arc::default(),
        }
    }

    /// Starts the listener task unless it runs already. Never blocks.
    pub(crate) fn ensure_running(&self) {
        let mut slot = self.slot.lock().unwrap();
        if slot.as_ref().is_some_and(|stop| !stop.is_closed()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        *slot = Some(stop_tx);
        runtime.spawn(run(
            Arc::downgrade(&self.slot),
            self.pool.clone(),
            self.wakeups.clone(),
            stop_rx,
        ));
    }
}

async fn run(
    slot: Weak<Slot>,
    pool: PgPool,
    wakeups: Weak<Wakeups>,
    mut stop: oneshot::Receiver<()>,
) {
    // Our own one-connection pool: the application's pool is left alone.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with((*pool.connect_options()).clone());
    let closed = pool.close_event();
    drop(pool);
    tokio::pin!(closed);
    let mut idle = interval(IDLE_FOR);
    idle.set_missed_tick_behavior(MissedTickBehavior::Delay);
    idle.tick().await;
    let mut retry = RETRY_MIN;

    'connect: loop {
        let connected = tokio::select! {
            _ = &mut stop => break,
            _ = &mut closed => break,
            r = listen(&own) => r,
        };
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?retry,
                    "dblock: cannot LISTEN for lease releases; waiters poll meanwhile");
                tokio::select! {
                    _ = &mut stop => break,
                    _ = &mut closed => break,
                    _ = sleep(retry) => {}
                }
                if stop_if_idle(&slot, &wakeups) {
                    break;
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        retry = RETRY_MIN;
        // Releases sent before we listened were not seen: let every waiter
        // look again.
        match wakeups.upgrade() {
            Some(w) => w.wake_all(),
            None => break,
        }
        loop {
            tokio::select! {
                _ = &mut stop => break 'connect,
                _ = &mut closed => break 'connect,
                _ = idle.tick() => {
                    if stop_if_idle(&slot, &wakeups) {
                        break 'connect;
                    }
                }
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) => match wakeups.upgrade() {
                        Some(w) => w.wake(notification.payload()),
                        None => break 'connect,
                    },
                    // The connection dropped and was re-established.
                    Ok(None) => match wakeups.upgrade() {
                        Some(w) => w.wake_all(),
                        None => break 'connect,
                    },
                    Err(e) => {
                        tracing::warn!(error = %e,
                            "dblock: lost the LISTEN connection for lease releases; reconnecting");
                        continue 'connect;
                    }
                },
            }
        }
    }
    // Closing waits for the connection to come back from UNLISTEN; bound it
    // in case the server is gone.
    let _ = timeout(Duration::from_secs(5), own.close()).await;
}

async fn listen(own: &PgPool) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(own).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Gives up the slot if nobody waits; the next waiter starts a new task.
/// Checked under the slot's lock, which waiters take after subscribing, so
/// a waiter either sees the slot cleared or is seen here.
fn stop_if_idle(slot: &Weak<Slot>, wakeups: &Weak<Wakeups>) -> bool {
    let Some(slot) = slot.upgrade() else {
        return true;
    };
    let mut slot = slot.lock().unwrap();
    if wakeups.upgrade().is_none_or(|w| w.is_idle()) {
        *slot = None;
        true
    } else {
        false
    }
}
