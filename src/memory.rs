//! The in-process backend.
//!
//! `Memory` keeps leases in a map inside this process, with the same
//! semantics as the database backends: fencing tokens, shared and exclusive
//! modes, ttl and renewal on the monotonic clock (tokio's, so
//! `tokio::time::pause` drives it in tests), the lost signal,
//! `hold_at_least` and semaphores (`max_holders(n)`). Use it in unit tests of code written against
//! [`Locks`](crate::Locks), and in single-process applications.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::lease::permits::{Decision, Found, READER};
use crate::lease::{
    lease_backend, Claim, Claimed, LeaseEngine, LeaseId, LeaseOptions, LeaseStore, NewExpiry,
    Renewal, Renewed, Wakeups,
};
use crate::name::NameMap;
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
            engine: LeaseEngine::new(
                MemoryStore::default(),
                Wakeups::new(),
                LeaseOptions::default(),
            )
            .expect("the default options are valid"),
        }
    }

    /// Replaces the options (see [`LeaseOptions`]) after checking them:
    /// [`Error::InvalidOption`](crate::Error::InvalidOption) unless
    /// `0 < min_poll <= max_poll`. Like `with_options` on every backend, it
    /// returns a new backend over the same locks (its clones and the new backend see the same names): locks held through `self`
    /// stay with `self` (configure the backend before taking locks).
    ///
    /// In memory a release wakes waiters at once, so this matters only for
    /// expiries.
    pub fn with_options(self, options: LeaseOptions) -> Result<Self> {
        // A fresh engine over the same locks, so that this works on a handle
        // that has been cloned (the engine's options cannot change under
        // clones that share it).
        let store = MemoryStore {
            state: self.engine.store().state.clone(),
            clock: self.engine.store().clock,
        };
        Ok(Memory {
            engine: LeaseEngine::new(store, self.engine.wakeups(), options)?,
        })
    }
}

lease_backend!(Memory);

impl Memory {
    /// How many names have an entry in the map now (held, kept by
    /// `hold_at_least`, or expired and not yet swept). For tests of the
    /// bounded footprint; not a stable interface.
    #[doc(hidden)]
    pub fn entries(&self) -> usize {
        self.engine.store().state.lock().unwrap().names.len()
    }
}

#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    state: Arc<Mutex<State>>,
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
        let since = crate::time::chrono_duration;
        if at >= self.base {
            self.base_wall + since(at - self.base)
        } else {
            self.base_wall - since(self.base - at)
        }
    }
}

/// The locks of one `Memory` (and its clones).
///
/// Only names that something holds (or keeps with `hold_at_least`) have an
/// entry: a release that frees a name removes it, and a sweep removes the
/// expired ones each time the map has doubled since the last sweep, so the
/// map's size follows the number of names held, not of names ever used.
/// Tokens come from one counter for all names, so a name whose entry was
/// removed still gets a greater token next time.
#[derive(Debug, Default)]
struct State {
    names: NameMap<Entry>,
    /// The last token handed out, for any name.
    token: u64,
    /// The map's size after the last sweep.
    swept: usize,
}

/// Below this size the map is never swept.
const SWEEP_FROM: usize = 1024;

impl State {
    fn next_token(&mut self) -> u64 {
        self.token += 1;
        self.token
    }

    /// Removes `name`'s entry if nothing holds it any more.
    fn forget_if_free(&mut self, name: &str) {
        let now = Instant::now();
        let free =
            |e: &Entry| e.holders.is_empty() && e.writer_waiting.is_none_or(|until| until <= now);
        if self.names.get(name).is_some_and(free) {
            self.names.remove(name);
        }
    }

    /// Removes every entry whose leases have all expired, once the map has
    /// doubled since the last sweep (amortised O(1) per claim).
    fn sweep_if_grown(&mut self, now: Instant) {
        if self.names.len() < SWEEP_FROM.max(2 * self.swept) {
            return;
        }
        self.names.retain(|_, entry| {
            entry.prune(now);
            !entry.holders.is_empty()
        });
        self.swept = self.names.len();
    }
}

#[derive(Debug, Default)]
struct Entry {
    holders: Vec<Holder>,
    /// Until when a writer waiting for readers to leave keeps new readers
    /// out (see [`permits`](crate::lease::permits), "Readers").
    writer_waiting: Option<Instant>,
}

#[derive(Debug)]
struct Holder {
    /// Empty once released with `hold_at_least` (the entry then only keeps
    /// the name taken): no renewal matches it.
    owner: String,
    holder: String,
    mode: LockMode,
    /// 1 for a lock, `n` for a permit of a semaphore of `n`.
    max_holders: u32,
    token: u64,
    acquired: Instant,
    acquired_at: DateTime<Utc>,
    expires: Instant,
}

impl Entry {
    fn prune(&mut self, now: Instant) {
        self.holders.retain(|h| h.expires > now);
    }

    /// Where `lease` stands among the holders, if it is still theirs and
    /// live.
    fn position(&self, lease: LeaseId<'_>, now: Instant) -> Option<usize> {
        self.holders
            .iter()
            .position(|h| h.owner == lease.owner && h.token == lease.token && h.expires > now)
    }

    fn info(&self, name: &str, clock: &Clock) -> Option<LockInfo> {
        let first = self.holders.first()?;
        let mut info = LockInfo::new(Some(name.to_owned()), first.holder.clone(), first.mode);
        info.token = Some(first.token);
        info.acquired_at = Some(first.acquired_at);
        info.expires_at = Some(clock.wall(first.expires));
        info.holders = self.holders.len() as u32;
        if first.max_holders > 1 {
            // A semaphore, as the SQL stores report it: the newest token,
            // the latest expiry.
            info.max_holders = Some(first.max_holders);
            info.token = self.holders.iter().map(|h| h.token).max();
            info.expires_at = self.holders.iter().map(|h| clock.wall(h.expires)).max();
        }
        Some(info)
    }
}

impl MemoryStore {
    /// Renews `lease` to `ttl` from `now` if it is still its owner's and
    /// live: its new expiry, by the wall clock.
    fn renew_at(
        &self,
        state: &mut State,
        lease: LeaseId<'_>,
        ttl: Duration,
        now: Instant,
    ) -> Option<DateTime<Utc>> {
        let entry = state.names.get_mut(lease.name)?;
        let i = entry.position(lease, now)?;
        let h = &mut entry.holders[i];
        h.expires = now + ttl;
        Some(self.clock.wall(h.expires))
    }
}

impl LeaseStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        state.sweep_if_grown(now);
        if let Some(entry) = state.names.get_mut(claim.name) {
            entry.prune(now);
            // Permits and readers, as the SQL stores keep them apart.
            let holders = entry
                .holders
                .iter()
                .filter(|h| h.max_holders > 1 || h.mode == LockMode::Shared);
            let found = Found {
                plain_live: entry
                    .holders
                    .iter()
                    .any(|h| h.max_holders == 1 && h.mode == LockMode::Exclusive),
                permits: holders.clone().count() as u32,
                capacity: holders.map(|h| h.max_holders).max(),
                writer_waiting: entry.writer_waiting.is_some_and(|until| until > now),
            };
            // A plain claim finding permits only misses: the engine then
            // refuses it (see `permits`).
            let free = if claim.is_holder() {
                found.decide(claim.name, claim.max_holders, claim.mode)? == Decision::Take
            } else {
                entry.holders.is_empty()
            };
            if !free {
                if let Some(mark) = claim.writer_waits {
                    if found.permits > 0 && found.capacity == Some(READER) {
                        entry.writer_waiting = Some(now + mark);
                    }
                }
                return Ok(None);
            }
            if !claim.is_holder() {
                entry.writer_waiting = None;
            }
        }
        let token = state.next_token();
        let expires = now + claim.ttl;
        let entry = state.names.entry(claim.name.to_owned()).or_default();
        entry.holders.push(Holder {
            owner: claim.owner.to_owned(),
            holder: claim.holder.to_owned(),
            mode: claim.mode,
            max_holders: claim.max_holders,
            token,
            acquired: now,
            acquired_at: self.clock.wall(now),
            expires,
        });
        Ok(Some(Claimed {
            token,
            expires_at: self.clock.wall(expires),
        }))
    }

    async fn renew(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        Ok(self.renew_at(&mut state, lease, ttl, now))
    }

    async fn renew_many(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        Ok(batch
            .iter()
            .map(|r| match self.renew_at(&mut state, r.lease(), r.ttl, now) {
                Some(at) => Renewed::Until(at),
                None => Renewed::Gone,
            })
            .collect())
    }

    fn batch_len(&self, batch: &[Renewal]) -> usize {
        batch.len()
    }

    async fn release(&self, lease: LeaseId<'_>, hold: Option<Duration>) -> Result<bool> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let name = lease.name;
        let Some(entry) = state.names.get_mut(name) else {
            return Ok(false);
        };
        let Some(i) = entry.position(lease, now) else {
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
                entry.prune(now);
                state.forget_if_free(name);
            }
        }
        Ok(true)
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        Ok(self.clock.wall(Instant::now()))
    }

    async fn force_release(&self, name: &str) -> Result<bool> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let held = state.names.remove(name).is_some_and(|mut entry| {
            entry.prune(now);
            !entry.holders.is_empty()
        });
        Ok(held)
    }

    async fn inspect(&self, name: &str) -> Result<Option<LockInfo>> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let info = state.names.get_mut(name).and_then(|entry| {
            entry.prune(now);
            entry.info(name, &self.clock)
        });
        state.forget_if_free(name);
        Ok(info)
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        state.names.retain(|_, entry| {
            entry.prune(now);
            !entry.holders.is_empty()
        });
        state.swept = state.names.len();
        let mut all: Vec<LockInfo> = state
            .names
            .iter()
            .filter_map(|(name, entry)| entry.info(name, &self.clock))
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
            max_holders: 1,
            writer_waits: None,
            abandoned: &|| false,
        }
    }

    fn id<'a>(name: &'a str, owner: &'a str, token: u64) -> LeaseId<'a> {
        LeaseId { name, owner, token }
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
            .release(id("a", "o1", a.token), Some(Duration::from_secs(60)))
            .await
            .unwrap());
        assert!(store.release(id("c", "o3", c.token), None).await.unwrap());
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
                .renew(id("a", "o1", a.token), Duration::from_secs(1))
                .await
                .unwrap(),
            None
        );
    }
}
