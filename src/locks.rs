//! The facade: `Locks` and its acquire builder.

use std::fmt;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::field::Empty;
use tracing::Instrument;

use crate::backend::BoxFuture;
use crate::error::Loss;
use crate::name::validate_name;
use crate::observe::{self, Outcome};
use crate::{
    AcquireRequest, Backend, Error, LockGuard, LockInfo, LockMode, LostReason, Result, Wait,
};

/// The entry point: a cheap, cloneable handle on one lock [`Backend`].
///
/// ```
/// # async fn demo() -> dblock::Result<()> {
/// use std::time::Duration;
/// let locks = dblock::Locks::new(dblock::memory::Memory::new());
///
/// let guard = locks.acquire("reports:nightly").wait(Duration::from_secs(5)).await?;
/// println!("{} held with token {}", guard.name(), guard.token());
/// guard.release().await?;
///
/// assert!(locks.try_acquire("job:42").await?.is_some());
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Clone)]
pub struct Locks {
    backend: Arc<dyn Backend>,
}

impl fmt::Debug for Locks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locks")
            .field("backend", &self.backend)
            .finish()
    }
}

impl Locks {
    /// Wraps a backend.
    pub fn new(backend: impl Backend) -> Self {
        Locks {
            backend: Arc::new(backend),
        }
    }

    /// Wraps a backend that is already shared.
    pub fn from_arc(backend: Arc<dyn Backend>) -> Self {
        Locks { backend }
    }

    /// The backend behind this handle.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Starts an acquisition of `name`. Await the builder to take the lock;
    /// without `.wait(..)` it waits until the lock is free.
    pub fn acquire(&self, name: impl AsRef<str>) -> Acquire<'_> {
        Acquire {
            locks: self,
            request: AcquireRequest::new(name),
            wait: Wait::Forever,
            ttl: None,
            default_ttl: None,
            mode: LockMode::Exclusive,
            hold_at_least: None,
            holder: None,
            max_holders: None,
        }
    }

    /// Takes `name` (waiting until it is free), runs `work` while the lock
    /// is held, and releases it. If the lock is lost meanwhile, `work` is
    /// cancelled (its future dropped, at its next `.await`) and the answer
    /// is [`Error::Lost`]; a loss found by the final release also answers
    /// `Lost`, since `work` may have finished after the lock was gone. For
    /// a ttl or a bounded wait, use [`Acquire::with_lock`].
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let locks = dblock::Locks::new(dblock::memory::Memory::new());
    /// let token = locks.with_lock("reports", async |guard| guard.token()).await?;
    /// assert!(token > 0);
    /// # Ok::<(), dblock::Error>(()) }).unwrap();
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped, `work` is dropped with it and the lock is
    /// released in the background.
    pub async fn with_lock<T>(
        &self,
        name: impl AsRef<str>,
        work: impl AsyncFnOnce(&LockGuard) -> T,
    ) -> Result<T> {
        self.acquire(name).with_lock(work).await
    }

    /// Takes the lock if it is free right now; `Ok(None)` if it is held.
    /// Never waits for the lock (it does wait for the database).
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped, no lock is left held (see [`Acquire`]).
    pub async fn try_acquire(&self, name: impl AsRef<str>) -> Result<Option<LockGuard>> {
        self.acquire(name).try_now().await
    }

    /// Who holds `name` now, as the database sees it.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn inspect(&self, name: &str) -> Result<Option<LockInfo>> {
        validate_name(name)?;
        self.backend.inspect(name).await
    }

    /// Every lock held now, as the database sees it.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn list(&self) -> Result<Vec<LockInfo>> {
        self.backend.list().await
    }

    /// The current time by the backend's clock: the database's for the
    /// database backends (see [`Backend::now`]). One round trip.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn now(&self) -> Result<chrono::DateTime<chrono::Utc>> {
        self.backend.now().await
    }

    /// Breaks `name` whoever holds it: the lease is ended, or, for an
    /// advisory lock, the holding session is terminated, which ends every
    /// other lock on that session too (an advisory lock held through this
    /// same backend is unlocked on its session instead). The holder's guard
    /// reports itself lost at its next renewal or heartbeat. Returns whether
    /// anything was held. This is an operator's tool for a stuck lock; it
    /// defeats mutual exclusion for whoever believed they held it.
    ///
    /// # Cancel safety
    /// Cancel safe in that nothing is left half-done: if dropped, the lock
    /// may or may not have been broken.
    pub async fn force_release(&self, name: &str) -> Result<bool> {
        validate_name(name)?;
        self.backend.force_release(name).await
    }
}

/// An acquisition being set up by [`Locks::acquire`]; `.await` it.
///
/// # Cancel safety
/// Cancel safe: dropping the future at any point leaves no lock held. A
/// grant that races the drop is released (or its connection closed) in the
/// background.
#[must_use = "an acquisition does nothing until awaited"]
pub struct Acquire<'a> {
    locks: &'a Locks,
    request: Result<AcquireRequest>,
    wait: Wait,
    ttl: Option<Duration>,
    /// A ttl set by dblock itself (elections): not refused where there are
    /// no leases.
    default_ttl: Option<Duration>,
    mode: LockMode,
    hold_at_least: Option<Duration>,
    holder: Option<String>,
    max_holders: Option<u32>,
}

impl fmt::Debug for Acquire<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("request", &self.request)
            .field("wait", &self.wait)
            .field("ttl", &self.ttl)
            .field("mode", &self.mode)
            .field("max_holders", &self.max_holders)
            .finish()
    }
}

impl<'a> Acquire<'a> {
    /// The lease length (lease backends; default 30 s): a holder that stops
    /// renewing loses the lock this long after its last renewal. Must lie
    /// between 100 ms and 366 days.
    ///
    /// A backend without leases (`postgres::Advisory`, whose locks last as
    /// long as their session) cannot keep that promise and refuses an
    /// explicit ttl with [`Error::Unsupported`], before anything is sent to
    /// the database, as it refuses [`hold_at_least`](Self::hold_at_least).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// A lease length that a backend without leases ignores (elections).
    pub(crate) fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// Gives up with [`Error::Timeout`] after waiting this long. A zero wait
    /// tries once.
    ///
    /// On the lease backends this bounds the call even when the database
    /// stops answering or cannot be reached (a Galera view change, a
    /// failover, a black-holed connection, an exhausted pool): a claim still
    /// unanswered at the deadline, or 5 s after it was sent if that is later
    /// (1 s on Redis, whose client gives up on an answer after 3 s; a loaded
    /// server's disk stall is no reason to give up a claim), is
    /// left to finish on its own and gives back whatever it takes, and the
    /// call returns [`Error::Unavailable`].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Wait::For(wait);
        self
    }

    /// Asks for a shared (reader) lock: any number of readers hold the name
    /// together, each with its own guard and fencing token, and exclude a
    /// writer (an ordinary, exclusive acquisition). A writer waiting for
    /// readers keeps new readers out until it has had its turn, so readers
    /// cannot starve it (on every backend except
    /// [`postgres::Advisory`](crate::postgres::Advisory) waiting by
    /// polling). With [`hold_at_least`](Self::hold_at_least), a released
    /// reader keeps its share (writers out) until then.
    pub fn shared(mut self) -> Self {
        self.mode = LockMode::Shared;
        self
    }

    /// Keeps the lease until at least `acquired_at + d` even if released
    /// sooner, so that a scheduled job's slot runs once across nodes.
    pub fn hold_at_least(mut self, d: Duration) -> Self {
        self.hold_at_least = Some(d);
        self
    }

    /// Records `identity` as the lock's holder (what
    /// [`LockInfo::holder`] shows) instead of this process's `host:pid`;
    /// see [`AcquireRequest::with_holder`]. Leader election uses it.
    pub fn holder(mut self, identity: impl Into<String>) -> Self {
        self.holder = Some(identity.into());
        self
    }

    /// Takes a permit of a semaphore: up to `n` holders of the name at
    /// once, each with its own guard and fencing token, on every backend
    /// of this crate (on `postgres::Advisory`, each permit holds one of `n`
    /// slot keys; see its docs).
    /// `n` must lie between 1 and [`MAX_HOLDERS`](crate::MAX_HOLDERS); `1`
    /// is a plain lock. All holders of a name at one time must agree on
    /// `n`: an acquisition that finds it held with another `n` (a plain
    /// lock, or reader and writer locks, counting as 1) fails with
    /// [`Error::InvalidOption`]; once nothing holds the name, any `n` may
    /// take it. See [`AcquireRequest::with_max_holders`].
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::time::Duration;
    /// let locks = dblock::Locks::new(dblock::memory::Memory::new());
    /// let a = locks.acquire("export:tenant-7").max_holders(2).await?;
    /// let b = locks.acquire("export:tenant-7").max_holders(2).await?;
    /// let third = locks.acquire("export:tenant-7").max_holders(2).wait(Duration::ZERO).await;
    /// assert!(matches!(third, Err(dblock::Error::Timeout { .. })));
    /// assert!(b.token() > a.token());
    /// assert_eq!(locks.inspect("export:tenant-7").await?.unwrap().holders, 2);
    /// # Ok::<(), dblock::Error>(()) }).unwrap();
    /// ```
    pub fn max_holders(mut self, n: u32) -> Self {
        self.max_holders = Some(n);
        self
    }

    fn build(self, wait: Wait) -> Result<(&'a Locks, AcquireRequest)> {
        let mut request = self.request?.with_mode(self.mode).with_wait(wait)?;
        if let Some(n) = self.max_holders {
            request = request.with_max_holders(n)?;
        }
        if let Some(ttl) = self.ttl {
            request = request.with_ttl(ttl)?;
        } else if let Some(ttl) = self.default_ttl {
            request = request.with_default_ttl(ttl)?;
        }
        if let Some(d) = self.hold_at_least {
            request = request.with_hold_at_least(d)?;
        }
        if let Some(holder) = self.holder {
            request = request.with_holder(holder)?;
        }
        request.check_mode()?;
        Ok((self.locks, request))
    }

    /// The one acquisition path: every acquisition is a `debug` span
    /// `acquire` here, and counted in the metrics.
    async fn run(self, wait: Wait) -> Result<Option<LockGuard>> {
        let (locks, request) = self.build(wait)?;
        let name = request.shared_name().clone();
        let mode = request.mode;
        let backend = locks.backend.kind();
        let span = observe::debug_span!(
            "acquire",
            name = %name,
            backend,
            mode = mode.as_str(),
            max_holders = Empty,
            wait = ?request.wait,
            outcome = Empty,
            waited_s = Empty,
            token = Empty,
            error = Empty,
        );
        if request.max_holders > 1 {
            span.record("max_holders", request.max_holders);
        }
        // No clock read unless a span or the metrics want one.
        let started = observe::timing(&span).then(Instant::now);
        let acquiring = locks.backend.acquire(request);
        let result = if span.is_none() {
            acquiring.await
        } else {
            acquiring.instrument(span.clone()).await
        };
        let ended = started.map(|at| (at, Instant::now()));
        let waited = ended.map_or(Duration::ZERO, |(at, now)| now - at);
        let outcome = Outcome::of(&result);
        if !span.is_disabled() {
            span.record("outcome", outcome.as_str());
            span.record("waited_s", waited.as_secs_f64());
            match &result {
                Ok(Some(grant)) => {
                    span.record("token", grant.token);
                }
                Err(e) => {
                    span.record("error", tracing::field::display(e));
                }
                Ok(None) => {}
            }
            tracing::debug!(parent: &span, outcome = outcome.as_str(), "dblock: acquisition ended");
        }
        observe::acquisition(backend, outcome, waited);
        let grant = result?;
        Ok(grant.map(|g| LockGuard::new(name, mode, g, backend, ended.map(|(_, now)| now))))
    }

    /// Takes the lock as set up if it is free right now; `Ok(None)` if it
    /// is held (a `.wait(..)` set before is ignored). Never waits for the
    /// lock (it does wait for the database).
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped, no lock is left held (see [`Acquire`]).
    pub async fn try_now(self) -> Result<Option<LockGuard>> {
        self.run(Wait::No).await
    }

    /// Takes the lock as set up, runs `work` while it is held, and
    /// releases it: [`Locks::with_lock`] with this acquisition's options.
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped, `work` is dropped with it and the lock is
    /// released in the background.
    pub async fn with_lock<T>(self, work: impl AsyncFnOnce(&LockGuard) -> T) -> Result<T> {
        let guard = self.await?;
        let lost = guard.lost_owned();
        let out = tokio::select! {
            // A loss and an end of `work` seen together count as a loss.
            biased;
            _ = lost.lost() => None,
            out = work(&guard) => Some(out),
        };
        let Some(out) = out else {
            let loss = guard.loss().unwrap_or_else(|| {
                // Not marked lost: its backend's keeper of the lock is gone.
                Loss::new(LostReason::Other, "the lock's keeper ended")
            });
            return Err(Error::from_loss(guard.name(), loss));
        };
        guard.release().await?;
        Ok(out)
    }
}

impl<'a> IntoFuture for Acquire<'a> {
    type Output = Result<LockGuard>;
    type IntoFuture = BoxFuture<'a, Result<LockGuard>>;

    fn into_future(self) -> Self::IntoFuture {
        let wait = self.wait;
        Box::pin(async move {
            let name = self.request.as_ref().map(|r| r.shared_name().clone()).ok();
            match self.run(wait).await? {
                Some(guard) => Ok(guard),
                // A backend answers None only to Wait::No; treat it as an
                // immediate timeout rather than panic if one misbehaves.
                None => Err(Error::Timeout {
                    name: name.as_deref().unwrap_or_default().to_owned(),
                    waited: Duration::ZERO,
                }),
            }
        })
    }
}

// Compile-time checks that the facade can cross threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>(_: T) {}
    assert_send_sync::<Locks>();
    assert_send_sync::<LockGuard>();
    let _ = |l: Locks| assert_send(async move { l.acquire("x").await });
};
