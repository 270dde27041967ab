//! For backend authors: the trait every backend implements, and what a
//! backend hands back for a granted lock.
//!
//! An application needs none of this beyond naming [`Backend`] (also at the
//! crate root, since `Locks::new` takes one): it uses
//! [`Locks`](crate::Locks), [`LockGuard`](crate::LockGuard) and the
//! backends' own types. A new backend implements [`Backend`], answers an
//! acquisition with a [`Grant`] built by [`Grant::new`] (or
//! [`Grant::status`] and [`PendingGrant::grant`]) over its own
//! [`HeldLock`], and reports renewals and loss through the [`LockStatus`]
//! it keeps.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::Loss;
use crate::status;
use crate::{AcquireRequest, LockInfo, LostReason, Result};

/// A boxed, sendable future: what the object-safe traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A lock service: PostgreSQL advisory locks, a lease table, or memory.
///
/// The trait is object safe; [`Locks`](crate::Locks) holds an
/// `Arc<dyn Backend>`. Implementations receive requests already validated.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// A short name for messages, such as `"postgres-advisory"`.
    fn kind(&self) -> &'static str;

    /// Takes the lock as the request says. `Ok(None)` only for
    /// [`Wait::No`](crate::Wait::No) when the lock is held elsewhere;
    /// [`Error::Timeout`](crate::Error::Timeout) when a bounded wait runs out.
    ///
    /// Must be cancel safe: if the future is dropped, no lock may stay held
    /// that no guard owns (release it, close its connection, or let a short
    /// lease run out).
    ///
    /// A request with a [`holder`](AcquireRequest::holder) (a leader's
    /// identity) must be granted only once that identity is recorded where
    /// [`inspect`](Backend::inspect) reports it as
    /// [`LockInfo::holder`], with the lock's token: leader election reads
    /// the leader from there.
    fn acquire(&self, request: AcquireRequest) -> BoxFuture<'_, Result<Option<Grant>>>;

    /// Who holds `name` now, if anyone.
    fn inspect<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LockInfo>>>;

    /// Every lock held now.
    fn list(&self) -> BoxFuture<'_, Result<Vec<LockInfo>>>;

    /// The current time by the clock that decides expiry: the database's
    /// (`clock_timestamp()` on PostgreSQL, `UTC_TIMESTAMP(6)` on MySQL,
    /// SQLite's `julianday('now')`), or the in-process clock of
    /// [`Memory`](crate::memory::Memory). The scheduler
    /// ([`schedule`](crate::schedule)) computes its slots from it, so that
    /// hosts whose own clocks differ agree on them.
    ///
    /// Required, with no default: a backend that answered with the local
    /// clock would silently break that agreement.
    ///
    /// Must be cancel safe (it only reads).
    fn now(&self) -> BoxFuture<'_, Result<DateTime<Utc>>>;

    /// Breaks `name` whoever holds it: an operator's tool for a stuck lock.
    /// The holder's guard reports itself lost (at its next renewal or
    /// heartbeat). Returns whether anything was held.
    fn force_release<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        let _ = name;
        Box::pin(async move {
            Err(crate::Error::Unsupported {
                backend: self.kind(),
                what: "breaking a lock".into(),
            })
        })
    }
}

/// The backend's side of a held lock: what the guard calls to renew or
/// release it. The lost signal travels separately, through [`LockStatus`].
pub trait HeldLock: Send + Sync + fmt::Debug {
    /// Renews the lock so that it lasts `by` from now (by the database
    /// clock) and makes `by` the lease length of later renewals. Returns the
    /// new expiry, or `None` for locks that live as long as their connection.
    fn extend(&self, by: Duration) -> BoxFuture<'_, Result<Option<DateTime<Utc>>>>;

    /// Releases the lock and reports the outcome.
    ///
    /// The guard polls the future in the caller's task and, if the caller
    /// stops waiting before it is done, finishes it in a task of its own:
    /// an implementation need not guard its statement against
    /// cancellation itself.
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>>;

    /// Releases the lock in the background: the guard was dropped.
    fn release_on_drop(self: Box<Self>);
}

/// The state a guard watches: the current expiry and, once lost, why.
#[derive(Debug, Clone, Default)]
pub(crate) struct State {
    pub(crate) expires_at: Option<DateTime<Utc>>,
    pub(crate) lost: Option<Loss>,
    /// The guard holding the lock, as the facade told it, for reporting a
    /// loss.
    pub(crate) seen: crate::observe::Seen,
}

/// The backend's handle on a guard's status: it records renewals and loss.
#[derive(Debug, Clone)]
pub struct LockStatus {
    tx: status::Sender,
}

impl LockStatus {
    /// Records a new expiry after a successful renewal.
    pub fn set_expires_at(&self, at: Option<DateTime<Utc>>) {
        self.tx.send_modify(|s| s.expires_at = at);
    }

    /// Marks the lock lost, with its cause and what happened in words; the
    /// first loss recorded is kept.
    ///
    /// Callers often hold an internal lock (a backend's registry) while
    /// they mark a loss, so the loss is not reported here (a `warn` event
    /// with the reason, and the `dblock_losses_total` metric): a subscriber
    /// or recorder that calls back into dblock would deadlock. It is
    /// reported by a task of its own (or at once when no runtime is at
    /// hand).
    pub fn mark_lost(&self, reason: LostReason, detail: impl Into<String>) {
        self.mark(Loss::new(reason, detail));
    }

    pub(crate) fn mark(&self, loss: Loss) {
        let mut first = None;
        self.tx.send_if_modified(|s| {
            if s.lost.is_none() {
                s.lost = Some(loss.clone());
                first = Some(loss);
                true
            } else {
                false
            }
        });
        let Some(Loss {
            reason: cause,
            detail: reason,
        }) = first
        else {
            return;
        };
        let (backend, token, name, uncount) = {
            let state = self.tx.borrow();
            let holder = state.seen.holder();
            (
                holder.map_or("unknown", |h| h.backend),
                holder.map(|h| h.token),
                holder.and_then(|h| h.name.clone()),
                state.seen.uncount(),
            )
        };
        let report = move || {
            tracing::warn!(
                backend,
                name = name.as_deref(),
                token,
                cause = cause.as_str(),
                %reason,
                "dblock: lock lost"
            );
            crate::observe::loss(backend, cause.as_str());
            if uncount {
                crate::observe::not_held(backend);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move { report() })),
            Err(_) => report(),
        }
    }

    /// Whether the lock has been marked lost.
    pub fn is_lost(&self) -> bool {
        self.tx.borrow().lost.is_some()
    }

    /// Why the lock was marked lost, if it was.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.tx.borrow().lost.as_ref().map(|l| l.reason)
    }

    /// What happened, in words, if the lock was marked lost.
    pub fn lost_detail(&self) -> Option<String> {
        self.tx.borrow().lost.as_ref().map(|l| l.detail.clone())
    }

    /// The loss recorded, if any.
    pub(crate) fn loss(&self) -> Option<Loss> {
        self.tx.borrow().lost.clone()
    }
}

/// A granted lock, as a backend returns it to [`Locks`](crate::Locks).
#[derive(Debug)]
pub struct Grant {
    pub(crate) token: u64,
    pub(crate) held: Box<dyn HeldLock>,
    pub(crate) state: status::Receiver,
}

impl Grant {
    /// Builds a grant. The backend keeps the returned [`LockStatus`] to
    /// report renewals and loss to the guard.
    pub fn new(
        token: u64,
        expires_at: Option<DateTime<Utc>>,
        held: Box<dyn HeldLock>,
    ) -> (Grant, LockStatus) {
        let (tx, rx) = status::channel(State {
            expires_at,
            ..State::default()
        });
        (
            Grant {
                token,
                held,
                state: rx,
            },
            LockStatus { tx },
        )
    }

    /// Creates the status channel before the held lock exists (a backend's
    /// keeper task usually needs the status first).
    pub fn status(expires_at: Option<DateTime<Utc>>) -> (LockStatus, PendingGrant) {
        let (tx, rx) = status::channel(State {
            expires_at,
            ..State::default()
        });
        (LockStatus { tx }, PendingGrant { rx })
    }
}

/// The guard's half of a status channel made by [`Grant::status`].
#[derive(Debug)]
pub struct PendingGrant {
    rx: status::Receiver,
}

impl PendingGrant {
    /// Completes the grant.
    pub fn grant(self, token: u64, held: Box<dyn HeldLock>) -> Grant {
        Grant {
            token,
            held,
            state: self.rx,
        }
    }
}
