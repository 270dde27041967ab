//! An owned handle on a lock's lost signal, for tasks that outlive a borrow
//! of the guard.

use std::fmt;

use crate::status::Receiver;
use crate::LostReason;

/// Fires once a lock is no longer held: lost (renewal failed or came too
/// late, the connection died, the lock was broken), or released (its guard
/// released or dropped; for a [`Leadership`](crate::Leadership), resigned). Cloneable, `Send` and
/// `'static`, like a cancellation token: move it into a spawned task and
/// stop the task's work when [`lost`](LostSignal::lost) resolves.
///
/// Made by [`LockGuard::lost_owned`](crate::LockGuard::lost_owned) and
/// [`Leadership::lost_owned`](crate::Leadership::lost_owned).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let locks = dblock::Locks::new(dblock::memory::Memory::new());
/// let guard = locks.acquire("reports").await?;
/// let lost = guard.lost_owned();
/// let worker = tokio::spawn(async move {
///     tokio::select! {
///         _ = lost.lost() => "stopped: the lock is gone",
///         _ = std::future::pending::<()>() => unreachable!(),
///     }
/// });
/// guard.release().await?;
/// assert_eq!(worker.await.unwrap(), "stopped: the lock is gone");
/// # Ok::<(), dblock::Error>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct LostSignal {
    /// The backend's status of the lock.
    lock: Receiver,
    /// The guard's own channel, whose sender goes with the guard: closed
    /// once the guard is released or dropped (a leadership resigned).
    guard: Receiver,
}

impl fmt::Debug for LostSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LostSignal")
            .field("lost", &self.is_lost())
            .field("reason", &self.reason())
            .finish()
    }
}

/// Whether one status channel says the lock is gone: marked lost, or its
/// sender (the backend's keeper of the lock) dropped, which happens once
/// the lock is released.
fn gone(rx: &Receiver) -> bool {
    rx.borrow().lost.is_some() || rx.is_closed()
}

impl LostSignal {
    pub(crate) fn new(lock: Receiver, guard: Receiver) -> Self {
        LostSignal { lock, guard }
    }

    /// Whether the lock is no longer held (lost, released or resigned).
    pub fn is_lost(&self) -> bool {
        gone(&self.lock) || gone(&self.guard)
    }

    /// Why the lock was lost, where a cause was recorded (`None` while
    /// held, and after a plain release).
    pub fn reason(&self) -> Option<LostReason> {
        self.lock.borrow().lost.as_ref().map(|l| l.reason)
    }

    /// What happened when the lock was lost, in words, where it was
    /// recorded (`None` while held, and after a plain release).
    pub fn detail(&self) -> Option<String> {
        self.lock.borrow().lost.as_ref().map(|l| l.detail.clone())
    }

    /// Resolves once the lock is no longer held; at once if it is not.
    ///
    /// # Cancel safety
    /// Cancel safe: it only watches; dropping it changes nothing.
    pub async fn lost(&self) {
        // An error means the keeper is gone: the lock is not held.
        let lost = |s: &crate::backend::State| s.lost.is_some();
        tokio::select! {
            _ = self.lock.wait_for(lost) => {}
            _ = self.guard.wait_for(lost) => {}
        }
    }
}
