//! Semaphores on advisory locks as the pool sees them: whether a name is
//! held by permits and of how many, for `inspect`, `list` and the
//! acquisitions that disagree with them. How a permit is taken is in
//! `session::permit`; its keys in [`PermitKeys`].

use std::sync::atomic::Ordering;

use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::postgres::key::{capacity_key, semaphore_key, PermitKeys};
use crate::postgres::map_err;
use crate::{LockInfo, LockMode, Result, MAX_HOLDERS};

// Which of the keys $1 are held (granted) by any session, by their place in
// $1 (1-based).
const HELD: &str = "SELECT u.i
  FROM unnest($1::bigint[]) WITH ORDINALITY AS u(k, i)
 WHERE EXISTS (SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND ((l.classid::bigint << 32) | l.objid::bigint) = u.k)
 ORDER BY u.i";

/// Which of `keys` are held now, by their index.
async fn held<'e, E>(on: E, keys: &[i64]) -> Result<Vec<usize>>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let at: Vec<i64> = sqlx::query_scalar(HELD)
        .bind(keys)
        .fetch_all(on)
        .await
        .map_err(map_err)?;
    Ok(at.into_iter().map(|i| (i - 1) as usize).collect())
}

/// The capacity of the semaphore `name` if permits of it are held now
/// (its semaphore marker is): the `n` of the capacity marker held with it
/// (a permit takes its capacity marker before the semaphore marker and
/// gives it back after). A name held as a lock, by readers, or not at all
/// answers `None`. One statement, on `on`: the pool, or a holder session's
/// connection when the pool may have none to spare.
pub(super) async fn capacity_held<'e, E>(on: E, name: &str) -> Result<Option<u32>>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let mut keys = vec![semaphore_key(name)];
    keys.extend((2..=MAX_HOLDERS).map(|n| capacity_key(name, n)));
    let at = held(on, &keys).await?;
    if at.first() != Some(&0) {
        return Ok(None);
    }
    Ok(at.get(1).map(|&i| i as u32 + 1))
}

// Whether a session holds the name's key ($1) without the semaphore's
// marker ($2): a lock or readers of the name.
const LOCK_BESIDE: &str = "SELECT coalesce(bool_or(has_name AND NOT has_semaphore), false)
  FROM (SELECT pid, bool_or(key = $1) AS has_name, bool_or(key = $2) AS has_semaphore
          FROM (SELECT pid, ((classid::bigint << 32) | objid::bigint) AS key
                  FROM pg_locks
                 WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                   AND database = (SELECT oid FROM pg_database
                                    WHERE datname = current_database())) l
         WHERE key IN ($1, $2)
         GROUP BY pid) s";

/// Whether a lock or readers of the name hold it now beside the semaphore
/// `keys`: a session holds the name's key without the semaphore marker.
/// A permit's take saw that once; this looks again before calling it a
/// disagreement, because a holder session that ends (terminated, or its
/// client gone) gives its locks back one lock-table partition at a time,
/// and a look in between can find it holding the name's key but no longer
/// the marker. One statement, on `on` (see [`capacity_held`]).
pub(super) async fn lock_beside<'e, E>(on: E, keys: &PermitKeys) -> Result<bool>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    sqlx::query_scalar(LOCK_BESIDE)
        .bind(keys.name)
        .bind(keys.semaphore)
        .fetch_one(on)
        .await
        .map_err(map_err)
}

/// Tests' pauses before a permit's second look ([`lock_beside`]), by name:
/// the race it answers (a holder session half-way through its end) cannot
/// be timed from outside the server, so a test holds the permit there and
/// changes what the look will find.
static PAUSES: std::sync::Mutex<Vec<Pause>> = std::sync::Mutex::new(Vec::new());
/// Whether any pause was ever set: the permit's path reads only this.
static PAUSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One pause: the name, the signal that a permit reached it, and the
/// signal to go on.
type Pause = (String, oneshot::Sender<()>, oneshot::Receiver<()>);

/// Holds the next permit of `name` whose take saw a lock of the name just
/// before it looks again (`lock_beside`): the first receiver answers once
/// one is there, and it goes on when the sender is used or dropped. For
/// dblock's own tests (`dblock::__unstable`).
pub fn pause_before_second_look(name: &str) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
    let (reached, at) = oneshot::channel();
    let (go, wait) = oneshot::channel();
    PAUSES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((name.to_owned(), reached, wait));
    PAUSING.store(true, Ordering::Release);
    (at, go)
}

/// Waits at a test's pause for `name`, if one is set (see
/// [`pause_before_second_look`]).
pub(super) async fn paused_before_second_look(name: &str) {
    if !PAUSING.load(Ordering::Acquire) {
        return;
    }
    let pause = {
        let mut pauses = PAUSES.lock().unwrap_or_else(|e| e.into_inner());
        let at = pauses.iter().position(|(n, ..)| n == name);
        at.map(|i| pauses.swap_remove(i))
    };
    if let Some((_, reached, go)) = pause {
        let _ = reached.send(());
        let _ = go.await;
    }
}

/// How many of the semaphore's slots are held now: its holders.
async fn holders(pool: &PgPool, keys: &PermitKeys) -> Result<u32> {
    Ok(held(pool, &keys.slots).await?.len() as u32)
}

/// Makes `info`, seen on the name's key, that of the semaphore of `n`
/// permits `keys`: its holders are its slots held.
async fn as_semaphore(pool: &PgPool, info: &mut LockInfo, keys: &PermitKeys) -> Result<()> {
    info.mode = LockMode::Exclusive;
    info.max_holders = Some(keys.slots.len() as u32);
    info.holders = holders(pool, keys).await?;
    Ok(())
}

/// `inspect` of `name`, seen on its key as `info`: a name held by permits
/// is shown as its semaphore.
pub(super) async fn inspect(pool: &PgPool, name: &str, info: &mut LockInfo) -> Result<()> {
    if info.mode != LockMode::Shared {
        return Ok(());
    }
    if let Some(n) = capacity_held(pool, name).await? {
        as_semaphore(pool, info, &PermitKeys::new(name, n)).await?;
    }
    Ok(())
}

/// `list`: the semaphores this backend holds permits of (`ours`) are shown
/// once each, by name, as their semaphore; their marker and slot keys are
/// left out. Others' semaphores show as the advisory keys they hold.
pub(super) async fn list(
    pool: &PgPool,
    mut all: Vec<LockInfo>,
    ours: Vec<std::sync::Arc<PermitKeys>>,
) -> Result<Vec<LockInfo>> {
    if ours.is_empty() {
        return Ok(all);
    }
    let mut hidden = std::collections::HashSet::new();
    for keys in &ours {
        hidden.insert(keys.semaphore);
        hidden.insert(keys.capacity);
        hidden.extend(keys.slots.iter().copied());
    }
    all.retain(|info| info.key.is_none_or(|k| !hidden.contains(&k)));
    for info in &mut all {
        if let Some(keys) = ours.iter().find(|k| Some(k.name) == info.key) {
            as_semaphore(pool, info, keys).await?;
        }
    }
    Ok(all)
}
