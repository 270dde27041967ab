//! A batch of renewals on its way, and recording its answers.

use super::*;

/// A batch on its way: the leases from `next` on have no answer yet. If
/// dropped before they get one, they go back to the timetable, due now.
pub(super) struct Pending<S: LeaseStore> {
    pub(super) inner: Arc<Inner<S>>,
    pub(super) ids: Vec<Id>,
    pub(super) next: usize,
}

impl<S: LeaseStore> Pending<S> {
    /// Renews the batch; `span` is its `renewal_batch` span (or none),
    /// which gets the batch's figures.
    pub(super) async fn run(
        mut self,
        items: Vec<Renewal>,
        deadlines: Vec<Instant>,
        span: tracing::Span,
    ) {
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
                permits::renew_many(&inner.store, &items[range.clone()]),
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
        {
            let mut batches = inner
                .renewals
                .batch_sizes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            batches[0] = (items.len(), took);
            if items.len() > batches[1].0 {
                batches[1] = (items.len(), took);
            }
        }
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
pub(super) fn apply<S: LeaseStore>(
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
            tracing::debug!(target: "dblock::lease::renewal", leases = ids.len(), error = %e, "dblock: batch renewal failed; retrying");
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
pub(super) const APPLY_SLICE: usize = 2048;
