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
    fn shared(&self) -> bool {
        true
    }
    fn lease(&self) -> bool {
        true
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
        .with_options(dblock::LeaseOptions {
            min_poll: Duration::from_secs(30),
            max_poll: Duration::from_secs(30),
        })
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
