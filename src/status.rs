//! A lock's status, shared by its backend (which records renewals and loss)
//! and its guard (which reads it and waits for a loss).
//!
//! It does what the guard needed from `tokio::sync::watch` and no more: a
//! value behind a mutex, one [`Notify`] for waiters, and a count of
//! senders, the channel being closed once the last one goes (the backend
//! let go of the lock: it was released or its keeper ended). Closing a
//! `watch` channel notifies its eight `Notify`s, each under its own lock,
//! whether anyone waits or not: about 0.4 µs of every uncontended advisory
//! acquire and release on the bench's machine, a tenth of what dblock adds
//! to its own SQL there (docs/performance.md, "Issue 14, eleventh pass").
//! Nobody waits on most guards' status, so the rare waiter pays instead.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::backend::State;

struct Shared {
    state: Mutex<State>,
    /// Live [`Sender`]s; none: closed.
    senders: AtomicUsize,
    /// Notified at every change that is sent, and when the last sender goes.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new status holding `state`, and its first sender and receiver.
pub(crate) fn channel(state: State) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        senders: AtomicUsize::new(1),
        changed: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// The channel was closed: every sender is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// The writing end; the channel closes when the last clone goes.
pub(crate) struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Changes the state and wakes the receivers waiting for a change.
    pub(crate) fn send_modify(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.shared.lock());
        self.shared.changed.notify_waiters();
    }

    /// Changes the state; wakes the waiting receivers only if `change` says
    /// it changed something (returns true), and returns that.
    pub(crate) fn send_if_modified(&self, change: impl FnOnce(&mut State) -> bool) -> bool {
        let modified = change(&mut self.shared.lock());
        if modified {
            self.shared.changed.notify_waiters();
        }
        modified
    }

    /// The state now. Holds the status's lock: send nothing while it lives.
    pub(crate) fn borrow(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// A new receiver of this channel.
    pub(crate) fn subscribe(&self) -> Receiver {
        Receiver {
            shared: self.shared.clone(),
        }
    }
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // AcqRel: a receiver that sees the channel closed sees every change
        // sent before.
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.changed.notify_waiters();
        }
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("status::Sender")
            .field("state", &*self.borrow())
            .finish()
    }
}

/// The reading end.
#[derive(Clone)]
pub(crate) struct Receiver {
    shared: Arc<Shared>,
}

impl Receiver {
    /// The state now. Holds the status's lock: hold it only briefly.
    pub(crate) fn borrow(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// Whether every sender is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.senders.load(Ordering::Acquire) == 0
    }

    /// Resolves once `ready` holds for the state (at once if it does now),
    /// or with [`Closed`] once it does not and no sender is left to make it.
    ///
    /// # Cancel safety
    /// Cancel safe: it only watches.
    pub(crate) async fn wait_for(&self, ready: impl Fn(&State) -> bool) -> Result<(), Closed> {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so that a change or the close
            // that comes after the look wakes it.
            changed.as_mut().enable();
            if ready(&self.borrow()) {
                return Ok(());
            }
            if self.is_closed() {
                // A last change may have come between the look and the
                // close; the close came after every change (the count's
                // release and acquire), so this look sees them all. A
                // loss marked just before the release is still a loss.
                return if ready(&self.borrow()) {
                    Ok(())
                } else {
                    Err(Closed)
                };
            }
            changed.await;
        }
    }
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("status::Receiver")
            .field("state", &*self.borrow())
            .field("closed", &self.is_closed())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Loss;
    use crate::LostReason;
    use std::time::Duration;

    fn lost(s: &State) -> bool {
        s.lost.is_some()
    }

    fn mark(tx: &Sender) {
        tx.send_modify(|s| s.lost = Some(Loss::new(LostReason::Other, "test")));
    }

    #[tokio::test]
    async fn a_change_wakes_a_waiter() {
        let (tx, rx) = channel(State::default());
        let waiter = tokio::spawn(async move { rx.wait_for(lost).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        mark(&tx);
        let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(woken.expect("woken").unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn an_unmodified_send_wakes_nobody_into_success() {
        let (tx, rx) = channel(State::default());
        let waiter = tokio::spawn(async move { rx.wait_for(lost).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!tx.send_if_modified(|_| false));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(tx);
        let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(woken.expect("woken").unwrap(), Err(Closed));
    }

    #[tokio::test]
    async fn closes_only_when_the_last_sender_goes() {
        let (tx, rx) = channel(State::default());
        let second = tx.clone();
        let watcher = rx.clone();
        let waiter = tokio::spawn(async move { watcher.wait_for(lost).await });
        drop(tx);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!rx.is_closed());
        assert!(!waiter.is_finished());
        drop(second);
        assert!(rx.is_closed());
        let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(woken.expect("woken").unwrap(), Err(Closed));
    }

    #[tokio::test]
    async fn a_loss_marked_between_the_look_and_the_close_is_a_loss() {
        let (tx, rx) = channel(State::default());
        mark(&tx);
        drop(tx);
        // The first look answers as one made before the mark and the close
        // would have; the waiter then finds the channel closed.
        let looks = std::sync::atomic::AtomicUsize::new(0);
        let ready = |s: &State| looks.fetch_add(1, Ordering::Relaxed) > 0 && s.lost.is_some();
        assert_eq!(rx.wait_for(ready).await, Ok(()));
        assert_eq!(looks.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_loss_sent_before_the_close_is_seen_as_a_loss() {
        let (tx, rx) = channel(State::default());
        let late = tx.subscribe();
        mark(&tx);
        drop(tx);
        assert!(rx.is_closed());
        assert_eq!(rx.wait_for(lost).await, Ok(()));
        assert_eq!(late.wait_for(lost).await, Ok(()));
        assert!(rx.borrow().lost.is_some());
    }
}
