//! Leader election and the lock helpers (`with_lock`, `lost_owned`,
//! `try_now`), on every backend.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dblock::{Election, Error, Leader};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

use super::{eventually, held, Fixture, TtlIf, HUNG};
use crate::common::unique;

/// The election ttl of these tests: renewals and observers' reads every
/// 500 ms.
const TTL: Duration = Duration::from_millis(1500);

/// What an observer's bound allows beyond one renewal period: the read's
/// own round trip (generous, for a loaded machine).
const READ: Duration = Duration::from_secs(1);

async fn elect(f: &impl Fixture, name: &str, identity: &str) -> Election {
    f.locks()
        .await
        .elect(name, identity)
        .unwrap()
        .ttl(TTL)
        .unwrap()
}

/// Waits until the observer shows `want` (identity and term, or nobody),
/// at most `within`; answers how long it took, or `None`.
async fn sees(
    rx: &mut watch::Receiver<Option<Leader>>,
    within: Duration,
    want: Option<(&str, u64)>,
) -> Option<Duration> {
    let started = Instant::now();
    let matches = |l: &Option<Leader>| l.as_ref().map(|l| (l.identity.as_str(), l.term)) == want;
    timeout(within, rx.wait_for(matches))
        .await
        .ok()
        .map(|r| r.expect("the observer stopped"))
        .map(|_| started.elapsed())
}

/// Several campaigners, each on its own `Locks`, take turns: never two
/// leaders at once, every term above the one before, and an observer that
/// never campaigns sees each leader within one renewal period (plus the
/// read). Leaders step down in each of the three ways: resigning,
/// resigning through the election handle, and dropping the leadership.
pub async fn leader_unique_and_observed<F: Fixture>(f: &F) {
    let name = unique("elect");
    let observer = elect(f, &name, "observer").await;
    let bound = observer.observe_every() + READ;
    let seen = Arc::new(tokio::sync::Mutex::new(observer.observe().await.unwrap()));
    let leading = Arc::new(AtomicBool::new(false));
    let terms = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..3 {
        let election = elect(f, &name, &format!("candidate-{c}")).await;
        let (seen, leading, terms) = (seen.clone(), leading.clone(), terms.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..3 {
                let leader = timeout(HUNG, election.campaign())
                    .await
                    .expect("campaign hung")
                    .expect("campaign");
                assert!(!leading.swap(true, Ordering::SeqCst), "two leaders at once");
                {
                    let mut terms = terms.lock().unwrap();
                    if let Some(&last) = terms.last() {
                        assert!(leader.term() > last, "term {} after {last}", leader.term());
                    }
                    terms.push(leader.term());
                }
                let mut rx = seen.lock().await;
                let took = sees(&mut rx, bound, Some((election.identity(), leader.term()))).await;
                drop(rx);
                assert!(
                    took.is_some(),
                    "the observer did not see {} (term {}) within {bound:?}",
                    election.identity(),
                    leader.term()
                );
                assert!(!leader.is_lost(), "{:?}", leader.lost_reason());
                leading.store(false, Ordering::SeqCst);
                match (c + round) % 3 {
                    0 => leader.resign().await.expect("resign"),
                    1 => {
                        assert!(election.resign().await.expect("resign"));
                        assert!(leader.is_lost(), "a resigned leadership still leads");
                    }
                    _ => drop(leader),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("campaigner");
    }
    assert_eq!(terms.lock().unwrap().len(), 9);
    // Nobody leads at the end, and the observer says so.
    let mut rx = seen.lock().await;
    assert!(
        sees(&mut rx, HUNG, None).await.is_some(),
        "still shows {:?}",
        *rx.borrow()
    );
}

/// A leader whose lock is broken by an operator learns it (`lost()`), a
/// waiting campaigner takes over with a greater term, and an observer sees
/// the new leader within one renewal period of its win (plus the read).
pub async fn broken_leader_is_replaced<F: Fixture>(f: &F) {
    let name = unique("elect-broken");
    let (a, b) = (elect(f, &name, "a").await, elect(f, &name, "b").await);
    let mut rx = elect(f, &name, "observer").await.observe().await.unwrap();
    let bound = a.observe_every() + READ;
    let first = a.campaign().await.unwrap();
    assert!(sees(&mut rx, bound, Some(("a", first.term())))
        .await
        .is_some());
    let next = tokio::spawn(async move { (b.campaign().await, b) });
    sleep(Duration::from_millis(100)).await;
    assert!(!next.is_finished(), "b leads beside a");
    let operator = f.locks().await;
    assert!(operator.force_release(&name).await.unwrap());
    timeout(Duration::from_secs(10), first.lost())
        .await
        .expect("the broken leader's lost() did not fire");
    assert!(first.is_lost());
    let (second, b) = timeout(HUNG, next).await.expect("b hung").unwrap();
    let second = second.expect("b campaign");
    assert!(second.term() > first.term());
    let took = sees(&mut rx, bound, Some(("b", second.term()))).await;
    assert!(
        took.is_some(),
        "the observer did not see b within {bound:?}"
    );
    assert_eq!(
        operator.leader(&name).await.unwrap().map(|l| l.term),
        Some(second.term())
    );
    assert!(matches!(first.resign().await, Err(Error::Lost { .. })));
    drop(b);
    second.resign().await.unwrap();
}

/// A leader that dies without resigning (its runtime torn down, as when its
/// process is killed) is replaced: once its lease runs out, or at once for
/// an advisory lock, whose session ends with it. Observers follow.
pub async fn dead_leader_is_replaced<F: Fixture>(f: &F) {
    let name = unique("elect-dead");
    let dead = elect(f, &name, "dead").await;
    let died = Instant::now();
    let term = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let leader = rt.block_on(dead.campaign()).unwrap();
        let term = leader.term();
        std::mem::forget(leader);
        rt.shutdown_background();
        term
    })
    .join()
    .unwrap();
    let mut rx = elect(f, &name, "observer").await.observe().await.unwrap();
    let heir = elect(f, &name, "heir").await;
    let leader = timeout(HUNG, heir.campaign())
        .await
        .expect("the heir hung")
        .unwrap();
    if f.lease() {
        assert!(died.elapsed() >= TTL.mul_f64(0.8), "{:?}", died.elapsed());
    }
    assert!(leader.term() > term);
    let bound = heir.observe_every() + READ;
    assert!(
        sees(&mut rx, bound, Some(("heir", leader.term())))
            .await
            .is_some(),
        "the observer did not see the heir within {bound:?}: {:?}",
        *rx.borrow()
    );
    leader.resign().await.unwrap();
}

/// Resigning hands over at once to a waiting campaigner; a handle that
/// leads cannot campaign again; a resigned handle has nothing to resign;
/// bad names and identities are refused before anything is written.
pub async fn resign_hands_over<F: Fixture>(f: &F) {
    let name = unique("elect-resign");
    let (a, b) = (elect(f, &name, "a").await, elect(f, &name, "b").await);
    let first = a.campaign().await.unwrap();
    assert!(matches!(a.campaign().await, Err(Error::InvalidOption(_))));
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.campaign().await }
    });
    sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "b leads beside a");
    let resigned = Instant::now();
    assert!(a.resign().await.unwrap());
    timeout(Duration::from_secs(1), first.lost())
        .await
        .expect("a resigned leadership's lost() did not fire");
    assert!(!a.resign().await.unwrap(), "resigned twice");
    let second = timeout(HUNG, waiting)
        .await
        .expect("b hung")
        .unwrap()
        .unwrap();
    // Prompt: a release wakes waiters in-process; across processes within a
    // poll (250 ms) or a server-side wait.
    assert!(
        resigned.elapsed() < Duration::from_secs(5),
        "{:?}",
        resigned.elapsed()
    );
    assert!(second.term() > first.term());
    let observed = a.leader().await.unwrap().expect("b leads");
    assert_eq!(
        (observed.identity.as_str(), observed.term),
        ("b", second.term())
    );
    drop(first);
    // a may campaign again once its leadership is gone, and waits for b.
    let again = tokio::spawn(async move { a.campaign().await.map(|l| (l.term(), l)) });
    sleep(Duration::from_millis(100)).await;
    assert!(!again.is_finished());
    let second_term = second.term();
    second.resign().await.unwrap();
    let (term, third) = timeout(HUNG, again)
        .await
        .expect("a hung")
        .unwrap()
        .unwrap();
    assert!(term > second_term);
    third.resign().await.unwrap();

    let locks = f.locks().await;
    assert!(matches!(locks.elect("", "x"), Err(Error::InvalidName(_))));
    for bad in ["", "a\0b", &"x".repeat(256)] {
        assert!(
            matches!(locks.elect(&name, bad), Err(Error::InvalidOption(_))),
            "identity {bad:?} accepted"
        );
    }
    assert!(locks.elect(&name, "x".repeat(255)).is_ok());
    let e = locks.elect(&name, "x").unwrap();
    assert!(matches!(
        e.ttl(Duration::ZERO),
        Err(Error::InvalidOption(_))
    ));
    assert!(!held(&locks, &name).await);
}

/// `with_lock` runs the work under the lock and releases it; when the lock
/// is lost, the work is cancelled (its future dropped) and the answer is
/// `Lost`.
pub async fn with_lock_cancels_on_loss<F: Fixture>(f: &F) {
    let (a, operator) = (f.locks().await, f.locks().await);
    let name = unique("with-lock");
    let out = a
        .with_lock(&name, async |guard| {
            assert!(!guard.is_lost());
            (guard.token(), held(&operator, &name).await)
        })
        .await
        .unwrap();
    assert!(out.0 > 0);
    assert!(out.1, "the work ran without the lock");
    assert!(
        !held(&operator, &name).await,
        "with_lock left the lock held"
    );

    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let started = Arc::new(tokio::sync::Notify::new());
    let lease = f.lease();
    let work = {
        let (a, name, dropped, started) =
            (a.clone(), name.clone(), dropped.clone(), started.clone());
        tokio::spawn(async move {
            a.acquire(&name)
                .ttl_if(lease, Duration::from_millis(900))
                .with_lock(async |_guard| {
                    let _flag = Flag(dropped);
                    started.notify_one();
                    std::future::pending::<()>().await
                })
                .await
        })
    };
    timeout(HUNG, started.notified())
        .await
        .expect("work never started");
    assert!(operator.force_release(&name).await.unwrap());
    let answer = timeout(Duration::from_secs(10), work)
        .await
        .expect("with_lock did not stop the work")
        .unwrap();
    assert!(matches!(answer, Err(Error::Lost { .. })), "{answer:?}");
    assert!(dropped.load(Ordering::SeqCst), "the work was not dropped");
}

/// `lost_owned` fires in a spawned task when the lock is broken, and when
/// its guard is released.
pub async fn lost_owned_fires_in_a_task<F: Fixture>(f: &F) {
    let (a, operator) = (f.locks().await, f.locks().await);
    let name = unique("lost-owned");
    let g = a
        .acquire(&name)
        .ttl_if(f.lease(), Duration::from_millis(900))
        .await
        .unwrap();
    let signal = g.lost_owned();
    assert!(!signal.is_lost());
    let task = tokio::spawn({
        let signal = signal.clone();
        async move { signal.lost().await }
    });
    sleep(Duration::from_millis(50)).await;
    assert!(!task.is_finished(), "fired while held");
    assert!(operator.force_release(&name).await.unwrap());
    timeout(Duration::from_secs(10), task)
        .await
        .expect("lost_owned did not fire")
        .unwrap();
    assert!(signal.is_lost());
    assert!(signal.reason().is_some());
    drop(g);

    let g = a.acquire(&name).wait(HUNG).await.unwrap();
    let signal = g.lost_owned();
    let task = tokio::spawn(async move { signal.lost().await });
    sleep(Duration::from_millis(50)).await;
    assert!(!task.is_finished(), "fired while held");
    g.release().await.unwrap();
    timeout(Duration::from_secs(5), task)
        .await
        .expect("lost_owned did not fire on release")
        .unwrap();
}

/// The public try-form: `Some` when free, `None` when held, for exclusive
/// and (where supported) shared locks.
pub async fn try_now_on_the_builder<F: Fixture>(f: &F) {
    let (a, b) = (f.locks().await, f.locks().await);
    let name = unique("try-now");
    let g = a.acquire(&name).try_now().await.unwrap().expect("free");
    assert!(b.acquire(&name).try_now().await.unwrap().is_none());
    let started = Instant::now();
    assert!(b
        .acquire(&name)
        .wait(HUNG)
        .try_now()
        .await
        .unwrap()
        .is_none());
    assert!(started.elapsed() < Duration::from_secs(5), "try_now waited");
    g.release().await.unwrap();
    if f.shared() {
        let r1 = a
            .acquire(&name)
            .shared()
            .try_now()
            .await
            .unwrap()
            .expect("free");
        let r2 = b
            .acquire(&name)
            .shared()
            .try_now()
            .await
            .unwrap()
            .expect("shared");
        assert!(b.acquire(&name).try_now().await.unwrap().is_none());
        r1.release().await.unwrap();
        r2.release().await.unwrap();
    } else {
        let err = a.acquire(&name).shared().try_now().await.unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    }
    assert!(eventually(HUNG, || async { !held(&b, &name).await }).await);
}
