//! Scheduled jobs: each slot runs once across the fleet.
//!
//! Every process of the fleet runs the same [`Job`]: a name, a [`Schedule`]
//! (a fixed interval or a cron expression) and an async closure. Each slot
//! of the schedule runs **once** across all of them while at least one is
//! alive:
//!
//! - **Slots follow the database clock.** Each process measures the offset
//!   between its own clock and the database's ([`Locks::now`]) and plans by
//!   the database's, so hosts whose clocks differ by seconds agree on the
//!   slots.
//! - **A slot is claimed with a lease** named `schedule:<job>@<slot start>`,
//!   taken without waiting and kept with `hold_at_least` until the end of
//!   the *next* slot (plus a margin of 5 s), so a host that comes late finds
//!   it taken, and during a slot the presence of the previous slot's lease
//!   says whether the previous slot ran. A claim whose database time falls
//!   outside the window in which it is valid (a process paused between
//!   deciding and claiming) is given up, never run. The lease then runs out
//!   (and is removed where the backend sweeps expired leases); nothing is
//!   kept per slot.
//! - **The job gets the slot and the guard.** Pass [`LockGuard::token`] to
//!   what the job writes, so that a holder paused past its lease cannot
//!   overwrite a later one. The guard renews itself while the job runs (its
//!   ttl is [`Job::ttl`]); the job may release it when done, or just drop
//!   it. If the lock is lost, the job's future is dropped: the job is
//!   cancelled at its next `.await`.
//!
//! # Policies
//!
//! - [`Overlap`]: when a run outlasts its slot, the next slot is skipped
//!   ([`Overlap::Skip`], the default; a second lease,
//!   `schedule:<job>:running`, is held while any run is under way) or
//!   starts anyway ([`Overlap::Allow`]).
//! - [`Missed`]: a slot that no process claimed — every host was down at
//!   its start — is skipped ([`Missed::Skip`], the default: a slot may start
//!   only within [`Job::grace`] of its start) or run once when the next
//!   slot starts ([`Missed::CatchUpOnce`]: however many slots were missed,
//!   the latest one runs; a slot may then start at any time before the end
//!   of the next).
//! - [`Job::max_run_time`] (ShedLock's lockAtMostFor): a run still going
//!   after this long is cancelled.
//!
//! # Backends
//!
//! A claim must outlive the process that made it, so the scheduler needs a
//! lease backend: [`postgres::Lease`](crate::postgres::Lease),
//! [`mysql::Lease`](crate::mysql::Lease),
//! [`sqlite::Lease`](crate::sqlite::Lease) or
//! [`Memory`](crate::memory::Memory). On
//! [`postgres::Advisory`](crate::postgres::Advisory), whose locks end with
//! their session, [`Job::run`] fails with [`Error::Unsupported`].
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use dblock::schedule::{Job, Schedule, Slot};
//! use dblock::{LockGuard, Locks, memory::Memory};
//!
//! let locks = Locks::new(Memory::new());
//! let job = Job::new(
//!     "billing",
//!     Schedule::every(Duration::from_secs(3600))?, // or Schedule::cron("0 3 * * *")?
//!     |slot: Slot, guard: LockGuard| async move {
//!         println!("billing for {} with fencing token {}", slot.rfc3339(), guard.token());
//!         guard.release().await
//!     },
//! )
//! .max_run_time(Duration::from_secs(600));
//! // Run until the stop future resolves (here: at once).
//! job.run_until(&locks, async {}).await?;
//! # Ok::<(), dblock::Error>(()) }).unwrap();
//! ```

mod clock;
mod slots;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant};

use crate::backend::BoxFuture;
use crate::status;
use crate::{Error, LockGuard, Locks, Result};
use clock::DbClock;
use slots::{format_start, Bounds};

pub use slots::{Schedule, MIN_INTERVAL};

/// The longest job name: room is left in the lock name for the prefix and
/// the slot's start.
pub const MAX_JOB_NAME_LEN: usize = 200;

/// How much longer than the end of the next slot a slot's claim is kept:
/// covers the error of each host's estimate of the database clock.
const HOLD_MARGIN: Duration = Duration::from_secs(5);

/// The pause before a claim that failed on a database error is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What happens to a slot that starts while a run of an earlier slot is
/// still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// The slot is skipped (the host that claims it reports
    /// [`Outcome::Skipped`]): at most one run of the job at a time across
    /// the fleet.
    #[default]
    Skip,
    /// The slot starts anyway: runs of consecutive slots may overlap.
    Allow,
}

/// What happens to a slot that nobody claimed in time (every host was down
/// or paused at its start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Missed {
    /// It is skipped: a slot starts only within [`Job::grace`] of its start.
    #[default]
    Skip,
    /// The latest missed slot runs once, as soon as a host finds it
    /// unclaimed (at the start of the next slot, or when the first host
    /// starts). Any slot may start late, until the end of the next one.
    CatchUpOnce,
}

/// One slot of a job, as the job sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    job: Arc<str>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    catch_up: bool,
}

impl Slot {
    /// The job's name.
    pub fn job(&self) -> &str {
        &self.job
    }
    /// When the slot starts, by the database clock.
    pub fn start(&self) -> DateTime<Utc> {
        self.start
    }
    /// When the slot ends (the next slot's start), by the database clock.
    pub fn end(&self) -> DateTime<Utc> {
        self.end
    }
    /// Whether this run catches up a slot that nobody ran in its time
    /// ([`Missed::CatchUpOnce`]).
    pub fn is_catch_up(&self) -> bool {
        self.catch_up
    }
    /// The start as RFC 3339 in UTC with milliseconds
    /// (`2026-11-27T06:30:00.000Z`): how it appears in lock names, logs and
    /// `DBLOCK_SLOT`.
    pub fn rfc3339(&self) -> String {
        format_start(self.start)
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} slot {}", self.job, self.rfc3339())
    }
}

/// What became of one slot on this host. Every slot a host sees is
/// reported once through [`Job::on_outcome`] (and logged with `tracing`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Outcome {
    /// This host ran the slot; `error` is the job's error, if it failed.
    Ran {
        /// The slot.
        slot: Slot,
        /// The slot lease's fencing token.
        token: u64,
        /// The job's error, if it returned one.
        error: Option<String>,
    },
    /// This host started the slot, and cancelled it: the lock was lost, or
    /// the run passed [`Job::max_run_time`].
    Cancelled {
        /// The slot.
        slot: Slot,
        /// The slot lease's fencing token.
        token: u64,
        /// Why.
        reason: String,
    },
    /// Another host claimed the slot first.
    Taken {
        /// The slot.
        slot: Slot,
    },
    /// This host claimed the slot but did not run it: a run of an earlier
    /// slot was still going ([`Overlap::Skip`]).
    Skipped {
        /// The slot.
        slot: Slot,
    },
    /// Nobody claimed the slot in time, and this host came too late
    /// ([`Missed::Skip`]), or its claim reached the database too late.
    Missed {
        /// The slot.
        slot: Slot,
    },
    /// Claiming the slot failed on a database error (it is tried again
    /// while the slot may still start).
    Failed {
        /// The slot.
        slot: Slot,
        /// The error.
        error: String,
    },
}

impl Outcome {
    /// The slot this is about.
    pub fn slot(&self) -> &Slot {
        match self {
            Outcome::Ran { slot, .. }
            | Outcome::Cancelled { slot, .. }
            | Outcome::Taken { slot }
            | Outcome::Skipped { slot }
            | Outcome::Missed { slot }
            | Outcome::Failed { slot, .. } => slot,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ran {
                slot,
                token,
                error: None,
            } => write!(f, "{slot}: ran here (token {token})"),
            Outcome::Ran {
                slot,
                token,
                error: Some(e),
            } => write!(f, "{slot}: ran here (token {token}) and failed: {e}"),
            Outcome::Cancelled {
                slot,
                token,
                reason,
            } => write!(f, "{slot}: ran here (token {token}), cancelled: {reason}"),
            Outcome::Taken { slot } => write!(f, "{slot}: taken by another host"),
            Outcome::Skipped { slot } => {
                write!(
                    f,
                    "{slot}: skipped, a run of an earlier slot is still going"
                )
            }
            Outcome::Missed { slot } => write!(f, "{slot}: missed, nobody claimed it in time"),
            Outcome::Failed { slot, error } => write!(f, "{slot}: claiming failed: {error}"),
        }
    }
}

type RunFn =
    dyn Fn(Slot, LockGuard) -> BoxFuture<'static, std::result::Result<(), String>> + Send + Sync;
type OutcomeFn = dyn Fn(&Outcome) + Send + Sync;

/// A scheduled job: what runs, when, and the policies. Build it with
/// [`Job::new`], then [`run`](Job::run) it in every process of the fleet.
#[derive(Clone)]
pub struct Job {
    name: Result<Arc<str>, String>,
    schedule: Schedule,
    overlap: Overlap,
    missed: Missed,
    grace: Option<Duration>,
    max_run_time: Option<Duration>,
    ttl: Duration,
    skew: chrono::Duration,
    on_outcome: Option<Arc<OutcomeFn>>,
    run: Arc<RunFn>,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.name)
            .field("schedule", &self.schedule)
            .field("overlap", &self.overlap)
            .field("missed", &self.missed)
            .field("grace", &self.grace)
            .field("max_run_time", &self.max_run_time)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// A job named `name` (1 to 200 bytes of UTF-8, no NUL; checked when it
    /// runs) that calls `run` with each slot it wins and the slot's guard.
    /// An error the closure returns is reported ([`Outcome::Ran`]); it does
    /// not stop the schedule.
    pub fn new<F, Fut, E>(name: impl Into<String>, schedule: Schedule, run: F) -> Job
    where
        F: Fn(Slot, LockGuard) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: fmt::Display + 'static,
    {
        let name: String = name.into();
        let name = check_job_name(&name).map(|()| Arc::from(name));
        let run = move |slot: Slot, guard: LockGuard| -> BoxFuture<'static, _> {
            let fut = run(slot, guard);
            Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
        };
        Job {
            name,
            schedule,
            overlap: Overlap::default(),
            missed: Missed::default(),
            grace: None,
            max_run_time: None,
            ttl: crate::DEFAULT_TTL,
            skew: chrono::Duration::zero(),
            on_outcome: None,
            run: Arc::new(run),
        }
    }

    /// What happens when a run outlasts its slot (default [`Overlap::Skip`]).
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// What happens to a slot nobody claimed in time (default
    /// [`Missed::Skip`]).
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// With [`Missed::Skip`], how late after its start a slot may still
    /// start (a host that starts later finds it missed). Default: half the
    /// slot's length, at most one minute.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Cancels a run still going after this long (ShedLock's
    /// lockAtMostFor). Default: no limit.
    pub fn max_run_time(mut self, limit: Duration) -> Self {
        self.max_run_time = Some(limit);
        self
    }

    /// The lease length of a running slot's guard, renewed every third of
    /// it while the job runs (default 30 s). A host that dies mid-run keeps
    /// the slot (it is not run again) and, with [`Overlap::Skip`], blocks
    /// the next slots for at most this long.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Called with every slot's [`Outcome`] on this host, besides the
    /// `tracing` event.
    pub fn on_outcome(mut self, f: impl Fn(&Outcome) + Send + Sync + 'static) -> Self {
        self.on_outcome = Some(Arc::new(f));
        self
    }

    /// A test hook: this host's wall clock reads `skew` away from the true
    /// time. The scheduler must not care.
    #[doc(hidden)]
    pub fn clock_skew(mut self, skew: chrono::Duration) -> Self {
        self.skew = skew;
        self
    }

    /// The lock name of a slot.
    fn slot_lock(name: &str, start: DateTime<Utc>) -> String {
        format!("schedule:{name}@{}", format_start(start))
    }

    /// Runs the schedule until an error that retrying cannot cure. See
    /// [`run_until`](Job::run_until).
    ///
    /// # Cancel safety
    /// As for [`run_until`](Job::run_until).
    pub async fn run(self, locks: &Locks) -> Result<()> {
        self.run_until(locks, std::future::pending()).await
    }

    /// Runs the schedule until `stop` resolves, then waits for the runs
    /// under way to finish and returns `Ok(())`.
    ///
    /// Fails at once, before anything is written, with
    /// [`Error::InvalidName`] or [`Error::InvalidOption`] for a bad name or
    /// option, and with [`Error::Unsupported`] on a backend whose locks
    /// cannot outlive their holder. [`Error::SchemaMissing`] also ends it.
    /// Database errors do not: they are reported ([`Outcome::Failed`]) and
    /// the claim is tried again while the slot may still start.
    ///
    /// # Cancel safety
    /// Cancel safe in that nothing leaks: if the future is dropped, the runs
    /// under way are cancelled (their futures dropped) and their guards
    /// released in the background; the slots they claimed stay claimed.
    pub async fn run_until(self, locks: &Locks, stop: impl Future<Output = ()>) -> Result<()> {
        let name = self.name.clone().map_err(Error::InvalidName)?;
        crate::AcquireRequest::new(Job::slot_lock(&name, DateTime::UNIX_EPOCH))?
            .with_ttl(self.ttl)?;
        if let Some(g) = self.grace {
            check_positive("grace", g)?;
        }
        if let Some(m) = self.max_run_time {
            check_positive("max_run_time", m)?;
        }
        let this = Arc::new(Scheduler {
            job: self,
            name,
            locks: locks.clone(),
        });
        this.run(stop).await
    }
}

fn check_job_name(name: &str) -> std::result::Result<(), String> {
    crate::validate_name(name).map_err(|e| match e {
        Error::InvalidName(m) => m.replace("lock name", "job name"),
        other => other.to_string(),
    })?;
    if name.len() > MAX_JOB_NAME_LEN {
        return Err(format!(
            "a job name may be at most {MAX_JOB_NAME_LEN} bytes of UTF-8; this one has {}",
            name.len()
        ));
    }
    Ok(())
}

fn check_positive(what: &str, d: Duration) -> Result<()> {
    if d.is_zero() || d > crate::request::MAX_DURATION {
        return Err(Error::InvalidOption(format!(
            "{what} must lie between 0 and 366 days (got {d:?})"
        )));
    }
    Ok(())
}

/// A running job.
struct Scheduler {
    job: Job,
    name: Arc<str>,
    locks: Locks,
}

/// Why an attempt at a slot did not settle it.
enum Unsettled {
    /// A database error: try again shortly.
    Retry,
    /// An error retrying cannot cure.
    Fatal(Error),
}

impl Scheduler {
    async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(stop);
        self.probe().await?;
        let mut clock = DbClock::new(&self.locks, self.job.skew).await?;
        // The start of the latest slot this host has settled: slots are
        // settled in order.
        let mut last: Option<DateTime<Utc>> = None;
        let mut runs = JoinSet::new();
        loop {
            if clock.stale() {
                if let Err(e) = clock.measure(&self.locks).await {
                    tracing::warn!(error = %e, "dblock::schedule: cannot read the database clock");
                }
            }
            let current = self.job.schedule.bounds_at(clock.now())?;
            let mut todo = Vec::with_capacity(2);
            if self.job.missed == Missed::CatchUpOnce {
                let previous = self.job.schedule.before(current.start)?;
                if last < Some(previous.start) {
                    todo.push((previous, true));
                }
            }
            if last < Some(current.start) {
                todo.push((current, false));
            }
            let mut wake = clock.instant_of(current.end) + Duration::from_millis(2);
            for (bounds, catch_up) in todo {
                match self.attempt(&clock, bounds, catch_up, &mut runs).await {
                    Ok(Some(done)) if catch_up => {
                        last = Some(bounds.start);
                        // The current slot waits for the catch-up run, so
                        // that Overlap::Skip does not skip it for that run.
                        tokio::select! {
                            _ = &mut stop => {
                                while runs.join_next().await.is_some() {}
                                return Ok(());
                            }
                            _ = done => {}
                        }
                    }
                    Ok(_) => last = Some(bounds.start),
                    Err(Unsettled::Fatal(e)) => return Err(e),
                    Err(Unsettled::Retry) => {
                        wake = wake.min(Instant::now() + RETRY_AFTER);
                        break;
                    }
                }
            }
            loop {
                tokio::select! {
                    _ = &mut stop => {
                        while runs.join_next().await.is_some() {}
                        return Ok(());
                    }
                    Some(_) = runs.join_next(), if !runs.is_empty() => {}
                    _ = sleep_until(wake) => break,
                }
            }
        }
    }

    /// Finds out at once whether the backend can keep a claim past its
    /// holder (one that cannot refuses `hold_at_least` before writing
    /// anything), and whether the schema is there: one short lease, on a
    /// name of its own per job.
    async fn probe(&self) -> Result<()> {
        let name = format!("schedule:{}:probe", self.name);
        let claim = self
            .locks
            .acquire(name.as_str())
            .ttl(Duration::from_secs(5))
            .hold_at_least(Duration::ZERO)
            .wait(Duration::ZERO)
            .await;
        match claim {
            // Whatever the release says, the probe has answered (and its
            // lease ends within its ttl anyway).
            Ok(guard) => {
                let _ = guard.release().await;
                Ok(())
            }
            // Another host of the fleet is probing: fine.
            Err(Error::Timeout { .. }) => Ok(()),
            Err(e) if fatal(&e) => Err(self.fatal(e)),
            Err(e) => Err(e),
        }
    }

    fn report(&self, outcome: Outcome) {
        report(&self.job.on_outcome, &outcome);
    }

    /// Claims the slot and starts its run, or finds out why not. `Ok` once
    /// the slot is settled for this host, with a receiver that fires when
    /// the run this host started ends.
    async fn attempt(
        &self,
        clock: &DbClock,
        bounds: Bounds,
        catch_up: bool,
        runs: &mut JoinSet<()>,
    ) -> std::result::Result<Option<oneshot::Receiver<()>>, Unsettled> {
        let job = &self.job;
        let slot = Slot {
            job: self.name.clone(),
            start: bounds.start,
            end: bounds.end,
            catch_up,
        };
        let next = job.schedule.after(bounds).map_err(Unsettled::Fatal)?;
        // A claim is valid only before this (database time). Every claim of
        // the slot is kept until the end of the next slot plus a margin, so
        // two valid claims can never both succeed.
        let valid_until = if catch_up || job.missed == Missed::CatchUpOnce {
            next.end
        } else {
            let len = (bounds.end - bounds.start).to_std().unwrap_or_default();
            let grace = job
                .grace
                .unwrap_or_else(|| (len / 2).min(Duration::from_secs(60)));
            (bounds.start + crate::time::chrono_duration(grace)).min(next.end)
        };
        let lock = Job::slot_lock(&self.name, bounds.start);
        let now = clock.now();
        if now >= valid_until {
            return self.too_late(&lock, slot).await.map(|()| None);
        }
        let hold_until = next.end + chrono::Duration::from_std(HOLD_MARGIN).expect("small");
        // Lengthened by the last round trip to the database, the bound on
        // how far this host's reading of its clock may be off.
        let hold = (hold_until - now).to_std().unwrap_or(HOLD_MARGIN) + clock.uncertainty();
        let claim = self
            .locks
            .acquire(lock.as_str())
            .ttl(job.ttl)
            .hold_at_least(hold)
            .wait(Duration::ZERO)
            .await;
        let guard = match claim {
            Ok(guard) => guard,
            Err(Error::Timeout { .. }) => {
                self.report(Outcome::Taken { slot });
                return Ok(None);
            }
            Err(e) => return Err(self.failed(slot, e)),
        };
        // The database time of the claim: the lease was granted for ttl
        // from then.
        let ttl = chrono::Duration::from_std(job.ttl).expect("checked");
        let claimed_at = guard.expires_at().map(|e| e - ttl);
        if let Some(at) = claimed_at {
            if at >= valid_until {
                // Decided in time, claimed too late (paused, slow): the
                // claim keeps others off, and nobody runs the slot.
                drop(guard);
                self.report(Outcome::Missed { slot });
                return Ok(None);
            }
            if at < bounds.start {
                // This host's estimate ran a little ahead of the database:
                // start no earlier than the slot does.
                sleep((bounds.start - at).to_std().unwrap_or_default()).await;
            }
        }
        let running = match job.overlap {
            Overlap::Allow => None,
            Overlap::Skip => match self.running_lock().await {
                Ok(Some(running)) => Some(running),
                Ok(None) => {
                    drop(guard);
                    self.report(Outcome::Skipped { slot });
                    return Ok(None);
                }
                Err(e) => {
                    // The claim stands (it cannot be taken back): the slot
                    // is lost for the whole fleet.
                    drop(guard);
                    self.report(Outcome::Failed {
                        slot,
                        error: format!("checking for a run still going: {e}"),
                    });
                    return Ok(None);
                }
            },
        };
        let token = guard.token();
        let mut lost = vec![guard.state()];
        lost.extend(running.as_ref().map(LockGuard::state));
        let run = (job.run)(slot.clone(), guard);
        let limit = job.max_run_time;
        let on_outcome = job.on_outcome.clone();
        let (done_tx, done) = oneshot::channel();
        runs.spawn(async move {
            let limit_passed = async {
                match limit {
                    Some(d) => sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let outcome = tokio::select! {
                result = run => Outcome::Ran { slot, token, error: result.err() },
                reason = any_lost(lost) => Outcome::Cancelled {
                    slot, token, reason: format!("the lock was lost ({reason})"),
                },
                _ = limit_passed => Outcome::Cancelled {
                    slot, token,
                    reason: format!("it ran past its max run time of {:?}", limit.unwrap_or_default()),
                },
            };
            if let Some(running) = running {
                let _ = running.release().await;
            }
            report(&on_outcome, &outcome);
            let _ = done_tx.send(());
        });
        Ok(Some(done))
    }

    /// The lease held while a run is under way ([`Overlap::Skip`]); `None`
    /// if a run holds it. Tried three times on database errors.
    async fn running_lock(&self) -> Result<Option<LockGuard>> {
        let name = format!("schedule:{}:running", self.name);
        let mut attempt = 0;
        loop {
            let r = self
                .locks
                .acquire(name.as_str())
                .ttl(self.job.ttl)
                .wait(Duration::ZERO)
                .await;
            match r {
                Ok(guard) => return Ok(Some(guard)),
                Err(Error::Timeout { .. }) => return Ok(None),
                Err(e) if attempt >= 2 || fatal(&e) => return Err(e),
                Err(_) => {
                    attempt += 1;
                    sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The slot can no longer start: taken if someone holds it, else missed.
    async fn too_late(&self, lock: &str, slot: Slot) -> std::result::Result<(), Unsettled> {
        match self.locks.inspect(lock).await {
            Ok(Some(_)) => self.report(Outcome::Taken { slot }),
            Ok(None) => self.report(Outcome::Missed { slot }),
            Err(e) if fatal(&e) => return Err(Unsettled::Fatal(e)),
            Err(_) => self.report(Outcome::Missed { slot }),
        }
        Ok(())
    }

    /// An error retrying cannot cure, explained for a scheduled job.
    fn fatal(&self, e: Error) -> Error {
        match e {
            Error::Unsupported { backend, what } => Error::Unsupported {
                backend,
                what: format!(
                    "scheduled jobs need a slot's claim to outlive the process that made it, \
                     which this backend cannot do ({what}); use a lease backend: \
                     postgres::Lease, mysql::Lease, sqlite::Lease or Memory"
                ),
            },
            e => e,
        }
    }

    fn failed(&self, slot: Slot, e: Error) -> Unsettled {
        if fatal(&e) {
            return Unsettled::Fatal(self.fatal(e));
        }
        self.report(Outcome::Failed {
            slot,
            error: e.to_string(),
        });
        Unsettled::Retry
    }
}

/// Errors that retrying cannot cure.
fn fatal(e: &Error) -> bool {
    matches!(
        e,
        Error::Unsupported { .. }
            | Error::SchemaMissing { .. }
            | Error::InvalidName(_)
            | Error::InvalidOption(_)
    )
}

fn report(on_outcome: &Option<Arc<OutcomeFn>>, outcome: &Outcome) {
    match outcome {
        Outcome::Ran { error: None, .. } | Outcome::Taken { .. } => {
            tracing::info!("dblock::schedule: {outcome}")
        }
        _ => tracing::warn!("dblock::schedule: {outcome}"),
    }
    if let Some(f) = on_outcome {
        f(outcome);
    }
}

/// Resolves with the reason once any of the guards is lost. A guard whose
/// keeper is gone was released by the job: that is not a loss.
async fn any_lost(states: Vec<status::Receiver>) -> String {
    let waits = states.into_iter().map(|rx| -> BoxFuture<'static, String> {
        Box::pin(async move {
            let lost = rx.wait_for(|s| s.lost.is_some()).await.map(|()| {
                rx.borrow()
                    .lost
                    .as_ref()
                    .map(|l| l.detail.clone())
                    .unwrap_or_default()
            });
            match lost {
                Ok(reason) => reason,
                Err(_) => std::future::pending().await,
            }
        })
    });
    futures_select_all(waits.collect()).await
}

/// The first of several futures to finish.
async fn futures_select_all(mut futs: Vec<BoxFuture<'static, String>>) -> String {
    std::future::poll_fn(move |cx| {
        for f in futs.iter_mut() {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_checked() {
        assert!(check_job_name("billing").is_ok());
        assert!(check_job_name("").unwrap_err().contains("job name"));
        assert!(check_job_name("a\0b").is_err());
        assert!(check_job_name(&"x".repeat(MAX_JOB_NAME_LEN)).is_ok());
        assert!(check_job_name(&"x".repeat(MAX_JOB_NAME_LEN + 1))
            .unwrap_err()
            .contains("200"));
        // The longest job name still makes a valid lock name.
        let lock = Job::slot_lock(&"x".repeat(MAX_JOB_NAME_LEN), DateTime::UNIX_EPOCH);
        assert!(crate::validate_name(&lock).is_ok());
    }
}
