//! The behavioural suite on the in-process backend.

mod common;
mod suite;

use dblock::memory::Memory;
use dblock::Locks;

struct MemoryFixture(Memory);

impl suite::Fixture for MemoryFixture {
    async fn locks(&self) -> Locks {
        Locks::new(self.0.clone())
    }
    fn unreachable(&self) -> Locks {
        Locks::new(self.0.clone())
    }
}

async fn fixture() -> MemoryFixture {
    MemoryFixture(Memory::new())
}

behaviour_suite!(fixture());

// ---- Batched renewal. ----

mod batch;

struct MemoryHarness;

impl batch::Harness for MemoryHarness {
    async fn subject(&self, _pool_size: u32) -> batch::Subject {
        let memory = Memory::new();
        let counted = memory.clone();
        batch::Subject {
            table: String::new(),
            locks: Locks::new(memory.clone()),
            observer: Locks::new(memory),
            stats: Box::new(move || counted.renewal_stats()),
            cut: None,
            db_updates: None,
            cleanup: None,
        }
    }
}

mod batched {
    use super::*;
    batch_suite!(MemoryHarness);
}

/// Options can be set on a handle that has been cloned, and the result
/// still shares the locks (and the wake-ups) of the original.
#[tokio::test]
async fn with_options_on_a_cloned_handle_shares_the_locks() {
    use std::time::Duration;
    let original = Memory::new();
    let clone = original.clone();
    let tuned = clone
        .with_options(
            dblock::LeaseOptions::default()
                .min_poll(Duration::from_secs(30))
                .max_poll(Duration::from_secs(30)),
        )
        .expect("options on a cloned handle");
    let (a, b) = (Locks::new(original), Locks::new(tuned));
    let g = a.acquire("shared-state").await.unwrap();
    assert!(b.try_acquire("shared-state").await.unwrap().is_none());
    // A waiter on the tuned handle polls every 30 s, so a prompt grant
    // shows the release woke it.
    let waiter = tokio::spawn(async move {
        b.acquire("shared-state")
            .wait(Duration::from_secs(20))
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    g.release().await.unwrap();
    let started = std::time::Instant::now();
    waiter.await.unwrap().expect("woken by the release");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// An observer made just before a campaign through the same handle sees
/// the new leader at once, not a renewal period later: the wake-up is armed
/// before the observer's first read. On a current-thread runtime the
/// reading task cannot run before the campaign has notified.
#[tokio::test]
async fn an_observer_made_just_before_a_campaign_sees_it_at_once() {
    use std::time::Duration;
    let locks = Locks::new(Memory::new());
    let election = locks
        .elect(common::unique("observe-race"), "me")
        .unwrap()
        .ttl(Duration::from_secs(30))
        .unwrap();
    assert_eq!(election.observe_every(), Duration::from_secs(10));
    let mut leaders = election.observe().await.unwrap();
    assert!(leaders.borrow().is_none());
    let leader = election.campaign().await.unwrap();
    let term = leader.term();
    let seen = tokio::time::timeout(
        Duration::from_secs(2),
        leaders.wait_for(|l| l.as_ref().is_some_and(|l| l.term == term)),
    )
    .await;
    assert!(
        seen.is_ok(),
        "the observer did not see the campaign within 2 s (its period is 10 s)"
    );
    leader.resign().await.unwrap();
}
