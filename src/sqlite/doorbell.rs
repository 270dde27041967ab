//! Release doorbells for [`Lease`](super::Lease) waiters in other
//! processes on the same machine: file locks beside the database (see
//! [`crate::lease::doorbell`]).
//!
//! Beside the database file `app.db` lies a folder `app.db-dblock-bells`
//! of 256 empty files; a lease's bell is the file picked by a hash of the
//! table and the name.
//!
//! - **Holder**: while a process holds a lease, it holds a *shared* lock
//!   (`flock`, or `LockFileEx` on Windows, through `std::fs::File::lock_shared`)
//!   on the lease's bell file, taken right after the claim and dropped
//!   right after the release statement (or when a renewal finds the lease
//!   gone). Shared, so that leases whose names fall in the same file (and
//!   so hold the same bell) never exclude each other.
//! - **Waiter**: a watch asks for an *exclusive* lock on the same file, in
//!   a thread of its own (a file lock cannot be awaited), and lets go of it
//!   at once: it gets it when every holder of the bell has let go. One
//!   watch per name per backend, at most [`WATCHES`] at once, and at most
//!   [`THREADS`] threads blocked per backend (a thread blocked for a holder
//!   that keeps its lease cannot be called back, it ends with the holder's
//!   release or exit); past either, waiters poll.
//! - Two names in one file: a waiter then wakes when both holders have
//!   released, or at its poll. Files, not byte ranges of one file: the
//!   standard library locks whole files, and no new dependency is needed.
//! - **Never a dependency**: an in-memory database has no bells, a folder
//!   that cannot be created (read-only) leaves waiters polling, and no
//!   error of a bell ever fails a lock operation.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, Semaphore};

use crate::lease::doorbell::{self, Bell, Holder, Ring};

/// The most names one backend watches at once.
pub(crate) const WATCHES: usize = 8;
/// The most threads one backend keeps blocked on bells.
pub(crate) const THREADS: usize = 8;
/// How long one wait on a bell lasts before the watch looks again.
const WAIT: Duration = Duration::from_secs(1);

/// The bell file of `name` in `table`.
fn bell_file(dir: &Path, table: &str, name: &str) -> PathBuf {
    let digest = Sha256::new()
        .chain_update(table.as_bytes())
        .chain_update([0])
        .chain_update(name.as_bytes())
        .finalize();
    dir.join(format!("{:02x}", digest[0]))
}

/// Where the bell files of the database file `db` lie: beside its
/// canonical path, found at first use (when the file exists: a claim has
/// been answered), so that processes started in other folders agree.
/// `None` if there is no such file (an in-memory database).
#[derive(Debug)]
struct Folder {
    db: PathBuf,
    dir: OnceLock<Option<PathBuf>>,
}

impl Folder {
    fn get(&self) -> Option<&Path> {
        self.dir
            .get_or_init(|| {
                let db = std::fs::canonicalize(&self.db).ok()?;
                let mut dir = db.into_os_string();
                dir.push("-dblock-bells");
                Some(PathBuf::from(dir))
            })
            .as_deref()
    }
}

/// The leases (name, token) this process holds behind one bell file, and
/// the file, locked (`None` if its lock could not be taken).
type Armed = (foldhash::HashSet<(String, u64)>, Option<File>);

/// The bells of one backend (see [`Holding`]).
pub(crate) type Bells = doorbell::Bells<Holding>;

/// Bells for the database file `db` (as the connect options name it).
pub(crate) fn bells(db: &Path, table: &str) -> Bells {
    let dir = Arc::new(Folder {
        db: db.to_owned(),
        dir: OnceLock::new(),
    });
    Bells::new(
        Holding {
            dir: dir.clone(),
            table: table.to_owned(),
            armed: Mutex::default(),
        },
        Watcher {
            dir,
            table: table.to_owned(),
            threads: Arc::new(Semaphore::new(THREADS)),
        },
        WATCHES,
    )
}

/// The holding side: a shared lock on the bell file of each lease held.
pub(crate) struct Holding {
    dir: Arc<Folder>,
    table: String,
    /// Bell file → what this process holds behind it.
    armed: Mutex<HashMap<PathBuf, Armed>>,
}

impl Holder for Holding {
    type Watcher = Watcher;

    /// Not for an in-memory database (no file, so no folder for bells).
    fn usable(&self) -> bool {
        self.dir.get().is_some()
    }

    fn arm(&self, name: &str, token: u64) {
        let Some(dir) = self.dir.get() else { return };
        let path = bell_file(dir, &self.table, name);
        let mut armed = self.armed.lock().unwrap();
        let entry = armed.entry(path.clone()).or_default();
        let first = entry.0.is_empty();
        entry.0.insert((name.to_owned(), token));
        if first {
            entry.1 = hold(dir, &path);
        }
    }

    fn disarm(&self, name: &str, token: u64) {
        let Some(dir) = self.dir.get() else { return };
        let path = bell_file(dir, &self.table, name);
        let mut armed = self.armed.lock().unwrap();
        let Some((leases, _)) = armed.get_mut(&path) else {
            return;
        };
        if !leases.remove(&(name.to_owned(), token)) || !leases.is_empty() {
            return;
        }
        if let Some((_, Some(file))) = armed.remove(&path) {
            let _ = file.unlock();
        }
    }

    fn debug_fields(&self, f: &mut fmt::DebugStruct<'_, '_>) {
        f.field("dir", &self.dir);
    }
}

/// Opens `path` and takes its shared lock, never blocking for long: a
/// watch holds the exclusive lock only for an instant.
fn hold(dir: &Path, path: &Path) -> Option<File> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    };
    let file = match open() {
        Ok(file) => file,
        Err(_) => {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::debug!(error = %e, dir = %dir.display(),
                    "dblock: cannot create the doorbell folder; waiters elsewhere poll");
                return None;
            }
            open().ok()?
        }
    };
    for _ in 0..1000 {
        match file.try_lock_shared() {
            Ok(()) => return Some(file),
            Err(TryLockError::WouldBlock) => std::thread::yield_now(),
            Err(TryLockError::Error(e)) => {
                tracing::debug!(error = %e, "dblock: cannot lock a doorbell file");
                return None;
            }
        }
    }
    None
}

/// The waiting side: an exclusive lock on the bell file, in a thread.
pub(crate) struct Watcher {
    dir: Arc<Folder>,
    table: String,
    threads: Arc<Semaphore>,
}

impl Bell for Watcher {
    /// The thread blocked on the bell, if one is: it reports when it got
    /// the lock.
    type Session = Option<oneshot::Receiver<()>>;

    async fn open(&self) -> Option<Self::Session> {
        self.dir.get().map(|_| None)
    }

    async fn wait(&self, blocked: &mut Self::Session, name: &str) -> Result<Ring, String> {
        if blocked.is_none() {
            let dir = self.dir.get().ok_or("no doorbell folder")?;
            let Ok(file) = File::open(bell_file(dir, &self.table, name)) else {
                // No bell file: nobody ever held a lease behind it.
                return Ok(Ring::Unarmed);
            };
            match file.try_lock() {
                Ok(()) => {
                    let _ = file.unlock();
                    return Ok(Ring::Unarmed);
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => return Err(e.to_string()),
            }
            let permit = self
                .threads
                .clone()
                .try_acquire_owned()
                .map_err(|_| "every doorbell thread is busy")?;
            // A thread of its own, not `spawn_blocking`: a runtime waits for
            // its blocking tasks when it shuts down, and this one may block
            // for as long as a holder keeps its lease.
            let (rang, rung) = oneshot::channel();
            std::thread::Builder::new()
                .name("dblock-doorbell".into())
                .spawn(move || {
                    if file.lock().is_ok() {
                        let _ = file.unlock();
                    }
                    drop(permit);
                    let _ = rang.send(());
                })
                .map_err(|e| e.to_string())?;
            *blocked = Some(rung);
        }
        let thread = blocked.as_mut().expect("set above");
        match tokio::time::timeout(WAIT, thread).await {
            Ok(_) => {
                *blocked = None;
                Ok(Ring::Rang)
            }
            Err(_) => Ok(Ring::Quiet),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_is_rung_when_the_holder_lets_go() {
        let dir = std::env::temp_dir().join(format!("dblock-bells-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("x.db");
        std::fs::write(&db, b"").unwrap();
        // Two backends: the holder's and the waiter's (bells are per open
        // file, so this is what another process sees).
        let holder = bells(&db, "t");
        let waiter = bells(&db, "t");
        holder.arm("n", 1);
        // An unarmed-looking first ring is allowed; after it, the watch
        // must wait for the holder.
        let _ = tokio::time::timeout(Duration::from_millis(100), waiter.released("n")).await;
        let woken = tokio::spawn(waiter.released("n"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!woken.is_finished(), "rang while the holder held the bell");
        holder.disarm("n", 1);
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("the release rang the bell")
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shared_bells_stay_held_until_the_last_lease_goes() {
        let dir = std::env::temp_dir().join(format!("dblock-bells-share-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("x.db");
        std::fs::write(&db, b"").unwrap();
        let bells = bells(&db, "t");
        bells.arm("n", 1);
        bells.arm("n", 2);
        let path = bell_file(bells.holder().dir.get().unwrap(), "t", "n");
        let probe = File::open(&path).unwrap();
        assert!(probe.try_lock().is_err(), "the bell is held");
        bells.disarm("n", 1);
        bells.disarm("n", 1);
        assert!(probe.try_lock().is_err(), "still held for the second lease");
        bells.disarm("n", 2);
        assert!(probe.try_lock().is_ok(), "let go with the last lease");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
