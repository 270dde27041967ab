//! The renewal task: registering a granted lease, starting the task, and
//! the task's loop over the timetable.

use super::*;

/// A lease just granted, to be kept.
pub(in crate::lease) struct NewLease {
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
pub(in crate::lease) fn register<S: LeaseStore>(
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
pub(super) fn start_task<S: LeaseStore>(inner: &Arc<Inner<S>>, handle: &Handle) {
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
pub(super) struct Task<S: LeaseStore> {
    /// Upgraded for each look at the timetable; held strongly while
    /// anything is held, so that leases whose guards were dropped are still
    /// released if the backend is dropped too.
    pub(super) inner: Weak<Inner<S>>,
    pub(super) wake: Arc<Notify>,
    pub(super) finished: bool,
}

impl<S: LeaseStore> Task<S> {
    pub(super) async fn run(mut self) {
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
                // The target documented in docs/observability.md (the
                // module's path before it was split into files).
                let span = crate::observe::debug_span!(
                    target: "dblock::lease::renewal",
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
