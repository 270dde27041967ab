//! The timetable of held leases: what the renewal task does next with
//! each, under one mutex.

use rustc_hash::FxHashMap;

use super::*;

/// What the renewal task is doing with a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Busy {
    /// Waiting for its next renewal (it is in `due`).
    Idle,
    /// In a batch statement.
    Batch,
    /// Being extended.
    Extend,
}

/// One held lease.
pub(super) struct Entry {
    pub(super) name: Arc<str>,
    pub(super) owner: Arc<str>,
    pub(super) token: u64,
    pub(super) hold: Option<Duration>,
    pub(super) ttl: Duration,
    pub(super) next_renew: Instant,
    pub(super) deadline: Instant,
    pub(super) busy: Busy,
    /// Its release has begun: no more renewals, and outcomes are ignored.
    pub(super) released: bool,
    pub(super) status: LockStatus,
}

impl Entry {
    pub(super) fn live(&self) -> bool {
        !self.released && !self.status.is_lost()
    }
}

#[derive(Default)]
pub(super) struct Registry {
    pub(super) leases: FxHashMap<Id, Entry>,
    /// When the renewal task looks at the timetable next by itself, as it
    /// last computed (`None`: only when woken). A change that needs it
    /// sooner wakes it; any other change waits for that look.
    pub(super) task_looks_at: Option<Instant>,
    /// When the last lease was granted: the task lingers [`LINGER`] past it.
    pub(super) last_grant: Option<Instant>,
    /// Next renewal of each idle, live lease.
    pub(super) due: BTreeSet<(Instant, Id)>,
    /// Local deadline of each live lease.
    pub(super) deadlines: BTreeSet<(Instant, Id)>,
    pub(super) next_id: Id,
    pub(super) running: bool,
    /// The largest renewal slack among the leases held since the registry
    /// was last empty: how far ahead of now `take_due` looks.
    pub(super) horizon: Duration,
    /// Leases whose guard was dropped: the task releases them.
    pub(super) dropped: Vec<Id>,
}

/// How long the renewal task stays after the last grant once nothing is
/// held: a backend that takes and releases leases all the time keeps one
/// task rather than starting one per lease.
pub(super) const LINGER: Duration = Duration::from_secs(5);

/// How early a lease may be renewed, to share a tick with others.
pub(super) fn slack(ttl: Duration) -> Duration {
    renew_every(ttl) / 2
}

/// How soon a renewal whose outcome is unknown is tried again.
pub(super) fn retry_pause(ttl: Duration) -> Duration {
    (ttl / 20).max(Duration::from_millis(20))
}

impl Registry {
    /// Takes a lease out of both timetables.
    pub(super) fn unschedule(&mut self, id: Id) {
        if let Some(e) = self.leases.get(&id) {
            self.due.remove(&(e.next_renew, id));
            self.deadlines.remove(&(e.deadline, id));
        }
    }

    /// Sets a lease's times, and puts it in the timetables if it is live
    /// (in `due` only if idle).
    pub(super) fn schedule(&mut self, id: Id, next_renew: Instant, deadline: Instant) {
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
    pub(super) fn lose(&mut self, id: Id, reason: LostReason, detail: &str) {
        self.unschedule(id);
        if let Some(e) = self.leases.get(&id) {
            if !e.released {
                e.status.mark_lost(reason, detail);
            }
        }
    }

    /// Marks lost every lease whose local deadline has passed. Returns
    /// whether there was any.
    pub(super) fn expire(&mut self, now: Instant) -> bool {
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
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<(Id, Renewal, Instant)> {
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
    pub(super) fn wake_at(&self) -> Option<Instant> {
        let due = self.due.first().map(|&(at, _)| at);
        let deadline = self.deadlines.first().map(|&(at, _)| at);
        match (due, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
