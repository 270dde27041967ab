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
