//! Shared (reader) locks in the behavioural suite: written once, run against
//! every backend whose fixture says it has them ([`Fixture::shared`]).
//! Backends without reader locks are covered by `shared_and_exclusive`,
//! which checks that they refuse them.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dblock::{Error, LockMode};
use tokio::time::{sleep, timeout, Instant};

use super::semaphore::holders;
use super::{eventually, Fixture, TtlIf, HUNG};
use crate::common::unique;

/// Several readers on independent `Locks` hold the name at once, each with
/// its own, increasing token; `inspect` and `list` show them as one shared
/// lock with their count; no writer gets in beside them. Once they are
/// gone a writer holds the name alone: no reader, no second writer.
pub async fn readers_together_writer_alone<F: Fixture>(f: &F) {
    if !f.shared() {
        return;
    }
    let name = unique("readers");
    let observer = f.locks().await;
    let mut readers = Vec::new();
    let mut last = 0;
    for _ in 0..4 {
        let locks = f.locks().await;
        let r = locks.acquire(&name).shared().wait(HUNG).await.unwrap();
        assert_eq!(r.mode(), LockMode::Shared);
        assert!(r.token() > last, "reader token {} after {last}", r.token());
        last = r.token();
        readers.push((locks, r));
    }
    let info = observer.inspect(&name).await.unwrap().expect("held");
    assert_eq!(info.mode, LockMode::Shared);
    assert_eq!(info.holders, 4);
    assert_eq!(info.max_holders, None, "readers have no bound");
    // Listed by a holder (an advisory lock held elsewhere is listed by
    // its key only).
    let listed = readers[0].0.list().await.unwrap();
    let entry = listed
        .iter()
        .find(|i| i.name.as_deref() == Some(name.as_str()))
        .expect("listed");
    assert_eq!((entry.mode, entry.holders), (LockMode::Shared, 4));
    assert!(
        observer.try_acquire(&name).await.unwrap().is_none(),
        "a writer got in beside readers"
    );
    for (_, r) in readers.drain(..) {
        r.release().await.unwrap();
    }
    assert!(
        eventually(HUNG, || async { holders(&observer, &name).await == 0 }).await,
        "readers still shown after release"
    );

    let (a, b) = (f.locks().await, f.locks().await);
    let w = a.acquire(&name).wait(HUNG).await.unwrap();
    assert!(w.token() > last, "writer token {} after {last}", w.token());
    let info = observer.inspect(&name).await.unwrap().expect("held");
    assert_eq!((info.mode, info.holders), (LockMode::Exclusive, 1));
    let r = b
        .acquire(&name)
        .shared()
        .wait(Duration::from_millis(200))
        .await;
    assert!(
        matches!(r, Err(Error::Timeout { .. })),
        "a reader got in beside a writer: {r:?}"
    );
    assert!(
        b.try_acquire(&name).await.unwrap().is_none(),
        "a second writer got in"
    );
    let writer_token = w.token();
    w.release().await.unwrap();
    let r = b.acquire(&name).shared().wait(HUNG).await.unwrap();
    assert!(r.token() > writer_token);
    r.release().await.unwrap();
}

/// Readers renew in the background like every lease (PostgreSQL: all the
/// holder rows of a tick in one statement): several readers of two names,
/// on two `Locks`, stay held for several ttls, and the name stays closed
/// to writers.
pub async fn readers_are_renewed<F: Fixture>(f: &F) {
    if !f.shared() {
        return;
    }
    let names = [unique("readers-renewed"), unique("readers-renewed")];
    let (a, b, observer) = (f.locks().await, f.locks().await, f.locks().await);
    let ttl = Duration::from_millis(700);
    let mut readers = Vec::new();
    for locks in [&a, &b] {
        for name in &names {
            readers.push(
                locks
                    .acquire(name)
                    .shared()
                    .ttl_if(f.lease(), ttl)
                    .await
                    .unwrap(),
            );
        }
    }
    sleep(ttl * 4).await;
    for r in &readers {
        assert!(!r.is_lost(), "a reader was lost: {:?}", r.lost_reason());
    }
    for name in &names {
        assert_eq!(holders(&observer, name).await, 2);
        assert!(observer.try_acquire(name).await.unwrap().is_none());
    }
    let extended = readers[0].extend(Duration::from_secs(20)).await.unwrap();
    if f.lease() {
        let extended = extended.expect("a lease's expiry");
        let seen = observer.inspect(&names[0]).await.unwrap().unwrap();
        assert!(seen.expires_at.unwrap() >= extended - chrono::Duration::milliseconds(5));
    }
    for r in readers {
        r.release().await.unwrap();
    }
    for name in &names {
        assert!(
            eventually(HUNG, || async { holders(&observer, name).await == 0 }).await,
            "readers still shown after release"
        );
    }
}

/// No writer starvation: readers keep arriving (each holding a moment,
/// always one of them holding), a writer arrives, and from then on no new
/// reader gets in; the writer is granted once the readers it found have
/// left, alone, and the readers come back after it. (A backend without
/// writer preference, see [`Fixture::writer_first`], is not held to it:
/// there a writer may wait as long as readers keep overlapping.)
pub async fn waiting_writer_blocks_new_readers<F: Fixture>(f: &F) {
    if !f.shared() || !f.writer_first() {
        return;
    }
    let name = unique("no-starvation");
    let first = f.locks().await;
    let r1 = first.acquire(&name).shared().wait(HUNG).await.unwrap();

    // Readers arriving in a loop, on two `Locks`, two tasks each.
    let stop = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicU32::new(0));
    let granted = Arc::new(AtomicU32::new(0));
    let mut loops = Vec::new();
    for _ in 0..2 {
        let locks = f.locks().await;
        for _ in 0..2 {
            let (locks, name, stop, inside, granted) = (
                locks.clone(),
                name.clone(),
                stop.clone(),
                inside.clone(),
                granted.clone(),
            );
            loops.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let r = locks
                        .acquire(&name)
                        .shared()
                        .wait(Duration::from_millis(100))
                        .await;
                    match r {
                        Ok(r) => {
                            inside.fetch_add(1, Ordering::SeqCst);
                            granted.fetch_add(1, Ordering::SeqCst);
                            sleep(Duration::from_millis(30)).await;
                            inside.fetch_sub(1, Ordering::SeqCst);
                            r.release().await.expect("release a reader");
                        }
                        Err(Error::Timeout { .. }) => {}
                        Err(e) => panic!("reader: {e:?}"),
                    }
                }
            }));
        }
    }
    assert!(
        eventually(HUNG, || async { granted.load(Ordering::SeqCst) >= 4 }).await,
        "readers beside a reader were not granted"
    );

    let writer = {
        let (locks, name, inside) = (f.locks().await, name.clone(), inside.clone());
        tokio::spawn(async move {
            let w = locks.acquire(&name).wait(HUNG).await?;
            // Alone: no reader of the loop inside.
            let readers_inside = inside.load(Ordering::SeqCst);
            Ok::<_, Error>((w, readers_inside, Instant::now()))
        })
    };
    // The writer has tried (and missed) by now; readers that were inside
    // leave within their 30 ms.
    sleep(Duration::from_millis(400)).await;
    assert!(!writer.is_finished(), "a writer got in beside a reader");
    let before = granted.load(Ordering::SeqCst);
    let late = f.locks().await;
    let r = late
        .acquire(&name)
        .shared()
        .wait(Duration::from_millis(400))
        .await;
    assert!(
        matches!(r, Err(Error::Timeout { .. })),
        "a new reader got in while a writer was waiting: {r:?}"
    );
    assert_eq!(
        granted.load(Ordering::SeqCst),
        before,
        "readers kept arriving while a writer was waiting"
    );

    let released = Instant::now();
    let first_token = r1.token();
    r1.release().await.unwrap();
    let (w, readers_inside, at) = timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer was kept out by arriving readers")
        .unwrap()
        .expect("the writer's acquisition failed");
    assert!(w.token() > first_token);
    assert_eq!(
        readers_inside, 0,
        "a reader was inside when the writer got in"
    );
    assert!(
        at.duration_since(released) < Duration::from_secs(5),
        "the writer came {:?} after the last reader left",
        at.duration_since(released)
    );
    let info = late.inspect(&name).await.unwrap().expect("held");
    assert_eq!((info.mode, info.holders), (LockMode::Exclusive, 1));
    sleep(Duration::from_millis(150)).await;
    assert_eq!(
        inside.load(Ordering::SeqCst),
        0,
        "a reader beside the writer"
    );
    let during = granted.load(Ordering::SeqCst);
    w.release().await.unwrap();
    // The readers come back once the writer is gone.
    assert!(
        eventually(HUNG, || async { granted.load(Ordering::SeqCst) > during }).await,
        "readers did not come back after the writer"
    );
    stop.store(true, Ordering::SeqCst);
    for l in loops {
        timeout(HUNG, l).await.expect("reader loop hung").unwrap();
    }
}

/// A reader whose process stalls past its lease (no renewal can run) is
/// lost at its local deadline: a writer gets the name once the lease has
/// run out by the database clock, and the reader's guard, when its process
/// resumes, reports itself lost and cannot release the writer's lock. A
/// reader of a backend whose locks live with their session (not a lease)
/// has no deadline.
pub async fn reader_lost_at_its_deadline<F: Fixture>(f: &F) {
    if !f.shared() {
        return;
    }
    let name = unique("reader-deadline");
    if !f.lease() {
        let r = f.locks().await.acquire(&name).shared().await.unwrap();
        assert!(r.expires_at().is_none(), "a session lock has no deadline");
        r.release().await.unwrap();
        return;
    }
    let ttl = Duration::from_millis(1200);
    let lease = f.lease();
    let locks = f.locks().await;
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
    let (checked_tx, checked_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let stalled = {
        let name = name.clone();
        crate::common::on_own_runtime(async move {
            let r = locks
                .acquire(&name)
                .shared()
                .ttl_if(lease, ttl)
                .await
                .unwrap();
            let _ = taken_tx.send(r.token());
            // The whole runtime stalls, its renewals with it.
            std::thread::sleep(ttl * 3);
            let lost = timeout(Duration::from_secs(10), r.lost()).await.is_ok();
            let refused = matches!(r.release().await, Err(Error::Lost { .. }));
            let _ = checked_tx.send((lost, refused));
            // Runs on until the test is done: a backend shared with
            // the test's other handles (Memory) may renew their leases
            // from this runtime.
            let _ = done_rx.await;
        })
    };
    let token = taken_rx.await.expect("the reader was not granted");
    let taken = Instant::now();
    let other = f.locks().await;
    let w = other
        .acquire(&name)
        .wait(HUNG)
        .await
        .expect("a stalled reader kept the name");
    assert!(
        taken.elapsed() >= ttl.mul_f64(0.8),
        "a reader's lease was taken over {:?} after its grant, before its ttl",
        taken.elapsed()
    );
    assert!(w.token() > token);
    let (lost, refused) = timeout(HUNG, checked_rx)
        .await
        .expect("the stalled reader never resumed")
        .expect("the stalled reader's thread failed");
    assert!(lost, "a reader past its deadline was not reported lost");
    assert!(refused, "a lost reader's release did not report Lost");
    let info = other.inspect(&name).await.unwrap().expect("held");
    assert_eq!(info.token, Some(w.token()), "the writer's lock was touched");
    w.release().await.unwrap();
    let _ = done_tx.send(());
    tokio::task::spawn_blocking(move || stalled.join())
        .await
        .unwrap()
        .expect("the stalled reader's thread panicked");
}

/// `force_release` of a name held by readers frees every one of them: all
/// their guards report lost, and a writer gets the name at once.
pub async fn force_release_frees_all_readers<F: Fixture>(f: &F) {
    if !f.shared() {
        return;
    }
    let name = unique("readers-broken");
    let (a, b, c) = (f.locks().await, f.locks().await, f.locks().await);
    let operator = f.locks().await;
    // A short ttl: a lease guard learns of the break at its next renewal.
    let ttl = Duration::from_millis(900);
    let r1 = a
        .acquire(&name)
        .shared()
        .ttl_if(f.lease(), ttl)
        .await
        .unwrap();
    let r2 = b
        .acquire(&name)
        .shared()
        .ttl_if(f.lease(), ttl)
        .await
        .unwrap();
    let r3 = c
        .acquire(&name)
        .shared()
        .ttl_if(f.lease(), ttl)
        .await
        .unwrap();
    assert_eq!(holders(&operator, &name).await, 3);
    assert!(
        operator.force_release(&name).await.unwrap(),
        "nothing was broken"
    );
    for r in [&r1, &r2, &r3] {
        timeout(Duration::from_secs(10), r.lost())
            .await
            .expect("lost() did not fire for a reader");
    }
    assert!(matches!(r1.release().await, Err(Error::Lost { .. })));
    assert!(matches!(
        r2.extend(Duration::from_secs(5)).await,
        Err(Error::Lost { .. })
    ));
    drop(r3);
    let w = timeout(Duration::from_secs(5), operator.acquire(&name))
        .await
        .expect("the writer waited for broken readers")
        .unwrap();
    assert_eq!(w.mode(), LockMode::Exclusive);
    w.release().await.unwrap();
}

/// `hold_at_least` on a reader keeps its share after an early release:
/// writers stay out until then, other readers may still join. Backends
/// whose locks end with their session refuse it, for readers as for
/// writers.
pub async fn reader_hold_at_least<F: Fixture>(f: &F) {
    if !f.shared() {
        return;
    }
    let name = unique("reader-hold");
    let (a, b) = (f.locks().await, f.locks().await);
    let hold = Duration::from_millis(1200);
    let r = a.acquire(&name).shared().hold_at_least(hold).await;
    if !f.lease() {
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
        assert_eq!(holders(&b, &name).await, 0);
        return;
    }
    let r = r.unwrap();
    let taken = Instant::now();
    r.release().await.unwrap();
    assert!(
        b.try_acquire(&name).await.unwrap().is_none(),
        "a writer got in before the reader's hold_at_least"
    );
    let r2 = b.acquire(&name).shared().wait(Duration::ZERO).await;
    let r2 = r2.expect("a reader could not join a held-over reader");
    r2.release().await.unwrap();
    let w = b.acquire(&name).wait(HUNG).await.unwrap();
    assert!(
        taken.elapsed() >= hold.mul_f64(0.9),
        "a writer got in {:?} after a reader held for {hold:?}",
        taken.elapsed()
    );
    w.release().await.unwrap();
}
