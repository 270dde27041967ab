//! The in-process backend.
//!
//! `Memory` keeps leases in a map inside this process, with the same
//! semantics as the database backends: fencing tokens, shared and exclusive
//! modes, ttl and renewal on the monotonic clock (tokio's, so
//! `tokio::time::pause` drives it in tests), the lost signal and
//! `hold_at_least`. Use it in unit tests of code written against
//! [`Locks`](crate::Locks), and in single-process applications.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::lease::{
    lease_backend, Claim, Claimed, LeaseEngine, LeaseOptions, LeaseStore, Renewal, Renewed, Wakeups,
};
use crate::{LockInfo, LockMode, Result};

/// An in-process lock service. Clones share the same locks.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let locks = dblock::Locks::new(dblock::memory::Memory::new());
/// let a = locks.acquire("cfg").shared().await?;
/// let b = locks.acquire("cfg").shared().await?;
/// assert!(locks.try_acquire("cfg").await?.is_none()); // readers exclude a writer
/// assert!(b.token() > a.token());
/// # Ok::<(), dblock::Error>(()) }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Memory {
    engine: LeaseEngine<MemoryStore>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory::new()
    }
}

impl Memory {
    /// A new, empty lock service.
    pub fn new() -> Self {
        Memory {
            engine: LeaseEngine::new(MemoryStore::default(), Wakeups::new()),
        }
    }

    /// Sets how waiting polls (see [`LeaseOptions`]). In memory a release
    /// wakes waiters at once, so this matters only for expiries.
    pub fn with_options(self, options: LeaseOptions) -> Result<Self> {
        // A fresh engine over the same locks, so that this works on a handle
        // that has been cloned (the engine's options cannot change under
        // clones that share it).
        let store = MemoryStore {
            names: self.engine.store().names.clone(),
            clock: self.engine.store().clock,
        };
        let mut engine = LeaseEngine::new(store, self.engine.wakeups());
        engine.set_options(options)?;
        Ok(Memory { engine })
    }
}

lease_backend!(Memory);

#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    names: Arc<Mutex<HashMap<String, Entry>>>,
    clock: Clock,
}

/// Memory's clock: the wall clock read once, advanced by tokio's monotonic
/// clock. Expiries are decided on the monotonic clock, and reported (and
/// [`now`](crate::Backend::now) answered) on this one, so that both agree,
/// also under `tokio::time::pause`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    base: Instant,
    base_wall: DateTime<Utc>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            base: Instant::now(),
            base_wall: Utc::now(),
        }
    }
}

impl Clock {
    /// The wall-clock reading of a monotonic instant.
    fn wall(&self, at: Instant) -> DateTime<Utc> {
        let since =
            |d: std::time::Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        if at >= self.base {
            self.base_wall + since(at - self.base)
        } else {
            self.base_wall - since(self.base - at)
        }
    }
}

#[derive(Debug, Default)]
struct Entry {
    token: u64,
    holders: Vec<Holder>,
}

#[derive(Debug)]
struct Holder {
    /// Empty once released with `hold_at_least` (the entry then only keeps
    /// the name taken): no renewal matches it.
    owner: String,
    holder: String,
    mode: LockMode,
    token: u64,
    acquired: Instant,
    acquired_at: DateTime<Utc>,
    expires: Instant,
}

impl Entry {
    fn prune(&mut self, now: Instant) {
        self.holders.retain(|h| h.expires > now);
    }

    fn info(&self, name: &str, clock: &Clock) -> Option<LockInfo> {
        let first = self.holders.first()?;
        let mut info = LockInfo::new(Some(name.to_owned()), first.holder.clone(), first.mode);
        info.token = Some(first.token);
        info.acquired_at = Some(first.acquired_at);
        info.expires_at = Some(clock.wall(first.expires));
        info.holders = self.holders.len() as u32;
        Some(info)
    }
}

impl LeaseStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn supports_shared(&self) -> bool {
        true
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap();
        let entry = names.entry(claim.name.to_owned()).or_default();
        entry.prune(now);
        let free = match claim.mode {
            LockMode::Exclusive => entry.holders.is_empty(),
            LockMode::Shared => entry.holders.iter().all(|h| h.mode == LockMode::Shared),
        };
        if !free {
            return Ok(None);
        }
        entry.token += 1;
        let expires = now + claim.ttl;
        entry.holders.push(Holder {
            owner: claim.owner.to_owned(),
            holder: claim.holder.to_owned(),
            mode: claim.mode,
            token: entry.token,
            acquired: now,
            acquired_at: self.clock.wall(now),
            expires,
        });
        Ok(Some(Claimed {
            token: entry.token,
            expires_at: self.clock.wall(expires),
        }))
    }

    async fn renew(
        &self,
        name: &str,
        owner: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<Option<DateTime<Utc>>> {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap();
        let Some(entry) = names.get_mut(name) else {
            return Ok(None);
        };
        let mine = entry
            .holders
            .iter_mut()
            .find(|h| h.owner == owner && h.token == token && h.expires > now);
        Ok(mine.map(|h| {
            h.expires = now + ttl;
            self.clock.wall(h.expires)
        }))
    }

    async fn renew_many(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap();
        Ok(batch
            .iter()
            .map(|r| {
                let mine = names.get_mut(&*r.name).and_then(|entry| {
                    entry
                        .holders
                        .iter_mut()
                        .find(|h| h.owner == *r.owner && h.token == r.token && h.expires > now)
                });
                match mine {
                    Some(h) => {
                        h.expires = now + r.ttl;
                        Renewed::Until(self.clock.wall(h.expires))
                    }
                    None => Renewed::Gone,
                }
            })
            .collect())
    }

    fn batch_len(&self, batch: &[Renewal]) -> usize {
        batch.len()
    }

    async fn release(
        &self,
        name: &str,
        owner: &str,
        token: u64,
        hold: Option<Duration>,
    ) -> Result<bool> {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap();
        let Some(entry) = names.get_mut(name) else {
            return Ok(false);
        };
        let Some(i) = entry
            .holders
            .iter()
            .position(|h| h.owner == owner && h.token == token && h.expires > now)
        else {
            return Ok(false);
        };
        match hold.map(|d| entry.holders[i].acquired + d) {
            Some(until) if until > now => {
                let h = &mut entry.holders[i];
                h.expires = until;
                h.owner.clear();
            }
            _ => {
                entry.holders.swap_remove(i);
            }
        }
        Ok(true)
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        Ok(self.clock.wall(Instant::now()))
    }

    async fn force_release(&self, name: &str) -> Result<bool> {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap();
        Ok(names.get_mut(name).is_some_and(|entry| {
            entry.prune(now);
            let held = !entry.holders.is_empty();
            entry.holders.clear();
            held
        }))
    }

    async fn inspect(&self, name: &str) -> Result<Option<LockInfo>> {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap();
        Ok(names.get_mut(name).and_then(|entry| {
            entry.prune(now);
            entry.info(name, &self.clock)
        }))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap();
        let mut all: Vec<LockInfo> = names
            .iter_mut()
            .filter_map(|(name, entry)| {
                entry.prune(now);
                entry.info(name, &self.clock)
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim<'a>(name: &'a str, owner: &'a str) -> Claim<'a> {
        Claim {
            name,
            owner,
            holder: "test:1",
            mode: LockMode::Exclusive,
            ttl: Duration::from_secs(30),
            abandoned: &|| false,
        }
    }

    fn renewal(name: &str, owner: &str, token: u64) -> Renewal {
        Renewal {
            name: name.into(),
            owner: owner.into(),
            token,
            ttl: Duration::from_secs(30),
        }
    }

    /// A batch renewal that lands after a release never revives the lease,
    /// even one kept by `hold_at_least`; its neighbours are renewed.
    #[tokio::test]
    async fn renew_many_refuses_released_leases() {
        let store = MemoryStore::default();
        let a = store.claim(&claim("a", "o1")).await.unwrap().unwrap();
        let b = store.claim(&claim("b", "o2")).await.unwrap().unwrap();
        let c = store.claim(&claim("c", "o3")).await.unwrap().unwrap();
        assert!(store
            .release("a", "o1", a.token, Some(Duration::from_secs(60)))
            .await
            .unwrap());
        assert!(store.release("c", "o3", c.token, None).await.unwrap());
        let answers = store
            .renew_many(&[
                renewal("a", "o1", a.token),
                renewal("b", "o2", b.token),
                renewal("c", "o3", c.token),
                renewal("b", "o2", b.token + 1),
            ])
            .await
            .unwrap();
        assert_eq!(answers[0], Renewed::Gone);
        assert!(matches!(answers[1], Renewed::Until(_)));
        assert_eq!(answers[2], Renewed::Gone);
        assert_eq!(answers[3], Renewed::Gone);
        // The held-over lease still blocks the name, until its hold.
        assert!(store.inspect("a").await.unwrap().is_some());
        assert_eq!(
            store
                .renew("a", "o1", a.token, Duration::from_secs(1))
                .await
                .unwrap(),
            None
        );
    }
}
