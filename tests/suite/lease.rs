//! The lease-specific behaviours: written once, run on every lease backend.
//!
//! A lease backend's test file implements [`LeaseFixture`] (and, for the SQL
//! tables, [`TableFixture`]) and expands [`lease_suite!`], which turns every
//! behaviour below into a test in a `lease` module of that binary.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dblock::{Error, LockGuard, Locks};
use tokio::time::{sleep, timeout, Instant};

use super::Fixture;
use crate::common::unique;

/// Cuts a backend off from its database (closes its pool, black-holes its
/// connection).
pub type Cut = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the lease behaviours need from a backend beyond [`Fixture`] (a
/// clone serves a holder in another "process": a thread and runtime of its
/// own).
pub trait LeaseFixture: Fixture + Clone {
    /// The database's clock now.
    fn db_now(&self) -> impl Future<Output = DateTime<Utc>> + Send;
    /// Makes the lease on `name` run out now, as the database counts it
    /// (its holder paused past it), behind the holder's back.
    fn expire_now(&self, name: &str) -> impl Future<Output = ()> + Send;
    /// Whether `inspect` reads a lease's expiry as stored (true for the SQL
    /// tables); Redis works it out from the key's remaining time in
    /// milliseconds, so two readings of one expiry differ by a few.
    fn exact_expiry(&self) -> bool {
        true
    }
}

/// `a` and `b` are the same expiry, as exactly as `f` reads expiries.
fn same_expiry<F: LeaseFixture>(f: &F, a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) {
    let (a, b) = (a.expect("an expiry"), b.expect("an expiry"));
    if f.exact_expiry() {
        assert_eq!(a, b);
    } else {
        let apart = (a - b).num_microseconds().unwrap().abs();
        assert!(apart <= 10_000, "{a} and {b} are {apart} µs apart");
    }
}

/// What the behaviours of a lease *table* (the SQL backends) need.
pub trait TableFixture: LeaseFixture {
    /// `Error::SchemaMissing`'s `migrate` and `dir` on this backend.
    fn schema_missing(&self) -> (&'static str, &'static str);
    /// A `Locks` over the lease table `table` (as `with_table` takes it).
    fn with_table(&self, table: &str) -> impl Future<Output = Result<Locks, Error>> + Send;
    /// Creates a lease table whose name is found only if it is quoted
    /// (mixed case, or qualified by its schema) and returns the name to give
    /// `with_table`.
    fn custom_table(&self) -> impl Future<Output = String> + Send;
    /// A `Locks` and what cuts it off from the database.
    fn doomed(&self) -> impl Future<Output = (Locks, Cut)> + Send;
    /// A `Locks` on a pool of one connection, and that connection, checked
    /// out: the `Locks` waits for it until it is dropped.
    fn starved(&self) -> impl Future<Output = (Locks, Box<dyn Any + Send>)> + Send;
    /// How many rows of the lease table (live or not) have a name that
    /// starts with `prefix` and a colon.
    fn lease_rows(&self, prefix: &str) -> impl Future<Output = i64> + Send;
}

/// A holder whose process dies: its runtime (and renewal task) is torn down
/// without a release. Returns its token.
pub fn die_holding<F: Fixture>(f: &F, name: &str, ttl: Duration) -> u64 {
    std::thread::scope(|s| {
        s.spawn(|| {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let token = runtime.block_on(async {
                let locks = f.locks().await;
                let guard = locks.acquire(name).ttl(ttl).await.unwrap();
                let token = guard.token();
                std::mem::forget(guard);
                token
            });
            drop(runtime);
            token
        })
        .join()
        .unwrap()
    })
}

/// Thirty-two contenders spread over `backends` try `name` at once: exactly
/// one wins and none gets an error. The winners keep their guards until
/// every contender has its answer. Returns the winner's token.
pub async fn one_winner(backends: &[Locks], name: &str) -> u64 {
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let locks = backends[i % backends.len()].clone();
            let (name, barrier) = (name.to_owned(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                locks.try_acquire(name).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        // Every contender gets an answer, none an error.
        if let Some(g) = task.await.unwrap().expect("no error in the race") {
            winners.push(g);
        }
    }
    assert_eq!(winners.len(), 1, "{name}: {} winners", winners.len());
    let winner = winners.pop().unwrap();
    let token = winner.token();
    winner.release().await.unwrap();
    token
}

/// The basics of a lease: its expiry, `try_acquire` and a timed-out wait
/// while it is held, `inspect` and `list` while it is and after it is not,
/// and a dropped guard's lease released in the background.
pub async fn acquire_try_timeout_release_inspect<F: LeaseFixture>(f: &F) {
    let locks = f.locks().await;
    let name = unique("lease-basic");
    let has = |all: &[dblock::LockInfo], token: Option<u64>| {
        all.iter().any(|i| {
            i.name.as_deref() == Some(name.as_str()) && token.is_none_or(|t| i.token == Some(t))
        })
    };

    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(guard.name(), name);
    assert!(!guard.is_lost());
    let left = guard.expires_at().expect("a lease has an expiry") - f.db_now().await;
    assert!(
        left > chrono::Duration::seconds(8) && left <= chrono::Duration::seconds(10),
        "{left}"
    );

    assert!(locks.try_acquire(&name).await.unwrap().is_none());
    let started = Instant::now();
    let err = locks
        .acquire(&name)
        .wait(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    let info = locks.inspect(&name).await.unwrap().expect("held");
    assert_eq!(info.name.as_deref(), Some(name.as_str()));
    assert_eq!(info.token, Some(guard.token()));
    assert!(info.holder.ends_with(&format!(":{}", std::process::id())));
    assert!(info.acquired_at.unwrap() < info.expires_at.unwrap());
    same_expiry(f, info.expires_at, guard.expires_at());
    assert!(has(&locks.list().await.unwrap(), Some(guard.token())));

    guard.release().await.unwrap();
    assert!(locks.inspect(&name).await.unwrap().is_none());
    assert!(!has(&locks.list().await.unwrap(), None));
    let again = locks.try_acquire(&name).await.unwrap().expect("free again");
    drop(again);
    // Dropping releases in the background.
    let deadline = Instant::now() + Duration::from_secs(5);
    while locks.inspect(&name).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "a dropped guard was not released"
        );
        sleep(Duration::from_millis(10)).await;
    }
    let next = locks
        .acquire(&name)
        .wait(Duration::from_secs(5))
        .await
        .unwrap();
    next.release().await.unwrap();
}

/// A lease whose holder died is granted again once the database's clock has
/// passed its expiry, not before.
pub async fn a_dead_holders_lease_is_taken_over_after_its_ttl<F: LeaseFixture>(f: &F) {
    let locks = f.locks().await;
    let name = unique("lease-dead");
    let dead = die_holding(f, &name, Duration::from_millis(1500));
    let died = Instant::now();

    let before = locks.inspect(&name).await.unwrap().expect("still leased");
    assert_eq!(before.token, Some(dead));
    assert!(locks.try_acquire(&name).await.unwrap().is_none());

    let guard = locks
        .acquire(&name)
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    let took = died.elapsed();
    assert!(guard.token() > dead);
    assert!(
        took >= Duration::from_millis(1000),
        "taken over after only {took:?}"
    );
    // Granted only once the database clock passed the dead lease's expiry.
    let after = locks.inspect(&name).await.unwrap().expect("held");
    assert!(
        after.acquired_at.unwrap() >= before.expires_at.unwrap(),
        "{after:?} vs {before:?}"
    );
    assert!(guard.expires_at().unwrap() > f.db_now().await);
    guard.release().await.unwrap();
}

/// A holder whose lease ran out (it paused past it) or was broken by an
/// operator can neither release nor extend the lease granted after it.
pub async fn a_stale_holder_can_neither_release_nor_extend_the_next_lease<F: LeaseFixture>(f: &F) {
    let (a, b) = (f.locks().await, f.locks().await);

    // A pauses past its lease: the database lets it run out.
    let name = unique("lease-stale");
    let stale = a.acquire(&name).ttl(Duration::from_secs(60)).await.unwrap();
    f.expire_now(&name).await;
    let next = b
        .acquire(&name)
        .ttl(Duration::from_secs(60))
        .wait(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(next.token() > stale.token());
    stale_is_refused(f, &b, stale, next).await;

    // The lease is broken behind its holder's back and someone else takes it.
    let name = unique("lease-stale-broken");
    let stale = a.acquire(&name).ttl(Duration::from_secs(30)).await.unwrap();
    assert!(b.force_release(&name).await.unwrap());
    assert!(!b.force_release(&name).await.unwrap());
    let next = b.acquire(&name).ttl(Duration::from_secs(30)).await.unwrap();
    assert!(next.token() > stale.token());
    stale_is_refused(f, &b, stale, next).await;
}

/// A holder whose whole process stops (no renewal can run) past its lease:
/// another takes the lease, and the paused holder's release, once it
/// resumes, fails and leaves the new lease alone.
pub async fn a_paused_holder_cannot_release_the_next_lease<F: LeaseFixture>(f: &F) {
    let locks = f.locks().await;
    let name = unique("lease-paused");
    let (taken_tx, taken_rx) = std::sync::mpsc::channel();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    let paused = {
        let (f, name) = (f.clone(), name.clone());
        crate::common::on_own_runtime(async move {
            let locks = f.locks().await;
            let guard = locks
                .acquire(name)
                .ttl(Duration::from_millis(600))
                .await
                .unwrap();
            taken_tx.send(guard.token()).unwrap();
            // The whole "process" stops: no renewal can run.
            resume_rx.recv().unwrap();
            guard.release().await
        })
    };
    let old = taken_rx.recv().unwrap();
    let next = locks
        .acquire(&name)
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(next.token() > old);
    resume_tx.send(()).unwrap();
    let released = paused.join().unwrap();
    assert!(
        matches!(released, Err(Error::Lost { .. })),
        "the stale release must fail: {released:?}"
    );
    let info = locks.inspect(&name).await.unwrap().expect("still held");
    assert_eq!(info.token, Some(next.token()));
    assert!(!next.is_lost());
    next.release().await.unwrap();
}

/// `stale`'s extend and release fail as lost and change nothing of `next`,
/// B's lease on the same name.
async fn stale_is_refused<F: LeaseFixture>(f: &F, b: &Locks, stale: LockGuard, next: LockGuard) {
    let name = next.name().to_owned();
    let before = b.inspect(&name).await.unwrap().expect("held by B");
    // extend reaches the database (the stale guard does not know yet).
    assert!(!stale.is_lost());
    let err = stale.extend(Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err:?}");
    assert!(stale.is_lost());
    let err = stale.release().await.unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err:?}");

    let after = b.inspect(&name).await.unwrap().expect("still held by B");
    assert_eq!(after.token, Some(next.token()));
    same_expiry(f, after.expires_at, before.expires_at);
    assert!(b.try_acquire(&name).await.unwrap().is_none());
    assert!(next
        .extend(Duration::from_secs(30))
        .await
        .unwrap()
        .is_some());
    assert!(!next.is_lost());
    next.release().await.unwrap();
}

/// A lease taken with `hold_at_least` stays until its hold is over, released
/// or not; a hold already past does not delay the release.
pub async fn hold_at_least_keeps_the_lease_after_release<F: LeaseFixture>(f: &F) {
    let locks = f.locks().await;
    let name = unique("lease-hold");
    let hold = chrono::Duration::seconds(2);

    let guard = locks
        .acquire(&name)
        .hold_at_least(hold.to_std().unwrap())
        .await
        .unwrap();
    let token = guard.token();
    let acquired_at = granted_at(&locks, &name).await;
    guard.release().await.unwrap();

    assert!(locks.try_acquire(&name).await.unwrap().is_none());
    let info = locks.inspect(&name).await.unwrap().expect("kept");
    same_expiry(f, info.expires_at, Some(acquired_at + hold));
    let left = (info.expires_at.unwrap() - f.db_now().await).num_milliseconds();
    assert!((1000..=2000).contains(&left), "{left} ms left");

    let next = locks
        .acquire(&name)
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(next.token() > token);
    assert!(granted_at(&locks, &name).await >= acquired_at + hold);
    next.release().await.unwrap();

    // A hold already past does not delay the release.
    let name = unique("lease-hold-past");
    let guard = locks
        .acquire(&name)
        .hold_at_least(Duration::from_millis(200))
        .await
        .unwrap();
    sleep(Duration::from_millis(400)).await;
    guard.release().await.unwrap();
    assert!(locks.inspect(&name).await.unwrap().is_none());
    assert!(locks.try_acquire(&name).await.unwrap().is_some());
}

/// When the lease on `name` was granted.
async fn granted_at(locks: &Locks, name: &str) -> DateTime<Utc> {
    let info = locks.inspect(name).await.unwrap().expect("held");
    info.acquired_at.expect("a lease's grant time")
}

/// A lease broken by an operator is seen as lost at the next renewal.
pub async fn lost_fires_when_the_lease_is_broken<F: LeaseFixture>(f: &F) {
    let (locks, operator) = (f.locks().await, f.locks().await);
    let name = unique("lease-broken");
    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(operator.force_release(&name).await.unwrap());
    assert!(!operator.force_release(&name).await.unwrap());
    // The next renewal (within ttl/3) finds the lease no longer ours.
    timeout(Duration::from_millis(1500), guard.lost())
        .await
        .expect("lost() resolves after the next renewal");
    assert!(guard.is_lost());
    assert!(matches!(guard.release().await, Err(Error::Lost { .. })));
}

/// When renewals cannot reach the database, the guard reports itself lost at
/// its local deadline, while the database still counts the lease as held:
/// the holder learns of the loss before anyone else can be granted the lock.
pub async fn lost_fires_before_the_database_expires_the_lease<F: TableFixture>(f: &F) {
    let (locks, cut) = f.doomed().await;
    let observer = f.locks().await;
    let name = unique("lease-closed");
    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_secs(2))
        .await
        .unwrap();
    // Renewals can no longer reach the database.
    cut.await;
    timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("lost() resolves at the local deadline");
    let info = observer
        .inspect(&name)
        .await
        .unwrap()
        .expect("the database still counts the lease as held");
    let (expires_at, now) = (info.expires_at.unwrap(), f.db_now().await);
    assert!(
        expires_at > now,
        "lost only at {now}, lease ran out at {expires_at}"
    );
    assert!(guard.is_lost());
}

/// Every operation on a table that does not exist says which migration to
/// run, rather than failing with a bare database error.
pub async fn a_missing_table_reports_schema_missing<F: TableFixture>(f: &F) {
    let locks = f.with_table("dblock_missing_xyz").await.unwrap();
    let name = unique("lease-missing");
    let (want_migrate, want_dir) = f.schema_missing();
    for err in [
        locks.try_acquire(&name).await.map(|_| ()).unwrap_err(),
        locks.inspect(&name).await.map(|_| ()).unwrap_err(),
        locks.list().await.map(|_| ()).unwrap_err(),
        locks.force_release(&name).await.map(|_| ()).unwrap_err(),
    ] {
        let text = err.to_string();
        match err {
            Error::SchemaMissing { migrate, dir } => {
                assert_eq!(migrate, want_migrate);
                assert_eq!(dir, want_dir);
                assert!(text.contains(want_migrate), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// `with_table` refuses names that would change the SQL, and quotes the
/// ones it takes (a mixed-case or schema-qualified table is found).
pub async fn with_table_rejects_injection_and_quotes_identifiers<F: TableFixture>(f: &F) {
    for bad in [
        "dblock_leases; DROP TABLE dblock_leases",
        "dblock_leases --",
        "\"dblock_leases\"",
        "`dblock_leases`",
        "a-b",
        "a.b.c",
        "",
    ] {
        let err = f.with_table(bad).await.map(|_| ()).unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "{bad:?}: {err:?}");
    }
    let custom = f.with_table(&f.custom_table().await).await.unwrap();
    let default = f.locks().await;
    let name = unique("lease-custom");
    let guard = custom.acquire(&name).await.unwrap();
    assert!(custom.try_acquire(&name).await.unwrap().is_none());
    assert!(default.inspect(&name).await.unwrap().is_none());
    guard.release().await.unwrap();
}

/// Acquisitions cancelled while they wait for a pooled connection claim
/// nothing once they get one. (Found by the torture test's cancellation
/// storm: queued claims of cancelled acquisitions went on taking leases
/// after their callers had gone, starving the pool and blocking real
/// acquirers.) A claim leaves a row behind, so no row may exist.
pub async fn acquisitions_cancelled_while_waiting_for_a_connection_claim_nothing<
    F: TableFixture,
>(
    f: &F,
) {
    let (locks, busy) = f.starved().await;
    let prefix = unique("queued-cancel");
    for i in 0..10 {
        let name = format!("{prefix}:{i}");
        assert!(timeout(Duration::from_millis(20), locks.acquire(&name))
            .await
            .is_err());
    }
    drop(busy);
    // Let every queued attempt get the connection in turn.
    sleep(Duration::from_millis(500)).await;
    assert_eq!(
        f.lease_rows(&prefix).await,
        0,
        "cancelled acquisitions claimed leases"
    );
    // The pool still serves.
    let g = locks
        .acquire(format!("{prefix}:after"))
        .wait(Duration::from_secs(5))
        .await
        .unwrap();
    g.release().await.unwrap();
}

/// Expands into one test per lease behaviour, for a fixture built by
/// `$fixture` (an expression of a future). `lease_suite!(tables $fixture)`
/// adds the behaviours of a lease table.
#[macro_export]
macro_rules! lease_suite {
    (tables $fixture:expr) => {
        $crate::lease_suite!($fixture);
        $crate::lease_suite!(@tests $fixture;
            lost_fires_before_the_database_expires_the_lease,
            a_missing_table_reports_schema_missing,
            with_table_rejects_injection_and_quotes_identifiers,
            acquisitions_cancelled_while_waiting_for_a_connection_claim_nothing);
    };
    (@tests $fixture:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let fixture = $fixture.await;
                suite::lease::$name(&fixture).await;
            }
        )*
    };
    ($fixture:expr) => {
        $crate::lease_suite!(@tests $fixture;
            acquire_try_timeout_release_inspect,
            a_dead_holders_lease_is_taken_over_after_its_ttl,
            a_stale_holder_can_neither_release_nor_extend_the_next_lease,
            a_paused_holder_cannot_release_the_next_lease,
            hold_at_least_keeps_the_lease_after_release,
            lost_fires_when_the_lease_is_broken);
    };
}
