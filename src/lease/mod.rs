//! The lease protocol, written once.
//!
//! A lease is a row (or, for [`Memory`](crate::memory::Memory), a map entry)
//! that records who holds a name until when. Each store contributes only the
//! atomic operations of its dialect — claim, renew, release, inspect — while
//! this module does everything around them: waiting with backoff and
//! in-process wake-ups, the background renewal, the local deadline and the
//! lost signal, `hold_at_least`, cancel safety.

mod wakeups;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::backend::{BoxFuture, Grant, HeldLock, LockStatus};
use crate::{AcquireRequest, Error, LockInfo, LockMode, Result, Wait};

pub(crate) use wakeups::Wakeups;

/// One attempt to take a lease.
pub(crate) struct Claim<'a> {
    pub name: &'a str,
    pub owner: &'a str,
    pub holder: &'a str,
    pub mode: LockMode,
    pub ttl: Duration,
    /// Whether the acquirer has gone away. A store that waits for a pooled
    /// connection checks it once it has one, and claims nothing (answers
    /// `None`) if so: a cancelled acquisition must not go on to take the
    /// lease after waiting its turn for a connection.
    pub abandoned: &'a (dyn Fn() -> bool + Send + Sync),
}

impl fmt::Debug for Claim<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("holder", &self.holder)
            .field("mode", &self.mode)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A lease the store granted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claimed {
    pub token: u64,
    pub expires_at: DateTime<Utc>,
}

/// The dialect of one database: each operation is atomic on its own and
/// decides expiry by the store's clock, never the caller's.
pub(crate) trait LeaseStore: Send + Sync + fmt::Debug + 'static {
    /// The backend's name for messages.
    fn kind(&self) -> &'static str;

    /// Whether shared (reader) leases are implemented.
    fn supports_shared(&self) -> bool {
        false
    }

    /// Takes the lease if it is free (never held, released, or expired by
    /// the store's clock). `None` if someone else holds it.
    fn claim(&self, claim: &Claim<'_>) -> impl Future<Output = Result<Option<Claimed>>> + Send;

    /// Pushes the expiry to `ttl` from now if `owner` and `token` still hold
    /// the lease and it has not expired. `None` if it is no longer theirs.
    fn renew(
        &self,
        name: &str,
        owner: &str,
        token: u64,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<DateTime<Utc>>>> + Send;

    /// Ends the lease if `owner` and `token` still hold it; with `hold`, the
    /// lease stays until `acquired_at + hold` if that is later than now.
    /// Returns whether the lease was still theirs.
    fn release(
        &self,
        name: &str,
        owner: &str,
        token: u64,
        hold: Option<Duration>,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Ends whoever's lease on `name` (an operator breaking a stuck lock).
    fn force_release(&self, name: &str) -> impl Future<Output = Result<bool>> + Send;

    /// The live lease on `name`, if any.
    fn inspect(&self, name: &str) -> impl Future<Output = Result<Option<LockInfo>>> + Send;

    /// Every live lease.
    fn list(&self) -> impl Future<Output = Result<Vec<LockInfo>>> + Send;

    /// Called each time an acquisition is about to wait for a lease held
    /// elsewhere. A store with a push channel for releases (PostgreSQL's
    /// LISTEN/NOTIFY) makes sure it is listening; it must not block.
    fn waiting(&self) {}
}

/// How the lease machinery waits and renews; the defaults suit most uses.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    /// The first pause between two claim attempts while waiting; it doubles
    /// on each miss up to `max_poll` (and never beyond the ttl), with jitter.
    pub min_poll: Duration,
    /// The longest pause between two claim attempts while waiting: the
    /// bound on how late a waiter in another process notices a release.
    pub max_poll: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            min_poll: Duration::from_millis(5),
            max_poll: Duration::from_millis(250),
        }
    }
}

/// The background renewal period for a lease of `ttl`.
pub(crate) fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// How much earlier than the lease's end a guard gives up on it: the time
/// allowed for the lost signal to reach the holder, and for clock rates to
/// differ, before the database may hand the name to someone else.
pub(crate) fn safety_margin(ttl: Duration) -> Duration {
    ttl / 5
}

/// A fresh random owner id: 128 bits, hex.
pub(crate) fn new_owner() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// `host:pid`, recorded with each lease so an operator can see who holds it.
pub(crate) fn this_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// The generic lease backend over one store.
pub(crate) struct LeaseEngine<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for LeaseEngine<S> {
    fn clone(&self) -> Self {
        LeaseEngine {
            inner: self.inner.clone(),
        }
    }
}

impl<S: LeaseStore> fmt::Debug for LeaseEngine<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseEngine")
            .field("store", &self.inner.store)
            .field("options", &self.inner.options)
            .finish()
    }
}

struct Inner<S> {
    store: S,
    wakeups: Arc<Wakeups>,
    holder: String,
    options: LeaseOptions,
}

impl<S: LeaseStore> LeaseEngine<S> {
    pub(crate) fn new(store: S, wakeups: Arc<Wakeups>) -> Self {
        LeaseEngine {
            inner: Arc::new(Inner {
                store,
                wakeups,
                holder: this_holder(),
                options: LeaseOptions::default(),
            }),
        }
    }

    pub(crate) fn store(&self) -> &S {
        &self.inner.store
    }

    /// Replaces the options. Must be called before the engine is shared.
    pub(crate) fn set_options(&mut self, options: LeaseOptions) -> Result<()> {
        if options.min_poll.is_zero() || options.min_poll > options.max_poll {
            return Err(Error::InvalidOption(format!(
                "poll bounds must satisfy 0 < min_poll <= max_poll (got {:?} and {:?})",
                options.min_poll, options.max_poll
            )));
        }
        Arc::get_mut(&mut self.inner)
            .expect("options are set before the backend is shared")
            .options = options;
        Ok(())
    }

    pub(crate) fn acquire(&self, request: AcquireRequest) -> BoxFuture<'_, Result<Option<Grant>>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            if request.mode() == LockMode::Shared && !inner.store.supports_shared() {
                return Err(Error::Unsupported {
                    backend: inner.store.kind(),
                    what:
                        "shared (reader) leases; use postgres::Advisory or Memory for reader locks"
                            .into(),
                });
            }
            // The attempt runs in its own task, which owns the outcome: if
            // this future is dropped, the task notices and releases whatever
            // it was granted, even mid-statement.
            let (reply_tx, reply_rx) = oneshot::channel();
            tokio::spawn(acquire_task(inner, request, reply_tx));
            reply_rx
                .await
                .unwrap_or_else(|_| Err(Error::Database(sqlx::Error::WorkerCrashed)))
        })
    }

    pub(crate) fn inspect<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LockInfo>>> {
        Box::pin(self.inner.store.inspect(name))
    }

    pub(crate) fn list(&self) -> BoxFuture<'_, Result<Vec<LockInfo>>> {
        Box::pin(self.inner.store.list())
    }

    pub(crate) fn force_release<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let broken = self.inner.store.force_release(name).await?;
            self.inner.wakeups.wake(name);
            Ok(broken)
        })
    }
}

type Reply = oneshot::Sender<Result<Option<Grant>>>;

async fn acquire_task<S: LeaseStore>(
    inner: Arc<Inner<S>>,
    request: AcquireRequest,
    mut reply: Reply,
) {
    let owner = new_owner();
    let name = request.name();
    let deadline = match request.wait() {
        Wait::For(d) => Some(Instant::now() + d),
        _ => None,
    };
    let subscription = inner.wakeups.subscribe(name);
    let cap = inner.options.max_poll.min(request.ttl());
    let mut pause = inner.options.min_poll.min(cap);
    let (claimed, sent_at) = loop {
        // Armed before the attempt, so a release between the attempt and
        // the wait is not missed.
        let notified = subscription.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        // The acquirer may have gone while this task waited to run or to
        // retry: then claim nothing.
        if reply.is_closed() {
            return;
        }
        let abandoned = || reply.is_closed();
        let claim = Claim {
            name,
            owner: &owner,
            holder: &inner.holder,
            mode: request.mode(),
            ttl: request.ttl(),
            abandoned: &abandoned,
        };
        let sent_at = Instant::now();
        match inner.store.claim(&claim).await {
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
            Ok(Some(claimed)) => break (claimed, sent_at),
            Ok(None) => {}
        }
        let now = Instant::now();
        let wake_at = match (request.wait(), deadline) {
            (Wait::No, _) => {
                let _ = reply.send(Ok(None));
                return;
            }
            (_, Some(deadline)) if now >= deadline => {
                let _ = reply.send(Err(Error::Timeout {
                    name: name.to_owned(),
                    waited: match request.wait() {
                        Wait::For(d) => d,
                        _ => Duration::ZERO,
                    },
                }));
                return;
            }
            (_, Some(deadline)) => deadline.min(now + jitter(pause)),
            (_, None) => now + jitter(pause),
        };
        inner.store.waiting();
        tokio::select! {
            _ = reply.closed() => return,
            _ = &mut notified => {}
            _ = sleep_until(wake_at) => {}
        }
        pause = (pause * 2).min(cap);
    };
    drop(subscription);
    grant(inner, request, owner, claimed, sent_at, reply).await;
}

enum Command {
    Release(oneshot::Sender<Result<()>>),
    Extend(Duration, oneshot::Sender<Result<Option<DateTime<Utc>>>>),
}

#[derive(Debug)]
struct Held {
    commands: mpsc::Sender<Command>,
    name: String,
}

impl HeldLock for Held {
    fn extend(&self, by: Duration) -> BoxFuture<'_, Result<Option<DateTime<Utc>>>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let gone = || Error::lost(&self.name, "the lease keeper has stopped");
            self.commands
                .send(Command::Extend(by, tx))
                .await
                .map_err(|_| gone())?;
            rx.await.map_err(|_| gone())?
        })
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let gone = || Error::lost(&self.name, "the lease keeper has stopped");
            self.commands
                .send(Command::Release(tx))
                .await
                .map_err(|_| gone())?;
            rx.await.map_err(|_| gone())?
        })
    }

    fn release_on_drop(self: Box<Self>) {
        // Closing the command channel tells the keeper to release.
    }
}

async fn grant<S: LeaseStore>(
    inner: Arc<Inner<S>>,
    request: AcquireRequest,
    owner: String,
    claimed: Claimed,
    sent_at: Instant,
    reply: Reply,
) {
    let (commands, rx) = mpsc::channel(4);
    let (status, pending) = Grant::status(Some(claimed.expires_at));
    let held = Held {
        commands,
        name: request.name().to_owned(),
    };
    let grant = pending.grant(claimed.token, Box::new(held));
    if reply.send(Ok(Some(grant))).is_err() {
        // The acquirer went away while the claim was in flight: the grant
        // (and its command channel) was dropped with the failed send, so the
        // keeper below sees a closed channel and releases at once.
    }
    let keeper = Keeper {
        inner,
        name: request.name().to_owned(),
        owner,
        token: claimed.token,
        hold: request.hold_at_least(),
        lease: request.ttl(),
        status,
    };
    keeper.run(rx, sent_at).await;
}

struct Keeper<S> {
    inner: Arc<Inner<S>>,
    name: String,
    owner: String,
    token: u64,
    hold: Option<Duration>,
    lease: Duration,
    status: LockStatus,
}

impl<S: LeaseStore> Keeper<S> {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, sent_at: Instant) {
        let mut deadline = sent_at + self.lease - safety_margin(self.lease);
        let mut next_renew = sent_at + renew_every(self.lease);
        loop {
            let lost = self.status.is_lost();
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    None => {
                        self.release().await.ok();
                        return;
                    }
                    Some(Command::Release(reply)) => {
                        let _ = reply.send(self.release().await);
                        return;
                    }
                    Some(Command::Extend(by, reply)) => {
                        let sent_at = Instant::now();
                        let outcome = self.renew(by, deadline).await;
                        if let Ok(Some(_)) = outcome {
                            self.lease = by;
                            deadline = sent_at + by - safety_margin(by);
                            next_renew = sent_at + renew_every(by);
                        }
                        let _ = reply.send(outcome);
                    }
                },
                _ = sleep_until(deadline), if !lost => {
                    self.status.mark_lost(format!(
                        "the lease was not renewed before its local deadline (ttl {:?} minus a margin of {:?})",
                        self.lease, safety_margin(self.lease)
                    ));
                }
                _ = sleep_until(next_renew), if !lost => {
                    let sent_at = Instant::now();
                    match self.renew(self.lease, deadline).await {
                        Ok(Some(_)) => {
                            deadline = sent_at + self.lease - safety_margin(self.lease);
                            next_renew = sent_at + renew_every(self.lease);
                        }
                        Ok(None) | Err(Error::Lost { .. }) => {}
                        Err(e) => {
                            // A passing fault: try again soon, until the deadline.
                            tracing::debug!(name = %self.name, error = %e, "dblock: lease renewal failed; retrying");
                            next_renew = Instant::now() + (self.lease / 20).max(Duration::from_millis(20));
                        }
                    }
                }
            }
        }
    }

    /// One renewal, bounded by the local deadline. Marks the lease lost when
    /// the store says it is no longer ours or the deadline passes first.
    async fn renew(&self, by: Duration, deadline: Instant) -> Result<Option<DateTime<Utc>>> {
        if let Some(reason) = self.status.lost_reason() {
            return Err(Error::lost(&self.name, reason));
        }
        match timeout_at(
            deadline,
            self.inner
                .store
                .renew(&self.name, &self.owner, self.token, by),
        )
        .await
        {
            Ok(Ok(Some(at))) => {
                self.status.set_expires_at(Some(at));
                Ok(Some(at))
            }
            Ok(Ok(None)) => {
                let reason = "the lease was taken over or broken: renewal found it no longer ours";
                self.status.mark_lost(reason);
                Err(Error::lost(&self.name, reason))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let reason = "renewal did not complete before the local deadline";
                self.status.mark_lost(reason);
                Err(Error::lost(&self.name, reason))
            }
        }
    }

    async fn release(&self) -> Result<()> {
        // Conditional on owner and token, so this is harmless even after a
        // loss: it can only end our own lease.
        let outcome = self
            .inner
            .store
            .release(&self.name, &self.owner, self.token, self.hold)
            .await;
        self.inner.wakeups.wake(&self.name);
        match outcome {
            Ok(true) => Ok(()),
            Ok(false) => {
                let reason = "the lease had already expired or been taken over";
                self.status.mark_lost(reason);
                Err(Error::lost(&self.name, reason))
            }
            Err(e) => Err(e),
        }
    }
}

/// Implements [`Backend`](crate::Backend) for a public wrapper around a
/// [`LeaseEngine`] stored in its field `engine`.
macro_rules! lease_backend {
    ($ty:ty) => {
        impl $crate::Backend for $ty {
            fn kind(&self) -> &'static str {
                $crate::lease::LeaseStore::kind(self.engine.store())
            }
            fn acquire(
                &self,
                request: $crate::AcquireRequest,
            ) -> $crate::backend::BoxFuture<'_, $crate::Result<Option<$crate::Grant>>> {
                self.engine.acquire(request)
            }
            fn inspect<'a>(
                &'a self,
                name: &'a str,
            ) -> $crate::backend::BoxFuture<'a, $crate::Result<Option<$crate::LockInfo>>> {
                self.engine.inspect(name)
            }
            fn list(
                &self,
            ) -> $crate::backend::BoxFuture<'_, $crate::Result<Vec<$crate::LockInfo>>> {
                self.engine.list()
            }
            fn force_release<'a>(
                &'a self,
                name: &'a str,
            ) -> $crate::backend::BoxFuture<'a, $crate::Result<bool>> {
                self.engine.force_release(name)
            }
        }
    };
}
pub(crate) use lease_backend;
