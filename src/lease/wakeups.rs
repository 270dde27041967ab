//! In-process wake-ups: a release wakes the waiters for the same name in
//! this process at once, instead of at their next poll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Waiters by name.
#[derive(Debug, Default)]
pub(crate) struct Wakeups {
    map: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Wakeups {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Wakeups::default())
    }

    /// Registers interest in `name` until the subscription is dropped.
    pub(crate) fn subscribe(self: &Arc<Self>, name: &str) -> Subscription {
        let notify = self
            .map
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .clone();
        Subscription {
            wakeups: self.clone(),
            name: name.to_owned(),
            notify,
        }
    }

    /// Wakes every waiter for `name` in this process.
    pub(crate) fn wake(&self, name: &str) {
        if let Some(notify) = self.map.lock().unwrap().get(name) {
            notify.notify_waiters();
        }
    }

    /// Whether nobody in this process waits for any name.
    #[cfg_attr(not(any(feature = "postgres", feature = "redis")), allow(dead_code))]
    pub(crate) fn is_idle(&self) -> bool {
        self.map.lock().unwrap().is_empty()
    }

    /// The names someone in this process waits for (or is about to).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn names(&self) -> Vec<String> {
        self.map.lock().unwrap().keys().cloned().collect()
    }

    /// Wakes every waiter (after a reconnect that may have missed releases).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn wake_all(&self) {
        for notify in self.map.lock().unwrap().values() {
            notify.notify_waiters();
        }
    }
}

/// Interest in one name.
#[derive(Debug)]
pub(crate) struct Subscription {
    wakeups: Arc<Wakeups>,
    name: String,
    notify: Arc<Notify>,
}

impl Subscription {
    /// A future that completes at the next wake-up; `enable` it before
    /// checking the lock to miss none.
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.wakeups.map.lock().unwrap();
        // The map's reference and ours: nobody else waits for this name.
        if Arc::strong_count(&self.notify) == 2 {
            map.remove(&self.name);
        }
    }
}
