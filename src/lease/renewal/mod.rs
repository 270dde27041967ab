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
//!
//! The parts: `timetable` (the per-lease entries and the timetable under
//! the mutex), `task` (registering a grant, the task and its loop), `batch`
//! (a batch on its way and recording its answers), `held` (the guard's
//! handle: extend, release, release in the background).

use std::collections::BTreeSet;
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

use super::{permits, renew_every, safety_margin, Inner, LeaseId, LeaseStore, Renewal, Renewed};
use crate::backend::{BoxFuture, HeldLock, LockStatus};
use crate::detach::Detached;
use crate::error::Loss;
use crate::{Error, LostReason, Result};

mod batch;
mod held;
mod task;
mod timetable;

use batch::*;
use held::*;
use task::*;
use timetable::*;

pub(super) use held::Held;
pub(super) use task::{register, NewLease};

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
    /// Leases in the largest batch so far (the earliest of equals).
    pub largest_batch_len: usize,
    /// How long that batch took.
    pub largest_batch_time: Duration,
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
    /// The last batch's size and time, then the largest one's.
    batch_sizes: Mutex<[(usize, Duration); 2]>,
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
        let [(last_batch_len, last_batch_time), (largest_batch_len, largest_batch_time)] = *self
            .batch_sizes
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
            largest_batch_len,
            largest_batch_time,
        }
    }

    /// Something changed: the task recomputes its timetable, and extends
    /// and releases waiting for a lease look again.
    fn changed(&self) {
        self.settled.notify_waiters();
        self.wake.notify_one();
    }
}
