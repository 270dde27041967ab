//! What inspection of a lock reports.

use chrono::{DateTime, Utc};

use crate::LockMode;

/// A lock as the database sees it now, from [`Locks::inspect`](crate::Locks::inspect)
/// or [`Locks::list`](crate::Locks::list).
///
/// With the `serde` feature it is `Serialize`: times as RFC 3339 strings,
/// the mode as `"exclusive"` or `"shared"`, absent values as `null`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct LockInfo {
    /// The lock's name. `None` for an advisory lock seen in `pg_locks` that no
    /// guard of this process holds: the database keeps only its 64-bit key.
    pub name: Option<String>,
    /// The PostgreSQL advisory key (see [`advisory_key`](crate::advisory_key)), for advisory locks.
    pub key: Option<i64>,
    /// Who holds it: `host:pid` for a lease, the server backend (pid,
    /// application, client address) for an advisory lock; or the identity
    /// the holder gave ([`Acquire::holder`](crate::Acquire::holder), a
    /// leader's identity).
    pub holder: String,
    /// The holder's fencing token, where the database records it.
    pub token: Option<u64>,
    /// When it was acquired, by the database clock, where recorded.
    pub acquired_at: Option<DateTime<Utc>>,
    /// When the lease runs out by the database clock; `None` for locks that
    /// live as long as their connection.
    pub expires_at: Option<DateTime<Utc>>,
    /// Exclusive or shared.
    pub mode: LockMode,
    /// How many holders share it (1 for an exclusive lock).
    pub holders: u32,
    /// How many holders the name admits at once: `Some(1)` for an
    /// exclusive lock, `Some(n)` for a semaphore of `n` permits
    /// ([`Acquire::max_holders`](crate::Acquire::max_holders)), `None` for
    /// shared (reader) holders, who have no bound.
    pub max_holders: Option<u32>,
    /// How many sessions are waiting for it, where the database shows them
    /// (PostgreSQL advisory locks: the ungranted `pg_locks` entries of
    /// sessions blocked in `pg_advisory_lock`); `None` where it cannot
    /// (lease backends, whose waiters poll or sleep between attempts).
    pub waiters: Option<u32>,
}

impl LockInfo {
    /// A record for a lock with one holder; the other fields start empty.
    pub fn new(name: Option<String>, holder: String, mode: LockMode) -> Self {
        LockInfo {
            name,
            key: None,
            holder,
            token: None,
            acquired_at: None,
            expires_at: None,
            mode,
            holders: 1,
            max_holders: match mode {
                LockMode::Exclusive => Some(1),
                LockMode::Shared => None,
            },
            waiters: None,
        }
    }
}
