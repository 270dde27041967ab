//! One release: a guard's handle on its lock ([`Held`]) and the unlock it
//! runs, from the caller's task.
//!
//! [`unlock`] reads top to bottom: the session's connection (its async
//! mutex), what the registry records of the hold, the unlock statement
//! ([`Session::unlock`]), the registry's bookkeeping, and last the guard's
//! status and the local waiters. `Held::release` runs it in the caller's
//! task, and the guard runs that future inside [`Detached`]: if the
//! caller's future is dropped mid-statement, a task finishes it and still
//! records the outcome. A guard dropped without a release has its
//! session's keeper task run the same [`unlock`].

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::registry::{Hold, HoldState, LockId};
use super::session::{Failure, Session};
use crate::backend::{BoxFuture, HeldLock, LockStatus};
use crate::detach::Detached;
use crate::error::Loss;
use crate::postgres::map_err;
use crate::{Error, LostReason, Result};

/// The outcome of an unlock.
pub(super) enum Released {
    Yes,
    /// The lock was not held any more (lost or broken before): why.
    NotHeld(Loss),
    /// The unlock's outcome is unknown; the session was closed, which ends
    /// the lock.
    Failed(Error),
}

/// A guard's handle on its lock: the session that holds it.
pub(super) struct Held {
    name: Arc<str>,
    key: i64,
    lock: LockId,
    /// Gone once the session ended abnormally (which ended the lock).
    session: Weak<Session>,
    status: LockStatus,
    /// Whether dropping the handle should release the lock.
    armed: bool,
}

impl Held {
    /// The handle on the hold `lock` of `name` (`key`) on `session`.
    pub(super) fn new(
        name: Arc<str>,
        key: i64,
        lock: LockId,
        session: &Arc<Session>,
        status: LockStatus,
    ) -> Self {
        Held {
            name,
            key,
            lock,
            session: Arc::downgrade(session),
            status,
            armed: true,
        }
    }
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("name", &self.name)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl HeldLock for Held {
    fn extend(&self, _by: Duration) -> BoxFuture<'_, Result<Option<DateTime<Utc>>>> {
        let session = self.session.upgrade();
        Box::pin(async move {
            let session = session.ok_or_else(|| gone(&self.name, &self.status))?;
            match Detached::new(async move { session.check().await }).await {
                Ok(()) if !self.status.is_lost() => Ok(None),
                Ok(()) => Err(gone(&self.name, &self.status)),
                Err(loss) => Err(Error::from_loss(&self.name, loss)),
            }
        })
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        self.armed = false;
        let session = self.session.upgrade();
        let (lock, key) = (self.lock, self.key);
        // The unlock runs in the caller's task and, if the caller stops
        // waiting, finishes in a task of its own (the guard sees to it).
        Box::pin(async move {
            let Some(session) = session else {
                return Err(gone(&self.name, &self.status));
            };
            match unlock(&session, lock, key, None).await {
                Released::Yes => Ok(()),
                Released::NotHeld(loss) => Err(Error::from_loss(&self.name, loss)),
                Released::Failed(e) => Err(e),
            }
        })
    }

    fn release_on_drop(self: Box<Self>) {
        // Dropping the armed handle queues the unlock.
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.armed {
            // The session's keeper unlocks it. If the keeper is gone, so is
            // the session, and with it the lock.
            if let Some(session) = self.session.upgrade() {
                session.unlock_later(self.lock, self.key);
            }
        }
    }
}

/// Releases the lock `lock` on `key`, held on `session`. With `broken`, its
/// guard is reported lost for that reason (an operator broke it).
pub(super) async fn unlock(
    session: &Session,
    lock: LockId,
    key: i64,
    broken: Option<&Loss>,
) -> Released {
    let inner = &session.inner;
    // Counted in the session's backlog, which routing looks at, until done.
    let _backlog = session.unlocking();
    // 1. The session's connection, behind its mutex. A session that ended
    //    ended the lock with it (and reported it lost).
    let mut c = match session.conn().await {
        Ok(c) => c,
        Err(reason) => return Released::NotHeld(reason),
    };
    // 2. The hold, looked up under the session's mutex: the registry
    //    changes this session's holds only while it is held, so the hold
    //    cannot be broken and the key taken again by another guard
    //    meanwhile.
    let (mode, permit) = match inner.registry().hold(key, lock) {
        Some(h) if h.session == session.id => (h.mode, h.permit.clone()),
        _ => return Released::NotHeld(lost_before()),
    };
    // 3. The unlock statement. If its outcome is unknown (or the server
    //    refused it, which leaves the lock in doubt too), the session is
    //    closed, which ends every lock on it.
    let unlocked = match session.unlock(&mut c, key, mode, permit.as_ref()).await {
        Ok(unlocked) => unlocked,
        Err(Failure::Server(e)) => {
            let loss = Loss::new(
                LostReason::Other,
                format!("an unlock failed on the holder session: {e}"),
            );
            mark_lost(session, key, lock, &loss);
            session.die(&mut c, &loss);
            return Released::Failed(map_err(e));
        }
        Err(Failure::Broken(loss)) => {
            mark_lost(session, key, lock, &loss);
            session.die(&mut c, &loss);
            return Released::Failed(Error::Unavailable(loss.detail));
        }
    };
    // 4. The registry forgets the hold; a session adopted from a wait that
    //    now holds nothing goes back to the pool (its keeper sees to it).
    let (hold, extra_idle) = inner.registry().release(session.id, key, lock);
    drop(c);
    if extra_idle {
        session.tidy();
    }
    // 5. The guard's status, and the local waiters of the name.
    let Some(Hold {
        state: HoldState::Held { name, status, .. },
        ..
    }) = hold
    else {
        return Released::NotHeld(lost_before());
    };
    let released = if unlocked {
        if let Some(loss) = broken {
            status.mark(loss.clone());
        }
        Released::Yes
    } else {
        let loss = broken.cloned().unwrap_or_else(|| {
            Loss::new(
                LostReason::RenewalFailed,
                "the session no longer held the advisory lock",
            )
        });
        status.mark(loss.clone());
        Released::NotHeld(loss)
    };
    inner.wakeups.wake(&name);
    released
}

/// Marks one lock lost before its release is answered, so the guard
/// reports the loss (the session is about to be closed, which ends the
/// lock; it may have ended earlier, when another holder could take it).
fn mark_lost(session: &Session, key: i64, lock: LockId, loss: &Loss) {
    if let Some(Hold {
        state: HoldState::Held { status, .. },
        ..
    }) = session.inner.registry().hold(key, lock)
    {
        status.mark(loss.clone());
    }
}

fn gone(name: &str, status: &LockStatus) -> Error {
    Error::from_loss(
        name,
        status.loss().unwrap_or_else(|| {
            Loss::new(
                LostReason::ConnectionLost,
                "the advisory lock's holder session is gone",
            )
        }),
    )
}

/// An unlock of a lock the registry no longer records as held here.
fn lost_before() -> Loss {
    Loss::new(
        LostReason::RenewalFailed,
        "the advisory lock was lost or broken before",
    )
}
