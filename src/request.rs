//! What a caller asks for when acquiring a lock.

use std::sync::Arc;
use std::time::Duration;

use crate::name::validate_name;
use crate::{Error, Result};

/// Whether a lock excludes everyone or only writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum LockMode {
    /// One holder at a time.
    Exclusive,
    /// Any number of shared holders at once, and no exclusive holder
    /// meanwhile (a reader lock).
    Shared,
}

impl LockMode {
    /// `"exclusive"` or `"shared"`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
        }
    }
}

impl std::fmt::Display for LockMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long an acquisition may wait for a lock that is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Try once; a held lock is not an error (`try_acquire`).
    No,
    /// Wait at most this long, then fail with [`Error::Timeout`].
    For(Duration),
    /// Wait until the lock is free.
    Forever,
}

/// The default lease length of the lease backends.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// The shortest ttl accepted: renewal runs every ttl/3 and must fit a round
/// trip to the database.
pub const MIN_TTL: Duration = Duration::from_millis(100);
/// The most holders a semaphore may admit
/// ([`AcquireRequest::with_max_holders`]).
pub const MAX_HOLDERS: u32 = 1000;
/// The longest ttl, wait or `hold_at_least` accepted.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A validated request to take a lock, as handed to a [`Backend`](crate::Backend).
///
/// Built by [`Locks::acquire`](crate::Locks::acquire); backends receive it
/// already checked, so they never see a bad name or option.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    /// Shared, not copied, by the facade, the backend and the guard.
    pub(crate) name: Arc<str>,
    pub(crate) mode: LockMode,
    pub(crate) ttl: Duration,
    pub(crate) ttl_set: bool,
    pub(crate) wait: Wait,
    pub(crate) hold_at_least: Option<Duration>,
    pub(crate) holder: Option<String>,
    pub(crate) max_holders: u32,
}

impl AcquireRequest {
    /// A request for an exclusive lock on `name`, waiting forever, with the
    /// default ttl. Fails with [`Error::InvalidName`] for a bad name.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        validate_name(name)?;
        Ok(AcquireRequest {
            name: Arc::from(name),
            mode: LockMode::Exclusive,
            ttl: DEFAULT_TTL,
            ttl_set: false,
            wait: Wait::Forever,
            hold_at_least: None,
            holder: None,
            max_holders: 1,
        })
    }

    /// Sets the lease length (lease backends). Must lie between 100 ms and 366 days.
    pub fn with_ttl(mut self, ttl: Duration) -> Result<Self> {
        check_duration("ttl", ttl, MIN_TTL)?;
        self.ttl = ttl;
        self.ttl_set = true;
        Ok(self)
    }

    /// Sets the lease length without marking it explicit: for dblock's own
    /// callers (elections) that run on every backend, where a backend
    /// without leases ignores it instead of refusing it.
    pub(crate) fn with_default_ttl(self, ttl: Duration) -> Result<Self> {
        let mut request = self.with_ttl(ttl)?;
        request.ttl_set = false;
        Ok(request)
    }

    /// Sets how long to wait. A `Wait::For` longer than 366 days is refused.
    pub fn with_wait(mut self, wait: Wait) -> Result<Self> {
        if let Wait::For(d) = wait {
            check_duration("wait", d, Duration::ZERO)?;
        }
        self.wait = wait;
        Ok(self)
    }

    /// Sets the lock mode.
    ///
    /// A shared mode on a request for more than one holder is refused when
    /// the request reaches [`Locks`](crate::Locks) or a backend (see
    /// [`with_max_holders`](Self::with_max_holders)).
    pub fn with_mode(mut self, mode: LockMode) -> Self {
        self.mode = mode;
        self
    }

    /// Makes the request one for a permit of a semaphore: up to `n` holders
    /// of the name at once, each with its own guard and fencing token. `1`
    /// (the default) is a plain lock. Must lie between 1 and
    /// [`MAX_HOLDERS`], and cannot be combined with a shared mode (readers
    /// share a lock without a bound already): [`Error::InvalidOption`]
    /// otherwise.
    ///
    /// All holders of a name at one time must agree on `n`: an acquisition
    /// that finds the name held with another `n` (a plain lock counting as
    /// `1`, reader and writer locks too) fails with
    /// [`Error::InvalidOption`] instead of waiting. Once nothing holds the
    /// name, the next acquisition may use any `n`.
    pub fn with_max_holders(mut self, n: u32) -> Result<Self> {
        if n == 0 || n > MAX_HOLDERS {
            return Err(Error::InvalidOption(format!(
                "max_holders({n}): a semaphore admits between 1 and {MAX_HOLDERS} holders"
            )));
        }
        self.max_holders = n;
        self.check_mode()?;
        Ok(self)
    }

    /// Refuses a shared request for more than one holder.
    pub(crate) fn check_mode(&self) -> Result<()> {
        if self.mode == LockMode::Shared && self.max_holders > 1 {
            return Err(Error::InvalidOption(format!(
                "max_holders({}) with shared(): readers share a lock without a bound; \
                 ask for one or the other",
                self.max_holders
            )));
        }
        Ok(())
    }

    /// Keeps the lease until at least `acquired_at + d` even when released
    /// earlier. Must be at most 366 days.
    pub fn with_hold_at_least(mut self, d: Duration) -> Result<Self> {
        check_duration("hold_at_least", d, Duration::ZERO)?;
        self.hold_at_least = Some(d);
        Ok(self)
    }

    /// Records `holder` as who holds the lock, in place of the process's
    /// `host:pid`: [`LockInfo::holder`](crate::LockInfo::holder) shows it.
    /// A leader's identity travels this way (see
    /// [`Election`](crate::Election)). The same rules as a name: 1 to 255
    /// bytes of UTF-8, no NUL ([`Error::InvalidOption`] otherwise).
    pub fn with_holder(mut self, holder: impl Into<String>) -> Result<Self> {
        let holder = holder.into();
        crate::name::validate_identity(&holder)?;
        self.holder = Some(holder);
        Ok(self)
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lock's name, shared: what a backend keeps beside a hold (for
    /// `list` and loss reports) without copying it.
    pub fn shared_name(&self) -> &Arc<str> {
        &self.name
    }
    /// Exclusive or shared.
    pub fn mode(&self) -> LockMode {
        self.mode
    }
    /// The lease length (the default, 30 s, unless set).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
    /// Whether the caller set a ttl explicitly.
    pub fn ttl_is_explicit(&self) -> bool {
        self.ttl_set
    }
    /// How long to wait.
    pub fn wait(&self) -> Wait {
        self.wait
    }
    /// The minimum time the lease is kept from acquisition, if any.
    pub fn hold_at_least(&self) -> Option<Duration> {
        self.hold_at_least
    }
    /// Who the request says holds the lock, if it says so
    /// ([`with_holder`](Self::with_holder)); the backend records its own
    /// description (`host:pid`) otherwise.
    pub fn holder(&self) -> Option<&str> {
        self.holder.as_deref()
    }
    /// How many holders the name admits at once: 1 for a lock, `n` for a
    /// permit of a semaphore. A [`Backend`](crate::Backend) without
    /// semaphores must answer [`Error::Unsupported`] to a request above 1.
    pub fn max_holders(&self) -> u32 {
        self.max_holders
    }
    /// Whether this is a permit of a semaphore of more than one holder.
    pub(crate) fn is_permit(&self) -> bool {
        self.max_holders > 1
    }
}

fn check_duration(what: &str, d: Duration, min: Duration) -> Result<()> {
    if d < min {
        return Err(Error::InvalidOption(format!(
            "{what} of {d:?} is below the minimum of {min:?}"
        )));
    }
    if d > MAX_DURATION {
        return Err(Error::InvalidOption(format!(
            "{what} of {d:?} is above the maximum of 366 days"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        let r = AcquireRequest::new("x").unwrap();
        assert!(matches!(
            r.clone().with_ttl(Duration::ZERO),
            Err(Error::InvalidOption(_))
        ));
        assert!(matches!(
            r.clone().with_ttl(Duration::from_secs(u64::MAX)),
            Err(Error::InvalidOption(_))
        ));
        assert!(matches!(
            r.clone()
                .with_wait(Wait::For(Duration::from_secs(u64::MAX))),
            Err(Error::InvalidOption(_))
        ));
        assert!(r.clone().with_wait(Wait::For(Duration::ZERO)).is_ok());
        assert!(r.clone().with_ttl(Duration::from_millis(100)).is_ok());
        assert!(matches!(
            r.clone().with_hold_at_least(Duration::MAX),
            Err(Error::InvalidOption(_))
        ));
        for n in [0, MAX_HOLDERS + 1, u32::MAX] {
            assert!(matches!(
                r.clone().with_max_holders(n),
                Err(Error::InvalidOption(_))
            ));
        }
        assert_eq!(r.clone().with_max_holders(3).unwrap().max_holders(), 3);
        assert!(matches!(
            r.clone().with_mode(LockMode::Shared).with_max_holders(2),
            Err(Error::InvalidOption(_))
        ));
        assert!(r.with_mode(LockMode::Shared).with_max_holders(1).is_ok());
    }
}
