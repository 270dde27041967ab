//! `dblock::schedule`: three hosts run the same 2-second schedule on every
//! backend that can honour it, and every slot in the window runs exactly
//! once; hosts with shifted clocks agree; the policies do what they say.
//!
//! The fleet tests run in real time against the real databases
//! (`DBLOCK_TEST_POSTGRES_URL`, `DBLOCK_TEST_MYSQL_URL`); the policy tests
//! run on `Memory` under tokio's paused clock.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dblock::memory::Memory;
use dblock::schedule::{Job, Missed, Outcome, Overlap, Schedule, Slot};
use dblock::{Error, LockGuard, Locks};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::postgres::PgPoolOptions;

/// One run of a slot, as a job recorded it.
#[derive(Debug, Clone)]
struct Run {
    host: usize,
    slot: DateTime<Utc>,
    end: DateTime<Utc>,
    token: u64,
    /// The database time when the job started.
    started: DateTime<Utc>,
}

type Log = Arc<Mutex<Vec<Run>>>;

/// A job that records each run with the database time it started at.
fn recording_job(name: &str, host: usize, locks: Locks, log: Log, every: Duration) -> Job {
    Job::new(
        name,
        Schedule::every(every).unwrap(),
        move |slot: Slot, guard: LockGuard| {
            let (locks, log) = (locks.clone(), log.clone());
            async move {
                let started = locks.now().await?;
                log.lock().unwrap().push(Run {
                    host,
                    slot: slot.start(),
                    end: slot.end(),
                    token: guard.token(),
                    started,
                });
                // Some work, well inside the slot.
                tokio::time::sleep(Duration::from_millis(200)).await;
                guard.release().await
            }
        },
    )
}

/// Runs one job per host for `slots` 2-second slots and checks that every
/// slot fully inside the window ran exactly once, at a database time inside
/// the slot, and that no slot ran twice at all.
async fn fleet(hosts: Vec<Locks>, skews: &[i64]) {
    let every = Duration::from_secs(2);
    let slots = 5;
    let name = common::unique("fleet");
    let log: Log = Arc::default();
    let seen: Arc<Mutex<Vec<(usize, Outcome)>>> = Arc::default();
    let db = hosts[0].clone();
    let begin = db.now().await.expect("database clock");
    let stop_at = tokio::time::Instant::now() + every * slots;
    let mut tasks = Vec::new();
    for (host, locks) in hosts.into_iter().enumerate() {
        let skew = chrono::Duration::seconds(skews.get(host).copied().unwrap_or(0));
        let seen = seen.clone();
        let job = recording_job(&name, host, locks.clone(), log.clone(), every)
            .clock_skew(skew)
            .on_outcome(move |o| seen.lock().unwrap().push((host, o.clone())));
        tasks.push(tokio::spawn(async move {
            job.run_until(&locks, tokio::time::sleep_until(stop_at))
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("the scheduler ran");
    }
    let end = db.now().await.expect("database clock");

    let runs = log.lock().unwrap().clone();
    let mut by_slot: BTreeMap<DateTime<Utc>, Vec<Run>> = BTreeMap::new();
    for r in &runs {
        by_slot.entry(r.slot).or_default().push(r.clone());
    }
    for (slot, rs) in &by_slot {
        assert_eq!(rs.len(), 1, "slot {slot} ran {} times: {rs:?}", rs.len());
        let r = &rs[0];
        assert!(
            r.started >= r.slot && r.started < r.end,
            "slot {slot} started at {} by the database clock, outside the slot: {r:?}",
            r.started
        );
    }
    // Every slot that began after the hosts had started (allow a second
    // for connecting) and ended before they stopped ran.
    let two = chrono::Duration::seconds(2);
    let seen = seen.lock().unwrap().clone();
    // Each host's first slot: a host reports the slots from the one
    // current when it came up (connecting may take seconds on a loaded
    // machine). The window starts with the first host up.
    let first_seen = |host: usize| {
        seen.iter()
            .filter(|(h, _)| *h == host)
            .map(|(_, o)| o.slot().start())
            .min()
    };
    let hosts = skews.len().max(3);
    let first_up = (0..hosts)
        .filter_map(first_seen)
        .min()
        .expect("a host reported");
    let mut start = DateTime::from_timestamp((begin.timestamp() / 2 + 1) * 2, 0)
        .unwrap()
        .max(first_up + two);
    let mut expected = 0;
    while start + two <= end {
        assert!(
            by_slot.contains_key(&start),
            "slot {start} did not run (window {begin} .. {end}); runs: {runs:?}"
        );
        // The host that ran it reported so.
        let runner = by_slot[&start][0].host;
        assert!(
            seen.iter().any(|(h, o)| *h == runner
                && o.slot().start() == start
                && matches!(o, Outcome::Ran { error: None, .. })),
            "host {runner} ran slot {start} but did not report it: {seen:#?}"
        );
        // Every host saw the slot in its time, by the database clock, and
        // found it running here or taken: none missed it.
        for host in (0..hosts).filter(|&h| first_seen(h).is_some_and(|f| f < start)) {
            let settled = seen.iter().any(|(h, o)| {
                *h == host
                    && o.slot().start() == start
                    && matches!(o, Outcome::Ran { error: None, .. } | Outcome::Taken { .. })
            });
            assert!(
                settled,
                "host {host} did not settle slot {start}: {seen:#?}"
            );
        }
        expected += 1;
        start += two;
    }
    assert!(expected >= 3, "the window held only {expected} full slots");
    // Tokens of a name are per slot here; each slot's lease is fresh.
    assert!(runs.iter().all(|r| r.token > 0));
}

fn memory_hosts() -> Vec<Locks> {
    let memory = Memory::new();
    (0..3).map(|_| Locks::new(memory.clone())).collect()
}

async fn postgres_hosts() -> Vec<Locks> {
    let url = common::postgres_url().await;
    let mut hosts = Vec::new();
    for _ in 0..3 {
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .connect(&url)
            .await
            .expect("PostgreSQL reachable (DBLOCK_TEST_POSTGRES_URL)");
        dblock::postgres::migrate(&pool).await.unwrap();
        hosts.push(Locks::new(dblock::postgres::Lease::new(pool)));
    }
    hosts
}

async fn mysql_hosts() -> Vec<Locks> {
    let url = common::mysql_url().await;
    let mut hosts = Vec::new();
    for _ in 0..3 {
        let pool = MySqlPoolOptions::new()
            .max_connections(3)
            .connect(&url)
            .await
            .expect("MySQL reachable (DBLOCK_TEST_MYSQL_URL)");
        dblock::mysql::migrate(&pool).await.unwrap();
        hosts.push(Locks::new(dblock::mysql::Lease::new(pool)));
    }
    hosts
}

async fn sqlite_hosts(dir: &std::path::Path) -> Vec<Locks> {
    let file = dir.join("schedule.db");
    let mut hosts = Vec::new();
    for _ in 0..3 {
        let lease = dblock::sqlite::Lease::open(&file).await.unwrap();
        hosts.push(Locks::new(lease));
    }
    hosts
}

async fn redis_hosts() -> Vec<Locks> {
    let mut hosts = Vec::new();
    for _ in 0..3 {
        let lease = dblock::redis::Lease::open(&common::redis_url())
            .await
            .expect("open Redis (DBLOCK_TEST_REDIS_URL)");
        hosts.push(Locks::new(lease));
    }
    hosts
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dblock-schedule-{tag}-{}-{}",
        std::process::id(),
        Utc::now().timestamp_micros()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_runs_each_slot_once_memory() {
    fleet(memory_hosts(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_runs_each_slot_once_postgres_lease() {
    fleet(postgres_hosts().await, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_runs_each_slot_once_mysql_lease() {
    fleet(mysql_hosts().await, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_runs_each_slot_once_sqlite_lease() {
    let dir = temp_dir("fleet");
    fleet(sqlite_hosts(&dir).await, &[]).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_runs_each_slot_once_redis_lease() {
    fleet(redis_hosts().await, &[]).await;
}

/// Hosts whose clocks are 7 s behind and 5 s (2.5 slots) ahead still agree
/// on the slots, and run each inside its slot by the database clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifted_clocks_agree_postgres_lease() {
    fleet(postgres_hosts().await, &[-7, 0, 5]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifted_clocks_agree_mysql_lease() {
    fleet(mysql_hosts().await, &[3, -5, 11]).await;
}

/// Advisory locks end with their session: a claim could not outlive a
/// crashed host. Refused up front, naming the alternative.
#[tokio::test]
async fn advisory_locks_are_refused() {
    let url = common::postgres_url().await;
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .connect(&url)
        .await
        .expect("PostgreSQL reachable (DBLOCK_TEST_POSTGRES_URL)");
    let locks = Locks::new(dblock::postgres::Advisory::new(pool));
    let job = Job::new(
        common::unique("advisory"),
        Schedule::every(Duration::from_secs(1)).unwrap(),
        |_: Slot, _: LockGuard| async { Ok::<_, Error>(()) },
    );
    let r = tokio::time::timeout(Duration::from_secs(10), job.run(&locks))
        .await
        .expect("refused at once");
    match r {
        Err(Error::Unsupported { what, .. }) => {
            assert!(what.contains("postgres::Lease"), "{what}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

/// A bad job name or option fails before anything is written.
#[tokio::test]
async fn bad_input_is_refused_before_writing() {
    let memory = Memory::new();
    let locks = Locks::new(memory.clone());
    let every = Schedule::every(Duration::from_secs(1)).unwrap();
    let noop = |_: Slot, _: LockGuard| async { Ok::<_, Error>(()) };
    let r = Job::new("", every.clone(), noop).run(&locks).await;
    assert!(
        matches!(r, Err(Error::InvalidName(ref m)) if m.contains("job name")),
        "{r:?}"
    );
    let r = Job::new("x".repeat(201), every.clone(), noop)
        .run(&locks)
        .await;
    assert!(matches!(r, Err(Error::InvalidName(_))), "{r:?}");
    let r = Job::new("j", every.clone(), noop)
        .ttl(Duration::ZERO)
        .run(&locks)
        .await;
    assert!(matches!(r, Err(Error::InvalidOption(_))), "{r:?}");
    let r = Job::new("j", every, noop)
        .max_run_time(Duration::ZERO)
        .run(&locks)
        .await;
    assert!(matches!(r, Err(Error::InvalidOption(_))), "{r:?}");
    assert!(
        locks.list().await.unwrap().is_empty(),
        "nothing was written"
    );
    assert!(matches!(
        Schedule::cron("61 * * * *"),
        Err(Error::InvalidOption(_))
    ));
}

// ---- Policies, on Memory under tokio's paused clock ----

type Outcomes = Arc<Mutex<Vec<Outcome>>>;

/// A job of 10-second slots whose runs take `work` each; returns the
/// outcomes seen by one host running it from `from` until `until`.
fn timed_job(name: &str, work: Duration, outcomes: &Outcomes) -> Job {
    let outcomes = outcomes.clone();
    Job::new(
        name,
        Schedule::every(Duration::from_secs(10)).unwrap(),
        move |_: Slot, guard: LockGuard| async move {
            tokio::time::sleep(work).await;
            drop(guard);
            Ok::<_, Error>(())
        },
    )
    .ttl(Duration::from_secs(3))
    .on_outcome(move |o| outcomes.lock().unwrap().push(o.clone()))
}

fn count(outcomes: &Outcomes, f: impl Fn(&Outcome) -> bool) -> usize {
    outcomes.lock().unwrap().iter().filter(|o| f(o)).count()
}

fn ran(o: &Outcome) -> bool {
    matches!(o, Outcome::Ran { error: None, .. })
}

/// Waits (in paused time) until the Memory clock is at the start of a
/// 10-second slot, plus `plus`.
async fn align(locks: &Locks, plus: Duration) {
    let now = locks.now().await.unwrap();
    let into = Duration::from_millis((now.timestamp_millis() % 10_000) as u64);
    tokio::time::sleep(Duration::from_secs(10) - into + plus).await;
}

/// One host runs the job made by `job` from `into` a 10-second slot for
/// `run_for` (paused time); returns the outcomes it saw.
async fn one_host(
    locks: &Locks,
    into: Duration,
    run_for: Duration,
    job: impl FnOnce(&Outcomes) -> Job,
) -> Outcomes {
    align(locks, into).await;
    let outcomes: Outcomes = Arc::default();
    job(&outcomes)
        .run_until(locks, tokio::time::sleep(run_for))
        .await
        .unwrap();
    outcomes
}

#[tokio::test(start_paused = true)]
async fn overlap_skip_skips_slots_while_a_run_goes_on() {
    // Each run takes 25 s: two and a half slots.
    let outcomes = one_host(
        &Locks::new(Memory::new()),
        Duration::from_millis(100),
        Duration::from_secs(59),
        |o| timed_job("skip", Duration::from_secs(25), o),
    )
    .await;
    // Slots at 0, 10, 20, 30, 40, 50: runs start at 0 and 30; 10 and 20
    // are skipped while the first runs, 40 and 50 while the second does.
    assert_eq!(count(&outcomes, ran), 2, "{outcomes:?}");
    assert_eq!(
        count(&outcomes, |o| matches!(o, Outcome::Skipped { .. })),
        4,
        "{outcomes:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn overlap_allow_starts_every_slot() {
    let outcomes = one_host(
        &Locks::new(Memory::new()),
        Duration::from_millis(100),
        Duration::from_secs(59),
        |o| timed_job("allow", Duration::from_secs(25), o).overlap(Overlap::Allow),
    )
    .await;
    // Six slots start; run_until waits for the last ones to finish.
    assert_eq!(count(&outcomes, ran), 6, "{outcomes:?}");
    assert_eq!(
        count(&outcomes, |o| matches!(o, Outcome::Skipped { .. })),
        0
    );
}

/// A host runs a job of 10-second slots (each run takes 1 s) from 0.1 s
/// into a slot for 15 s, is down for `down`, then runs for `again`. Every
/// host is down meanwhile (there is only this one).
async fn downtime(missed: Missed, down: u64, again: u64) -> Vec<Outcome> {
    let memory = Memory::new();
    let locks = Locks::new(memory.clone());
    align(&locks, Duration::from_millis(100)).await;
    let outcomes: Outcomes = Arc::default();
    let job = timed_job("down", Duration::from_secs(1), &outcomes).missed(missed);
    job.clone()
        .run_until(&locks, tokio::time::sleep(Duration::from_secs(15)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(down)).await;
    job.run_until(&locks, tokio::time::sleep(Duration::from_secs(again)))
        .await
        .unwrap();
    let o = outcomes.lock().unwrap().clone();
    o
}

fn starts(outcomes: &[Outcome], f: impl Fn(&Outcome) -> bool) -> Vec<i64> {
    let first = outcomes
        .iter()
        .find(|o| !o.slot().is_catch_up())
        .map(|o| o.slot().start())
        .unwrap();
    outcomes
        .iter()
        .filter(|o| f(o))
        .map(|o| (o.slot().start() - first).num_seconds())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn missed_catch_up_once_runs_the_latest_missed_slot() {
    // Up through slots 0 and 10; down through 20, 30, 40; back 3.1 s into
    // slot 50, up until 68.1.
    let outcomes = downtime(Missed::CatchUpOnce, 38, 15).await;
    let mut ran_slots = starts(&outcomes, ran);
    ran_slots.sort();
    // Slot -10 is caught up when the first host starts, 40 when it comes
    // back (the latest of the three missed; 20 and 30 never run), and 50
    // runs late, after the catch-up, which CatchUpOnce allows. No slot is
    // skipped for the catch-up run going on.
    assert_eq!(ran_slots, vec![-10, 0, 10, 40, 50, 60], "{outcomes:#?}");
    let caught = starts(&outcomes, |o| ran(o) && o.slot().is_catch_up());
    assert_eq!(caught, vec![-10, 40], "{outcomes:#?}");
}

#[tokio::test(start_paused = true)]
async fn missed_skip_runs_no_missed_slot() {
    // Back 6.1 s into slot 50, past its 5 s grace; up until 68.1.
    let outcomes = downtime(Missed::Skip, 41, 12).await;
    assert_eq!(starts(&outcomes, ran), vec![0, 10, 60], "{outcomes:#?}");
    assert_eq!(
        starts(&outcomes, |o| matches!(o, Outcome::Missed { .. })),
        vec![50],
        "{outcomes:#?}"
    );
    assert!(outcomes.iter().all(|o| !o.slot().is_catch_up()));
}

#[tokio::test(start_paused = true)]
async fn max_run_time_cancels_the_run_and_frees_the_next_slot() {
    let locks = Locks::new(Memory::new());
    align(&locks, Duration::from_millis(100)).await;
    let outcomes: Outcomes = Arc::default();
    let finished = Arc::new(Mutex::new(0));
    let f = finished.clone();
    let o = outcomes.clone();
    let job = Job::new(
        "hang",
        Schedule::every(Duration::from_secs(10)).unwrap(),
        move |_: Slot, _guard: LockGuard| {
            let f = f.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                *f.lock().unwrap() += 1;
                Ok::<_, Error>(())
            }
        },
    )
    .ttl(Duration::from_secs(3))
    .max_run_time(Duration::from_secs(4))
    .on_outcome(move |x| o.lock().unwrap().push(x.clone()));
    job.run_until(&locks, tokio::time::sleep(Duration::from_secs(25)))
        .await
        .unwrap();
    let cancelled = count(
        &outcomes,
        |o| matches!(o, Outcome::Cancelled { reason, .. } if reason.contains("max run time")),
    );
    // Slots 0, 10, 20 each start (the previous run was cancelled at +4 s,
    // releasing the running lease) and each is cancelled.
    assert_eq!(cancelled, 3, "{outcomes:#?}");
    assert_eq!(
        *finished.lock().unwrap(),
        0,
        "no run went on after its cancel"
    );
    assert_eq!(
        count(&outcomes, |o| matches!(o, Outcome::Skipped { .. })),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn a_run_whose_lock_is_lost_is_cancelled() {
    let locks = Locks::new(Memory::new());
    align(&locks, Duration::from_millis(100)).await;
    let outcomes: Outcomes = Arc::default();
    let o = outcomes.clone();
    let (started_tx, started_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64)>();
    let finished = Arc::new(Mutex::new(false));
    let f = finished.clone();
    let job = Job::new(
        "lose",
        Schedule::every(Duration::from_secs(10)).unwrap(),
        move |_: Slot, guard: LockGuard| {
            let (tx, f) = (started_tx.clone(), f.clone());
            async move {
                let _ = tx.send((guard.name().to_owned(), guard.token()));
                tokio::time::sleep(Duration::from_secs(8)).await;
                *f.lock().unwrap() = true;
                Ok::<_, Error>(())
            }
        },
    )
    .ttl(Duration::from_secs(3))
    .on_outcome(move |x| o.lock().unwrap().push(x.clone()));
    let breaker = {
        let locks = locks.clone();
        let mut rx = started_rx;
        async move {
            let (name, _) = rx.recv().await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(locks.force_release(&name).await.unwrap());
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    };
    job.run_until(&locks, breaker).await.unwrap();
    let lost = count(
        &outcomes,
        |o| matches!(o, Outcome::Cancelled { reason, .. } if reason.contains("lost")),
    );
    assert_eq!(lost, 1, "{outcomes:#?}");
    assert!(
        !*finished.lock().unwrap(),
        "the run was cancelled, not finished"
    );
}

/// A host that starts past a slot's grace does not run it.
#[tokio::test(start_paused = true)]
async fn a_host_past_the_grace_misses_the_slot() {
    let outcomes = one_host(
        &Locks::new(Memory::new()),
        Duration::from_secs(7),
        Duration::from_secs(2),
        |o| timed_job("late", Duration::from_secs(1), o),
    )
    .await;
    // Started 7 s into a 10-second slot: past its 5 s grace.
    assert_eq!(count(&outcomes, ran), 0, "{outcomes:#?}");
    assert_eq!(
        count(&outcomes, |o| matches!(o, Outcome::Missed { .. })),
        1,
        "{outcomes:#?}"
    );
}

/// A backend whose slot claims take 6 s to reach the store: a host stalled
/// between deciding to claim and claiming.
#[derive(Debug)]
struct SlowClaims(Memory);

impl dblock::Backend for SlowClaims {
    fn kind(&self) -> &'static str {
        "slow-memory"
    }
    fn acquire(
        &self,
        request: dblock::AcquireRequest,
    ) -> dblock::backend::BoxFuture<'_, dblock::Result<Option<dblock::backend::Grant>>> {
        Box::pin(async move {
            // Slot claims only (`schedule:<job>@<slot>`), not the probe.
            if request.name().contains('@') {
                tokio::time::sleep(Duration::from_secs(6)).await;
            }
            self.0.acquire(request).await
        })
    }
    fn inspect<'a>(
        &'a self,
        name: &'a str,
    ) -> dblock::backend::BoxFuture<'a, dblock::Result<Option<dblock::LockInfo>>> {
        self.0.inspect(name)
    }
    fn list(&self) -> dblock::backend::BoxFuture<'_, dblock::Result<Vec<dblock::LockInfo>>> {
        self.0.list()
    }
    fn now(&self) -> dblock::backend::BoxFuture<'_, dblock::Result<DateTime<Utc>>> {
        self.0.now()
    }
}

/// A claim that reaches the database after its slot's window is given up,
/// never run, and still keeps the slot from every other host.
#[tokio::test(start_paused = true)]
async fn a_claim_that_lands_too_late_is_not_run() {
    use dblock::Backend as _;
    let memory = Memory::new();
    let outcomes = one_host(
        &Locks::new(SlowClaims(memory.clone())),
        Duration::from_millis(100),
        Duration::from_secs(8),
        |o| timed_job("stall", Duration::from_secs(1), o),
    )
    .await;
    // Decided 0.1 s into the slot, claimed at 6.1 s: past the 5 s grace.
    assert_eq!(count(&outcomes, ran), 0, "{outcomes:#?}");
    assert_eq!(
        count(&outcomes, |o| matches!(o, Outcome::Missed { .. })),
        1,
        "{outcomes:#?}"
    );
    let slot = outcomes.lock().unwrap()[0].slot().clone();
    let held = memory
        .inspect(&format!("schedule:stall@{}", slot.rfc3339()))
        .await
        .unwrap();
    assert!(held.is_some(), "the late claim keeps the slot taken");
}
