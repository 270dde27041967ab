//! Cross-process wake-ups for [`Lease`](super::Lease) waiters through Redis
//! pub/sub, one channel per name.
//!
//! A release (or a forced release) `PUBLISH`es the name on
//! `{prefix}released:{name}` in the same script that frees the key. A
//! backend with waiters runs one listener task on a pub/sub connection of
//! its own, which subscribes to the channels of exactly the names waited
//! for in this process, so a process receives the releases it waits for
//! and no others.
//!
//! The listener's connection speaks RESP3 (Redis 6 or later), where a
//! subscribed connection still takes other commands: it is named
//! `dblock:{pid}:{n}:sub` (`CLIENT SETNAME`) like the backend's own, and
//! pinged like any other. On a server without RESP3 the listener cannot
//! connect, and waiters poll.
//!
//! The listener is a convenience on top of polling, never a dependency:
//! - each time an acquisition is about to wait, the task is nudged; it
//!   subscribes to the names newly waited for, unsubscribes from those
//!   nobody waits for any more, and then wakes the newly subscribed names'
//!   waiters once, since a release published before the subscription took
//!   effect was not seen;
//! - it pings the connection every few seconds; a connection that fails or
//!   does not answer is replaced, with backoff, and every name is
//!   subscribed (and its waiters woken) again; meanwhile waiters poll,
//!   bounded by `LeaseOptions::max_poll`;
//! - it stops a minute after the last waiter, and when the backend is
//!   dropped.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::Notify;
use tokio::time::{interval, sleep, timeout, Instant, MissedTickBehavior};

use super::lease::{name_connection, Keys};
use crate::lease::Wakeups;

/// How long the listener stays connected with nobody waiting.
const IDLE_FOR: Duration = Duration::from_secs(60);
/// How often the connection is pinged (and the backend checked for life).
const TICK: Duration = Duration::from_secs(5);
/// How long a connect, (un)subscribe or ping may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// The nudge of the running listener task, if any.
type Slot = Mutex<Option<Arc<Notify>>>;

/// The backend's handle on its listener task. Dropping it stops the task.
#[derive(Debug)]
pub(crate) struct Listener {
    /// The backend's client, made to speak RESP3.
    client: Client,
    /// `CLIENT SETNAME` of its connections.
    name: Arc<str>,
    keys: Keys,
    wakeups: Weak<Wakeups>,
    slot: Arc<Slot>,
}

impl Listener {
    pub(crate) fn new(client: Client, name: String, keys: Keys, wakeups: &Arc<Wakeups>) -> Self {
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(resp3)).unwrap_or(client);
        Listener {
            client,
            name: name.into(),
            keys,
            wakeups: Arc::downgrade(wakeups),
            slot: Arc::default(),
        }
    }

    /// Starts the listener task unless it runs already, and has it bring its
    /// subscriptions up to date. Never blocks.
    pub(crate) fn ensure_running(&self) {
        let mut slot = self.slot.lock().unwrap();
        if let Some(nudge) = slot.as_ref() {
            nudge.notify_one();
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let nudge = Arc::new(Notify::new());
        *slot = Some(nudge.clone());
        runtime.spawn(run(
            Arc::downgrade(&self.slot),
            self.client.clone(),
            self.name.clone(),
            self.keys.clone(),
            self.wakeups.clone(),
            nudge,
        ));
    }
}

/// A connection for pub/sub, named, its pushes (messages, and the
/// library's notice of a disconnection) arriving on the receiver.
async fn connect(
    client: &Client,
    name: &str,
) -> redis::RedisResult<(MultiplexedConnection, UnboundedReceiver<PushInfo>)> {
    let (tx, rx) = unbounded_channel();
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REQUEST_TIMEOUT))
        .set_response_timeout(Some(REQUEST_TIMEOUT))
        .set_push_sender(tx);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    name_connection(&mut conn, name).await?;
    Ok((conn, rx))
}

async fn run(
    slot: Weak<Slot>,
    client: Client,
    name: Arc<str>,
    keys: Keys,
    wakeups: Weak<Wakeups>,
    nudge: Arc<Notify>,
) {
    let mut retry = RETRY_MIN;
    let mut busy_at = Instant::now();
    'connect: loop {
        let connected = match timeout(REQUEST_TIMEOUT * 2, connect(&client, &name)).await {
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connecting timed out".to_owned()),
        };
        let (mut conn, mut pushes) = match connected {
            Ok(connected) => connected,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?retry,
                    "dblock: cannot subscribe to Redis lease releases; waiters poll meanwhile");
                sleep(retry).await;
                if stop_if_idle(&slot, &wakeups, &nudge) {
                    return;
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        retry = RETRY_MIN;
        let mut subscribed: HashSet<String> = HashSet::new();
        let mut tick = interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            // Bring the subscriptions in line with the names waited for.
            let Some(w) = wakeups.upgrade() else {
                return;
            };
            let wanted: HashSet<String> = w.names().into_iter().collect();
            drop(w);
            let new: Vec<String> = wanted.difference(&subscribed).cloned().collect();
            let old: Vec<String> = subscribed.difference(&wanted).cloned().collect();
            if !new.is_empty() {
                let channels: Vec<String> = new.iter().map(|n| keys.channel(n)).collect();
                if !matches!(
                    timeout(REQUEST_TIMEOUT, conn.subscribe(&channels)).await,
                    Ok(Ok(()))
                ) {
                    tracing::warn!("dblock: Redis SUBSCRIBE failed; reconnecting");
                    continue 'connect;
                }
                subscribed.extend(new.iter().cloned());
                // A release published before the subscription took effect
                // was not seen: let these waiters look again.
                if let Some(w) = wakeups.upgrade() {
                    for name in &new {
                        w.wake(name);
                    }
                }
            }
            if !old.is_empty() {
                let channels: Vec<String> = old.iter().map(|n| keys.channel(n)).collect();
                if !matches!(
                    timeout(REQUEST_TIMEOUT, conn.unsubscribe(&channels)).await,
                    Ok(Ok(()))
                ) {
                    tracing::warn!("dblock: Redis UNSUBSCRIBE failed; reconnecting");
                    continue 'connect;
                }
                for name in &old {
                    subscribed.remove(name);
                }
            }
            if !wanted.is_empty() {
                busy_at = Instant::now();
            }
            tokio::select! {
                _ = nudge.notified() => {}
                _ = tick.tick() => {
                    if slot.upgrade().is_none() {
                        return;
                    }
                    if busy_at.elapsed() >= IDLE_FOR && stop_if_idle(&slot, &wakeups, &nudge) {
                        return;
                    }
                    let pong = timeout(
                        REQUEST_TIMEOUT,
                        redis::cmd("PING").query_async::<Value>(&mut conn),
                    )
                    .await;
                    if !matches!(pong, Ok(Ok(_))) {
                        tracing::warn!("dblock: the Redis pub/sub connection did not answer a PING; reconnecting");
                        continue 'connect;
                    }
                }
                push = pushes.recv() => match push {
                    Some(PushInfo { kind: PushKind::Message, data }) => {
                        // [channel, payload]: the payload is the name.
                        let released = match data.get(1) {
                            Some(Value::BulkString(bytes)) => String::from_utf8_lossy(bytes),
                            _ => continue,
                        };
                        match wakeups.upgrade() {
                            Some(w) => w.wake(&released),
                            None => return,
                        }
                    }
                    // Confirmations of (un)subscribing, and anything else.
                    Some(PushInfo { kind, .. }) if kind != PushKind::Disconnection => {}
                    _ => {
                        tracing::warn!("dblock: lost the Redis pub/sub connection; reconnecting");
                        continue 'connect;
                    }
                },
            }
        }
    }
}

/// Gives up the slot if nobody waits; the next waiter starts a new task.
/// Checked under the slot's lock, which waiters take after subscribing in
/// [`Wakeups`], so a waiter either sees the slot cleared or is seen here.
fn stop_if_idle(slot: &Weak<Slot>, wakeups: &Weak<Wakeups>, nudge: &Arc<Notify>) -> bool {
    let Some(slot) = slot.upgrade() else {
        return true;
    };
    let mut slot = slot.lock().unwrap();
    if wakeups.upgrade().is_none_or(|w| w.is_idle()) {
        if slot.as_ref().is_some_and(|n| Arc::ptr_eq(n, nudge)) {
            *slot = None;
        }
        true
    } else {
        false
    }
}
