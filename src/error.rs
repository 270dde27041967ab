//! The crate's error type.

use std::time::Duration;

/// Everything that can go wrong when taking, keeping or inspecting a lock.
///
/// Bad input ([`Error::InvalidName`], [`Error::InvalidOption`]) is always
/// reported before anything is sent to the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock was not granted within the time given to `.wait(..)`.
    #[error("timed out after {waited:?} waiting for lock {name:?}")]
    Timeout {
        /// The lock's name.
        name: String,
        /// How long the caller asked to wait.
        waited: Duration,
    },
    /// The lock is no longer held: its lease could not be renewed in time, its
    /// connection died, or an operator broke it. Whatever the guard protected
    /// may now be in another holder's hands.
    #[error("lock {name:?} was lost: {reason}")]
    Lost {
        /// The lock's name.
        name: String,
        /// Why the lock is considered lost.
        reason: String,
    },
    /// A lock name that dblock refuses: empty, longer than 255 bytes, or
    /// containing a NUL byte.
    #[error("invalid lock name: {0}")]
    InvalidName(String),
    /// An option out of its range (a zero ttl, a wait of years, a table name
    /// that is not a plain identifier, ...).
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The database has no dblock schema yet, or one older than this
    /// version of dblock (a table or column it needs is missing).
    #[error("the dblock schema is missing or out of date in this database: call `{migrate}` (or apply the SQL files in `migrations/{dir}/`) first")]
    SchemaMissing {
        /// The function that creates the schema, e.g. `dblock::postgres::migrate`.
        migrate: &'static str,
        /// The folder under `migrations/` with the same SQL.
        dir: &'static str,
    },
    /// The backend cannot do what was asked (for example a shared lock on a
    /// backend without reader locks).
    #[error("unsupported by the {backend} backend: {what}")]
    Unsupported {
        /// The backend, e.g. `postgres-advisory`.
        backend: &'static str,
        /// What it cannot do, and what to use instead.
        what: String,
    },
    /// The database has no room for another lock: PostgreSQL's shared lock
    /// table is full (SQLSTATE 53200, "out of shared memory"). Nothing was
    /// taken, locks already held stay held, and other acquisitions succeed
    /// again once locks are released. The message names the setting to
    /// raise.
    #[error("the database's lock table is full: {detail}")]
    LockTableFull {
        /// What is full, its size as configured, and which setting to raise.
        detail: String,
    },
    /// An error from the database driver.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// An error from the Redis client or server
    /// ([`redis::Lease`](crate::redis::Lease)).
    #[cfg(feature = "redis")]
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// `Result` with [`Error`] as its default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn lost(name: &str, reason: impl Into<String>) -> Self {
        Error::Lost {
            name: name.to_owned(),
            reason: reason.into(),
        }
    }
}
