//! The crate's error type.

use std::time::Duration;

/// Everything that can go wrong when taking, keeping or inspecting a lock.
///
/// Bad input ([`Error::InvalidName`], [`Error::InvalidOption`]) is always
/// reported before anything is sent to the database, and so is an option
/// the backend cannot keep ([`Error::Unsupported`]: `.ttl()` or
/// `.hold_at_least()` on a backend without leases).
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
    ///
    /// Match on [`reason`](LostReason) to tell the causes apart; `detail`
    /// is the human-readable account (for logs, not for matching: its
    /// wording may change in any release).
    #[error("lock {name:?} was lost ({reason}): {detail}")]
    Lost {
        /// The lock's name.
        name: String,
        /// Why the lock is considered lost.
        reason: LostReason,
        /// What happened, in words.
        detail: String,
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
    /// Something dblock found wrong with what the database answered or
    /// with its own state: a row it cannot decode, a value out of range,
    /// a migration history it does not know. Not a driver error, and not
    /// retryable as such; the message says what.
    #[error("dblock: {0}")]
    Internal(String),
    /// The backend could not get or keep a working database session: the
    /// connections it took kept failing (the message says how). Nothing
    /// was taken; retrying later may succeed.
    #[error("no working database session: {0}")]
    Unavailable(String),
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
    pub(crate) fn lost(name: &str, reason: LostReason, detail: impl Into<String>) -> Self {
        Error::Lost {
            name: name.to_owned(),
            reason,
            detail: detail.into(),
        }
    }

    /// [`Error::Lost`] for `name` with the cause recorded in `loss`.
    pub(crate) fn from_loss(name: &str, loss: Loss) -> Self {
        Error::Lost {
            name: name.to_owned(),
            reason: loss.reason,
            detail: loss.detail,
        }
    }

    /// An internal failure of dblock's own (see [`Error::Internal`]).
    #[cfg_attr(
        not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
        allow(dead_code)
    )]
    pub(crate) fn internal(what: impl Into<String>) -> Self {
        Error::Internal(what.into())
    }
}

/// Why a lock was lost: the cause a backend found, for programs to match.
///
/// The same values label the `dblock_losses_total` metric (`reason`) and the
/// `cause` field of the `dblock: lock lost` warning ([`as_str`](Self::as_str);
/// see `docs/observability.md`). New causes may be added in minor releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// The lease ran out before a renewal was confirmed: its local deadline
    /// passed, a renewal or release came too late, or a release found the
    /// lease already expired.
    Expired,
    /// A renewal, heartbeat or release found the lock no longer ours: it was
    /// taken over after it ran out, or broken elsewhere (`force_release`
    /// through another backend or process, a deleted lease row or key).
    RenewalFailed,
    /// It was broken by [`Locks::force_release`](crate::Locks::force_release)
    /// through the same advisory backend (a lease broken anywhere is found
    /// by its next renewal: [`RenewalFailed`](Self::RenewalFailed)).
    ForceReleased,
    /// Its database session was terminated by an operator or the server
    /// (`pg_terminate_backend`, SQLSTATE 57P01).
    Terminated,
    /// The connection that held it failed, stopped answering, or turned out
    /// to go through a transaction pooler.
    ConnectionLost,
    /// The Tokio runtime that renewed it shut down.
    RuntimeShutdown,
    /// Anything else: the holder session was closed because the outcome of
    /// one of its statements was uncertain (the detail says which).
    Other,
}

impl LostReason {
    /// The label for metrics and logs: `expired`, `renewal_failed`,
    /// `force_released`, `terminated`, `connection_lost`,
    /// `runtime_shutdown` or `other`. Stable: dashboards may rely on it.
    pub fn as_str(self) -> &'static str {
        match self {
            LostReason::Expired => "expired",
            LostReason::RenewalFailed => "renewal_failed",
            LostReason::ForceReleased => "force_released",
            LostReason::Terminated => "terminated",
            LostReason::ConnectionLost => "connection_lost",
            LostReason::RuntimeShutdown => "runtime_shutdown",
            LostReason::Other => "other",
        }
    }
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A recorded loss: its cause and what happened, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loss {
    pub(crate) reason: LostReason,
    pub(crate) detail: String,
}

impl Loss {
    pub(crate) fn new(reason: LostReason, detail: impl Into<String>) -> Self {
        Loss {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::LostReason;

    /// The loss labels are the ones `docs/observability.md` and the
    /// `metrics` module document, no more and no fewer.
    #[test]
    fn loss_labels_are_documented() {
        let all = [
            LostReason::Expired,
            LostReason::RenewalFailed,
            LostReason::ForceReleased,
            LostReason::Terminated,
            LostReason::ConnectionLost,
            LostReason::RuntimeShutdown,
            LostReason::Other,
        ];
        let labels: std::collections::BTreeSet<&str> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), all.len(), "two causes share a label");
        for (file, text) in [
            (
                "docs/observability.md",
                include_str!("../docs/observability.md"),
            ),
            ("src/metrics.rs", include_str!("metrics.rs")),
        ] {
            // The rows of the loss-cause table: "| `label` | ... |".
            let start = text
                .find("| reason | the lock was lost because |")
                .expect(file);
            let documented: std::collections::BTreeSet<&str> = text[start..]
                .lines()
                .map(|l| l.trim_start_matches("//!").trim())
                .skip(2)
                .take_while(|l| l.starts_with("| `"))
                .filter_map(|l| l.split('`').nth(1))
                .collect();
            assert_eq!(documented, labels, "{file}");
        }
    }
}
