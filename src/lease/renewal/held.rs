//! The guard's handle on a held lease: `extend`, `release`, and release
//! in the background when the guard is dropped.

use super::*;

/// Runs `f` when dropped, unless disarmed.
pub(super) struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    pub(super) fn disarm(mut self) {
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
pub(super) async fn extend<S: LeaseStore>(
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
    let lease = LeaseId {
        name: &name,
        owner: &owner,
        token,
    };
    let outcome = timeout_at(deadline, permits::renew(&inner.store, lease, by)).await;
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
pub(super) async fn release<S: LeaseStore>(inner: Arc<Inner<S>>, id: Id) -> Result<()> {
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
    let lease = LeaseId {
        name: &name,
        owner: &owner,
        token,
    };
    let outcome = match tokio::time::timeout_at(bound, permits::release(&inner.store, lease, hold))
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
    super::super::schedule_sweep(&inner);
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
pub(super) fn release_in_background<S: LeaseStore>(inner: &Arc<Inner<S>>, id: Id) {
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
pub(in crate::lease) struct Held<S: LeaseStore> {
    pub(super) inner: Arc<Inner<S>>,
    pub(super) id: Id,
    pub(super) name: Arc<str>,
    /// An explicit release has taken over: dropping does nothing.
    pub(super) taken: bool,
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
        // In the caller's task; if the caller stops waiting, the guard
        // finishes this future in a task of its own (see
        // `HeldLock::release`), so once `taken` is set the release is seen
        // through. Dropped unpolled, `self` releases in the background.
        Box::pin(async move {
            self.taken = true;
            tokio::task::coop::consume_budget().await;
            release(self.inner.clone(), self.id).await
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
