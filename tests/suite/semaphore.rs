//! Semaphores (`max_holders(n)`) in the behavioural suite: written once, run
//! against every backend through [`Fixture`].

use std::time::Duration;

use dblock::{Error, LockMode, Locks};
use tokio::time::{sleep, timeout};

use super::{eventually, Fixture, TtlIf, HUNG};
use crate::common::unique;

/// How many holders `inspect` shows for `name` (0 when free).
pub(super) async fn holders(locks: &Locks, name: &str) -> u32 {
    locks
        .inspect(name)
        .await
        .expect("inspect")
        .map_or(0, |i| i.holders)
}

/// Backends without semaphores refuse them with `Unsupported`, before
/// anything is held. Returns whether the fixture has them.
async fn has_semaphores<F: Fixture>(f: &F, locks: &Locks, name: &str) -> bool {
    if f.semaphores() {
        return true;
    }
    let err = locks.acquire(name).max_holders(2).await.unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    assert_eq!(holders(locks, name).await, 0);
    false
}

/// Many tasks on several `Locks` never have more than `n` permits at once,
/// and do have `n` at once at some point.
pub async fn semaphore_bounds_holders<F: Fixture>(f: &F) {
    let name = unique("sem-bound");
    const N: u32 = 3;
    if !has_semaphores(f, &f.locks().await, &name).await {
        return;
    }
    let (most, _) = super::contend(f, &name, [3, 3, 4], N, || 40).await;
    assert_eq!(most, N, "n was never reached");
}

/// Permits come with their own increasing tokens; the (n+1)th waits; a
/// released permit goes to the next; `inspect` and `list` show the holders
/// and their count; acquisitions that disagree on `n` are refused while the
/// name is held, and any `n` may take it once it is free.
pub async fn semaphore_permits_inspect_and_disagreement<F: Fixture>(f: &F) {
    let (a, b) = (f.locks().await, f.locks().await);
    let name = unique("sem-basics");
    if !has_semaphores(f, &a, &name).await {
        return;
    }
    // Absurd values are refused before anything is written.
    for n in [0, dblock::MAX_HOLDERS + 1] {
        let err = a.acquire(&name).max_holders(n).await.unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "{err:?}");
    }
    let err = a.acquire(&name).shared().max_holders(2).await.unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "{err:?}");
    assert_eq!(holders(&b, &name).await, 0);

    let p1 = a.acquire(&name).max_holders(3).await.unwrap();
    let p2 = b.acquire(&name).max_holders(3).await.unwrap();
    let p3 = a.acquire(&name).max_holders(3).await.unwrap();
    assert!(p1.token() < p2.token() && p2.token() < p3.token());
    assert_eq!(p1.mode(), LockMode::Exclusive);
    let full = b
        .acquire(&name)
        .max_holders(3)
        .wait(Duration::from_millis(200))
        .await;
    assert!(matches!(full, Err(Error::Timeout { .. })), "{full:?}");

    let info = b.inspect(&name).await.unwrap().expect("held");
    assert_eq!(info.holders, 3);
    assert_eq!(info.max_holders, Some(3));
    if f.lease() {
        assert_eq!(info.token, Some(p3.token()));
        assert!(info.expires_at.is_some());
    }
    let listed = b.list().await.unwrap();
    let entry = listed
        .iter()
        .find(|i| i.name.as_deref() == Some(name.as_str()))
        .expect("listed");
    assert_eq!((entry.holders, entry.max_holders), (3, Some(3)));

    // Disagreeing acquisitions: another n, a plain lock, a reader.
    for n in [2, 4] {
        let err = b.acquire(&name).max_holders(n).await.unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "n = {n}: {err:?}");
    }
    let err = b.acquire(&name).wait(HUNG).await.unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "plain: {err:?}");
    let err = b.acquire(&name).shared().wait(HUNG).await.unwrap_err();
    if f.shared() {
        assert!(matches!(err, Error::InvalidOption(_)), "shared: {err:?}");
    } else {
        assert!(matches!(err, Error::Unsupported { .. }), "shared: {err:?}");
    }
    assert_eq!(holders(&a, &name).await, 3, "a refusal changed the holders");

    // A released permit goes to the next holder, with a greater token.
    let last = p3.token();
    p2.release().await.unwrap();
    let p4 = b.acquire(&name).max_holders(3).wait(HUNG).await.unwrap();
    assert!(p4.token() > last);
    assert_eq!(holders(&a, &name).await, 3);

    for p in [p1, p3, p4] {
        p.release().await.unwrap();
    }
    assert!(
        a.inspect(&name).await.unwrap().is_none(),
        "held after release"
    );
    assert!(!crate::common::is_listed(&a, &name).await);

    // Free again: any n may take it; then the others are refused.
    let plain = a.acquire(&name).wait(HUNG).await.unwrap();
    assert!(plain.token() > last);
    let err = b.acquire(&name).max_holders(3).await.unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "{err:?}");
    // max_holders(1) is a plain lock: it waits, it is not refused.
    let one = b
        .acquire(&name)
        .max_holders(1)
        .wait(Duration::from_millis(100))
        .await;
    assert!(matches!(one, Err(Error::Timeout { .. })), "{one:?}");
    plain.release().await.unwrap();
    let one = b.acquire(&name).max_holders(1).await.unwrap();
    let info = a.inspect(&name).await.unwrap().expect("held");
    assert_eq!((info.holders, info.max_holders), (1, Some(1)));
    one.release().await.unwrap();
    let p = b.acquire(&name).max_holders(5).await.unwrap();
    p.release().await.unwrap();
}

/// A waiter for a full semaphore gets the permit released by another
/// process; a permit of a dropped guard comes back too.
pub async fn semaphore_waiter_gets_a_freed_permit<F: Fixture>(f: &F) {
    let (a, b) = (f.locks().await, f.locks().await);
    let name = unique("sem-wait");
    if !has_semaphores(f, &a, &name).await {
        return;
    }
    let p1 = a.acquire(&name).max_holders(2).await.unwrap();
    let p2 = a.acquire(&name).max_holders(2).await.unwrap();
    let waiter = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.acquire(&name).max_holders(2).wait(HUNG).await })
    };
    sleep(Duration::from_millis(150)).await;
    assert!(!waiter.is_finished(), "a third permit of two was granted");
    drop(p1);
    let p3 = timeout(HUNG, waiter)
        .await
        .expect("waiter hung")
        .unwrap()
        .expect("a freed permit");
    assert!(p3.token() > p2.token());
    p2.release().await.unwrap();
    p3.release().await.unwrap();
    assert!(eventually(HUNG, || async { holders(&b, &name).await == 0 }).await);
}

/// Permits of a lease backend renew in the background and can be extended;
/// breaking the name marks every permit lost and frees it.
pub async fn semaphore_renewal_and_loss<F: Fixture>(f: &F) {
    let (a, operator) = (f.locks().await, f.locks().await);
    let name = unique("sem-renew");
    if !has_semaphores(f, &a, &name).await {
        return;
    }
    let ttl = Duration::from_millis(900);
    let p1 = a
        .acquire(&name)
        .max_holders(2)
        .ttl_if(f.lease(), ttl)
        .await
        .unwrap();
    let p2 = a
        .acquire(&name)
        .max_holders(2)
        .ttl_if(f.lease(), ttl)
        .await
        .unwrap();
    if f.lease() {
        sleep(ttl * 3).await;
        assert!(!p1.is_lost(), "lost: {:?}", p1.lost_reason());
        assert!(!p2.is_lost(), "lost: {:?}", p2.lost_reason());
        assert_eq!(holders(&operator, &name).await, 2);
        let extended = super::extend_by_20s(&p1).await;
        let seen = operator.inspect(&name).await.unwrap().unwrap();
        assert!(seen.expires_at.unwrap() >= extended - chrono::Duration::milliseconds(5));
    }
    assert!(
        operator.force_release(&name).await.unwrap(),
        "nothing broken"
    );
    for p in [&p1, &p2] {
        timeout(Duration::from_secs(10), p.lost())
            .await
            .expect("lost() did not fire for a permit");
    }
    assert!(matches!(p1.release().await, Err(Error::Lost { .. })));
    drop(p2);
    let p = operator
        .acquire(&name)
        .max_holders(2)
        .wait(HUNG)
        .await
        .unwrap();
    p.release().await.unwrap();
}

/// A semaphore forced free while another client keeps taking and returning
/// its permits (at least one between two forced releases): no claim is
/// ever refused, and afterwards all `n` permits
/// can be taken at once. A forced release ends the permits and the name's
/// marker together, under the marker's lock; ended one after the other,
/// a claim in between could leave a live marker without a permit, which
/// reads as a plain lock and refuses every claim of the semaphore (and
/// keeps readers waiting) until it runs out.
pub async fn semaphore_force_release_under_claims<F: Fixture>(f: &F) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;

    let (a, b, operator) = (f.locks().await, f.locks().await, f.locks().await);
    let name = unique("sem-force");
    if !has_semaphores(f, &a, &name).await {
        return;
    }
    const N: u32 = 3;
    const ROUNDS: usize = 40;
    let stop = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(AtomicU32::new(0));
    let claims = {
        let (b, name, stop, taken) = (b.clone(), name.clone(), stop.clone(), taken.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match b.acquire(&name).max_holders(N).try_now().await {
                    // A permit broken meanwhile reports `Lost`; nothing
                    // else may fail.
                    Ok(Some(permit)) => {
                        taken.fetch_add(1, Ordering::SeqCst);
                        match permit.release().await {
                            Ok(()) | Err(Error::Lost { .. }) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(None) => tokio::task::yield_now().await,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    };
    for round in 0..ROUNDS {
        let before = taken.load(Ordering::SeqCst);
        let progressed = eventually(HUNG, || async {
            claims.is_finished() || taken.load(Ordering::SeqCst) > before
        });
        assert!(
            progressed.await,
            "round {round}: the other client took no permit"
        );
        let held = a
            .acquire(&name)
            .max_holders(N)
            .wait(HUNG)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        operator.force_release(&name).await.unwrap();
        // Forced, the permit reports `Lost`; nothing else may fail.
        match held.release().await {
            Ok(()) | Err(Error::Lost { .. }) => {}
            Err(e) => panic!("round {round}: release: {e}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    timeout(HUNG, claims)
        .await
        .expect("the claiming task hung")
        .expect("the claiming task panicked")
        .unwrap_or_else(|e| panic!("a claim or release during the forced releases failed: {e}"));
    let mut all = Vec::new();
    for k in 0..N {
        let permit = a.acquire(&name).max_holders(N).try_now().await.unwrap();
        all.push(permit.unwrap_or_else(|| panic!("permit {k} of {N} not free at the end")));
    }
    for permit in all {
        permit.release().await.unwrap();
    }
}
