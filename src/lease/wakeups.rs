//! In-process wake-ups: a release wakes the waiters for the same name in
//! this process at once, instead of at their next poll.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::name::NameMap;

/// Waiters by name.
#[derive(Debug, Default)]
pub(crate) struct Wakeups {
    map: Mutex<NameMap<Arc<Notify>>>,
    /// The map's length, stored under its mutex at every change: a release
    /// while nobody in this process waits (the common case) wakes nobody
    /// without taking the mutex or hashing the name. A waiter that
    /// subscribes just after such a look has not tried the lock yet, so it
    /// finds the lock released, as it would if the look had found it.
    names: AtomicUsize,
}

impl Wakeups {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Wakeups::default())
    }

    /// Registers interest in `name` until the subscription is dropped.
    pub(crate) fn subscribe(self: &Arc<Self>, name: &str) -> Subscription {
        let notify = {
            let mut map = self.map.lock().unwrap();
            let notify = map.entry(name.to_owned()).or_default().clone();
            self.names.store(map.len(), Ordering::SeqCst);
            notify
        };
        Subscription {
            wakeups: self.clone(),
            name: name.to_owned(),
            notify,
        }
    }

    /// Wakes every waiter for `name` in this process.
    pub(crate) fn wake(&self, name: &str) {
        if self.names.load(Ordering::SeqCst) == 0 {
            return;
        }
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
            self.wakeups.names.store(map.len(), Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_reaches_a_subscriber_and_the_count_follows_the_map() {
        let wakeups = Wakeups::new();
        // Nobody waits: a wake is a no-op.
        wakeups.wake("a");
        assert_eq!(wakeups.names.load(Ordering::SeqCst), 0);

        let a = wakeups.subscribe("a");
        let a2 = wakeups.subscribe("a");
        let b = wakeups.subscribe("b");
        assert_eq!(wakeups.names.load(Ordering::SeqCst), 2);

        {
            let notified = a.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            wakeups.wake("a");
            tokio::time::timeout(std::time::Duration::from_secs(1), notified)
                .await
                .expect("the subscriber of the released name is woken");
        }

        // The name stays while one of its two subscribers is left.
        drop(a);
        assert_eq!(wakeups.names.load(Ordering::SeqCst), 2);
        drop(a2);
        assert_eq!(wakeups.names.load(Ordering::SeqCst), 1);
        drop(b);
        assert_eq!(wakeups.names.load(Ordering::SeqCst), 0);
        assert!(wakeups.is_idle());
    }
}
