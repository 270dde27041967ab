//! The lease protocol, written once.
//!
//! A lease is a row (or, for [`Memory`](crate::memory::Memory), a map entry)
//! that records who holds a name until when. Each store contributes only the
//! atomic operations of its dialect — claim, renew (one lease, or a batch),
//! release, inspect — while this module does everything around them:
//! waiting with backoff and in-process wake-ups, the background renewal,
//! the local deadline and the lost signal, `hold_at_least`, cancel safety.
//!
//! # Batched renewal
//!
//! A backend renews every lease its process holds with **one statement per
//! renewal tick**, not one per lease (see [`renewal`] for the details):
//!
//! - One renewal task per backend (per [`LeaseEngine`], shared by its
//!   clones) keeps a timetable of the leases held through it. It wakes when
//!   the earliest lease is due (ttl/3 after its last confirmed renewal) and
//!   sends one `renew_many` for every lease due within half of its own
//!   renewal period, each with its own ttl. Leases of one ttl therefore fall
//!   into step after their first renewal and share every tick; a lease of a
//!   longer ttl is renewed at most twice as often as it needs.
//! - The store answers per lease: renewed (with its new expiry), gone (the
//!   lease is no longer ours: expired, released, broken, taken over) or
//!   unknown. Only the gone leases are marked lost. A statement that fails
//!   leaves every lease in it unconfirmed: each retries shortly and is
//!   marked lost at its own local deadline (ttl minus a margin, on the
//!   monotonic clock from before the last confirmed request).
//! - `extend` stays an immediate single-lease renewal and release stays per
//!   lease. An extend waits for a batch that holds its lease to finish (so
//!   a batch sent with the old ttl cannot land after it), and the batch
//!   skips a lease being extended. A release does not wait: the batch
//!   statement renews only a row whose owner, token and unexpired lease
//!   still match, and every store's release clears the owner or ends the
//!   lease, so a batch landing after a release cannot revive it.
//! - No task per lease: a held lease is an entry in the task's timetable
//!   (a few hundred bytes with its status channel). The task stops 5 s
//!   after the last grant once nothing is held through the backend, and
//!   starts again with the next grant; an uncontended acquire and release
//!   neither starts it nor wakes it.
//!
//! # No task hand-offs
//!
//! An acquisition claims from the caller's task, and a release or extend
//! runs there too: no task is spawned per call and no answer crosses
//! threads. Cancel safety is kept by [`Detached`]: if the caller's future
//! is dropped while a statement is in flight, the rest of it runs in a task
//! of its own, where a claim that went through is given back (by owner and
//! token; the owner id is random and unique to the acquisition) and a
//! release or extend is recorded in the timetable.
//! - A huge batch is cut into a few statements only where the dialect
//!   needs it ([`LeaseStore::batch_len`]): MySQL at half the server's
//!   `max_allowed_packet`, the others at 250,000 leases.
//! - Renewal shares the application's pool: a batch waits for a connection
//!   like any statement. Needing one connection per tick instead of one per
//!   lease, it is far less exposed than per-lease renewal was, but a pool
//!   kept saturated for longer than a lease's margin still costs leases.

#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) mod doorbell;
pub(crate) mod permits;
mod renewal;
mod wakeups;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::time::{sleep_until, Instant};

use crate::backend::{BoxFuture, Grant};
use crate::detach::Detached;
use crate::{AcquireRequest, Error, LockInfo, LockMode, Result, Wait};

pub use renewal::RenewalStats;
pub(crate) use wakeups::Wakeups;

/// One attempt to take a lease.
pub(crate) struct Claim<'a> {
    pub name: &'a str,
    pub owner: &'a str,
    pub holder: &'a str,
    pub mode: LockMode,
    pub ttl: Duration,
    /// How many holders the name admits: 1 for a plain (or reader or
    /// writer) lease, `n` for a permit of a semaphore (see [`permits`]).
    pub max_holders: u32,
    /// For a writer (a plain exclusive claim) that will wait if it misses:
    /// how long the mark it leaves on a name held by readers lasts (see
    /// [`permits`], "Readers"). `None` for a try, a reader or a permit.
    pub writer_waits: Option<Duration>,
    /// Whether the acquirer has gone away. A store that waits for a pooled
    /// connection checks it once it has one, and claims nothing (answers
    /// `None`) if so: a cancelled acquisition must not go on to take the
    /// lease after waiting its turn for a connection.
    pub abandoned: &'a (dyn Fn() -> bool + Send + Sync),
}

impl fmt::Debug for Claim<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("holder", &self.holder)
            .field("mode", &self.mode)
            .field("ttl", &self.ttl)
            .field("max_holders", &self.max_holders)
            .field("writer_waits", &self.writer_waits)
            .finish_non_exhaustive()
    }
}

impl Claim<'_> {
    /// Whether the claim is for a holder row (a permit of a semaphore, or a
    /// reader) rather than a plain lease.
    pub(crate) fn is_holder(&self) -> bool {
        self.max_holders > 1 || self.mode == LockMode::Shared
    }
}

/// A lease the store granted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claimed {
    pub token: u64,
    pub expires_at: DateTime<Utc>,
}

/// Which lease a renewal or a release is for: the name, and the owner and
/// token it was granted to. It is still theirs while both match and it has
/// not expired.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseId<'a> {
    pub name: &'a str,
    pub owner: &'a str,
    pub token: u64,
}

/// One lease of a batch renewal: renew it to `ttl` from now if `owner` and
/// `token` still hold it and it has not expired.
#[derive(Debug, Clone)]
pub(crate) struct Renewal {
    pub name: Arc<str>,
    pub owner: Arc<str>,
    pub token: u64,
    pub ttl: Duration,
}

impl Renewal {
    /// The lease this renewal is for.
    pub(crate) fn lease(&self) -> LeaseId<'_> {
        LeaseId {
            name: &self.name,
            owner: &self.owner,
            token: self.token,
        }
    }
}

/// What renewing one lease answers: its new expiry by the store's clock,
/// or `None` if it is no longer its owner's (released, expired, broken or
/// taken over).
pub(crate) type NewExpiry = Result<Option<DateTime<Utc>>>;

/// What a batch renewal found for one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewed {
    /// Renewed: the lease now runs until then, by the store's clock.
    Until(DateTime<Utc>),
    /// No longer ours: released, expired, broken or taken over.
    Gone,
    /// Not known (the row was busy in another transaction, say): try again.
    Unknown,
}

/// Rows per batch statement unless a store says otherwise: large enough
/// for 100,000 leases in one statement, small enough that one statement's
/// parameters stay in the tens of megabytes.
pub(crate) const DEFAULT_MAX_BATCH: usize = 250_000;

/// The dialect of one database: each operation is atomic on its own and
/// decides expiry by the store's clock, never the caller's. Every store
/// implements shared (reader) leases and the permits of semaphores (see
/// [`permits`]): claims with `max_holders > 1`, and the renewals and
/// releases of holder rows, which the engine sends to
/// [`renew_permit`](Self::renew_permit) and
/// [`release_permit`](Self::release_permit) (see [`permits::renew`]).
pub(crate) trait LeaseStore: Send + Sync + fmt::Debug + 'static {
    /// The backend's name for messages.
    fn kind(&self) -> &'static str;

    /// Takes the lease if it is free (never held, released, or expired by
    /// the store's clock). `None` if someone else holds it.
    fn claim(&self, claim: &Claim<'_>) -> impl Future<Output = Result<Option<Claimed>>> + Send;

    /// Pushes the expiry of a plain lease to `ttl` from now if its owner and
    /// token still hold it and it has not expired. `None` if it is no
    /// longer theirs.
    fn renew(&self, lease: LeaseId<'_>, ttl: Duration) -> impl Future<Output = NewExpiry> + Send;

    /// [`renew`](Self::renew) for a holder row (a permit of a semaphore or
    /// a reader, see [`permits`]). By default `renew` itself, for a store
    /// that keeps holder rows with the plain leases.
    fn renew_permit(
        &self,
        lease: LeaseId<'_>,
        ttl: Duration,
    ) -> impl Future<Output = NewExpiry> + Send {
        self.renew(lease, ttl)
    }

    /// Renews every lease of `batch` that is still held by its owner and
    /// token and has not expired, each to its own ttl from now, in as few
    /// statements as the dialect allows (one where it can). Returns one
    /// answer per lease, in order. An error means nothing is known about
    /// any of them: some may have been renewed.
    ///
    /// A lease released meanwhile must not be renewed: release leaves the
    /// row with no owner, or expired, or (with `hold`) marked so that the
    /// conditions here refuse it.
    fn renew_many(&self, batch: &[Renewal]) -> impl Future<Output = Result<Vec<Renewed>>> + Send;

    /// [`renew_many`](Self::renew_many) for holder rows (permits of
    /// semaphores and readers, see [`permits`]): every owner in `batch` is
    /// one. By default one [`renew_permit`](Self::renew_permit) each; a
    /// store that can renew them together overrides it.
    fn renew_holders(
        &self,
        batch: &[Renewal],
    ) -> impl Future<Output = Result<Vec<Renewed>>> + Send {
        async move {
            let mut answers = Vec::with_capacity(batch.len());
            for r in batch {
                answers.push(match self.renew_permit(r.lease(), r.ttl).await? {
                    Some(at) => Renewed::Until(at),
                    None => Renewed::Gone,
                });
            }
            Ok(answers)
        }
    }

    /// How many of the leading leases of `batch` (never empty) one
    /// `renew_many` call should take: all of them unless the dialect limits
    /// the size of one statement. At least 1.
    fn batch_len(&self, batch: &[Renewal]) -> usize {
        batch.len().min(DEFAULT_MAX_BATCH)
    }

    /// Ends a plain lease if its owner and token still hold it; with
    /// `hold`, the lease stays until `acquired_at + hold` if that is later
    /// than now. Either way a later renewal (single or batch) must refuse
    /// it. Returns whether the lease was still theirs.
    fn release(
        &self,
        lease: LeaseId<'_>,
        hold: Option<Duration>,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// [`release`](Self::release) for a holder row (a permit of a semaphore
    /// or a reader, see [`permits`]). By default `release` itself, for a
    /// store that keeps holder rows with the plain leases.
    fn release_permit(
        &self,
        lease: LeaseId<'_>,
        hold: Option<Duration>,
    ) -> impl Future<Output = Result<bool>> + Send {
        self.release(lease, hold)
    }

    /// Ends whoever's lease on `name` (an operator breaking a stuck lock).
    fn force_release(&self, name: &str) -> impl Future<Output = Result<bool>> + Send;

    /// The live lease on `name`, if any.
    fn inspect(&self, name: &str) -> impl Future<Output = Result<Option<LockInfo>>> + Send;

    /// Every live lease.
    fn list(&self) -> impl Future<Output = Result<Vec<LockInfo>>> + Send;

    /// Deletes up to [`SWEEP_BATCH`] rows whose lease ended more than
    /// `grace` ago by the store's clock (released or expired), and answers
    /// how many it deleted. Only a store whose tokens do not depend on the
    /// row (they come from a per-database counter) may delete rows; the
    /// default deletes nothing. The engine calls it in the background,
    /// `grace` after a release, at most once per `grace`.
    fn sweep(&self, grace: Duration) -> impl Future<Output = Result<u64>> + Send {
        let _ = grace;
        std::future::ready(Ok(0))
    }
    /// The store's clock now: the one every expiry is decided by.
    fn now(&self) -> impl Future<Output = Result<DateTime<Utc>>> + Send;

    /// How long a claim still in flight when an acquisition's wait ends may
    /// go on before the acquisition gives up on it (the claim then finishes
    /// in a task of its own and gives back what it takes). A store whose
    /// client abandons an answer after a timeout of its own answers less
    /// than that timeout, or a claim that lands late would be left unowned.
    fn claim_grace(&self) -> Duration {
        CLAIM_GRACE
    }

    /// Called each time an acquisition is about to wait for a lease held
    /// elsewhere. A store with a push channel for releases (PostgreSQL's
    /// LISTEN/NOTIFY) makes sure it is listening; it must not block.
    fn waiting(&self) {}

    /// Resolves when a release of `name` elsewhere (another process) may
    /// have happened: a store without a push channel rings a doorbell (see
    /// [`doorbell`]). Awaited beside the in-process wake-up and the poll
    /// timer while waiting, created after a failed claim; dropping it stops
    /// watching. Never resolves by default.
    fn released(&self, name: &str) -> impl Future<Output = ()> + Send {
        let _ = name;
        std::future::pending()
    }
}

/// How long a lease row is kept after its lease ended before a sweep may
/// delete it. A claim whose token was drawn before another holder's whole
/// claim and release (a server process stalled for this long between the
/// two halves of one statement) would otherwise create a fresh row with a
/// token below that holder's; while the ended row exists, such a claim
/// takes it over with a freshly drawn token instead.
pub(crate) const SWEEP_GRACE: Duration = Duration::from_secs(2);

/// The most rows one sweep statement deletes.
pub(crate) const SWEEP_BATCH: u64 = 10_000;

/// How the lease machinery waits and renews; the defaults suit most uses.
///
/// Built from [`Default`] with the builder methods, so that options added
/// later do not break existing code; given to `with_options` of any lease
/// backend ([`memory::Memory`](crate::memory::Memory), `postgres::Lease`,
/// `mysql::Lease`, `sqlite::Lease`, `redis::Lease`), which checks it.
///
/// ```
/// use std::time::Duration;
/// let options = dblock::LeaseOptions::default()
///     .min_poll(Duration::from_millis(10))
///     .max_poll(Duration::from_secs(1));
/// let backend = dblock::memory::Memory::new().with_options(options)?;
/// # let _ = backend;
/// # Ok::<(), dblock::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LeaseOptions {
    /// The first pause between two claim attempts while waiting; it doubles
    /// on each miss up to `max_poll` (and never beyond the ttl), with jitter.
    pub min_poll: Duration,
    /// The longest pause between two claim attempts while waiting: the
    /// bound on how late a waiter in another process notices a release.
    pub max_poll: Duration,
}

impl LeaseOptions {
    /// Sets [`min_poll`](Self::min_poll): the first pause between two claim
    /// attempts while waiting. Must be positive and at most `max_poll`
    /// (checked by `with_options`).
    pub fn min_poll(mut self, d: Duration) -> Self {
        self.min_poll = d;
        self
    }

    /// Sets [`max_poll`](Self::max_poll): the longest pause between two
    /// claim attempts while waiting.
    pub fn max_poll(mut self, d: Duration) -> Self {
        self.max_poll = d;
        self
    }
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            min_poll: Duration::from_millis(5),
            max_poll: Duration::from_millis(250),
        }
    }
}

/// Appends `s` to `out` as a JSON string literal (quoted and escaped), for
/// the stores that bind a batch as one JSON document.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("a string is always valid JSON"));
}

/// The background renewal period for a lease of `ttl`.
pub(crate) fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// How much earlier than the lease's end a guard gives up on it: the time
/// allowed for the lost signal to reach the holder, and for clock rates to
/// differ, before the database may hand the name to someone else.
pub(crate) fn safety_margin(ttl: Duration) -> Duration {
    ttl / 5
}

/// How long a waiting writer's mark lasts (see [`Claim::writer_waits`]):
/// past its next try, which comes at most `max_poll` (or the ttl) later,
/// with room for a slow claim; a writer that went away stops blocking
/// readers this long after its last try.
fn writer_mark(options: &LeaseOptions, ttl: Duration) -> Duration {
    2 * options.max_poll.min(ttl) + Duration::from_secs(1)
}

/// A fresh random owner id: 128 bits, hex.
pub(crate) fn new_owner() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// `host:pid`, recorded with each lease so an operator can see who holds it.
pub(crate) fn this_holder() -> String {
    let host = hostname::get()
        .ok()
        .map(|h| h.to_string_lossy().trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// A poll's pause, jittered: 50-100 % of `d`.
fn jitter(d: Duration) -> Duration {
    crate::retry::jitter(d, 0.5)
}

/// The generic lease backend over one store.
pub(crate) struct LeaseEngine<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for LeaseEngine<S> {
    fn clone(&self) -> Self {
        LeaseEngine {
            inner: self.inner.clone(),
        }
    }
}

impl<S: LeaseStore> fmt::Debug for LeaseEngine<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseEngine")
            .field("store", &self.inner.store)
            .field("options", &self.inner.options)
            .finish()
    }
}

struct Inner<S> {
    store: S,
    wakeups: Arc<Wakeups>,
    holder: String,
    options: LeaseOptions,
    renewals: renewal::Renewals,
    /// A sweep task is scheduled or running.
    sweeping: AtomicBool,
    /// A lease ended since the running sweep task last looked.
    sweep_due: AtomicBool,
}

/// Has ended rows deleted `SWEEP_GRACE` from now, in the background, unless
/// a sweep is scheduled already; one sweep task per engine at a time.
fn schedule_sweep<S: LeaseStore>(inner: &Arc<Inner<S>>) {
    inner.sweep_due.store(true, Ordering::Release);
    if inner.sweeping.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        inner.sweeping.store(false, Ordering::Release);
        return;
    };
    let weak = Arc::downgrade(inner);
    runtime.spawn(async move {
        loop {
            // Leases that end from now on are seen by the next round.
            match weak.upgrade() {
                Some(inner) => inner.sweep_due.store(false, Ordering::Release),
                None => return,
            }
            tokio::time::sleep(SWEEP_GRACE + Duration::from_millis(100)).await;
            let Some(inner) = weak.upgrade() else { return };
            loop {
                match inner.store.sweep(SWEEP_GRACE).await {
                    Ok(n) if n >= SWEEP_BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "dblock: sweeping ended leases failed");
                        break;
                    }
                }
            }
            // Go on if a lease ended meanwhile and nobody else took over.
            inner.sweeping.store(false, Ordering::Release);
            if !inner.sweep_due.load(Ordering::Acquire)
                || inner.sweeping.swap(true, Ordering::AcqRel)
            {
                return;
            }
        }
    });
}

impl<S: LeaseStore> LeaseEngine<S> {
    /// A fresh engine over `store` with `options`, after checking them:
    /// [`Error::InvalidOption`] unless `0 < min_poll <= max_poll`. Every
    /// backend's constructors and `with_options` build their engine here, so
    /// options never change under a clone already in use.
    pub(crate) fn new(store: S, wakeups: Arc<Wakeups>, options: LeaseOptions) -> Result<Self> {
        if options.min_poll.is_zero() || options.min_poll > options.max_poll {
            return Err(Error::InvalidOption(format!(
                "poll bounds must satisfy 0 < min_poll <= max_poll (got {:?} and {:?})",
                options.min_poll, options.max_poll
            )));
        }
        Ok(LeaseEngine {
            inner: Arc::new(Inner {
                store,
                wakeups,
                holder: this_holder(),
                options,
                renewals: renewal::Renewals::default(),
                sweeping: AtomicBool::new(false),
                sweep_due: AtomicBool::new(false),
            }),
        })
    }

    /// The in-process wake-ups this engine's releases ring.
    pub(crate) fn wakeups(&self) -> Arc<Wakeups> {
        self.inner.wakeups.clone()
    }

    pub(crate) fn store(&self) -> &S {
        &self.inner.store
    }

    /// The options the engine was built with.
    pub(crate) fn options(&self) -> &LeaseOptions {
        &self.inner.options
    }

    /// Counters of the background renewal, for tests and measurements.
    pub(crate) fn renewal_stats(&self) -> RenewalStats {
        self.inner.renewals.stats()
    }

    pub(crate) fn acquire(&self, request: AcquireRequest) -> BoxFuture<'_, Result<Option<Grant>>> {
        Box::pin(acquire(self.inner.clone(), request))
    }

    pub(crate) fn inspect<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LockInfo>>> {
        Box::pin(self.inner.store.inspect(name))
    }

    pub(crate) fn list(&self) -> BoxFuture<'_, Result<Vec<LockInfo>>> {
        Box::pin(self.inner.store.list())
    }

    pub(crate) fn now(&self) -> BoxFuture<'_, Result<DateTime<Utc>>> {
        Box::pin(self.inner.store.now())
    }

    pub(crate) fn force_release<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let broken = self.inner.store.force_release(name).await?;
            self.inner.wakeups.wake(name);
            Ok(broken)
        })
    }
}

/// A lease just claimed. Dropped without [`Taken::keep`] (its acquisition
/// went away while the claim was in flight, or it came too late to hand
/// out), it is given back in the background, by owner and token: the owner
/// id is random and unique to the acquisition.
struct Taken<S: LeaseStore> {
    inner: Arc<Inner<S>>,
    name: Arc<str>,
    owner: Arc<str>,
    claimed: Option<Claimed>,
}

impl<S: LeaseStore> Taken<S> {
    fn keep(mut self) -> Claimed {
        self.claimed.take().expect("a lease is kept once")
    }

    /// Gives the lease back (to be awaited; if dropped, it finishes in a
    /// task of its own), and wakes this process's waiters for the name.
    fn give_back(mut self) -> Detached<()> {
        let claimed = self.claimed.take();
        let (inner, name, owner) = (self.inner.clone(), self.name.clone(), self.owner.clone());
        Detached::new(async move {
            let Some(claimed) = claimed else { return };
            let lease = LeaseId {
                name: &name,
                owner: &owner,
                token: claimed.token,
            };
            let released = permits::release(&inner.store, lease, None).await;
            inner.wakeups.wake(&name);
            tracing::debug!(released = ?released.as_ref().ok(),
                "dblock: a lease claimed but not handed out was given back");
        })
    }
}

impl<S: LeaseStore> Drop for Taken<S> {
    fn drop(&mut self) {
        if self.claimed.is_some() {
            let take = Taken {
                inner: self.inner.clone(),
                name: self.name.clone(),
                owner: self.owner.clone(),
                claimed: self.claimed.take(),
            };
            // Dropped unpolled, a detached future runs in a task of its own.
            drop(take.give_back());
        }
    }
}

/// Sets a flag when dropped: the acquisition has gone away.
struct MarkGone(Arc<AtomicBool>);

impl Drop for MarkGone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// One claim attempt, awaited in the caller's task. If the acquisition is
/// dropped while the claim is in flight, the claim finishes in a task of
/// its own (see [`Detached`]): a store that has not sent it yet sees `gone`
/// and claims nothing, and a lease it did claim is given back when its
/// [`Taken`] is dropped there.
fn claim_attempt<S: LeaseStore>(
    inner: &Arc<Inner<S>>,
    request: &AcquireRequest,
    owner: &Arc<str>,
    gone: &Arc<AtomicBool>,
) -> Detached<Result<Option<Taken<S>>>> {
    let (inner, owner, gone) = (inner.clone(), owner.clone(), gone.clone());
    let name = request.shared_name().clone();
    let (mode, ttl, max_holders) = (request.mode(), request.ttl(), request.max_holders());
    let writer_waits =
        (mode == LockMode::Exclusive && max_holders == 1 && !matches!(request.wait(), Wait::No))
            .then(|| writer_mark(&inner.options, ttl));
    // The holder recorded with the lease: the request's identity (a leader
    // election's candidate) or this process's `host:pid`.
    let holder: Option<Arc<str>> = request.holder().map(Into::into);
    Detached::new(async move {
        let abandoned = || gone.load(Ordering::Acquire);
        let claim = Claim {
            name: &name,
            owner: &owner,
            holder: holder.as_deref().unwrap_or(&inner.holder),
            mode,
            ttl,
            max_holders,
            writer_waits,
            abandoned: &abandoned,
        };
        let claimed = inner.store.claim(&claim).await?;
        Ok(claimed.map(|claimed| Taken {
            inner: inner.clone(),
            name: name.clone(),
            owner: owner.clone(),
            claimed: Some(claimed),
        }))
    })
}

/// How long a claim sent just before an acquisition's deadline may take
/// past it, unless its store says less (`LeaseStore::claim_grace`): an
/// acquisition with a wait returns within its wait plus this, even if the
/// database stops answering. Long enough for a loaded server's
/// disk stall (the test suite saw a MariaDB claim take over a second, which
/// turned a `dblock cron` slot into a skip when this was 1 s), short enough
/// to bound a stalled one (a Galera view change held claims for 13 s).
const CLAIM_GRACE: Duration = Duration::from_secs(5);

/// The acquisition's wait ran out.
fn timed_out(name: &str, wait: Wait) -> Error {
    Error::Timeout {
        name: name.to_owned(),
        waited: match wait {
            Wait::For(d) => d,
            _ => Duration::ZERO,
        },
    }
}

/// The acquisition loop, run in the caller's task: claim, and while the
/// name is busy and the request allows, wait for a wake-up or the next
/// poll and claim again.
async fn acquire<S: LeaseStore>(
    inner: Arc<Inner<S>>,
    request: AcquireRequest,
) -> Result<Option<Grant>> {
    // An uncontended claim may answer without ever waiting (Memory): a
    // loop of them must still let the runtime run other tasks.
    tokio::task::coop::consume_budget().await;
    let owner: Arc<str> = permits::owner_for(request.max_holders(), request.mode()).into();
    let gone = Arc::new(AtomicBool::new(false));
    let _mark_gone = MarkGone(gone.clone());
    let name = request.name();
    let ttl = request.ttl();
    // A plain acquisition checks once, at its first miss, that the name is
    // not held as a semaphore (a permit claim checks that itself).
    let mut checked = request.is_permit();
    let deadline = match request.wait() {
        Wait::For(d) => Some(Instant::now() + d),
        _ => None,
    };
    // With a wait, the acquisition ends by its deadline plus the store's
    // claim grace whatever the database does: every statement it awaits is
    // bounded by this (the claim more tightly, see below).
    let limit = deadline.map(|d| d + inner.store.claim_grace());
    // A try (`Wait::No`) never waits, so it needs no wake-ups.
    let subscription = match request.wait() {
        Wait::No => None,
        _ => Some(inner.wakeups.subscribe(name)),
    };
    let cap = inner.options.max_poll.min(ttl);
    let mut pause = inner.options.min_poll.min(cap);
    loop {
        // Armed before the attempt, so a release between the attempt and
        // the wait is not missed.
        let notified = subscription.as_ref().map(|s| s.notified());
        let mut notified = std::pin::pin!(notified);
        if let Some(n) = notified.as_mut().as_pin_mut() {
            n.enable();
        }

        let sent_at = Instant::now();
        let attempt = claim_attempt(&inner, &request, &owner, &gone);
        let taken = match deadline {
            // A database that stalls or is down (a Galera view change, a
            // failover, a black-holed connection, no connection to be had)
            // must not keep the caller far past its wait: a claim still
            // unanswered at the deadline (or CLAIM_GRACE after it was sent,
            // if later) is left to finish in a task of its own, which gives
            // back a lease it takes, and the acquisition ends with
            // `Unavailable` (not `Timeout`: nobody was seen holding it).
            Some(deadline) => {
                let grace = inner.store.claim_grace();
                let bound = deadline.max(sent_at + grace);
                match tokio::time::timeout_at(bound, attempt).await {
                    Ok(answer) => answer?,
                    Err(_) => {
                        return Err(Error::Unavailable(format!(
                            "no answer from the database to the claim of {name:?} within {:?} \
                             (the acquisition's wait, or {grace:?} for a claim sent just before \
                             it ended); the claim finishes on its own and gives back what it takes",
                            bound - sent_at
                        )))
                    }
                }
            }
            None => attempt.await?,
        };
        if let Some(taken) = taken {
            // The claim (its wait for a connection and its retries
            // included) took longer than the lease's safety margin: its
            // local deadline has passed already, so it is no lease to
            // hand out. Give it back and try again while the wait allows.
            let took = sent_at.elapsed();
            if took < ttl - safety_margin(ttl) {
                // No await from the claim's answer to the grant: once
                // claimed, the lease is in the timetable and the grant's
                // guard owns it.
                let claimed = taken.keep();
                return Ok(Some(grant(&inner, &request, owner, claimed, sent_at)));
            }
            // Boxed, as the other rare paths below: the uncontended claim's
            // future should neither carry nor copy their state. Not awaited
            // past the limit (it then finishes in a task of its own): a
            // claim that came back late often means a server going away.
            within(limit, Box::pin(taken.give_back())).await;
            tracing::debug!(
                ?took,
                ?ttl,
                "dblock: a lease claimed past its local deadline was given back"
            );
            let out_of_time = match (request.wait(), deadline) {
                (Wait::No, _) => true,
                (_, Some(deadline)) => Instant::now() >= deadline,
                (_, None) => false,
            };
            if out_of_time {
                return Err(Error::lost(
                    name,
                    crate::LostReason::Expired,
                    format!(
                        "the claim took {took:?}, past the lease's local deadline \
                         (ttl {ttl:?} minus its safety margin); it was given back"
                    ),
                ));
            }
            continue;
        }
        if !checked {
            checked = true;
            // A holder the store cannot describe (a foreign value, a read
            // that failed) is no semaphore it knows: wait as before.
            let inspected = within(limit, Box::pin(inner.store.inspect(name))).await;
            match inspected.unwrap_or_else(|| {
                Err(Error::Unavailable(
                    "no answer within the acquisition's wait".into(),
                ))
            }) {
                Ok(found) => {
                    if let Some(e) = permits::refusal(name, request.max_holders(), found.as_ref()) {
                        return Err(e);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "dblock: could not inspect a held name"),
            }
        }
        let now = Instant::now();
        let wake_at = match (request.wait(), deadline) {
            (Wait::No, _) => return Ok(None),
            (_, Some(deadline)) if now >= deadline => return Err(timed_out(name, request.wait())),
            (_, Some(deadline)) => deadline.min(now + jitter(pause)),
            (_, None) => now + jitter(pause),
        };
        inner.store.waiting();
        // The one place an acquisition waits: a release in this process (or
        // one a store's push channel reports), or the next poll.
        let woken = async {
            match notified.as_mut().as_pin_mut() {
                Some(notified) => notified.await,
                None => std::future::pending().await,
            }
        };
        Box::pin(async {
            tokio::select! {
                _ = woken => {}
                _ = inner.store.released(name) => {}
                _ = sleep_until(wake_at) => {}
            }
        })
        .await;
        pause = (pause * 2).min(cap);
    }
}

/// Awaits `work` until `limit` (for ever without one); `None` if the limit
/// came first (`work` is dropped: it must be cancel safe).
async fn within<T>(limit: Option<Instant>, work: impl Future<Output = T>) -> Option<T> {
    match limit {
        Some(limit) => tokio::time::timeout_at(limit, work).await.ok(),
        None => Some(work.await),
    }
}

/// Puts a claimed lease in the renewal timetable and builds its grant.
fn grant<S: LeaseStore>(
    inner: &Arc<Inner<S>>,
    request: &AcquireRequest,
    owner: Arc<str>,
    claimed: Claimed,
    sent_at: Instant,
) -> Grant {
    let (status, pending) = Grant::status(Some(claimed.expires_at));
    let held = renewal::register(
        inner,
        renewal::NewLease {
            name: request.shared_name().clone(),
            owner,
            token: claimed.token,
            hold: request.hold_at_least(),
            ttl: request.ttl(),
            status,
        },
        sent_at,
    );
    pending.grant(claimed.token, Box::new(held))
}

/// Implements [`Backend`](crate::Backend) for a public wrapper around a
/// [`LeaseEngine`] stored in its field `engine`.
macro_rules! lease_backend {
    ($ty:ty) => {
        impl $ty {
            /// Counters of the batched background renewal: ticks, batch
            /// statements, leases renewed. For tests and measurements; not
            /// a stable interface.
            #[doc(hidden)]
            pub fn renewal_stats(&self) -> $crate::__unstable::RenewalStats {
                self.engine.renewal_stats()
            }
        }

        impl $crate::Backend for $ty {
            fn kind(&self) -> &'static str {
                $crate::lease::LeaseStore::kind(self.engine.store())
            }
            fn acquire(
                &self,
                request: $crate::AcquireRequest,
            ) -> $crate::backend::BoxFuture<'_, $crate::Result<Option<$crate::Grant>>> {
                self.engine.acquire(request)
            }
            fn inspect<'a>(
                &'a self,
                name: &'a str,
            ) -> $crate::backend::BoxFuture<'a, $crate::Result<Option<$crate::LockInfo>>> {
                self.engine.inspect(name)
            }
            fn list(
                &self,
            ) -> $crate::backend::BoxFuture<'_, $crate::Result<Vec<$crate::LockInfo>>> {
                self.engine.list()
            }
            fn force_release<'a>(
                &'a self,
                name: &'a str,
            ) -> $crate::backend::BoxFuture<'a, $crate::Result<bool>> {
                self.engine.force_release(name)
            }
            fn now(
                &self,
            ) -> $crate::backend::BoxFuture<'_, $crate::Result<chrono::DateTime<chrono::Utc>>> {
                self.engine.now()
            }
        }
    };
}
pub(crate) use lease_backend;

#[cfg(all(test, any(feature = "sqlite", feature = "mysql")))]
mod tests {
    use super::push_json_str;

    #[test]
    fn json_strings_are_quoted_and_escaped() {
        let text = "a\"b\\c\n\u{1}\u{7f}é🔒'";
        let mut out = String::from("[");
        push_json_str(&mut out, text);
        out.push(']');
        assert_eq!(out, "[\"a\\\"b\\\\c\\n\\u0001\u{7f}é🔒'\"]");
        let back: Vec<String> = serde_json::from_str(&out).unwrap();
        assert_eq!(back, [text]);
    }
}

/// An acquisition with a wait ends by its deadline plus the claim grace,
/// whatever the statements after its claim do.
#[cfg(test)]
mod bounded_wait {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use chrono::{DateTime, Utc};
    use tokio::time::Instant;

    use super::*;
    use crate::memory::MemoryStore;
    use crate::{AcquireRequest, Error, LockInfo};

    /// The memory store, whose inspections and releases can be made to
    /// never answer, and whose claims to take a while first.
    #[derive(Debug, Default)]
    struct Stalling {
        store: MemoryStore,
        stall: Arc<AtomicBool>,
        slow_claims: Arc<AtomicBool>,
    }

    impl Stalling {
        async fn stalled(&self) {
            if self.stall.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        }
    }

    impl LeaseStore for Stalling {
        fn kind(&self) -> &'static str {
            "stalling"
        }
        async fn claim(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
            if self.slow_claims.load(Ordering::SeqCst) {
                // Past the lease's safety margin (ttl 1 s): given back.
                tokio::time::sleep(Duration::from_millis(950)).await;
            }
            self.store.claim(claim).await
        }
        async fn renew(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
            self.store.renew(lease, ttl).await
        }
        async fn renew_many(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
            self.store.renew_many(batch).await
        }
        async fn release(&self, lease: LeaseId<'_>, hold: Option<Duration>) -> Result<bool> {
            self.stalled().await;
            self.store.release(lease, hold).await
        }
        async fn force_release(&self, name: &str) -> Result<bool> {
            self.store.force_release(name).await
        }
        async fn inspect(&self, name: &str) -> Result<Option<LockInfo>> {
            self.stalled().await;
            self.store.inspect(name).await
        }
        async fn list(&self) -> Result<Vec<LockInfo>> {
            self.store.list().await
        }
        async fn now(&self) -> Result<DateTime<Utc>> {
            self.store.now().await
        }
    }

    fn engine() -> (LeaseEngine<Stalling>, Arc<AtomicBool>, Arc<AtomicBool>) {
        let store = Stalling::default();
        let (stall, slow) = (store.stall.clone(), store.slow_claims.clone());
        let engine = LeaseEngine::new(store, Wakeups::new(), LeaseOptions::default()).unwrap();
        (engine, stall, slow)
    }

    fn request(name: &str, wait: Duration) -> AcquireRequest {
        AcquireRequest::new(name)
            .unwrap()
            .with_ttl(Duration::from_secs(1))
            .unwrap()
            .with_wait(Wait::For(wait))
            .unwrap()
    }

    /// The acquisition's outcome and how long it took; fails if it is
    /// still running well past its limit.
    async fn timed(
        engine: &LeaseEngine<Stalling>,
        name: &str,
        wait: Duration,
    ) -> (Result<Option<Grant>>, Duration) {
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            wait + CLAIM_GRACE + Duration::from_secs(10),
            engine.acquire(request(name, wait)),
        )
        .await
        .expect("the acquisition overran its wait and the claim grace");
        (outcome, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn an_inspection_that_never_answers_ends_at_the_limit() {
        let (engine, stall, _) = engine();
        let held = engine
            .acquire(request("busy", Duration::from_secs(1)))
            .await
            .unwrap()
            .expect("free");
        stall.store(true, Ordering::SeqCst);
        let wait = Duration::from_secs(2);
        let (outcome, took) = timed(&engine, "busy", wait).await;
        assert!(matches!(outcome, Err(Error::Timeout { .. })), "{outcome:?}");
        assert!(took <= wait + CLAIM_GRACE, "ended after {took:?}");
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_give_back_that_never_answers_ends_at_the_limit() {
        let (engine, stall, slow) = engine();
        slow.store(true, Ordering::SeqCst);
        stall.store(true, Ordering::SeqCst);
        let wait = Duration::from_millis(500);
        let (outcome, took) = timed(&engine, "late", wait).await;
        // The claim answered after the lease's margin: given back (which
        // never answers), and out of wait.
        assert!(matches!(outcome, Err(Error::Lost { .. })), "{outcome:?}");
        assert!(took <= wait + CLAIM_GRACE, "ended after {took:?}");
    }
}
