//! The local registry: which advisory locks this backend holds, or is
//! taking, on which holder session, and which sessions are open.
//!
//! PostgreSQL stacks session-level advisory locks: a session that already
//! holds a key is granted it again at once, whatever the mode and whoever
//! else waits. Two guards of one process must therefore never meet inside
//! PostgreSQL on the same session unless both are shared. The registry is
//! where that is decided, under one mutex, before any statement is sent:
//!
//! - an exclusive request for a key this backend holds or is taking (in any
//!   mode, on any session) is busy here, without asking the server;
//! - a shared request is busy here only against a local exclusive hold;
//!   beside local shared holds it goes to a session that does not hold the
//!   key if there is one, and is stacked on one that does otherwise (one
//!   `pg_advisory_unlock_shared` per guard undoes the stack);
//! - conflicts between different sessions, ours or anyone's, are left to
//!   PostgreSQL.
//!
//! A permit of a semaphore is recorded as a shared hold on the name's key
//! that knows its semaphore's keys and, once granted, its slot: permits of
//! one name and capacity go beside each other like shared holds (stacked on
//! one session if need be, their slots kept apart by the acquisition, see
//! `acquire::permit_on`); anything else of ours on the name meets them as
//! a disagreement ([`Route::Disagree`]).

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use super::session::Session;
use crate::backend::LockStatus;
use crate::postgres::key::PermitKeys;
use crate::LockMode;

pub(super) type SessionId = u64;
pub(super) type LockId = u64;

/// One lock on one session: being taken, or held by a guard.
pub(super) struct Hold {
    pub(super) lock: LockId,
    pub(super) session: SessionId,
    pub(super) mode: LockMode,
    /// A permit of a semaphore (its mode is `Shared`): its keys and slot.
    pub(super) permit: Option<Permit>,
    pub(super) state: HoldState,
}

/// What a permit hold knows besides the name's key.
#[derive(Clone)]
pub(super) struct Permit {
    /// Its semaphore's capacity and keys.
    pub(super) keys: Arc<PermitKeys>,
    /// The slot key it holds, once granted.
    pub(super) slot: Option<i64>,
}

impl Permit {
    pub(super) fn capacity(&self) -> u32 {
        self.keys.slots.len() as u32
    }
}

impl Hold {
    /// The hold `lock` on `session`, granted with `token` and owned by a
    /// guard of `name` whose status is `status`.
    pub(super) fn held(
        lock: LockId,
        session: SessionId,
        mode: LockMode,
        permit: Option<Permit>,
        token: u64,
        name: Arc<str>,
        status: LockStatus,
    ) -> Hold {
        Hold {
            lock,
            session,
            mode,
            permit,
            state: HoldState::Held {
                token,
                name,
                status,
            },
        }
    }

    /// How many holders the hold's name admits: 1 for a lock (reader or
    /// writer), `n` for a permit.
    fn capacity(&self) -> u32 {
        self.permit.as_ref().map_or(1, Permit::capacity)
    }
}

pub(super) enum HoldState {
    /// A lock statement is on its way; the outcome is not known yet.
    Pending,
    /// Granted and owned by a guard.
    Held {
        token: u64,
        name: Arc<str>,
        status: LockStatus,
    },
}

/// An open holder session.
pub(super) struct SessionEntry {
    /// The session; it lives as long as its keeper task or a guard on it.
    pub(super) session: Weak<Session>,
    /// Whether new locks are routed to it. Sessions adopted from a
    /// server-side wait beyond the configured number are not: they carry
    /// the lock they waited for and go back to the pool once it is released.
    pub(super) core: bool,
    /// The backend's process id, once known (for `force_release`).
    pub(super) pid: Option<i32>,
    /// Locks held and being taken on it.
    pub(super) holds: usize,
    /// Lock statements sent to it and not yet answered.
    pub(super) queued: usize,
    /// Unlocks under way or waiting for its connection (the session
    /// counts them).
    pub(super) unlocking: Arc<AtomicUsize>,
}

impl SessionEntry {
    /// Statements under way or waiting for the session's connection.
    fn backlog(&self) -> usize {
        self.queued + self.unlocking.load(Ordering::Relaxed)
    }
}

/// Where to send a lock attempt.
pub(super) enum Route {
    /// This backend holds or is taking the key in a conflicting mode.
    Busy,
    /// There is no holder session yet: one must be opened.
    Open,
    /// The sessions there are all have a backlog (or all hold the key), and
    /// fewer than the configured number are open: another would help.
    Grow,
    /// Try on this session; the pending hold is recorded.
    Send(Arc<Session>),
    /// This backend holds the name with another capacity (a permit beside
    /// a lock, or permits of another `n`): the capacity it holds it with.
    Disagree(u32),
}

/// A lock of ours, as `inspect` and `list` report it.
pub(super) struct Ours {
    pub(super) name: String,
    pub(super) token: u64,
    /// Guards on `key` beyond the first on each session (stacked shared
    /// holds, which `pg_locks` shows as one row per session).
    pub(super) stacked: u32,
}

#[derive(Default)]
pub(super) struct Registry {
    keys: FxHashMap<i64, Vec<Hold>>,
    sessions: FxHashMap<SessionId, SessionEntry>,
    /// The vector of the last key forgotten, kept for the next new key: an
    /// uncontended lock and release would otherwise allocate and free one
    /// each time.
    spare: Option<Vec<Hold>>,
}

impl Registry {
    /// Core sessions open now.
    pub(super) fn core_count(&self) -> usize {
        self.sessions.values().filter(|s| s.core).count()
    }

    /// Decides where a lock attempt goes, and records it as pending there.
    /// `permit` holds the semaphore's keys for a permit.
    pub(super) fn route(
        &mut self,
        key: i64,
        mode: LockMode,
        permit: Option<&Arc<PermitKeys>>,
        lock: LockId,
        target: usize,
        grow: bool,
    ) -> Route {
        let holds = self.keys.get(&key).map(Vec::as_slice).unwrap_or_default();
        let capacity = permit.map_or(1, |k| k.slots.len() as u32);
        // A granted hold that disagrees on the capacity is refused; a
        // pending one may yet fail, so it is waited for.
        for h in holds {
            if h.capacity() != capacity && (h.permit.is_some() || permit.is_some()) {
                return match h.state {
                    HoldState::Held { .. } => Route::Disagree(h.capacity()),
                    HoldState::Pending => Route::Busy,
                };
            }
        }
        if let Some(keys) = permit {
            // Every slot is held or being taken here.
            if holds.len() >= keys.slots.len() {
                return Route::Busy;
            }
        } else if !holds.is_empty()
            && (mode == LockMode::Exclusive || holds.iter().any(|h| h.mode == LockMode::Exclusive))
        {
            return Route::Busy;
        }
        let core = self.core_count();
        if core == 0 {
            return Route::Open;
        }
        let has_key = |id: &SessionId| holds.iter().any(|h| h.session == *id);
        // The least backlogged core session without the key; ties go to the
        // oldest, so that a lightly used backend keeps to one session and
        // the others fall idle and go back to the pool.
        let fresh = self
            .sessions
            .iter()
            .filter(|(id, s)| s.core && !has_key(id))
            .min_by_key(|(id, s)| (s.backlog(), **id))
            .map(|(id, s)| (*id, s.backlog()));
        let can_grow = grow && core < target;
        let chosen = match fresh {
            Some((_, queued)) if queued > 0 && can_grow => return Route::Grow,
            Some((id, _)) => id,
            // Every core session holds the key (shared): open another, or
            // stack on the least backlogged.
            None if can_grow => return Route::Grow,
            None => match self
                .sessions
                .iter()
                .filter(|(_, s)| s.core)
                .min_by_key(|(id, s)| (s.backlog(), **id))
            {
                Some((id, _)) => *id,
                None => return Route::Open,
            },
        };
        let entry = self.sessions.get_mut(&chosen).expect("chosen session");
        let Some(session) = entry.session.upgrade() else {
            // Its last owner dropped it just now (an abnormal end, which
            // is being reported): choose again without it.
            self.remove_session(chosen);
            return self.route(key, mode, permit, lock, target, grow);
        };
        entry.holds += 1;
        entry.queued += 1;
        // Most keys have one hold: a vector of one, not the default four.
        let spare = &mut self.spare;
        self.keys
            .entry(key)
            .or_insert_with(|| spare.take().unwrap_or_else(|| Vec::with_capacity(1)))
            .push(Hold {
                lock,
                session: chosen,
                mode,
                permit: permit.map(|keys| Permit {
                    keys: keys.clone(),
                    slot: None,
                }),
                state: HoldState::Pending,
            });
        Route::Send(session)
    }

    /// Registers an open session.
    pub(super) fn add_session(&mut self, id: SessionId, entry: SessionEntry) {
        self.sessions.insert(id, entry);
    }

    /// Records a lock held by a guard on `session` (a granted server-side
    /// wait, adopted together with its session).
    pub(super) fn add_held(&mut self, key: i64, hold: Hold) {
        self.keys.entry(key).or_default().push(hold);
    }

    /// The pending attempt `hold.lock` was granted: it becomes `hold`.
    pub(super) fn granted(&mut self, key: i64, hold: Hold) {
        if let Some(s) = self.sessions.get_mut(&hold.session) {
            s.queued = s.queued.saturating_sub(1);
        }
        let holds = self.keys.entry(key).or_default();
        match holds.iter_mut().find(|h| h.lock == hold.lock) {
            Some(h) => *h = hold,
            None => {
                // Not expected (the session records its own attempts), but a
                // lock the server granted is recorded whatever happened.
                if let Some(s) = self.sessions.get_mut(&hold.session) {
                    s.holds += 1;
                }
                holds.push(hold);
            }
        }
    }

    /// An attempt was answered without a grant: the pending hold goes.
    pub(super) fn not_granted(&mut self, session: SessionId, key: i64, lock: LockId) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.queued = s.queued.saturating_sub(1);
        }
        self.remove(key, lock);
    }

    /// The hold `lock` on `key`, if it is still recorded.
    pub(super) fn hold(&self, key: i64, lock: LockId) -> Option<&Hold> {
        self.keys.get(&key)?.iter().find(|h| h.lock == lock)
    }

    /// The slots held by granted permits on `key`.
    pub(super) fn slots_held(&self, key: i64) -> Vec<i64> {
        self.keys.get(&key).map_or_else(Vec::new, |holds| {
            holds
                .iter()
                .filter_map(|h| h.permit.as_ref()?.slot)
                .collect()
        })
    }

    /// The semaphores this backend holds permits of: their keys.
    pub(super) fn semaphores(&self) -> Vec<Arc<PermitKeys>> {
        self.keys
            .values()
            .filter_map(|holds| {
                holds.iter().find_map(|h| match (&h.permit, &h.state) {
                    (Some(p), HoldState::Held { .. }) => Some(p.keys.clone()),
                    _ => None,
                })
            })
            .collect()
    }

    /// Whether `session` has another hold on `key` in `mode` besides `lock`.
    pub(super) fn stacked(
        &self,
        session: SessionId,
        key: i64,
        mode: LockMode,
        lock: LockId,
    ) -> bool {
        self.keys.get(&key).is_some_and(|holds| {
            holds
                .iter()
                .any(|h| h.session == session && h.mode == mode && h.lock != lock)
        })
    }

    /// Forgets the hold `lock` on `key`; returns it.
    pub(super) fn remove(&mut self, key: i64, lock: LockId) -> Option<Hold> {
        let holds = self.keys.get_mut(&key)?;
        let at = holds.iter().position(|h| h.lock == lock)?;
        let hold = holds.swap_remove(at);
        if holds.is_empty() {
            // Kept for the next key only if small: one that held many
            // (stacked readers, permits) goes.
            if let Some(empty) = self.keys.remove(&key).filter(|v| v.capacity() <= 4) {
                self.spare = Some(empty);
            }
        }
        if let Some(s) = self.sessions.get_mut(&hold.session) {
            s.holds = s.holds.saturating_sub(1);
        }
        Some(hold)
    }

    /// A lock on `session` was unlocked: forgets its hold (returned), and
    /// tells whether the session is now an idle one beyond the core ones.
    pub(super) fn release(
        &mut self,
        session: SessionId,
        key: i64,
        lock: LockId,
    ) -> (Option<Hold>, bool) {
        let hold = self.remove(key, lock);
        (hold, self.idle_extra(session))
    }

    /// Whether the session holds nothing and is not a core one (it was
    /// adopted from a server-side wait): it goes back to the pool.
    pub(super) fn idle_extra(&self, session: SessionId) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| s.holds == 0 && !s.core)
    }

    /// The session's holds (held and pending), if it is open.
    pub(super) fn holds_on(&self, session: SessionId) -> Option<usize> {
        self.sessions.get(&session).map(|s| s.holds)
    }

    /// Unregisters the session if it holds nothing, so that nothing more is
    /// routed to it. Returns whether it did.
    pub(super) fn retire(&mut self, session: SessionId) -> bool {
        match self.sessions.get(&session) {
            Some(s) if s.holds == 0 => {
                self.sessions.remove(&session);
                true
            }
            _ => false,
        }
    }

    /// Unregisters the session and forgets every lock on it (it died or is
    /// being closed). Returns the held locks' names and statuses, to report
    /// them lost; `None` if the session was already gone.
    pub(super) fn remove_session(
        &mut self,
        session: SessionId,
    ) -> Option<Vec<(Arc<str>, LockStatus)>> {
        let entry = self.sessions.remove(&session)?;
        let mut lost = Vec::new();
        if entry.holds > 0 {
            self.keys.retain(|_, holds| {
                holds.retain_mut(|h| {
                    if h.session != session {
                        return true;
                    }
                    if let HoldState::Held { name, status, .. } = &h.state {
                        lost.push((name.clone(), status.clone()));
                    }
                    false
                });
                !holds.is_empty()
            });
        }
        Some(lost)
    }

    /// Our held locks on `key`: where they are, to break them.
    pub(super) fn held_on_key(&self, key: i64) -> Vec<(LockId, Arc<Session>)> {
        let Some(holds) = self.keys.get(&key) else {
            return Vec::new();
        };
        holds
            .iter()
            .filter(|h| matches!(h.state, HoldState::Held { .. }))
            .filter_map(|h| {
                let s = self.sessions.get(&h.session)?;
                Some((h.lock, s.session.upgrade()?))
            })
            .collect()
    }

    /// The process ids of our open sessions.
    pub(super) fn pids(&self) -> Vec<i32> {
        self.sessions.values().filter_map(|s| s.pid).collect()
    }

    /// What we know of `key` beyond `pg_locks`: a name and the newest token.
    pub(super) fn ours(&self, key: i64) -> Option<Ours> {
        let holds = self.keys.get(&key)?;
        let mut out: Option<Ours> = None;
        let mut sessions = Vec::new();
        let mut guards = 0u32;
        for h in holds {
            if let HoldState::Held { token, name, .. } = &h.state {
                guards += 1;
                if !sessions.contains(&h.session) {
                    sessions.push(h.session);
                }
                match &mut out {
                    Some(o) if o.token >= *token => {}
                    Some(o) => o.token = *token,
                    None => {
                        out = Some(Ours {
                            name: name.to_string(),
                            token: *token,
                            stacked: 0,
                        })
                    }
                }
            }
        }
        out.map(|mut o| {
            o.stacked = guards - sessions.len() as u32;
            o
        })
    }
}
