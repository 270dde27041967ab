//! Batched renewal, written once and run against every lease backend.
//!
//! Each backend's test file implements [`Harness`] and expands
//! [`batch_suite!`]. A subject is a backend on a lease table of its own (so
//! that thousands of leases do not show up in other tests' `list()`), with
//! its renewal counters and, where the backend has them, a way to make every
//! statement fail and the database's own count of UPDATE statements.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use dblock::__unstable::RenewalStats;
use dblock::{LockGuard, Locks};
use futures::stream::{self, StreamExt};
use tokio::time::{sleep, timeout, Instant};

use crate::common::unique;

pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One backend under test, on its own lease table.
pub struct Subject {
    /// The lease table's name (`dblock_leases` in a file of its own for
    /// SQLite, empty for memory).
    pub table: String,
    /// The backend holding the leases.
    pub locks: Locks,
    /// Another backend on the same table, with its own connections.
    pub observer: Locks,
    /// The holder backend's renewal counters.
    pub stats: Box<dyn Fn() -> RenewalStats + Send + Sync>,
    /// Makes every later statement of the holder backend fail (closes its
    /// pool). `None` where nothing can fail (memory).
    pub cut: Option<Box<dyn FnOnce() -> BoxFut<()> + Send>>,
    /// UPDATE statements the database ran on the lease table so far, as
    /// it counts them itself (PostgreSQL: a statement-level trigger).
    pub db_updates: Option<Box<dyn Fn() -> BoxFut<u64> + Send + Sync>>,
    /// Drops the table and whatever else the subject made.
    pub cleanup: Option<BoxFut<()>>,
}

impl Subject {
    pub async fn finish(mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            cleanup.await;
        }
    }
}

/// What the batch suite needs from a backend.
pub trait Harness: Send + Sync + 'static {
    /// A fresh subject; `pool_size` connections for the holder.
    fn subject(&self, pool_size: u32) -> impl Future<Output = Subject> + Send;
}

/// The longest any step may take before it counts as hung.
pub const HUNG: Duration = Duration::from_secs(60);

/// How much longer than their nominal figures the short-ttl tests run: a
/// 1 s lease renewed every third of a second is lost by one batch that
/// takes over 0.8 s, which a 2-core machine running four tests at a time
/// beside busy databases now and then does. Their windows and margins
/// scale with their ttls, so what they check is the same.
const SCALE: u64 = 2;

/// `n` nominal milliseconds, scaled by [`SCALE`].
fn ms(n: u64) -> Duration {
    Duration::from_millis(n * SCALE)
}

/// Takes `n` leases, the k-th with `ttl(k)`, 8 at a time (leaving half of
/// a 16-connection pool to the renewals); in order.
pub async fn take(
    locks: &Locks,
    prefix: &str,
    n: usize,
    ttl: impl Fn(usize) -> Duration,
) -> Vec<LockGuard> {
    take_many(locks, prefix, n, ttl, None, 8).await
}

/// Takes `n` leases named `{unique(prefix)}:{k}`, the k-th with `ttl(k)`
/// and `hold_at_least(hold)` if given, `at_once` at a time; in order.
pub async fn take_many(
    locks: &Locks,
    prefix: &str,
    n: usize,
    ttl: impl Fn(usize) -> Duration,
    hold: Option<Duration>,
    at_once: usize,
) -> Vec<LockGuard> {
    let base = unique(prefix);
    let ttls: Vec<Duration> = (0..n).map(ttl).collect();
    stream::iter(ttls.into_iter().enumerate())
        .map(|(k, ttl)| {
            let (locks, name) = (locks.clone(), format!("{base}:{k}"));
            async move {
                let mut acquire = locks.acquire(name).ttl(ttl).wait(HUNG);
                if let Some(hold) = hold {
                    acquire = acquire.hold_at_least(hold);
                }
                acquire.await.expect("acquire")
            }
        })
        .buffered(at_once)
        .collect()
        .await
}

/// Releases every guard, 8 at a time (the renewals of the others need
/// connections too).
pub async fn release_all(guards: Vec<LockGuard>) {
    stream::iter(guards)
        .map(|g| async move {
            let name = g.name().to_owned();
            g.release()
                .await
                .unwrap_or_else(|e| panic!("release {name}: {e:?}"))
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
}

/// Releases every guard but the `victim`-th (lost: its release would fail).
pub async fn release_all_but(guards: Vec<LockGuard>, victim: usize) {
    release_all(
        guards
            .into_iter()
            .enumerate()
            .filter(|(k, _)| *k != victim)
            .map(|(_, g)| g)
            .collect(),
    )
    .await;
}

/// Waits until the backend holds nothing and its renewal task has stopped.
async fn task_stops(stats: &(dyn Fn() -> RenewalStats + Send + Sync)) {
    let end = Instant::now() + HUNG;
    loop {
        let s = stats();
        if s.held == 0 && !s.running {
            return;
        }
        assert!(Instant::now() < end, "the renewal task did not stop: {s:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// `n` leases of three ttls held by one process are renewed by one
/// statement per tick: a handful of statements in a window where renewing
/// one by one would take thousands. Every lease stays held, its guard's
/// `expires_at` moves on, and the database agrees.
pub async fn one_statement_per_tick(h: &impl Harness, n: usize) {
    let s = h.subject(16).await;
    let ttls = [
        Duration::from_millis(4500),
        Duration::from_millis(6000),
        Duration::from_millis(9000),
    ];
    let guards = take(&s.locks, "batch-tick", n, |k| ttls[k % 3]).await;
    let first: Vec<_> = guards.iter().map(|g| g.expires_at().unwrap()).collect();
    // Leases acquired over a few seconds fall into step at their first
    // renewal.
    sleep(Duration::from_secs(3)).await;
    let before = (s.stats)();
    let db_before = match &s.db_updates {
        Some(count) => Some(count().await),
        None => None,
    };
    let window = Duration::from_secs(9);
    sleep(window).await;
    let after = (s.stats)();
    let db_after = match &s.db_updates {
        Some(count) => Some(count().await),
        None => None,
    };
    let statements = after.statements - before.statements;
    let batches = after.batches - before.batches;
    let renewed = after.renewed - before.renewed;
    eprintln!(
        "{n} leases, ttls {ttls:?}: {statements} statements in {batches} ticks renewed {renewed} leases in {window:?}; last batch {} leases in {:?}",
        after.last_batch_len, after.last_batch_time
    );
    assert_eq!(statements, batches, "more than one statement per tick");
    // The shortest period is 1.5 s, and the longer ttls join its ticks:
    // about 6 ticks (fewer if the database stalls). One statement per lease
    // would be at least 3 per lease.
    assert!(
        (1..=14).contains(&statements),
        "{statements} statements in {window:?}"
    );
    assert!(
        renewed >= 2 * n as u64,
        "only {renewed} renewals of {n} leases in {window:?}"
    );
    if let (Some(b), Some(a)) = (db_before, db_after) {
        // A statement in flight at either end of the window is counted by
        // one side before the other: allow one.
        assert!(
            (a - b).abs_diff(statements) <= 1,
            "the database counted {} UPDATE statements, dblock {statements}",
            a - b
        );
    }
    for (g, first) in guards.iter().zip(&first) {
        assert!(!g.is_lost(), "{}: {:?}", g.name(), g.lost_reason());
        assert!(
            g.expires_at().unwrap() > *first,
            "{}: expires_at did not move",
            g.name()
        );
    }
    let live = s.observer.list().await.unwrap();
    assert_eq!(live.len(), n, "the database does not see every lease held");
    release_all(guards).await;
    task_stops(&*s.stats).await;
    assert!(s.observer.list().await.unwrap().is_empty());
    s.finish().await;
}

/// A lease broken by `force_release` in the middle of a batch is reported
/// lost by the next tick; its neighbours in the same batch are renewed.
pub async fn broken_lease_lost_alone(h: &impl Harness, n: usize) {
    let s = h.subject(16).await;
    let ttl = ms(1500);
    let guards = take(&s.locks, "batch-broken", n, |_| ttl).await;
    sleep(ms(1200)).await;
    let victim = n / 2;
    let before: Vec<_> = guards.iter().map(|g| g.expires_at().unwrap()).collect();
    let counted = (s.stats)();
    assert!(s
        .observer
        .force_release(guards[victim].name())
        .await
        .unwrap());
    timeout(ms(3000), guards[victim].lost())
        .await
        .expect("the broken lease was not reported lost");
    // A couple more ticks.
    sleep(ms(1200)).await;
    let stats = (s.stats)();
    let (statements, renewed) = (
        stats.statements - counted.statements,
        stats.renewed - counted.renewed,
    );
    // Every 500 ms, n leases: batched, not one statement per lease.
    assert!(
        renewed >= n as u64 && statements <= 30,
        "{statements} statements renewed {renewed} leases: {stats:?}"
    );
    for (k, g) in guards.iter().enumerate() {
        if k == victim {
            continue;
        }
        assert!(!g.is_lost(), "{k}: {:?}", g.lost_reason());
        assert!(
            g.expires_at().unwrap() > before[k],
            "{k}: not renewed after its neighbour broke"
        );
    }
    assert_eq!(
        guards[victim].lost_reason(),
        Some(dblock::LostReason::RenewalFailed)
    );
    assert!(guards[victim]
        .lost_detail()
        .unwrap()
        .contains("no longer ours"));
    assert_eq!(s.observer.list().await.unwrap().len(), n - 1);
    release_all_but(guards, victim).await;
    task_stops(&*s.stats).await;
    s.finish().await;
}

/// When every batch statement fails, each lease is reported lost at its own
/// local deadline (ttl minus a fifth, from its last confirmed renewal): the
/// short ones first, none before it had to, none after the database would
/// let someone else in.
pub async fn failed_batches_lose_each_lease_at_its_deadline(h: &impl Harness, n: usize) {
    let mut s = h.subject(16).await;
    let Some(cut) = s.cut.take() else {
        s.finish().await;
        return;
    };
    let ttls = [ms(1000), ms(2000), ms(4000)];
    let guards = take(&s.locks, "batch-cut", n, |k| ttls[k % 3]).await;
    sleep(ms(1500)).await;
    assert!(guards.iter().all(|g| !g.is_lost()));
    cut().await;
    let cut_at = Instant::now();
    let all_lost = stream::iter(guards.iter())
        .map(|g| async move {
            timeout(ms(10_000), g.lost())
                .await
                .expect("not lost after the pool closed");
            cut_at.elapsed()
        })
        .buffered(n)
        .collect::<Vec<Duration>>();
    // The moment a longest lease is lost, the database still counts it as
    // held: the holder learns first.
    let longest = (0..n).rev().find(|k| k % 3 == 2).expect("n >= 3");
    let still_held = async {
        guards[longest].lost().await;
        s.observer
            .inspect(guards[longest].name())
            .await
            .unwrap()
            .is_some()
    };
    let (lost_after, still_held) = tokio::join!(all_lost, still_held);
    assert!(
        still_held,
        "the holder learnt of the loss only after the database expired the lease"
    );
    let mut worst = [Duration::ZERO; 3];
    let mut best = [Duration::MAX; 3];
    for (k, after) in lost_after.iter().enumerate() {
        let ttl = ttls[k % 3];
        // The deadline is 0.8 ttl after the last confirmed renewal, which
        // was at most ttl/3 before the cut.
        let latest = ttl.mul_f64(0.8) + ms(500);
        let earliest = ttl.mul_f64(0.8) - ttl / 3 - ms(100);
        assert!(
            *after <= latest && *after >= earliest,
            "lease {k} (ttl {ttl:?}) lost {after:?} after the cut"
        );
        worst[k % 3] = worst[k % 3].max(*after);
        best[k % 3] = best[k % 3].min(*after);
        assert_eq!(guards[k].lost_reason(), Some(dblock::LostReason::Expired));
        assert!(guards[k].lost_detail().unwrap().contains("deadline"));
    }
    eprintln!("lost after the cut, per ttl {ttls:?}: earliest {best:?}, latest {worst:?}");
    assert!(worst[0] < best[2], "{worst:?} vs {best:?}");
    drop(guards);
    task_stops(&*s.stats).await;
    s.finish().await;
}

/// Releases (with `hold_at_least`) racing batch renewals never revive a
/// lease: each released row keeps exactly `acquired_at + hold`.
pub async fn releases_racing_batches_revive_nothing(h: &impl Harness, n: usize) {
    let s = h.subject(16).await;
    let ttl = ms(1500);
    let hold = Duration::from_secs(30);
    let guards = take_many(&s.locks, "batch-release-race", n, |_| ttl, Some(hold), 8).await;
    sleep(ms(1200)).await;
    let names: Vec<String> = guards.iter().map(|g| g.name().to_owned()).collect();
    // Released over a second and a half while batches come every 500 ms.
    stream::iter(guards.into_iter().enumerate())
        .map(|(k, g)| async move {
            sleep(ms((k as u64 * 7) % 1500)).await;
            g.release().await.expect("release");
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    // Give any batch in flight time to land.
    sleep(ms(500)).await;
    for name in &names {
        let info = s
            .observer
            .inspect(name)
            .await
            .unwrap()
            .expect("kept by hold_at_least");
        let kept = info.expires_at.unwrap() - info.acquired_at.unwrap();
        let off = (kept - chrono::Duration::from_std(hold).unwrap())
            .num_milliseconds()
            .abs();
        assert!(
            off <= 5,
            "{name}: kept {kept} after acquisition instead of {hold:?}"
        );
    }
    task_stops(&*s.stats).await;
    s.finish().await;
}

/// Extends racing batch renewals keep their length: a batch sent with the
/// old ttl never lands after the extend.
pub async fn extends_racing_batches_keep_their_length(h: &impl Harness, n: usize) {
    let s = h.subject(16).await;
    let guards = take(&s.locks, "batch-extend-race", n, |_| ms(1500)).await;
    sleep(ms(1200)).await;
    let by = ms(20_000);
    // Extended over a second and a half while batches come every 500 ms.
    let extended: Vec<_> = stream::iter(guards.iter().enumerate())
        .map(|(k, g)| async move {
            sleep(ms((k as u64 * 7) % 1500)).await;
            g.extend(by).await.expect("extend").expect("an expiry")
        })
        .buffered(64)
        .collect()
        .await;
    // Several batch periods of the old ttl.
    sleep(ms(1500)).await;
    for (g, at) in guards.iter().zip(&extended) {
        assert!(!g.is_lost(), "{:?}", g.lost_reason());
        let seen = s.observer.inspect(g.name()).await.unwrap().expect("held");
        let seen = seen.expires_at.unwrap();
        // Never shortened by a batch sent with the old ttl (a later batch
        // may have renewed it again, with the new one).
        let five = chrono::Duration::milliseconds(5);
        assert!(
            seen >= *at - five,
            "{}: extended to {at}, but the database says {seen}",
            g.name()
        );
        // And the guard knows the latest expiry.
        assert!(
            g.expires_at().unwrap() >= seen - five,
            "{}: guard behind the database",
            g.name()
        );
    }
    release_all(guards).await;
    task_stops(&*s.stats).await;
    s.finish().await;
}

/// The renewal task runs only while something is held, also after guards
/// are dropped rather than released.
pub async fn task_runs_only_while_held(h: &impl Harness) {
    let s = h.subject(4).await;
    assert!(!(s.stats)().running);
    let guards = take(&s.locks, "batch-task", 20, |_| Duration::from_secs(30)).await;
    let stats = (s.stats)();
    assert!(stats.running && stats.held == 20, "{stats:?}");
    drop(guards);
    task_stops(&*s.stats).await;
    assert!(s.observer.list().await.unwrap().is_empty());
    // And it starts again.
    let g = s.locks.acquire(unique("batch-task-again")).await.unwrap();
    assert!((s.stats)().running);
    g.release().await.unwrap();
    task_stops(&*s.stats).await;
    s.finish().await;
}

/// Not a test: holds `DBLOCK_SCALE_LEASES` (default 100,000) leases of 30 s
/// and reports how long taking them took, the memory per lease, and the
/// statements, leases and time of each renewal tick. Run one backend at a
/// time, for instance
///
/// ```text
/// DBLOCK_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
///   cargo test --all-features --test postgres_lease batched::scale -- --ignored --nocapture
/// ```
///
/// (`--test memory`, `--test sqlite_lease`, or `--test mysql_lease` with
/// `DBLOCK_TEST_MYSQL_URL` for the others).
pub async fn scale(h: &impl Harness) {
    let n: usize = std::env::var("DBLOCK_SCALE_LEASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let s = h.subject(32).await;
    let ttl = Duration::from_secs(30);
    let rss_before = rss_kib();
    let started = Instant::now();
    let guards = take_many(&s.locks, "scale", n, |_| ttl, None, 64).await;
    let took = started.elapsed();
    let rss_after = rss_kib();
    eprintln!(
        "took {n} leases in {took:?} ({:?}/lease); RSS {rss_before} KiB -> {rss_after} KiB: ~{} bytes per lease held",
        took / n as u32,
        (rss_after.saturating_sub(rss_before)) * 1024 / n as u64
    );
    // Watch the ticks that follow, until three of them renewed (nearly)
    // everything. A tick is reported once its renewals are recorded.
    let end = Instant::now() + Duration::from_secs(150);
    let mut full_ticks = 0;
    let mut last = (s.stats)();
    while full_ticks < 3 && Instant::now() < end {
        sleep(Duration::from_millis(100)).await;
        let now = (s.stats)();
        if now.renewed > last.renewed && now.last_batch_len > 0 {
            let renewed = now.renewed - last.renewed;
            eprintln!(
                "tick: {renewed} leases renewed by {} statement(s) in {} batch(es); last batch {} leases in {:?}",
                now.statements - last.statements,
                now.batches - last.batches,
                now.last_batch_len,
                now.last_batch_time
            );
            if renewed as usize >= n * 9 / 10 {
                full_ticks += 1;
            }
            last = now;
        }
    }
    let lost = guards.iter().filter(|g| g.is_lost()).count();
    assert_eq!(lost, 0, "leases lost at scale");
    assert!(full_ticks >= 1, "no tick renewed most leases: {last:?}");
    let started = Instant::now();
    stream::iter(guards)
        .map(|g| async move { g.release().await.expect("release") })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    eprintln!("released {n} leases in {:?}", started.elapsed());
    task_stops(&*s.stats).await;
    s.finish().await;
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Expands the batch suite into tests for one harness: each behaviour
/// above with its number of leases, as a test of the same name.
#[macro_export]
macro_rules! batch_suite {
    ($harness:expr) => {
        $crate::batch_suite!(@tests $harness;
            one_statement_per_tick(2000),
            broken_lease_lost_alone(2000),
            failed_batches_lose_each_lease_at_its_deadline(600),
            releases_racing_batches_revive_nothing(300),
            extends_racing_batches_keep_their_length(300),
            task_runs_only_while_held(),
        );
        /// The 100,000-lease measurement: see [`batch::scale`].
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore]
        async fn scale() {
            batch::scale(&$harness).await;
        }
    };
    (@tests $harness:expr; $($name:ident($($n:expr)?),)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                batch::$name(&$harness $(, $n)?).await;
            }
        )*
    };
}
