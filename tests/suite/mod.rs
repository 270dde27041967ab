//! The behavioural suite: written once, run against every backend.
//!
//! Each backend's test file implements [`Fixture`] and expands
//! [`behaviour_suite!`], which turns every behaviour below into a test. A
//! backend is done when the whole suite passes on it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dblock::{Error, LockMode, Locks, LostReason};
use tokio::time::{sleep, timeout, Instant};

use crate::common::unique;

/// `.ttl()` only where the backend has leases: a backend without them
/// (PostgreSQL advisory locks) refuses an explicit ttl.
pub trait TtlIf {
    /// `self.ttl(ttl)` if `lease`, else `self`.
    fn ttl_if(self, lease: bool, ttl: Duration) -> Self;
}

impl TtlIf for dblock::Acquire<'_> {
    fn ttl_if(self, lease: bool, ttl: Duration) -> Self {
        if lease {
            self.ttl(ttl)
        } else {
            self
        }
    }
}

mod election;
pub use election::*;
pub mod lease;
mod semaphore;
pub use semaphore::*;
mod shared;
pub use shared::*;

/// What the suite needs from a backend.
pub trait Fixture: Send + Sync + 'static {
    /// A `Locks` with its own connections, as another process would have
    /// (for `Memory`, another handle on the same in-process service).
    fn locks(&self) -> impl std::future::Future<Output = Locks> + Send;
    /// A `Locks` whose database cannot be reached: any SQL would fail.
    fn unreachable(&self) -> Locks;
    /// Whether shared (reader) locks are implemented (by default, yes).
    fn shared(&self) -> bool {
        true
    }
    /// Whether locks are leases (expire by ttl; `expires_at` is set); by
    /// default, yes.
    fn lease(&self) -> bool {
        true
    }
    /// Whether semaphores (`max_holders(n)` above 1) are implemented.
    fn semaphores(&self) -> bool {
        true
    }
    /// Whether a waiting writer keeps new readers out (no writer
    /// starvation). Only PostgreSQL advisory locks waited for by polling
    /// lack it: a polling writer is not queued on the server, so nothing
    /// tells new readers that it waits.
    fn writer_first(&self) -> bool {
        true
    }
}

/// The longest any step of the suite may take before it counts as hung.
pub const HUNG: Duration = Duration::from_secs(30);

/// Polls `check` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    crate::common::poll_until(within, Duration::from_millis(20), check).await
}

async fn held(locks: &Locks, name: &str) -> bool {
    locks.inspect(name).await.expect("inspect").is_some()
}

/// Many tasks on several independent `Locks` never overlap in the critical
/// section, and every one of them gets its turn.
pub async fn exclusion_among_many_tasks<F: Fixture>(f: &F) {
    let name = unique("exclusion");
    let (_, done) = contend(f, &name, [4, 4, 5], 1, || rand_ms(3)).await;
    assert_eq!(done, 80);
}

/// `handles` independent `Locks`, `tasks` tasks on each, each taking `name`
/// `rounds` times (`[handles, tasks, rounds]`), as a semaphore of
/// `max_holders` when above 1, holding it for `hold()` ms: never more than
/// `max_holders` inside at once. Returns the most that were inside at once
/// and how many turns were taken.
pub(crate) async fn contend<F: Fixture>(
    f: &F,
    name: &str,
    [handles, tasks, rounds]: [usize; 3],
    max_holders: u32,
    hold: fn() -> u64,
) -> (u32, usize) {
    let inside = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut running = Vec::new();
    for _ in 0..handles {
        let locks = f.locks().await;
        for _ in 0..tasks {
            let (locks, name) = (locks.clone(), name.to_owned());
            let (inside, most, done) = (inside.clone(), most.clone(), done.clone());
            running.push(tokio::spawn(async move {
                for _ in 0..rounds {
                    let acquire = locks.acquire(&name).wait(HUNG);
                    let acquire = if max_holders > 1 {
                        acquire.max_holders(max_holders)
                    } else {
                        acquire
                    };
                    let guard = acquire.await.expect("acquire");
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    assert!(
                        now <= max_holders,
                        "{now} holders inside at once, of at most {max_holders}"
                    );
                    most.fetch_max(now, Ordering::SeqCst);
                    sleep(Duration::from_millis(hold())).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                    guard.release().await.expect("release");
                }
            }));
        }
    }
    for t in running {
        timeout(HUNG * 2, t).await.expect("hung").expect("task");
    }
    (most.load(Ordering::SeqCst), done.load(Ordering::SeqCst))
}

fn rand_ms(max: u64) -> u64 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64)
        % (max + 1)
}

/// Readers share; a writer excludes readers and readers exclude a writer.
/// Backends without reader locks refuse `.shared()` with `Unsupported`.
pub async fn shared_and_exclusive<F: Fixture>(f: &F) {
    let (a, b) = (f.locks().await, f.locks().await);
    let name = unique("shared");
    if !f.shared() {
        let err = a.acquire(&name).shared().await.unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
        assert!(
            !held(&b, &name).await,
            "a refused shared lock must not be held"
        );
        return;
    }
    let r1 = a.acquire(&name).shared().wait(HUNG).await.unwrap();
    let r2 = b.acquire(&name).shared().wait(HUNG).await.unwrap();
    assert_eq!(r1.mode(), LockMode::Shared);
    assert!(r2.token() > r1.token());
    assert!(
        b.try_acquire(&name).await.unwrap().is_none(),
        "writer got in beside readers"
    );
    let info = b.inspect(&name).await.unwrap().expect("held");
    assert_eq!(info.mode, LockMode::Shared);
    assert_eq!(info.holders, 2);
    r1.release().await.unwrap();
    assert!(
        b.try_acquire(&name).await.unwrap().is_none(),
        "writer got in beside a reader"
    );
    r2.release().await.unwrap();
    let w = b.acquire(&name).wait(HUNG).await.unwrap();
    assert!(
        a.acquire(&name)
            .shared()
            .wait(Duration::ZERO)
            .await
            .is_err(),
        "reader got in beside a writer"
    );
    // A reader waiting for the writer gets in once it leaves.
    let waiter = {
        let (a, name) = (a.clone(), name.clone());
        tokio::spawn(async move { a.acquire(&name).shared().wait(HUNG).await })
    };
    sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    w.release().await.unwrap();
    let r3 = waiter.await.unwrap().expect("reader after writer");
    assert_eq!(r3.mode(), LockMode::Shared);
    r3.release().await.unwrap();
}

/// `try_acquire` never waits; `.wait(d)` gives up with `Timeout` after `d`;
/// a waiter gets the lock once it is released.
pub async fn try_wait_and_timeout<F: Fixture>(f: &F) {
    let (a, b) = (f.locks().await, f.locks().await);
    let name = unique("wait");
    let g = a.acquire(&name).await.unwrap();
    assert!(b.try_acquire(&name).await.unwrap().is_none());

    let started = Instant::now();
    let err = b
        .acquire(&name)
        .wait(Duration::from_millis(300))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(
        waited >= Duration::from_millis(290),
        "gave up early: {waited:?}"
    );
    assert!(waited < HUNG, "timeout did not fire: {waited:?}");

    let err = b.acquire(&name).wait(Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");

    let waiter = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.acquire(&name).wait(HUNG).await })
    };
    sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "waiter got a held lock");
    let first = g.token();
    g.release().await.unwrap();
    let g2 = timeout(HUNG, waiter)
        .await
        .expect("waiter hung")
        .unwrap()
        .unwrap();
    assert!(g2.token() > first);
    g2.release().await.unwrap();
    assert!(b.try_acquire(&name).await.unwrap().is_some());
}

/// Tokens strictly increase across successive holders, across `Locks`
/// instances with their own connections.
pub async fn tokens_strictly_increase<F: Fixture>(f: &F) {
    let name = unique("tokens");
    let mut last = 0;
    for round in 0..3 {
        let locks = f.locks().await;
        for _ in 0..5 {
            let g = locks.acquire(&name).wait(HUNG).await.unwrap();
            assert!(
                g.token() > last,
                "round {round}: token {} after {last}",
                g.token()
            );
            last = g.token();
            if round % 2 == 0 {
                g.release().await.unwrap();
            } else {
                drop(g);
                // A dropped guard releases in the background.
                let other = f.locks().await;
                assert!(eventually(HUNG, || async { !held(&other, &name).await }).await);
            }
        }
    }
}

/// Release and drop leave nothing held, as the database sees it from
/// another connection; a released name can be taken at once.
pub async fn release_and_drop_leave_nothing<F: Fixture>(f: &F) {
    let (a, observer) = (f.locks().await, f.locks().await);
    let name = unique("release");
    let g = a.acquire(&name).await.unwrap();
    assert!(held(&observer, &name).await);
    g.release().await.unwrap();
    assert!(!held(&observer, &name).await, "held after release");
    // Released, not dropped: a dropped guard's release runs in the
    // background, and until its answer is in (the server may free the
    // name before it sends that answer) `observer` itself still counts the
    // name as held, which would make the last check below race it.
    let taken = observer.try_acquire(&name).await.unwrap();
    taken
        .expect("free at once after a release")
        .release()
        .await
        .unwrap();

    let g = a.acquire(&name).wait(HUNG).await.unwrap();
    drop(g);
    assert!(
        eventually(HUNG, || async { !held(&observer, &name).await }).await,
        "held after drop"
    );
    assert!(observer.try_acquire(&name).await.unwrap().is_some());
}

/// Acquisitions cancelled at any point, waiting or racing a grant, leave no
/// lock held that no guard owns, and the backend serves new work.
pub async fn cancellation_leaves_nothing<F: Fixture>(f: &F) {
    let (a, b, observer) = (f.locks().await, f.locks().await, f.locks().await);
    let name = unique("cancel");
    // Cancelled while waiting for a held lock.
    let g = a.acquire(&name).await.unwrap();
    for _ in 0..5 {
        assert!(timeout(Duration::from_millis(50), b.acquire(&name))
            .await
            .is_err());
    }
    g.release().await.unwrap();
    // Cancelled at assorted points of an uncontended acquisition, some of
    // them after the grant was made.
    for i in 0..100u64 {
        let _ = timeout(Duration::from_micros(i * 97 % 3000), b.acquire(&name)).await;
    }
    assert!(
        eventually(HUNG, || async { !held(&observer, &name).await }).await,
        "a cancelled acquisition left the lock held"
    );
    let g = timeout(HUNG, b.acquire(&name))
        .await
        .expect("backend stuck")
        .unwrap();
    g.release().await.unwrap();
    let g = timeout(HUNG, a.acquire(&name))
        .await
        .expect("backend stuck")
        .unwrap();
    g.release().await.unwrap();
}

/// A release whose caller stops waiting still goes through: the next
/// holder gets the name at once, not when a lease would run out.
pub async fn cancelled_release_still_releases<F: Fixture>(f: &F) {
    let (a, b) = (f.locks().await, f.locks().await);
    let name = unique("cancel-release");
    // Far beyond the bound below: only the release itself frees the name.
    let ttl = Duration::from_secs(300);
    for i in 0..40u64 {
        let g = a
            .acquire(&name)
            .ttl_if(f.lease(), ttl)
            .wait(HUNG)
            .await
            .unwrap();
        // Given up after 1 to 4 polls: once its statement is sent, while
        // it runs, or not at all (it may be done by then).
        {
            let mut release = std::pin::pin!(g.release());
            for _ in 0..=i % 4 {
                if futures::poll!(release.as_mut()).is_ready() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        let next = timeout(Duration::from_secs(10), b.acquire(&name))
            .await
            .unwrap_or_else(|_| panic!("round {i}: a cancelled release left the lock held"))
            .unwrap();
        next.release().await.unwrap();
    }
}

/// Breaking the lock from outside (terminating the holder's session, ending
/// its lease) fires `lost()`; releasing it then reports `Lost`.
pub async fn lost_fires_when_broken<F: Fixture>(f: &F) {
    let (a, operator) = (f.locks().await, f.locks().await);
    let name = unique("lost");
    let g = a
        .acquire(&name)
        .ttl_if(f.lease(), Duration::from_millis(900))
        .await
        .unwrap();
    assert!(!g.is_lost());
    assert!(
        operator.force_release(&name).await.unwrap(),
        "nothing was broken"
    );
    timeout(Duration::from_secs(10), g.lost())
        .await
        .expect("lost() did not fire");
    assert!(g.is_lost());
    // Broken through another backend: a lease finds it at its next
    // renewal, an advisory holder finds its session terminated.
    let reason = g.lost_reason().expect("a cause");
    assert!(
        matches!(reason, LostReason::RenewalFailed | LostReason::Terminated),
        "{reason:?}: {:?}",
        g.lost_detail()
    );
    assert!(!g.lost_detail().unwrap().is_empty());
    // The errors carry the same cause.
    let extended = g.extend(Duration::from_secs(1)).await;
    assert!(
        matches!(&extended, Err(Error::Lost { reason: r, .. }) if *r == reason),
        "{extended:?}"
    );
    let released = g.release().await;
    assert!(
        matches!(&released, Err(Error::Lost { reason: r, .. }) if *r == reason),
        "{released:?}"
    );
    // The name is free for others.
    assert!(operator.try_acquire(&name).await.unwrap().is_some());
}

/// A holder that dies without releasing (its runtime is torn down, as when a
/// process is killed) does not keep the lock forever: a lease is taken over
/// once its ttl has passed by the database clock, an advisory lock as soon
/// as its session ends.
pub async fn dead_holder_is_taken_over<F: Fixture>(f: &F) {
    let name = unique("dead");
    let ttl = Duration::from_millis(1500);
    let lease = f.lease();
    let locks = f.locks().await;
    let taken = Instant::now();
    {
        let (locks, name) = (locks.clone(), name.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let g = rt.block_on(async { locks.acquire(&name).ttl_if(lease, ttl).await.unwrap() });
            std::mem::forget(g);
            // Dropping the runtime kills the keeper mid-flight, like a crash.
            rt.shutdown_background();
        })
        .join()
        .unwrap();
    }
    let other = f.locks().await;
    let g = other
        .acquire(&name)
        .wait(HUNG)
        .await
        .expect("dead holder's lock never freed");
    if f.lease() {
        assert!(
            taken.elapsed() >= ttl.mul_f64(0.9),
            "a lease was taken over before its ttl: {:?}",
            taken.elapsed()
        );
    }
    g.release().await.unwrap();
}

/// Bad names are refused with `InvalidName` before any SQL runs (the
/// unreachable database would otherwise answer with a connection error).
pub async fn bad_names_rejected_before_sql<F: Fixture>(f: &F) {
    let locks = f.unreachable();
    for bad in [
        String::new(),
        "x".repeat(256),
        "a\0b".into(),
        "🔒".repeat(64),
    ] {
        let e = locks.acquire(bad.clone()).await.unwrap_err();
        assert!(matches!(e, Error::InvalidName(_)), "{bad:?}: {e:?}");
        let e = locks.try_acquire(bad.clone()).await.unwrap_err();
        assert!(matches!(e, Error::InvalidName(_)), "{bad:?}: {e:?}");
        let e = locks.inspect(&bad).await.unwrap_err();
        assert!(matches!(e, Error::InvalidName(_)), "{bad:?}: {e:?}");
        let e = locks.force_release(&bad).await.unwrap_err();
        assert!(matches!(e, Error::InvalidName(_)), "{bad:?}: {e:?}");
    }
    for (what, e) in [
        (
            "ttl 0",
            locks.acquire("ok").ttl(Duration::ZERO).await.unwrap_err(),
        ),
        (
            "ttl huge",
            locks.acquire("ok").ttl(Duration::MAX).await.unwrap_err(),
        ),
        (
            "wait huge",
            locks.acquire("ok").wait(Duration::MAX).await.unwrap_err(),
        ),
        (
            "hold huge",
            locks
                .acquire("ok")
                .hold_at_least(Duration::MAX)
                .await
                .unwrap_err(),
        ),
    ] {
        assert!(matches!(e, Error::InvalidOption(_)), "{what}: {e:?}");
    }
    // Awkward but valid names work on a reachable backend.
    let good = f.locks().await;
    for name in [
        "'; DROP TABLE dblock_leases; --".to_owned(),
        "🔒 ünïcödé ✓".into(),
        "é".repeat(127),
    ] {
        let g = good.acquire(name.clone()).wait(HUNG).await.unwrap();
        assert_eq!(g.name(), name);
        let info = good.inspect(&name).await.unwrap().expect("held");
        assert_eq!(info.name.as_deref(), Some(name.as_str()));
        g.release().await.unwrap();
    }
}

/// `inspect` and `list` report a held lock with its mode and token, and
/// nothing once it is released.
pub async fn inspect_and_list<F: Fixture>(f: &F) {
    let (a, observer) = (f.locks().await, f.locks().await);
    let name = unique("inspect");
    assert!(observer.inspect(&name).await.unwrap().is_none());
    let g = a
        .acquire(&name)
        .ttl_if(f.lease(), Duration::from_secs(20))
        .await
        .unwrap();
    let info = observer.inspect(&name).await.unwrap().expect("held");
    assert_eq!(info.mode, LockMode::Exclusive);
    assert_eq!(info.holders, 1);
    assert!(!info.holder.is_empty());
    if f.lease() {
        assert_eq!(info.token, Some(g.token()));
        let expires = info.expires_at.expect("a lease has an expiry");
        assert!(expires > chrono::Utc::now() + chrono::Duration::seconds(10));
        assert!(info.acquired_at.is_some());
        assert!(g.expires_at().is_some());
    } else {
        assert!(g.expires_at().is_none());
    }
    // The holder's own view names the lock and its token.
    let mine = a.list().await.unwrap();
    let entry = mine
        .iter()
        .find(|i| i.name.as_deref() == Some(name.as_str()))
        .expect("listed");
    assert_eq!(entry.token, Some(g.token()));
    g.release().await.unwrap();
    assert!(observer.inspect(&name).await.unwrap().is_none());
    assert!(!crate::common::is_listed(&a, &name).await);
}

/// A second acquisition through the same `Locks` waits like any other.
pub async fn not_reentrant<F: Fixture>(f: &F) {
    let a = f.locks().await;
    let name = unique("reentrant");
    let g = a.acquire(&name).await.unwrap();
    assert!(a.try_acquire(&name).await.unwrap().is_none(), "re-entered");
    assert!(matches!(
        a.acquire(&name).wait(Duration::from_millis(100)).await,
        Err(Error::Timeout { .. })
    ));
    g.release().await.unwrap();
    assert!(a.try_acquire(&name).await.unwrap().is_some());
}

/// Extends the lease `g` to 20 s from now, well past its expiry before;
/// returns the new expiry.
pub(crate) async fn extend_by_20s(g: &dblock::LockGuard) -> chrono::DateTime<chrono::Utc> {
    let first = g.expires_at().unwrap();
    let extended = g
        .extend(Duration::from_secs(20))
        .await
        .unwrap()
        .expect("expiry");
    assert!(extended > first + chrono::Duration::seconds(10));
    extended
}

/// `extend` pushes a lease's expiry out (and checks an advisory lock's
/// session), and renewal keeps a lease alive well past its first ttl.
pub async fn extend_and_renewal<F: Fixture>(f: &F) {
    let (a, observer) = (f.locks().await, f.locks().await);
    let name = unique("extend");
    let ttl = Duration::from_millis(600);
    let g = a.acquire(&name).ttl_if(f.lease(), ttl).await.unwrap();
    if f.lease() {
        let extended = extend_by_20s(&g).await;
        assert_eq!(g.expires_at(), Some(extended));
        let seen = observer
            .inspect(&name)
            .await
            .unwrap()
            .unwrap()
            .expires_at
            .unwrap();
        assert!(
            (seen - extended).num_milliseconds().abs() < 5,
            "{seen} vs {extended}"
        );
        g.release().await.unwrap();
        // Background renewal: held for several ttls without a word.
        let g = a.acquire(&name).ttl_if(f.lease(), ttl).await.unwrap();
        sleep(ttl * 4).await;
        assert!(!g.is_lost(), "lost: {:?}", g.lost_reason());
        assert!(observer.try_acquire(&name).await.unwrap().is_none());
        g.release().await.unwrap();
    } else {
        assert_eq!(g.extend(Duration::from_secs(20)).await.unwrap(), None);
        g.release().await.unwrap();
    }
    let g = a.acquire(&name).await.unwrap();
    assert!(matches!(
        g.extend(Duration::ZERO).await,
        Err(Error::InvalidOption(_))
    ));
    g.release().await.unwrap();
}

/// `hold_at_least` keeps a lease after an early release, so the slot runs
/// once; backends whose locks end with their session refuse it.
pub async fn hold_at_least<F: Fixture>(f: &F) {
    let (a, b) = (f.locks().await, f.locks().await);
    let name = unique("hold");
    let hold = Duration::from_millis(1200);
    let r = a.acquire(&name).hold_at_least(hold).await;
    if !f.lease() {
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
        assert!(!held(&b, &name).await);
        return;
    }
    let g = r.unwrap();
    let taken = Instant::now();
    g.release().await.unwrap();
    assert!(
        b.try_acquire(&name).await.unwrap().is_none(),
        "free before hold_at_least"
    );
    let g2 = b.acquire(&name).wait(HUNG).await.unwrap();
    assert!(
        taken.elapsed() >= hold.mul_f64(0.9),
        "{:?}",
        taken.elapsed()
    );
    g2.release().await.unwrap();
}

/// Options a backend cannot keep are refused the same way everywhere:
/// `.ttl()` and `.hold_at_least()` on a backend without leases answer
/// `Unsupported` before anything is sent to the database (an unreachable
/// one answers the same), and take nothing. A lease backend keeps the ttl
/// as its lease length.
pub async fn unhonoured_options_refused<F: Fixture>(f: &F) {
    let name = unique("unhonoured");
    let ttl = Duration::from_secs(7);
    let a = f.locks().await;
    if !f.lease() {
        let down = f.unreachable();
        for locks in [&down, &a] {
            let r = locks.acquire(&name).ttl(ttl).wait(Duration::ZERO).await;
            assert!(matches!(r, Err(Error::Unsupported { .. })), "ttl: {r:?}");
            let r = locks
                .acquire(&name)
                .hold_at_least(ttl)
                .wait(Duration::ZERO)
                .await;
            assert!(matches!(r, Err(Error::Unsupported { .. })), "hold: {r:?}");
        }
        assert!(!held(&a, &name).await);
        // The same acquisition without them is granted.
        let g = a.acquire(&name).wait(HUNG).await.unwrap();
        assert_eq!(g.expires_at(), None);
        g.release().await.unwrap();
        return;
    }
    let g = a.acquire(&name).ttl(ttl).wait(HUNG).await.unwrap();
    let now = a.now().await.unwrap();
    let left = (g.expires_at().expect("a lease expires") - now)
        .to_std()
        .unwrap();
    assert!(
        left <= ttl && left > ttl - Duration::from_secs(3),
        "expires in {left:?} with a ttl of {ttl:?}"
    );
    g.release().await.unwrap();
}

/// Expands the whole suite into tests for one fixture.
#[macro_export]
macro_rules! behaviour_suite {
    ($fixture:expr) => {
        $crate::behaviour_suite!(@tests $fixture;
            exclusion_among_many_tasks, shared_and_exclusive, try_wait_and_timeout,
            tokens_strictly_increase, release_and_drop_leave_nothing,
            cancellation_leaves_nothing, cancelled_release_still_releases, lost_fires_when_broken, dead_holder_is_taken_over,
            bad_names_rejected_before_sql, inspect_and_list, not_reentrant,
            extend_and_renewal, hold_at_least, unhonoured_options_refused,
            // Leader election and the lock helpers (election.rs).
            leader_unique_and_observed, broken_leader_is_replaced, dead_leader_is_replaced,
            resign_hands_over, with_lock_cancels_on_loss, lost_owned_fires_in_a_task,
            try_now_on_the_builder,
            // Semaphores (semaphore.rs).
            semaphore_bounds_holders, semaphore_permits_inspect_and_disagreement,
            semaphore_waiter_gets_a_freed_permit, semaphore_renewal_and_loss,
            semaphore_force_release_under_claims,
            // Shared (reader) locks (shared.rs).
            readers_together_writer_alone, readers_are_renewed, waiting_writer_blocks_new_readers,
            reader_lost_at_its_deadline, force_release_frees_all_readers,
            reader_hold_at_least);
    };
    (@tests $fixture:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let fixture = $fixture.await;
                suite::$name(&fixture).await;
            }
        )*
    };
}
