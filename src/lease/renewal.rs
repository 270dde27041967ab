//! The background renewal of every lease a backend holds, in batches.
//!
//! One task per [`LeaseEngine`](super::LeaseEngine) keeps a timetable of the
//! leases held through it:
//!
//! - `due`: when each idle lease should next be renewed (ttl/3 after the
//!   request that last renewed it);
//! - `deadlines`: when each live lease must be given up (its local
//!   deadline: ttl minus a safety margin after that same request).
//!
//! The task sleeps until the earliest of the two. At a deadline, it marks
//! that lease lost. When a lease is due, it takes every lease due within
//! half of its own renewal period out of `due` and hands them, as one
//! batch, to a short-lived task that sends them in one
//! [`renew_many`](super::LeaseStore::renew_many) statement (or a few, where
//! [`batch_len`](super::LeaseStore::batch_len) says one statement cannot
//! hold them all). The answers come back per lease: renewed leases get
//! their new expiry and times; gone leases are marked lost, each on its
//! own; unknown ones (the statement failed or the row was busy) retry
//! shortly and meet their own deadline if that keeps up.
//!
//! Why half a period of slack: two leases of the same ttl whose due times
//! differ by `d` share a tick once `d` is at most half a period, and if it
//! is more, the earlier one joins the later one's tick (it is then due
//! within half a period). So leases of one ttl fall into step after their
//! first renewal, and a process holding many leases of a few ttls sends a
//! few statements per period, whatever the number of leases. A lease is
//! never renewed later than its period, and at most twice as often.
//!
//! A lease is in one of three states: idle (in `due`), in a batch, or being
//! extended. `extend` waits for a batch holding its lease to finish (a batch
//! sent with the old ttl must not land after the extend), and the task
//! skips a lease being extended. A release waits only for an extend (as
//! the single keeper task used to serialise them); it does not wait for a
//! batch, because every store's batch statement refuses a released row.
//!
//! Everything per lease lives in one entry of a map, guarded by one mutex
//! that is never held across an `.await`. The task stops [`LINGER`] after
//! the map was last left empty (with no grant since), and starts again with
//! the next grant, so a backend that has held nothing for a while has no
//! task, while one that takes and releases leases all the time does not
//! start and stop a task for each. While it lingers it keeps only a weak
//! reference to the backend, so dropping the backend is not delayed. A
//! grant or a release wakes the task only if its timetable must change
//! sooner than the task would look anyway, so an uncontended acquire and
//! release costs no cross-thread wake-up. If the runtime running the task
//! shuts down, every lease of the backend is marked lost (nothing renews
//! them any more); a later grant starts a new task on its own runtime.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::{error::Elapsed, sleep_until, timeout_at, Instant};
use tracing::field::Empty;
use tracing::Instrument;

use super::{renew_every, safety_margin, Inner, LeaseStore, Renewal, Renewed};
use crate::backend::{BoxFuture, HeldLock, LockStatus};
use crate::detach::Detached;
use crate::error::Loss;
use crate::{Error, LostReason, Result};

type Id = u64;

const GONE: &str = "the lease was taken over or broken: renewal found it no longer ours";
const LATE: &str = "renewal did not complete before the local deadline";
const RELEASED: &str = "the lease was released";

/// Extending a lease that its guard released (or whose release began).
fn released(name: &str) -> Error {
    Error::lost(name, LostReason::Other, RELEASED)
}

/// Counters of a backend's batched background renewal: how many ticks and
/// statements renewed how many leases. For tests and measurements.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RenewalStats {
    /// Leases in the renewal timetable now: held, or being released.
    pub held: usize,
    /// Whether the renewal task is running.
    pub running: bool,
    /// Renewal ticks that sent a batch.
    pub batches: u64,
    /// Batch renewal calls sent to the store (`renew_many`): one statement
    /// each on PostgreSQL and SQLite, one short transaction on MySQL.
    pub statements: u64,
    /// Leases confirmed renewed by batches.
    pub renewed: u64,
    /// Single-lease renewals made by `extend`.
    pub extends: u64,
    /// Leases in the last batch.
    pub last_batch_len: usize,
    /// How long the last batch took, all its statements together.
    pub last_batch_time: Duration,
}

/// The renewal state of one engine.
#[derive(Default)]
pub(super) struct Renewals {
    registry: Mutex<Registry>,
    /// Wakes the renewal task: its timetable changed (shared with the task,
    /// which waits on it while it lingers without a strong reference).
    wake: Arc<Notify>,
    /// Wakes extends and releases waiting for a lease to settle.
    settled: Notify,
    batches: AtomicU64,
    statements: AtomicU64,
    renewed: AtomicU64,
    extends: AtomicU64,
    last_batch: Mutex<(usize, Duration)>,
}

impl Renewals {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counters now.
    pub(super) fn stats(&self) -> RenewalStats {
        let (held, running) = {
            let reg = self.lock();
            (reg.leases.len(), reg.running)
        };
        let (last_batch_len, last_batch_time) = *self
            .last_batch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        RenewalStats {
            held,
            running,
            batches: self.batches.load(Relaxed),
            statements: self.statements.load(Relaxed),
            renewed: self.renewed.load(Relaxed),
            extends: self.extends.load(Relaxed),
            last_batch_len,
            last_batch_time,
        }
    }

    /// Something changed: the task recomputes its timetable, and extends
    /// and releases waiting for a lease look again.
    fn changed(&self) {
        self.settled.notify_waiters();
        self.wake.notify_one();
    }
}

/// What the renewal task is doing with a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    /// Waiting for its next renewal (it is in `due`).
    Idle,
    /// In a batch statement.
    Batch,
    /// Being extended.
    Extend,
}

/// One held lease.
struct Entry {
    name: Arc<str>,
    owner: Arc<str>,
    token: u64,
    hold: Option<Duration>,
    ttl: Duration,
    next_renew: Instant,
    deadline: Instant,
    busy: Busy,
    /// Its release has begun: no more renewals, and outcomes are ignored.
    released: bool,
    status: LockStatus,
}

impl Entry {
    fn live(&self) -> bool {
        !self.released && !self.status.is_lost()
    }
}

#[derive(Default)]
struct Registry {
    leases: HashMap<Id, Entry>,
    /// When the renewal task looks at the timetable next by itself, as it
    /// last computed (`None`: only when woken). A change that needs it
    /// sooner wakes it; any other change waits for that look.
    task_looks_at: Option<Instant>,
    /// When the last lease was granted: the task lingers [`LINGER`] past it.
    last_grant: Option<Instant>,
    /// Next renewal of each idle, live lease.
    due: BTreeSet<(Instant, Id)>,
    /// Local deadline of each live lease.
    deadlines: BTreeSet<(Instant, Id)>,
    next_id: Id,
    running: bool,
    /// The largest renewal slack among the leases held since the registry
    /// was last empty: how far ahead of now `take_due` looks.
    horizon: Duration,
    /// Leases whose guard was dropped: the task releases them.
    dropped: Vec<Id>,
}

/// How long the renewal task stays after the last grant once nothing is
/// held: a backend that takes and releases leases all the time keeps one
/// task rather than starting one per lease.
const LINGER: Duration = Duration::from_secs(5);

/// How early a lease may be renewed, to share a tick with others.
fn slack(ttl: Duration) -> Duration {
    renew_every(ttl) / 2
}

/// How soon a renewal whose outcome is unknown is tried again.
fn retry_pause(ttl: Duration) -> Duration {
    (ttl / 20).max(Duration::from_millis(20))
}

impl Registry {
    /// Takes a lease out of both timetables.
    fn unschedule(&mut self, id: Id) {
        if let Some(e) = self.leases.get(&id) {
            self.due.remove(&(e.next_renew, id));
            self.deadlines.remove(&(e.deadline, id));
        }
    }

    /// Sets a lease's times, and puts it in the timetables if it is live
    /// (in `due` only if idle).
    fn schedule(&mut self, id: Id, next_renew: Instant, deadline: Instant) {
        self.unschedule(id);
        let Some(e) = self.leases.get_mut(&id) else {
            return;
        };
        e.next_renew = next_renew;
        e.deadline = deadline;
        if !e.live() {
            return;
        }
        self.deadlines.insert((deadline, id));
        if e.busy == Busy::Idle {
            self.due.insert((next_renew, id));
        }
    }

    /// Marks a lease lost (unless it is being released) and unschedules it.
    fn lose(&mut self, id: Id, reason: LostReason, detail: &str) {
        self.unschedule(id);
        if let Some(e) = self.leases.get(&id) {
            if !e.released {
                e.status.mark_lost(reason, detail);
            }
        }
    }

    /// Marks lost every lease whose local deadline has passed. Returns
    /// whether there was any.
    fn expire(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(e) = self.leases.get(&id) {
                self.due.remove(&(e.next_renew, id));
                e.status.mark_lost(LostReason::Expired, format!(
                    "the lease was not renewed before its local deadline (ttl {:?} minus a margin of {:?})",
                    e.ttl,
                    safety_margin(e.ttl)
                ));
                any = true;
            }
        }
        any
    }

    /// If a lease is due, takes it out of `due` with every lease due within
    /// its slack, as one batch: `(id, what to renew, local deadline)`.
    fn take_due(&mut self, now: Instant) -> Vec<(Id, Renewal, Instant)> {
        match self.due.first() {
            Some(&(at, _)) if at <= now => {}
            _ => return Vec::new(),
        }
        let leases = &self.leases;
        let keys: Vec<(Instant, Id)> = self
            .due
            .range(..=(now + self.horizon, Id::MAX))
            .filter(|(at, id)| leases.get(id).is_some_and(|e| *at <= now + slack(e.ttl)))
            .copied()
            .collect();
        let mut batch = Vec::with_capacity(keys.len());
        for key in keys {
            self.due.remove(&key);
            let Some(e) = self.leases.get_mut(&key.1) else {
                continue;
            };
            e.busy = Busy::Batch;
            batch.push((
                key.1,
                Renewal {
                    name: e.name.clone(),
                    owner: e.owner.clone(),
                    token: e.token,
                    ttl: e.ttl,
                },
                e.deadline,
            ));
        }
        batch
    }

    /// When the task must look again, unless woken sooner.
    fn wake_at(&self) -> Option<Instant> {
        let due = self.due.first().map(|&(at, _)| at);
        let deadline = self.deadlines.first().map(|&(at, _)| at);
        match (due, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A lease just granted, to be kept.
pub(super) struct NewLease {
    pub name: Arc<str>,
    pub owner: Arc<str>,
    pub token: u64,
    pub hold: Option<Duration>,
    pub ttl: Duration,
    pub status: LockStatus,
}

/// Adds a granted lease to the timetable (starting the renewal task if it
/// is not running) and returns the guard's handle on it. `sent_at` is when
/// the claim that granted it was sent. Must run inside a tokio runtime.
pub(super) fn register<S: LeaseStore>(
    inner: &Arc<Inner<S>>,
    lease: NewLease,
    sent_at: Instant,
) -> Held<S> {
    let renewals = &inner.renewals;
    let ttl = lease.ttl;
    let name = lease.name.clone();
    let (id, start, wake) = {
        let mut reg = renewals.lock();
        let id = reg.next_id;
        reg.next_id += 1;
        reg.horizon = reg.horizon.max(slack(ttl));
        reg.leases.insert(
            id,
            Entry {
                name: lease.name,
                owner: lease.owner,
                token: lease.token,
                hold: lease.hold,
                ttl,
                next_renew: sent_at,
                deadline: sent_at,
                busy: Busy::Idle,
                released: false,
                status: lease.status,
            },
        );
        let (next_renew, deadline) = (
            sent_at + renew_every(ttl),
            sent_at + ttl - safety_margin(ttl),
        );
        reg.schedule(id, next_renew, deadline);
        reg.last_grant = Some(reg.last_grant.map_or(sent_at, |at| at.max(sent_at)));
        let start = !std::mem::replace(&mut reg.running, true);
        // The task must look sooner than it means to only if this lease is
        // due (or at its deadline) before then.
        let wake = !start
            && reg
                .task_looks_at
                .is_none_or(|at| next_renew.min(deadline) < at);
        (id, start, wake)
    };
    if start {
        start_task(inner, &Handle::current());
    } else if wake {
        renewals.wake.notify_one();
    }
    Held {
        inner: inner.clone(),
        id,
        name,
        taken: false,
    }
}

/// Spawns the renewal task; `running` is already set.
fn start_task<S: LeaseStore>(inner: &Arc<Inner<S>>, handle: &Handle) {
    let task = Task {
        inner: Arc::downgrade(inner),
        wake: inner.renewals.wake.clone(),
        finished: false,
    };
    // The future owns `task` from here: dropped unpolled or mid-way (the
    // runtime shutting down), its drop clears `running`.
    handle.spawn(task.run());
}

/// The renewal task of one engine.
struct Task<S: LeaseStore> {
    /// Upgraded for each look at the timetable; held strongly while
    /// anything is held, so that leases whose guards were dropped are still
    /// released if the backend is dropped too.
    inner: Weak<Inner<S>>,
    wake: Arc<Notify>,
    finished: bool,
}

impl<S: LeaseStore> Task<S> {
    async fn run(mut self) {
        let wake = self.wake.clone();
        loop {
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let Some(inner) = self.inner.upgrade() else {
                // The backend is gone, and its timetable with it.
                self.finished = true;
                return;
            };
            let renewals = &inner.renewals;
            let now = Instant::now();
            let looked = {
                let mut reg = renewals.lock();
                let lost_some = reg.expire(now);
                if reg.leases.is_empty() {
                    reg.horizon = Duration::ZERO;
                    let until = reg.last_grant.map_or(now, |at| at + LINGER);
                    if now >= until {
                        reg.running = false;
                        reg.task_looks_at = None;
                        reg.last_grant = None;
                        self.finished = true;
                        None
                    } else {
                        reg.task_looks_at = Some(until);
                        Some((true, Vec::new(), Vec::new(), Some(until), lost_some))
                    }
                } else {
                    let dropped = std::mem::take(&mut reg.dropped);
                    let batch = reg.take_due(now);
                    let wake_at = reg.wake_at();
                    reg.task_looks_at = wake_at;
                    Some((false, batch, dropped, wake_at, lost_some))
                }
            };
            let Some((lingering, batch, dropped, wake_at, lost_some)) = looked else {
                return;
            };
            if lingering {
                if lost_some {
                    renewals.settled.notify_waiters();
                }
                // Nothing held: linger with only a weak reference to the
                // backend, until the last grant is LINGER old.
                drop(inner);
                let until = wake_at.unwrap_or(now);
                tokio::select! {
                    _ = &mut woken => {}
                    _ = sleep_until(until) => {}
                }
                continue;
            }
            if lost_some {
                renewals.settled.notify_waiters();
            }
            for id in dropped {
                tokio::spawn(release(inner.clone(), id));
            }
            if !batch.is_empty() {
                renewals.batches.fetch_add(1, Relaxed);
                let mut ids = Vec::with_capacity(batch.len());
                let mut items = Vec::with_capacity(batch.len());
                let mut deadlines = Vec::with_capacity(batch.len());
                for (id, item, deadline) in batch {
                    ids.push(id);
                    items.push(item);
                    deadlines.push(deadline);
                }
                let pending = Pending {
                    inner: inner.clone(),
                    ids,
                    next: 0,
                };
                let span = crate::observe::debug_span!(
                    "renewal_batch",
                    backend = inner.store.kind(),
                    leases = items.len(),
                    statements = Empty,
                    renewed = Empty,
                    took_s = Empty,
                );
                tokio::spawn(pending.run(items, deadlines, span.clone()).instrument(span));
            }
            // Held strongly while leases are (see `inner`).
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = &mut woken => {}
                        _ = sleep_until(at) => {}
                    }
                }
                None => woken.await,
            }
            drop(inner);
        }
    }
}

impl<S: LeaseStore> Drop for Task<S> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The runtime is shutting down (or the task panicked): nothing will
        // renew these leases any more, so their guards must not vouch for
        // them.
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let renewals = &inner.renewals;
        let mut reg = renewals.lock();
        reg.running = false;
        reg.task_looks_at = None;
        let ids: Vec<Id> = reg.leases.keys().copied().collect();
        for id in ids {
            reg.lose(
                id,
                LostReason::RuntimeShutdown,
                "the runtime that ran this backend's lease renewal shut down",
            );
        }
        drop(reg);
        renewals.settled.notify_waiters();
    }
}

/// A batch on its way: the leases from `next` on have no answer yet. If
/// dropped before they get one, they go back to the timetable, due now.
struct Pending<S: LeaseStore> {
    inner: Arc<Inner<S>>,
    ids: Vec<Id>,
    next: usize,
}

impl<S: LeaseStore> Pending<S> {
    /// Renews the batch; `span` is its `renewal_batch` span (or none),
    /// which gets the batch's figures.
    async fn run(mut self, items: Vec<Renewal>, deadlines: Vec<Instant>, span: tracing::Span) {
        let inner = self.inner.clone();
        let started = Instant::now();
        let mut renewed = 0;
        let mut statements = 0u64;
        while self.next < items.len() {
            let rest = &items[self.next..];
            let n = inner.store.batch_len(rest).clamp(1, rest.len());
            let range = self.next..self.next + n;
            // Past the latest deadline in the chunk every lease in it is
            // lost anyway: stop waiting for the statement.
            let give_up = deadlines[range.clone()]
                .iter()
                .copied()
                .max()
                .expect("a chunk is never empty");
            inner.renewals.statements.fetch_add(1, Relaxed);
            statements += 1;
            let sent_at = Instant::now();
            let outcome = timeout_at(
                give_up,
                super::permits::renew_many(&inner.store, &items[range.clone()]),
            )
            .await;
            renewed += apply(
                &inner,
                &self.ids[range.clone()],
                &items[range],
                outcome,
                sent_at,
            );
            self.next += n;
        }
        let took = started.elapsed();
        // The batch's size and time first, so that a reader who sees the
        // renewals counted sees this batch's figures.
        *inner
            .renewals
            .last_batch
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = (items.len(), took);
        inner.renewals.renewed.fetch_add(renewed, Relaxed);
        if !span.is_disabled() {
            span.record("statements", statements);
            span.record("renewed", renewed);
            span.record("took_s", took.as_secs_f64());
        }
        crate::observe::renewal_batch(inner.store.kind(), items.len(), took);
    }
}

impl<S: LeaseStore> Drop for Pending<S> {
    fn drop(&mut self) {
        if self.next >= self.ids.len() {
            return;
        }
        let now = Instant::now();
        let renewals = &self.inner.renewals;
        let mut reg = renewals.lock();
        for &id in &self.ids[self.next..] {
            let Some(e) = reg.leases.get_mut(&id) else {
                continue;
            };
            if e.busy == Busy::Batch {
                e.busy = Busy::Idle;
                let deadline = e.deadline;
                reg.schedule(id, now, deadline);
            }
        }
        drop(reg);
        renewals.changed();
    }
}

/// Records the answers of one batch statement sent at `sent_at`; returns
/// how many leases it renewed.
fn apply<S: LeaseStore>(
    inner: &Inner<S>,
    ids: &[Id],
    items: &[Renewal],
    outcome: std::result::Result<Result<Vec<Renewed>>, Elapsed>,
    sent_at: Instant,
) -> u64 {
    let answers: &[Renewed] = match &outcome {
        Ok(Ok(answers)) => {
            debug_assert_eq!(answers.len(), ids.len(), "one answer per lease");
            answers
        }
        Ok(Err(e)) => {
            tracing::debug!(leases = ids.len(), error = %e, "dblock: batch renewal failed; retrying");
            &[]
        }
        Err(_) => &[],
    };
    let now = Instant::now();
    if tracing::enabled!(tracing::Level::TRACE) {
        let count = |f: fn(&Renewed) -> bool| answers.iter().filter(|a| f(a)).count();
        tracing::trace!(
            leases = ids.len(),
            took = ?(now - sent_at),
            renewed = count(|a| matches!(a, Renewed::Until(_))),
            gone = count(|a| matches!(a, Renewed::Gone)),
            unknown = count(|a| matches!(a, Renewed::Unknown)),
            failed = answers.is_empty(),
            "dblock: batch renewal"
        );
    }
    let mut renewed = 0;
    let renewals = &inner.renewals;
    // In slices, so that grants, releases and extends on other threads are
    // not held up behind a batch of a hundred thousand.
    for start in (0..ids.len()).step_by(APPLY_SLICE) {
        let end = (start + APPLY_SLICE).min(ids.len());
        let mut reg = renewals.lock();
        for k in start..end {
            let (id, item) = (ids[k], &items[k]);
            let Some(e) = reg.leases.get_mut(&id) else {
                continue;
            };
            if e.busy != Busy::Batch {
                continue;
            }
            e.busy = Busy::Idle;
            if !e.live() {
                continue;
            }
            let deadline = e.deadline;
            match answers.get(k).copied().unwrap_or(Renewed::Unknown) {
                Renewed::Until(at) => {
                    e.status.set_expires_at(Some(at));
                    let ttl = item.ttl;
                    reg.schedule(
                        id,
                        sent_at + renew_every(ttl),
                        sent_at + ttl - safety_margin(ttl),
                    );
                    renewed += 1;
                }
                Renewed::Gone => reg.lose(id, LostReason::RenewalFailed, GONE),
                Renewed::Unknown if deadline <= now => reg.lose(id, LostReason::Expired, LATE),
                Renewed::Unknown => reg.schedule(id, now + retry_pause(item.ttl), deadline),
            }
        }
    }
    renewals.changed();
    renewed
}

/// How many answers of a batch are recorded under one hold of the lock.
const APPLY_SLICE: usize = 2048;

/// Runs `f` when dropped, unless disarmed.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// `extend(by)`: one immediate single-lease renewal, which also makes `by`
/// the ttl of the batch renewals that follow.
async fn extend<S: LeaseStore>(
    inner: Arc<Inner<S>>,
    id: Id,
    name: Arc<str>,
    by: Duration,
) -> Result<Option<DateTime<Utc>>> {
    let renewals = &inner.renewals;
    let (owner, token, deadline) = loop {
        let settled = renewals.settled.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        {
            let mut reg = renewals.lock();
            let Some(e) = reg.leases.get_mut(&id) else {
                return Err(released(&name));
            };
            if let Some(loss) = e.status.loss() {
                return Err(Error::from_loss(&name, loss));
            }
            if e.released {
                return Err(released(&name));
            }
            if e.busy == Busy::Idle {
                e.busy = Busy::Extend;
                let taken = (e.owner.clone(), e.token, e.deadline);
                let key = (e.next_renew, id);
                reg.due.remove(&key);
                break taken;
            }
        }
        // In a batch, or another extend: wait for it to settle.
        settled.await;
    };
    // If this task is dropped mid-statement (its runtime shutting down),
    // the lease goes back to the timetable as it was.
    let restore = OnDrop(Some(|| {
        let mut reg = renewals.lock();
        if let Some(e) = reg.leases.get_mut(&id) {
            e.busy = Busy::Idle;
            let (next_renew, deadline) = (e.next_renew, e.deadline);
            reg.schedule(id, next_renew, deadline);
        }
        drop(reg);
        renewals.changed();
    }));
    renewals.extends.fetch_add(1, Relaxed);
    let sent_at = Instant::now();
    let outcome = timeout_at(deadline, inner.store.renew(&name, &owner, token, by)).await;
    restore.disarm();

    let mut reg = renewals.lock();
    let result = match reg.leases.get_mut(&id) {
        None => Err(released(&name)),
        Some(e) => {
            e.busy = Busy::Idle;
            let (next_renew, deadline, lost) = (e.next_renew, e.deadline, e.status.loss());
            match outcome {
                Ok(Ok(Some(at))) => match lost {
                    Some(loss) => Err(Error::from_loss(&name, loss)),
                    None => {
                        e.ttl = by;
                        e.status.set_expires_at(Some(at));
                        reg.horizon = reg.horizon.max(slack(by));
                        reg.schedule(
                            id,
                            sent_at + renew_every(by),
                            sent_at + by - safety_margin(by),
                        );
                        Ok(Some(at))
                    }
                },
                Ok(Ok(None)) => {
                    reg.lose(id, LostReason::RenewalFailed, GONE);
                    Err(Error::from_loss(
                        &name,
                        lost.unwrap_or_else(|| Loss::new(LostReason::RenewalFailed, GONE)),
                    ))
                }
                Ok(Err(e)) => {
                    reg.schedule(id, next_renew, deadline);
                    Err(e)
                }
                Err(_) => {
                    reg.lose(id, LostReason::Expired, LATE);
                    Err(Error::from_loss(
                        &name,
                        lost.unwrap_or_else(|| Loss::new(LostReason::Expired, LATE)),
                    ))
                }
            }
        }
    };
    drop(reg);
    renewals.changed();
    result
}

/// Releases a lease (conditional on its owner and token, so harmless after
/// a loss) and forgets it.
async fn release<S: LeaseStore>(inner: Arc<Inner<S>>, id: Id) -> Result<()> {
    let renewals = &inner.renewals;
    let (name, owner, token, hold, deadline) = loop {
        let settled = renewals.settled.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        {
            let mut reg = renewals.lock();
            let Some(e) = reg.leases.get_mut(&id) else {
                return Ok(());
            };
            // A batch may still hold the lease: it cannot renew the row
            // once the release has landed, and its answer will be ignored.
            if e.busy != Busy::Extend {
                e.released = true;
                let taken = (e.name.clone(), e.owner.clone(), e.token, e.hold, e.deadline);
                reg.unschedule(id);
                break taken;
            }
        }
        settled.await;
    };
    // Forgotten whatever happens next, even if this future is dropped. The
    // lease left the timetable when its release began: the task need not
    // look again for it (it lingers, then stops, when nothing is left).
    let forget = OnDrop(Some(|| {
        let wake = {
            let mut reg = renewals.lock();
            reg.leases.remove(&id);
            // Unless the task waits to be woken (it had nothing scheduled):
            // then it must see that nothing is left, to linger and stop.
            reg.leases.is_empty() && reg.task_looks_at.is_none()
        };
        renewals.settled.notify_waiters();
        if wake {
            renewals.wake.notify_one();
        }
    }));
    // Bounded by the lease's local deadline (at least a second from now):
    // past it the lease counts as lost anyway, and a black-holed
    // connection must not hang the caller until TCP gives up.
    let bound = deadline.max(Instant::now() + Duration::from_secs(1));
    let outcome = match tokio::time::timeout_at(
        bound,
        inner.store.release(&name, &owner, token, hold),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(_) => {
            let reason = "the release did not complete before the lease's local deadline; the lease runs out by its ttl";
            if let Some(e) = renewals.lock().leases.get(&id) {
                e.status.mark_lost(LostReason::Expired, reason);
            }
            return Err(Error::lost(&name, LostReason::Expired, reason));
        }
    };
    inner.wakeups.wake(&name);
    super::schedule_sweep(&inner);
    let result = match outcome {
        Ok(true) => Ok(()),
        Ok(false) => {
            let reason = "the lease had already expired or been taken over";
            if let Some(e) = renewals.lock().leases.get(&id) {
                e.status.mark_lost(LostReason::Expired, reason);
            }
            Err(Error::lost(&name, LostReason::Expired, reason))
        }
        Err(e) => Err(e),
    };
    drop(forget);
    result
}

/// Queues the release of a lease whose guard was dropped; the renewal task
/// sends it. Works outside a runtime too (the task is then started on the
/// current runtime if there is one, else the lease simply runs out).
fn release_in_background<S: LeaseStore>(inner: &Arc<Inner<S>>, id: Id) {
    let renewals = &inner.renewals;
    let start = {
        let mut reg = renewals.lock();
        let Some(e) = reg.leases.get_mut(&id) else {
            return;
        };
        if e.busy != Busy::Extend {
            // No more renewals; the release itself waits for an extend.
            e.released = true;
            reg.unschedule(id);
        }
        reg.dropped.push(id);
        !std::mem::replace(&mut reg.running, true)
    };
    if start {
        match Handle::try_current() {
            Ok(handle) => start_task(inner, &handle),
            Err(_) => renewals.lock().running = false,
        }
    }
    renewals.wake.notify_one();
}

/// The guard's handle on a held lease.
pub(super) struct Held<S: LeaseStore> {
    inner: Arc<Inner<S>>,
    id: Id,
    name: Arc<str>,
    /// An explicit release has taken over: dropping does nothing.
    taken: bool,
}

impl<S: LeaseStore> fmt::Debug for Held<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("name", &self.name)
            .field("id", &self.id)
            .finish()
    }
}

impl<S: LeaseStore> HeldLock for Held<S> {
    fn extend(&self, by: Duration) -> BoxFuture<'_, Result<Option<DateTime<Utc>>>> {
        let (inner, id, name) = (self.inner.clone(), self.id, self.name.clone());
        // In the caller's task; if this future is dropped mid-statement,
        // the renewal finishes in a task of its own, since the timetable
        // has to learn its outcome.
        Box::pin(Detached::new(extend(inner, id, name, by)))
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            // Until here, dropping this future drops `self`, which releases
            // in the background.
            self.taken = true;
            tokio::task::coop::consume_budget().await;
            // In the caller's task; if dropped mid-statement, the release
            // finishes in a task of its own.
            Detached::new(release(self.inner.clone(), self.id)).await
        })
    }

    fn release_on_drop(self: Box<Self>) {
        // Dropping `self` releases.
    }
}

impl<S: LeaseStore> Drop for Held<S> {
    fn drop(&mut self) {
        if !self.taken {
            release_in_background(&self.inner, self.id);
        }
    }
}
