//! Leader election on the lock machinery: the leader is whoever holds the
//! election's lock, and its identity is recorded with the lock.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{watch, Notify};

use crate::lease::renew_every;
use crate::name::{validate_identity, validate_name};
use crate::request::{MAX_DURATION, MIN_TTL};
use crate::{Error, LockGuard, LockInfo, LockMode, Locks, LostReason, LostSignal, Result};

/// The default lease length of an election's lock: a dead leader is
/// replaced within about this long.
pub const DEFAULT_ELECTION_TTL: Duration = Duration::from_secs(15);

/// Who leads an election, as the database sees it now.
///
/// With the `serde` feature it is `Serialize`, times as RFC 3339 strings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Leader {
    /// The identity the leader campaigned with.
    pub identity: String,
    /// The leader's term: the fencing token of its lock, strictly greater
    /// than every earlier leader's.
    pub term: u64,
    /// When it became leader, by the database clock, where recorded.
    pub since: Option<DateTime<Utc>>,
    /// When its lease runs out unless renewed, by the database clock;
    /// `None` for an advisory lock, which lasts as long as its session.
    pub expires_at: Option<DateTime<Utc>>,
}

impl Leader {
    /// The leader described by the election lock's [`LockInfo`]: an
    /// exclusive holder whose term is known. An advisory lock whose holder
    /// has not recorded its identity yet (it is between its grant and the
    /// record, or it is no campaigner) has no known term: nobody leads yet.
    fn from_info(info: LockInfo) -> Option<Leader> {
        if info.mode != LockMode::Exclusive {
            return None;
        }
        Some(Leader {
            identity: info.holder,
            term: info.token?,
            since: info.acquired_at,
            expires_at: info.expires_at,
        })
    }

    /// Whether `other` is another leader, or another term of the same one
    /// (a renewal that only moves the expiry is no change).
    fn same_term(a: &Option<Leader>, b: &Option<Leader>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => a.term == b.term && a.identity == b.identity,
            _ => false,
        }
    }
}

/// A participant in the leader election of one name, made by
/// [`Locks::elect`]: it can [`campaign`](Election::campaign) to lead,
/// [`resign`](Election::resign), and [`observe`](Election::observe) who
/// leads. Processes that only want to know who leads observe without ever
/// campaigning.
///
/// The leader is whoever holds the lock `name` (exclusive, with the
/// election's ttl), and its identity is recorded with the lock: in the
/// lease row's or Redis value's holder field, or, for PostgreSQL advisory
/// locks, in the table `dblock_advisory_holders` (run
/// [`postgres::migrate`](crate::postgres::migrate)) beside the lock (a
/// role that observes needs `SELECT` on it, one that campaigns `INSERT`
/// and `UPDATE`; without them an observer sees nobody lead). Its
/// term is the lock's fencing token, so terms strictly increase and a
/// resource that records the highest term it saw refuses a deposed leader.
///
/// - **One leader at a time** as the lock excludes: a leader whose lease
///   could not be renewed in time reports itself lost before the database
///   hands the lock to the next one, as for any lock (an operator's
///   [`force_release`](Locks::force_release) is the exception: the broken
///   leader learns of it at its next renewal or heartbeat; fence with the
///   term).
/// - **Loss**: [`Leadership::lost`] resolves when the lock is lost, and
///   the leader should stop acting as one at once.
/// - **Observers** read who leads once per renewal period (a third of the
///   ttl), and at once after a campaign or resignation through the same
///   handle: a change of leader reaches them within one renewal period
///   plus the read's round trip.
///
/// Use the election's name only for the election: a plain acquisition of
/// that name would be seen as a leader too (with its `host:pid`), or, on
/// advisory locks, as nobody.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let locks = dblock::Locks::new(dblock::memory::Memory::new());
/// let a = locks.elect("scheduler", "host-a:4242")?;
/// let b = locks.elect("scheduler", "host-b:4242")?;
/// let leading = a.campaign().await?;
/// let seen = b.leader().await?.expect("a leads");
/// assert_eq!((seen.identity.as_str(), seen.term), ("host-a:4242", leading.term()));
/// leading.resign().await?;
/// let next = b.campaign().await?;
/// assert!(next.term() > seen.term);
/// # Ok::<(), dblock::Error>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct Election {
    locks: Locks,
    name: Arc<str>,
    identity: Arc<str>,
    ttl: Duration,
    /// The leadership won through this handle (and its clones), if alive.
    seat: Arc<Mutex<Weak<Seat>>>,
    /// Rung by campaigns and resignations here, so that this handle's
    /// observers read again at once.
    changed: Arc<Notify>,
}

impl fmt::Debug for Election {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Election")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Locks {
    /// A participant named `identity` in the leader election `name`. Both
    /// follow the rules of lock names (1 to 255 bytes of UTF-8, no NUL):
    /// a bad name fails with [`Error::InvalidName`], a bad identity with
    /// [`Error::InvalidOption`], before anything is written. Nothing is
    /// sent to the database until it campaigns or observes.
    pub fn elect(&self, name: impl Into<String>, identity: impl Into<String>) -> Result<Election> {
        let (name, identity) = (name.into(), identity.into());
        validate_name(&name)?;
        validate_identity(&identity)?;
        Ok(Election {
            locks: self.clone(),
            name: name.into(),
            identity: identity.into(),
            ttl: DEFAULT_ELECTION_TTL,
            seat: Arc::default(),
            changed: Arc::default(),
        })
    }

    /// Who leads the election `name` now, as the database sees it: one
    /// read. See [`Election`].
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn leader(&self, name: &str) -> Result<Option<Leader>> {
        Ok(self.inspect(name).await?.and_then(Leader::from_info))
    }
}

impl Election {
    /// The lease length of the leader's lock (lease backends; default
    /// 15 s), renewed every third of it: a leader that dies is replaced
    /// within about this long. Observers read once per third of it, on
    /// every backend. From 100 ms to 366 days ([`Error::InvalidOption`]).
    pub fn ttl(mut self, ttl: Duration) -> Result<Self> {
        if !(MIN_TTL..=MAX_DURATION).contains(&ttl) {
            return Err(Error::InvalidOption(format!(
                "an election's ttl of {ttl:?} is outside 100 ms ..= 366 days"
            )));
        }
        self.ttl = ttl;
        Ok(self)
    }

    /// The election's name (its lock's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This participant's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How often observers read who leads: one renewal period.
    pub fn observe_every(&self) -> Duration {
        renew_every(self.ttl)
    }

    /// Waits until this participant leads, and returns its leadership. It
    /// leads until the leadership is lost, resigned or dropped.
    ///
    /// Fails with [`Error::InvalidOption`] if this handle (or a clone)
    /// leads already: resign first. Bound the wait with
    /// `tokio::time::timeout`.
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped, it does not lead, and nothing is left held
    /// (as for [`Acquire`](crate::Acquire)).
    pub async fn campaign(&self) -> Result<Leadership> {
        if let Some(seat) = self.current() {
            if !seat.lost.is_lost() {
                return Err(Error::InvalidOption(format!(
                    "{:?} already leads {:?} through this handle: resign first",
                    self.identity, self.name
                )));
            }
        }
        let guard = self
            .locks
            .acquire(&*self.name)
            .default_ttl(self.ttl)
            .holder(&*self.identity)
            .await?;
        let term = guard.token();
        let seat = Arc::new(Seat {
            lost: guard.lost_owned(),
            guard: Mutex::new(Some(guard)),
            changed: self.changed.clone(),
        });
        *self.seat.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&seat);
        self.changed.notify_waiters();
        Ok(Leadership {
            seat,
            name: self.name.clone(),
            identity: self.identity.clone(),
            term,
        })
    }

    /// Gives up the leadership won through this handle (or a clone), if it
    /// leads: its lock is released and its [`Leadership::lost`] resolves.
    /// Answers whether it led.
    ///
    /// # Cancel safety
    /// Cancel safe: once called, the release goes ahead in the background
    /// even if this future is dropped.
    pub async fn resign(&self) -> Result<bool> {
        match self.current() {
            Some(seat) => seat.resign().await,
            None => Ok(false),
        }
    }

    /// Who leads now, as the database sees it: one read.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads.
    pub async fn leader(&self) -> Result<Option<Leader>> {
        self.locks.leader(&self.name).await
    }

    /// Follows who leads: a [`watch`] channel whose value is the leader
    /// (`None` while nobody leads), read from the database once per
    /// renewal period ([`observe_every`](Self::observe_every)) and at once
    /// after a campaign or resignation through this handle. The value
    /// changes (and `changed()` fires) when the leader or its term
    /// changes; a renewal that only moves the expiry updates the value
    /// silently. A read that fails keeps the last value and is retried at
    /// the next period (logged at debug level).
    ///
    /// The first read happens before this returns, so the channel starts
    /// with a real observation (and its error, if it fails). The reading
    /// task stops when every receiver is dropped. Must be called within a
    /// tokio runtime.
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped, no task is left running.
    pub async fn observe(&self) -> Result<watch::Receiver<Option<Leader>>> {
        // Armed before the first read, so that a campaign or resignation
        // through this handle during the read, or before the reading task
        // first runs, is read again rather than left to the next period.
        let mut rung = Box::pin(self.changed.clone().notified_owned());
        rung.as_mut().enable();
        let first = self.leader().await?;
        let (tx, rx) = watch::channel(first);
        let (locks, name, changed) = (self.locks.clone(), self.name.clone(), self.changed.clone());
        let every = self.observe_every();
        tokio::spawn(async move {
            loop {
                rung.as_mut().enable();
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(every) => {}
                    _ = &mut rung => {}
                }
                // Armed before the read, so that a campaign or resignation
                // during the read is read again.
                rung = Box::pin(changed.clone().notified_owned());
                rung.as_mut().enable();
                match locks.leader(&name).await {
                    Ok(now) => {
                        tx.send_if_modified(|seen| {
                            let change = !Leader::same_term(seen, &now);
                            *seen = now;
                            change
                        });
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, election = %name, "dblock: reading the leader failed");
                    }
                }
            }
        });
        Ok(rx)
    }

    fn current(&self) -> Option<Arc<Seat>> {
        self.seat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
    }
}

/// The state of one leadership, shared by the [`Leadership`] and the
/// [`Election`] that won it (which holds it weakly, to resign it).
struct Seat {
    /// The election's lock; taken out when resigned.
    guard: Mutex<Option<LockGuard>>,
    lost: LostSignal,
    changed: Arc<Notify>,
}

impl Seat {
    /// Releases the lock if it is still here; answers whether it was.
    async fn resign(&self) -> Result<bool> {
        let guard = self.guard.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(guard) = guard else {
            return Ok(false);
        };
        let outcome = guard.release().await;
        self.changed.notify_waiters();
        outcome.map(|()| true)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        // The guard goes with the seat, released in the background.
        self.changed.notify_waiters();
    }
}

/// This participant leads: returned by [`Election::campaign`]. It leads
/// until the leadership is lost ([`lost`](Leadership::lost) resolves),
/// resigned, or dropped (which resigns in the background).
///
/// Check [`is_lost`](Leadership::is_lost) or race your work against
/// [`lost`](Leadership::lost), and pass [`term`](Leadership::term) to the
/// resources the leader writes to, so that they can refuse a deposed one.
pub struct Leadership {
    seat: Arc<Seat>,
    name: Arc<str>,
    identity: Arc<str>,
    term: u64,
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("term", &self.term)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl Leadership {
    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The identity this leader campaigned with.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The term: the fencing token of the leader's lock, strictly greater
    /// than every earlier leader's.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// When the leader's lease runs out unless renewed, by the database
    /// clock, as of its last renewal; `None` for advisory locks, and once
    /// resigned.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        let guard = self.seat.guard.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().and_then(LockGuard::expires_at)
    }

    /// Whether this participant no longer leads: its lock was lost, or it
    /// resigned through its [`Election`].
    pub fn is_lost(&self) -> bool {
        self.seat.lost.is_lost()
    }

    /// Why the lock was lost, once it is (`None` after a resignation).
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.seat.lost.reason()
    }

    /// What happened when the lock was lost, in words, once it is (`None`
    /// after a resignation).
    pub fn lost_detail(&self) -> Option<String> {
        self.seat.lost.detail()
    }

    /// Resolves once this participant no longer leads (see
    /// [`is_lost`](Self::is_lost)). Stop acting as the leader then.
    ///
    /// # Cancel safety
    /// Cancel safe: it only watches.
    pub async fn lost(&self) {
        self.seat.lost.lost().await
    }

    /// An owned handle on [`lost`](Self::lost), for a spawned task.
    pub fn lost_owned(&self) -> LostSignal {
        self.seat.lost.clone()
    }

    /// Gives up the leadership: the lock is released, and the next
    /// campaigner may lead. Fails with [`Error::Lost`] if it had been lost
    /// already.
    ///
    /// # Cancel safety
    /// Cancel safe: once called, the release goes ahead in the background
    /// even if this future is dropped.
    pub async fn resign(self) -> Result<()> {
        self.seat.resign().await.map(drop)
    }
}
