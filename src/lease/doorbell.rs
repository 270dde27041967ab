//! Doorbells: wake-ups across processes for stores that have no push
//! channel of their own (MySQL/MariaDB, SQLite).
//!
//! A doorbell is a lock *beside* the lease, keyed by the lease's name: the
//! holder's process rings nothing, it simply holds the bell for as long as
//! it holds the lease ([`Bell`] implementors arm it after a claim and
//! disarm it after the release statement). A waiter in another process
//! waits for the bell itself, in the database server (`GET_LOCK`) or in
//! the kernel (`flock`), and so wakes the moment the holder lets it go,
//! instead of at its next poll. The lease row stays the lock and the
//! token's source: a bell only says "look again".
//!
//! The waiting side is written once, here:
//! - One watch per name per backend, shared by all local waiters of the
//!   name; at most a fixed number of watches run at once (each needs a
//!   connection or a thread). Past the cap, a waiter simply polls.
//! - A bell that nobody holds ("unarmed") means the holder does not ring
//!   (an older dblock, a bell it could not take, a Galera cluster), or that
//!   it has just released or not armed yet: the watch rings once, so that
//!   the waiter looks again, and then re-checks the bell with backoff
//!   without ringing until it has seen the bell held.
//! - Polling stays the fallback and the bound: a bell missed, a watch that
//!   fails or is refused costs at most the waiter's `max_poll`.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::{Claimed, Renewal, Renewed};
use crate::name::NameMap;

/// What one wait on a bell found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ring {
    /// Nobody held the bell: nothing to wait for.
    Unarmed,
    /// The bell was held, and let go: a release may have happened.
    Rang,
    /// Still held when the wait's own timeout ran out.
    Quiet,
}

/// The waiting side of one kind of bell.
pub(crate) trait Bell: Send + Sync + 'static {
    /// What one watch waits through (a connection, a file).
    type Session: Send + 'static;

    /// A session to wait on, or `None` if bells cannot be used now (the
    /// watch ends and its waiters poll).
    fn open(&self) -> impl Future<Output = Option<Self::Session>> + Send;

    /// Waits for `name`'s bell, for a bounded time (about a second), and
    /// says what it found. `Err` ends the watch (its waiters poll).
    fn wait(
        &self,
        session: &mut Self::Session,
        name: &str,
    ) -> impl Future<Output = Result<Ring, String>> + Send;
}

/// The holding side of one kind of bell: what a process does with the
/// bell of each lease it holds.
pub(crate) trait Holder: Send + Sync + 'static {
    /// The waiting side of the same bells.
    type Watcher: Bell;

    /// Whether bells may be used now. If not, arming and disarming do
    /// nothing, and waiters poll.
    fn usable(&self) -> bool;

    /// The lease `name` / `token` was granted to this process.
    fn arm(&self, name: &str, token: u64);

    /// This process is done with the lease `name` / `token` (released, or
    /// found gone).
    fn disarm(&self, name: &str, token: u64);

    /// The release of the lease `name` / `token` has begun (see
    /// [`Bells::disarm_on_drop`]). Nothing by default.
    fn releasing(&self, _name: &str, _token: u64) {}

    /// The fields [`Bells`] shows of it in its `Debug` form. None by
    /// default.
    fn debug_fields(&self, _f: &mut fmt::DebugStruct<'_, '_>) {}
}

/// The bells of one backend: the holding side for the leases it holds,
/// the watches for its waiters.
pub(crate) struct Bells<H: Holder> {
    holder: H,
    watches: Doorbells<H::Watcher>,
}

impl<H: Holder> fmt::Debug for Bells<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Bells");
        self.holder.debug_fields(&mut d);
        d.field("watches", &self.watches).finish_non_exhaustive()
    }
}

impl<H: Holder> Bells<H> {
    /// Bells held through `holder` and watched through `watcher`, at most
    /// `cap` names at once.
    pub(crate) fn new(holder: H, watcher: H::Watcher, cap: usize) -> Self {
        Bells {
            holder,
            watches: Doorbells::new(watcher, cap),
        }
    }

    /// The holding side.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn holder(&self) -> &H {
        &self.holder
    }

    /// The lease `name` / `token` was granted to this process.
    pub(crate) fn arm(&self, name: &str, token: u64) {
        if self.holder.usable() {
            self.holder.arm(name, token);
        }
    }

    /// This process is done with the lease `name` / `token` (released, or
    /// found gone): its bell is let go if it was taken.
    pub(crate) fn disarm(&self, name: &str, token: u64) {
        if self.holder.usable() {
            self.holder.disarm(name, token);
        }
    }

    /// What a claim of `name` granted, its bell armed if it was granted.
    pub(crate) fn armed(&self, name: &str, claimed: Option<Claimed>) -> Option<Claimed> {
        if let Some(c) = &claimed {
            self.arm(name, c.token);
        }
        claimed
    }

    /// What a renewal of `name` / `token` found, its bell disarmed if the
    /// lease is gone (`None`).
    pub(crate) fn renewed<T>(&self, name: &str, token: u64, renewed: Option<T>) -> Option<T> {
        if renewed.is_none() {
            self.disarm(name, token);
        }
        renewed
    }

    /// Disarms the bell of every lease of `batch` that `answers` (one per
    /// lease, in order) found gone.
    pub(crate) fn disarm_gone(&self, batch: &[Renewal], answers: &[Renewed]) {
        for (r, answer) in batch.iter().zip(answers) {
            if *answer == Renewed::Gone {
                self.disarm(&r.name, r.token);
            }
        }
    }

    /// A guard that disarms when dropped: after the release statement, or
    /// when the release is given up mid-way (the lease then runs out).
    /// Made as the release begins (see [`Holder::releasing`]).
    pub(crate) fn disarm_on_drop<'a>(&'a self, name: &'a str, token: u64) -> DisarmOnDrop<'a, H> {
        if self.holder.usable() {
            self.holder.releasing(name, token);
        }
        DisarmOnDrop {
            bells: self,
            name,
            token,
        }
    }

    /// Resolves when the holder of `name` in another process may have
    /// released it; never, while bells are not usable.
    pub(crate) fn released(&self, name: &str) -> impl Future<Output = ()> + Send {
        let watch = self.holder.usable().then(|| self.watches.released(name));
        async move {
            match watch {
                Some(watch) => watch.await,
                None => std::future::pending().await,
            }
        }
    }
}

/// See [`Bells::disarm_on_drop`].
pub(crate) struct DisarmOnDrop<'a, H: Holder> {
    bells: &'a Bells<H>,
    name: &'a str,
    token: u64,
}

impl<H: Holder> Drop for DisarmOnDrop<'_, H> {
    fn drop(&mut self) {
        self.bells.disarm(self.name, self.token);
    }
}

/// How long a watch lives on without anyone waiting: a waiter between two
/// claim attempts finds it still there (with what it knows of the bell).
const LINGER: Duration = Duration::from_secs(1);
/// Re-checking an unarmed bell: from this pause, doubling, ...
const UNARMED_MIN: Duration = Duration::from_millis(1);
/// ... up to this one.
const UNARMED_MAX: Duration = Duration::from_millis(250);

/// One name's watch.
#[derive(Debug, Default)]
struct Watch {
    notify: Notify,
    /// Rings so far.
    rings: AtomicU64,
    /// Waiters registered now.
    users: AtomicUsize,
    /// A waiter registered (it has just found the name busy).
    arrived: Notify,
}

type Watches = Mutex<NameMap<Arc<Watch>>>;

/// The watches of one backend (shared by its clones).
pub(crate) struct Doorbells<B> {
    bell: Arc<B>,
    watches: Arc<Watches>,
    slots: Arc<Semaphore>,
}

impl<B> fmt::Debug for Doorbells<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Doorbells")
            .field("watching", &self.watches.lock().unwrap().len())
            .field("free_slots", &self.slots.available_permits())
            .finish()
    }
}

impl<B: Bell> Doorbells<B> {
    /// Watches through `bell`, at most `cap` names at once.
    pub(crate) fn new(bell: B, cap: usize) -> Self {
        Doorbells {
            bell: Arc::new(bell),
            watches: Arc::default(),
            slots: Arc::new(Semaphore::new(cap)),
        }
    }

    /// Resolves when a release of `name` may have happened elsewhere; never,
    /// if no watch is free (the waiter polls). Registers at once, so a ring
    /// after this call is not missed; dropping the future deregisters.
    pub(crate) fn released(&self, name: &str) -> impl Future<Output = ()> + Send + 'static {
        let registered = self.register(name);
        async move {
            let Some((watch, seen, _registration)) = registered else {
                return std::future::pending().await;
            };
            loop {
                let notified = watch.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if watch.rings.load(Ordering::Acquire) != seen {
                    return;
                }
                notified.await;
            }
        }
    }

    fn register(&self, name: &str) -> Option<(Arc<Watch>, u64, Registration)> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let mut watches = self.watches.lock().unwrap();
        let watch = match watches.get(name) {
            Some(watch) => watch.clone(),
            None => {
                let permit = self.slots.clone().try_acquire_owned().ok()?;
                let watch = Arc::new(Watch::default());
                watches.insert(name.to_owned(), watch.clone());
                runtime.spawn(run(
                    self.bell.clone(),
                    Arc::downgrade(&self.watches),
                    name.to_owned(),
                    watch.clone(),
                    permit,
                ));
                watch
            }
        };
        watch.users.fetch_add(1, Ordering::AcqRel);
        watch.arrived.notify_one();
        let seen = watch.rings.load(Ordering::Acquire);
        Some((watch.clone(), seen, Registration(watch)))
    }
}

struct Registration(Arc<Watch>);

impl Drop for Registration {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::AcqRel);
    }
}

fn ring(watch: &Watch) {
    watch.rings.fetch_add(1, Ordering::AcqRel);
    watch.notify.notify_waiters();
}

/// One watch: waits on the bell while anyone waits for the name (and a
/// little longer), then gives its slot back.
async fn run<B: Bell>(
    bell: Arc<B>,
    watches: Weak<Watches>,
    name: String,
    watch: Arc<Watch>,
    permit: OwnedSemaphorePermit,
) {
    let mut session = bell.open().await;
    let mut last_user = Instant::now();
    let mut unarmed = 0u32;
    // Leave (under the map's lock, so no one registers meanwhile) once
    // nobody has waited for a while, or the session is gone.
    while let Some(map) = watches.upgrade() {
        {
            let mut map = map.lock().unwrap();
            if watch.users.load(Ordering::Acquire) > 0 {
                last_user = Instant::now();
            }
            if session.is_none() || last_user.elapsed() >= LINGER {
                if map.get(&name).is_some_and(|w| Arc::ptr_eq(w, &watch)) {
                    map.remove(&name);
                }
                break;
            }
        }
        drop(map);
        let Some(s) = session.as_mut() else { break };
        match bell.wait(s, &name).await {
            Ok(Ring::Rang) => {
                unarmed = 0;
                ring(&watch);
            }
            Ok(Ring::Quiet) => unarmed = 0,
            Ok(Ring::Unarmed) => {
                // The first time: the holder may have released already.
                if unarmed == 0 {
                    ring(&watch);
                }
                let pause = UNARMED_MIN
                    .saturating_mul(1 << unarmed.min(16))
                    .min(UNARMED_MAX);
                unarmed += 1;
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    // A waiter has just found the name busy: its holder has
                    // taken the bell or is about to. Look again soon (without
                    // ringing) rather than at the end of a backoff grown
                    // while nobody held the name, which could outlast a
                    // whole hold and leave the release unrung.
                    () = watch.arrived.notified() => unarmed = unarmed.min(1),
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, name = %name,
                    "dblock: waiting on a release doorbell failed; waiters poll");
                session = None;
            }
        }
    }
    // Anyone still registered polls from here on; one last ring lets them
    // look again at once rather than after their pause.
    ring(&watch);
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A bell in memory: `held` says whether the holder holds it; a wait
    /// lasts until it is let go (or 50 ms).
    #[derive(Default)]
    struct Fake {
        held: AtomicBool,
        changed: Notify,
        waits: AtomicUsize,
    }

    impl Bell for Arc<Fake> {
        type Session = ();
        async fn open(&self) -> Option<()> {
            Some(())
        }
        async fn wait(&self, _: &mut (), _: &str) -> Result<Ring, String> {
            self.waits.fetch_add(1, Ordering::Relaxed);
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.held.load(Ordering::Acquire) {
                return Ok(Ring::Unarmed);
            }
            match tokio::time::timeout(Duration::from_millis(50), changed).await {
                Ok(()) if !self.held.load(Ordering::Acquire) => Ok(Ring::Rang),
                _ => Ok(Ring::Quiet),
            }
        }
    }

    #[tokio::test]
    async fn a_release_rings_every_local_waiter() {
        let fake = Arc::new(Fake::default());
        fake.held.store(true, Ordering::Release);
        let bells = Doorbells::new(fake.clone(), 2);
        let a = tokio::spawn(bells.released("n"));
        let b = tokio::spawn(bells.released("n"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!a.is_finished() && !b.is_finished(), "rang while held");
        fake.held.store(false, Ordering::Release);
        fake.changed.notify_waiters();
        tokio::time::timeout(Duration::from_secs(1), async {
            a.await.unwrap();
            b.await.unwrap();
        })
        .await
        .expect("both waiters woken by the release");
        assert_eq!(bells.watches.lock().unwrap().len(), 1, "one watch per name");
    }

    #[tokio::test]
    async fn an_unarmed_bell_rings_once_then_backs_off() {
        let fake = Arc::new(Fake::default());
        let bells = Doorbells::new(fake.clone(), 2);
        tokio::time::timeout(Duration::from_secs(1), bells.released("n"))
            .await
            .expect("the first look at an unarmed bell rings");
        let again = tokio::time::timeout(Duration::from_millis(300), bells.released("n")).await;
        assert!(again.is_err(), "an unarmed bell rang twice in a row");
        let waits = fake.waits.load(Ordering::Relaxed);
        assert!(
            waits < 20,
            "re-checks of an unarmed bell back off ({waits} in 300 ms)"
        );
    }

    #[tokio::test]
    async fn a_new_waiter_cuts_short_the_backoff_of_an_unarmed_bell() {
        let fake = Arc::new(Fake::default());
        let bells = Doorbells::new(fake.clone(), 2);
        // Nobody holds the name for a while: the watch (kept by a waiter
        // that stays registered) backs off to its longest re-check gap.
        let _early = bells.released("n");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let before = fake.waits.load(Ordering::Relaxed);
        // A holder arms the bell; a waiter finds the name busy and
        // registers. The watch must see the bell held and ring its release
        // well within the longest gap (250 ms).
        fake.held.store(true, Ordering::Release);
        let waiter = tokio::spawn(bells.released("n"));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            fake.waits.load(Ordering::Relaxed) > before,
            "the watch did not look again when a waiter arrived"
        );
        fake.held.store(false, Ordering::Release);
        fake.changed.notify_waiters();
        tokio::time::timeout(Duration::from_millis(100), waiter)
            .await
            .expect("the release of a bell armed after the backoff grew was rung")
            .unwrap();
    }

    #[tokio::test]
    async fn past_the_cap_waiters_poll() {
        let fake = Arc::new(Fake::default());
        fake.held.store(true, Ordering::Release);
        let bells = Doorbells::new(fake.clone(), 1);
        let _first = bells.released("a");
        assert!(
            bells.register("b").is_none(),
            "a second name got a watch past the cap"
        );
        assert!(bells.register("a").is_some(), "the watched name is shared");
    }
}
