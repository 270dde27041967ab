//! # dblock
//!
//! Distributed locks on the database you already run. PostgreSQL advisory
//! locks, and lease rows on PostgreSQL, MySQL/MariaDB and embedded SQLite,
//! behind one trait: no Redis, ZooKeeper or etcd needed for "only one of
//! these at a time". Where Redis runs anyway, [`redis::Lease`] is the
//! correct version of its `SET NX PX` lock, behind the same trait.
//!
//! - **One facade**, [`Locks`], over any [`Backend`]: `acquire(name)` with
//!   `.ttl()`, `.wait()`, `.shared()`, `.hold_at_least()`; `try_acquire`;
//!   `inspect`; `list`.
//! - **Fencing tokens** that strictly increase per name and survive
//!   restarts ([`LockGuard::token`]).
//! - **Loss is reported**: leases renew in the background and advisory
//!   guards watch their connection; [`LockGuard::lost`] resolves when the
//!   lock can no longer be vouched for, and [`LockGuard::lost_reason`]
//!   (like [`Error::Lost`]) says why, as a [`LostReason`] to match.
//! - **Database time only** for every expiry decision.
//! - **No leaks**: dropped guards and cancelled acquisitions never leave a
//!   lock held, nor hand a locked connection back to the pool.
//! - **Leader election** ([`Locks::elect`]): campaign, resign, and observe
//!   who leads (identity and term) on every backend; plus
//!   [`Locks::with_lock`], which cancels its work when the lock is lost, and
//!   [`LockGuard::lost_owned`] for spawned tasks.
//! - **Scheduled jobs** ([`schedule`]): every process runs the same job,
//!   each slot of its interval or cron schedule runs once across the fleet,
//!   by the database clock.
//! - **Observable**: every acquisition, release and lease renewal batch is
//!   a `tracing` span at `debug` (targets `dblock::…`), a lost lock a
//!   `warn` event with its cause; with the `metrics` feature, counters,
//!   gauges and histograms through the `metrics` facade (`dblock::metrics`
//!   lists them). See `docs/observability.md`.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use dblock::{Locks, memory::Memory};
//!
//! let locks = Locks::new(Memory::new());
//! let guard = locks
//!     .acquire("reports:nightly")
//!     .ttl(Duration::from_secs(30))
//!     .wait(Duration::from_secs(5))
//!     .await?;
//! assert!(locks.try_acquire("reports:nightly").await?.is_none());
//! let token = guard.token();
//! guard.release().await?;
//! let next = locks.acquire("reports:nightly").await?;
//! assert!(next.token() > token);
//! # Ok::<(), dblock::Error>(()) }).unwrap();
//! ```
//!
//! See the README for the backends, the schema and the command-line tool.
//! Writing a backend of your own: the [`backend`] module.
// A build with no database backend (only `memory::Memory`) leaves some of
// the stores' shared plumbing unused.
#![cfg_attr(
    not(any(
        feature = "postgres",
        feature = "mysql",
        feature = "sqlite",
        feature = "redis"
    )),
    allow(dead_code)
)]
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The README's Rust examples are compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod backend;
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
mod detach;
mod election;
mod error;
mod guard;
mod info;
mod lease;
mod locks;
mod lost;
mod name;
mod observe;
mod request;
mod retry;
mod status;
mod time;

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
mod migrate;

pub mod memory;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
pub mod schedule;
#[cfg(feature = "sqlite")]
pub mod sqlite;

pub use backend::Backend;
// Backend-author plumbing lives in `dblock::backend`; these keep the
// crate's internal paths (`crate::Grant`, ...) working.
#[allow(unused_imports)]
pub(crate) use backend::{BoxFuture, Grant, HeldLock, LockStatus, PendingGrant};
pub use election::{Election, Leader, Leadership, DEFAULT_ELECTION_TTL};
pub use error::{Error, LostReason, Result};
pub use guard::LockGuard;
pub use info::LockInfo;
pub use lease::LeaseOptions;
#[allow(unused_imports)]
pub(crate) use lease::RenewalStats;
pub use locks::{Acquire, Locks};
pub use lost::LostSignal;
pub use name::{validate_name, validate_table, MAX_NAME_LEN};
#[cfg(feature = "postgres")]
pub use postgres::advisory_key;
pub use request::{AcquireRequest, LockMode, Wait, DEFAULT_TTL, MAX_HOLDERS};

/// Hooks for dblock's own tests and benchmarks. **Not a public API**: no
/// semver guarantee, may change or vanish in any release.
#[doc(hidden)]
pub mod __unstable {
    pub use crate::lease::RenewalStats;
    #[cfg(feature = "postgres")]
    pub use crate::postgres::advisory::semaphore::pause_before_second_look;
}
