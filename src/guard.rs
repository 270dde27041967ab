//! The guard that represents a held lock.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tracing::field::Empty;
use tracing::Instrument;

use crate::backend::{HeldLock, State};
use crate::detach::Detached;
use crate::error::Loss;
use crate::status;
use crate::{observe, Error, Grant, LockMode, LostReason, LostSignal, Result};

/// A held lock. Dropping it releases the lock in the background;
/// [`release`](LockGuard::release) does the same and reports errors.
///
/// While it lives, a lease guard renews its lease in the background and an
/// advisory guard watches its connection. Check [`is_lost`](LockGuard::is_lost)
/// or await [`lost`](LockGuard::lost) before acting on the assumption that
/// the lock is still yours, and pass [`token`](LockGuard::token) to the
/// resource you protect so it can refuse a stale holder.
pub struct LockGuard {
    name: Arc<str>,
    mode: LockMode,
    token: u64,
    /// [`Backend::kind`](crate::Backend::kind), for spans and metrics.
    backend: &'static str,
    /// When it was granted, if the clock was read for spans or metrics.
    acquired: Option<Instant>,
    state: status::Receiver,
    held: Option<Box<dyn HeldLock>>,
    /// The sender of [`lost_owned`](LockGuard::lost_owned)'s second
    /// channel, made on first use; it closes when the guard goes.
    ended: OnceLock<status::Sender>,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("token", &self.token)
            .field("expires_at", &self.expires_at())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl LockGuard {
    /// Wraps a grant. `acquired` is when it was granted, if the clock was
    /// read; a granted acquisition was counted held already (see
    /// [`observe::acquisition`]).
    pub(crate) fn new(
        name: Arc<str>,
        mode: LockMode,
        grant: Grant,
        backend: &'static str,
        acquired: Option<Instant>,
    ) -> Self {
        let lost_already = observe::holder_wanted() && {
            // The loss warning names the lock only if it would be logged.
            let named = tracing::enabled!(target: "dblock::backend", tracing::Level::WARN);
            let state = grant.state.borrow();
            state.seen.set(backend, grant.token, named.then_some(&name));
            state.lost.is_some()
        };
        let guard = LockGuard {
            name,
            mode,
            token: grant.token,
            backend,
            acquired,
            state: grant.state,
            held: Some(grant.held),
            ended: OnceLock::new(),
        };
        // Lost before the holder was recorded: the loss could not take it
        // off the held count.
        if lost_already {
            guard.uncount();
        }
        guard
    }

    /// Takes the guard off the held count, unless a loss did.
    fn uncount(&self) {
        if cfg!(feature = "metrics") && self.state.borrow().seen.uncount() {
            observe::not_held(self.backend);
        }
    }

    /// The guard ends (released or dropped): records how long it was held,
    /// and opens the `debug` span `release` (one per guard's end) for the
    /// caller to record the outcome in.
    fn end(&self) -> tracing::Span {
        self.uncount();
        let span = observe::debug_span!(
            "release",
            name = %self.name,
            backend = self.backend,
            token = self.token,
            outcome = Empty,
            held_s = Empty,
            error = Empty,
        );
        if let Some(held) = self.acquired.map(|at| at.elapsed()) {
            observe::hold(self.backend, held);
            span.record("held_s", held.as_secs_f64());
        }
        span
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Exclusive or shared.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The fencing token: strictly greater than the token of every earlier
    /// holder of this name, never reused.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// When the lease runs out by the database clock, as of the last
    /// renewal; `None` where the lock lives as long as its connection.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.state.borrow().expires_at
    }

    /// Whether the lock is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.state.borrow().lost.is_some() || self.state.is_closed()
    }

    /// Resolves once the lock is known lost: renewal failed or came too
    /// late, the connection died or was terminated, or the lock was broken.
    /// Never resolves while the lock is held.
    ///
    /// # Cancel safety
    /// Cancel safe: it only watches; dropping it changes nothing.
    pub async fn lost(&self) {
        // An error means the backend's keeper is gone: the lock can no
        // longer be vouched for, which is loss too.
        let _ = self.state.wait_for(|s| s.lost.is_some()).await;
    }

    /// An owned handle on the lost signal, for a spawned task: it fires
    /// when the lock is lost, and also once this guard is released or
    /// dropped (the lock is then no longer held either).
    pub fn lost_owned(&self) -> LostSignal {
        let ended = self
            .ended
            .get_or_init(|| status::channel(State::default()).0);
        LostSignal::new(self.state.clone(), ended.subscribe())
    }

    /// The status channel, for watching loss without borrowing the guard.
    pub(crate) fn state(&self) -> status::Receiver {
        self.state.clone()
    }

    /// Why the lock was lost, once it is: a cause to match on.
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.state.borrow().lost.as_ref().map(|l| l.reason)
    }

    /// What happened when the lock was lost, in words, once it is (for
    /// logs: the wording may change in any release).
    pub fn lost_detail(&self) -> Option<String> {
        self.state.borrow().lost.as_ref().map(|l| l.detail.clone())
    }

    /// The loss recorded, if any.
    pub(crate) fn loss(&self) -> Option<Loss> {
        self.state.borrow().lost.clone()
    }

    /// Renews the lock now so that it lasts `by` from now by the database
    /// clock, and makes `by` the lease length of the background renewals
    /// that follow. Fails with [`Error::Lost`] if the lock is no longer held.
    /// For advisory locks, which last as long as their connection, it checks
    /// the connection and returns `None`.
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped, the renewal may or may not have happened,
    /// and background renewal goes on either way.
    pub async fn extend(&self, by: Duration) -> Result<Option<DateTime<Utc>>> {
        if by < crate::request::MIN_TTL || by > crate::request::MAX_DURATION {
            return Err(Error::InvalidOption(format!(
                "extend({by:?}): a lease length must lie between 100 ms and 366 days"
            )));
        }
        if let Some(loss) = self.loss() {
            return Err(Error::from_loss(self.name(), loss));
        }
        let held = self.held.as_ref().expect("held until release");
        held.extend(by).await
    }

    /// Releases the lock and reports the outcome. Returns [`Error::Lost`] if
    /// the lock had been lost before (nothing was released then, since it was
    /// not held).
    ///
    /// # Cancel safety
    /// Cancel safe: once called, the release goes ahead in the background
    /// even if this future is dropped.
    pub async fn release(mut self) -> Result<()> {
        let held = self.held.take().expect("held until release");
        let span = self.end();
        let lost = self.loss();
        // In this task; if the caller stops waiting, the release finishes
        // in a task of its own (the backends rely on it, see
        // `HeldLock::release`).
        let releasing = Detached::boxed(held.release());
        let outcome = if span.is_none() {
            releasing.await
        } else {
            releasing.instrument(span.clone()).await
        };
        let result = self.release_result(lost, outcome);
        if !span.is_disabled() {
            let outcome = match &result {
                Ok(()) => "released",
                Err(Error::Lost { .. }) => "lost",
                Err(e) => {
                    span.record("error", tracing::field::display(e));
                    "error"
                }
            };
            span.record("outcome", outcome);
            tracing::debug!(parent: &span, outcome, "dblock: release ended");
        }
        result
    }

    fn release_result(&self, lost: Option<Loss>, outcome: Result<()>) -> Result<()> {
        match (lost, outcome) {
            (Some(loss), _) => Err(Error::from_loss(self.name(), loss)),
            (None, Ok(())) => Ok(()),
            // A release that failed because the lock was already gone (its
            // session terminated between two heartbeats, say) reports the
            // loss, not a bare database error: someone else may have held
            // the lock meanwhile.
            (None, Err(e)) => match self.loss() {
                Some(loss) => Err(Error::from_loss(self.name(), loss)),
                None => Err(e),
            },
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            let span = self.end();
            if !span.is_disabled() {
                span.record("outcome", "dropped");
                tracing::debug!(parent: &span, "dblock: guard dropped; releasing in the background");
            }
            let _in = span.enter();
            held.release_on_drop();
        }
    }
}
