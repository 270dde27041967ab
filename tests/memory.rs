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
