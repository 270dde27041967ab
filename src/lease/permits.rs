//! Semaphores on the lease stores: what every store shares.
//!
//! A permit of a semaphore of `n` is a lease of its own (own owner id, own
//! token, own renewal), and up to `n` of them may be live for one name at
//! once. The stores keep them apart from plain leases (the SQL stores in a
//! holders table beside the lease table, see their docs); the engine tells
//! them apart by the owner id, which for a permit starts with
//! [`PERMIT_PREFIX`], so that the renewal machinery, written for plain
//! leases, carries permits unchanged.
//!
//! All holders of a name at one time must agree on how many holders it
//! admits (its *capacity*: `n` for a permit, 1 for a plain lock and for
//! reader and writer locks). A permit claim checks that atomically with
//! the claim itself; a plain claim that misses checks it once, at its first
//! miss (see [`refusal`]).
//!
//! # Readers
//!
//! Shared (reader) leases ride on the same machinery: a reader is a holder
//! row like a permit (owner id with [`PERMIT_PREFIX`], its own token, its
//! own renewal), recorded with capacity 1 and without an upper bound on
//! their number; the name's marker carries mode `s`. The writer is a plain
//! lease: it takes the name once the marker has run out (the last reader
//! gone). To keep readers arriving in a row from starving it, a writer
//! that misses while readers hold the name *marks* it (the marker's
//! `writer_waiting_until`, by the store's clock, renewed at each of its
//! tries, lapsing by itself if the writer goes away, cleared when a writer
//! takes the name), and reader claims refuse while the mark is live (see
//! [`Found::decide`]).

use std::time::Duration;

use super::{LeaseId, LeaseStore, NewExpiry, Renewal, Renewed};
use crate::{Error, LockInfo, LockMode};

/// The first character of a permit's (and a reader's) owner id (a plain
/// owner id is 32 lowercase hex digits, so it never starts with it).
pub(crate) const PERMIT_PREFIX: char = 'p';

/// Whether the lease of owner id `owner` is a permit of a semaphore or a
/// reader: a holder row, not a plain lease.
pub(crate) fn is_permit(owner: &str) -> bool {
    owner.starts_with(PERMIT_PREFIX)
}

/// A fresh owner id for a request of `max_holders` in `mode`: a permit's
/// and a reader's are told apart from a plain lease's (both are holder
/// rows of the stores that keep a holders table).
pub(crate) fn owner_for(max_holders: u32, mode: LockMode) -> String {
    let owner = super::new_owner();
    if max_holders > 1 || mode == LockMode::Shared {
        format!("{PERMIT_PREFIX}{owner}")
    } else {
        owner
    }
}

/// How many holders a lock seen by `inspect` admits: its `max_holders`,
/// 1 for reader and writer locks.
pub(crate) fn capacity(info: &LockInfo) -> u32 {
    info.max_holders.unwrap_or(1)
}

/// The error for an acquisition of `asked` holders that found `name` held
/// with room for `found`.
pub(crate) fn disagreement(name: &str, asked: u32, found: u32) -> Error {
    let kind = |n: u32| {
        if n == 1 {
            "a lock (one holder; reader and writer locks count as one)".to_owned()
        } else {
            format!("a semaphore of {n} holders")
        }
    };
    Error::InvalidOption(format!(
        "lock {name:?} is held as {} but this acquisition asks for {}: all holders of a \
         name at one time must agree on max_holders",
        kind(found),
        kind(asked)
    ))
}

/// What an acquisition of `asked` holders must answer when it found `name`
/// held as `info`: an error if they disagree.
pub(crate) fn refusal(name: &str, asked: u32, info: Option<&LockInfo>) -> Option<Error> {
    let found = capacity(info?);
    (found != asked).then(|| disagreement(name, asked, found))
}

/// Renews one lease by the store's [`LeaseStore::renew_permit`] if its
/// owner is a permit's or a reader's, by [`LeaseStore::renew`] if not.
pub(crate) async fn renew<S: LeaseStore>(
    store: &S,
    lease: LeaseId<'_>,
    ttl: Duration,
) -> NewExpiry {
    if is_permit(lease.owner) {
        store.renew_permit(lease, ttl).await
    } else {
        store.renew(lease, ttl).await
    }
}

/// Releases one lease by the store's [`LeaseStore::release_permit`] if its
/// owner is a permit's or a reader's, by [`LeaseStore::release`] if not.
pub(crate) async fn release<S: LeaseStore>(
    store: &S,
    lease: LeaseId<'_>,
    hold: Option<Duration>,
) -> crate::Result<bool> {
    if is_permit(lease.owner) {
        store.release_permit(lease, hold).await
    } else {
        store.release(lease, hold).await
    }
}

/// [`LeaseStore::renew_many`] for a batch that may hold permits and
/// readers: the plain leases in one `renew_many`, the holder rows in one
/// [`LeaseStore::renew_holders`] (their stores keep them in another
/// table). Answers in the batch's order; an error means nothing is known,
/// as for `renew_many`.
pub(crate) async fn renew_many<S: LeaseStore>(
    store: &S,
    batch: &[Renewal],
) -> crate::Result<Vec<Renewed>> {
    if !batch.iter().any(|r| is_permit(&r.owner)) {
        return store.renew_many(batch).await;
    }
    let (holders, plain): (Vec<usize>, Vec<usize>) =
        (0..batch.len()).partition(|&i| is_permit(&batch[i].owner));
    let mut answers = vec![Renewed::Unknown; batch.len()];
    for (part, holders) in [(plain, false), (holders, true)] {
        if part.is_empty() {
            continue;
        }
        let leases: Vec<Renewal> = part.iter().map(|&i| batch[i].clone()).collect();
        let renewed = if holders {
            store.renew_holders(&leases).await?
        } else {
            store.renew_many(&leases).await?
        };
        for (&i, answer) in part.iter().zip(renewed) {
            answers[i] = answer;
        }
    }
    Ok(answers)
}

/// The holders table of lease table `table` (`table` or `schema.table`):
/// the same name with `_holders` appended. `None` when that is no valid
/// table name (the lease table's name is too long); permits then fail with
/// [`Error::InvalidOption`] (see [`no_holders_table`]).
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]
pub(crate) fn holders_table(table: &str) -> Option<String> {
    let holders = format!("{table}_holders");
    crate::validate_table(&holders).ok().map(|_| holders)
}

/// The error for a permit on a lease table without a valid holders table name.
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]
pub(crate) fn no_holders_table(table: &str) -> Error {
    Error::InvalidOption(format!(
        "semaphores on lease table {table:?} need a holders table named {table}_holders, \
         which is too long a name: use a lease table with a name of at most 55 characters"
    ))
}

/// Runs `op` over a store's permit statements, for the operations that
/// also visit the permits of stores and databases that have none: without
/// the statements (the holders table's name would be too long, see
/// [`holders_table`]) `op` is not run, and a database without the holders
/// table ([`Error::SchemaMissing`]: migrated before semaphores, or a lease
/// table of one's own without one) answers the same, `T::default()` (no
/// permit: `false`, `0`, `None`, nothing).
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]
pub(crate) async fn unless_no_holders<'s, P, T, Fut>(
    sql: Option<&'s P>,
    op: impl FnOnce(&'s P) -> Fut,
) -> crate::Result<T>
where
    T: Default,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let Some(sql) = sql else {
        return Ok(T::default());
    };
    match op(sql).await {
        Err(Error::SchemaMissing { .. }) => Ok(T::default()),
        outcome => outcome,
    }
}

/// The `LockInfo` of a name held by permits: `holders` live permits of a
/// semaphore of `max_holders`, the newest token, the earliest acquisition,
/// the latest expiry, and the holders' `host:pid`s. Holder rows of
/// capacity 1 are readers: mode shared, no bound.
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]
pub(crate) fn info(
    name: String,
    holders: u32,
    max_holders: u32,
    token: u64,
    who: String,
    acquired_at: chrono::DateTime<chrono::Utc>,
    expires_at: chrono::DateTime<chrono::Utc>,
) -> LockInfo {
    let mode = if max_holders == READER {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let mut info = LockInfo::new(Some(name), who, mode);
    info.holders = holders;
    if mode == LockMode::Exclusive {
        info.max_holders = Some(max_holders);
    }
    info.token = Some(token);
    info.acquired_at = Some(acquired_at);
    info.expires_at = Some(expires_at);
    info
}

/// A list of plain leases and one of names held by permits, merged in name
/// order: a name held by permits is shown once, as a semaphore (its lease
/// row is only their marker).
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]
pub(crate) fn merge_list(plain: Vec<LockInfo>, permits: Vec<LockInfo>) -> Vec<LockInfo> {
    let held: std::collections::HashSet<Option<String>> =
        permits.iter().map(|i| i.name.clone()).collect();
    let mut all: Vec<LockInfo> = plain
        .into_iter()
        .filter(|i| !held.contains(&i.name))
        .chain(permits)
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// The capacity recorded with a reader's holder row: its claim's
/// `max_holders` (a permit's is its `n`, always above 1).
pub(crate) const READER: u32 = 1;

/// The mode a store records on the marker for a holder claim: `s` for
/// readers, `x` for permits.
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]
pub(crate) fn marker_mode(claim: &super::Claim<'_>) -> &'static str {
    match claim.mode {
        LockMode::Shared => "s",
        LockMode::Exclusive => "x",
    }
}

/// What a permit (or reader) claim found under the name's lock, and what
/// it decides.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Found {
    /// A plain lease of the name (a writer, or a lease kept by
    /// `hold_at_least`) is live: its row is live and has a holder. A
    /// marker has no holder, and lasts as long as the latest permit; one
    /// still live without any live permit (a forced release ends the
    /// permits, then the marker) holds nothing, and is not counted here:
    /// counted, it read as a plain lock and refused the semaphore's
    /// claims.
    pub plain_live: bool,
    /// How many permits of the name are live.
    pub permits: u32,
    /// The capacity the live permits were taken with (the largest, should
    /// they ever differ).
    pub capacity: Option<u32>,
    /// A writer waiting for the name has marked it, and the mark has not
    /// lapsed by the store's clock: readers stay out.
    pub writer_waiting: bool,
}

/// The decision of a permit claim of `asked` holders on `name`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Take a permit.
    Take,
    /// Every permit is taken: wait.
    Full,
}

impl Found {
    /// Takes, waits, or refuses (holders that disagree on the capacity) for
    /// a claim of `asked` holders in `mode`.
    pub(crate) fn decide(&self, name: &str, asked: u32, mode: LockMode) -> crate::Result<Decision> {
        if mode == LockMode::Shared {
            return self.decide_reader(name);
        }
        if self.permits == 0 && self.plain_live {
            return Err(disagreement(name, asked, 1));
        }
        match self.capacity {
            Some(found) if found != asked => Err(disagreement(name, asked, found)),
            _ if self.permits >= asked => Ok(Decision::Full),
            _ => Ok(Decision::Take),
        }
    }

    /// A reader joins live readers, or takes a free name, unless a writer
    /// holds it or waits for it; permits of a semaphore refuse it.
    fn decide_reader(&self, name: &str) -> crate::Result<Decision> {
        match self.capacity {
            Some(found) if self.permits > 0 && found != READER => {
                Err(disagreement(name, READER, found))
            }
            // A writer (a plain lease) holds the name.
            _ if self.permits == 0 && self.plain_live => Ok(Decision::Full),
            _ if self.writer_waiting => Ok(Decision::Full),
            _ => Ok(Decision::Take),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permit_owners_are_told_apart() {
        assert!(is_permit(&owner_for(3, LockMode::Exclusive)));
        assert!(is_permit(&owner_for(1, LockMode::Shared)));
        assert!(!is_permit(&owner_for(1, LockMode::Exclusive)));
        assert_eq!(owner_for(1, LockMode::Exclusive).len(), 32);
    }

    #[test]
    fn reader_decisions() {
        let s = LockMode::Shared;
        assert_eq!(Found::default().decide("a", 1, s).unwrap(), Decision::Take);
        let readers = Found {
            plain_live: true,
            permits: 4,
            capacity: Some(READER),
            ..Found::default()
        };
        assert_eq!(readers.decide("a", 1, s).unwrap(), Decision::Take);
        let writer = Found {
            plain_live: true,
            ..Found::default()
        };
        assert_eq!(writer.decide("a", 1, s).unwrap(), Decision::Full);
        let waiting = Found {
            writer_waiting: true,
            ..readers
        };
        assert_eq!(waiting.decide("a", 1, s).unwrap(), Decision::Full);
        let semaphore = Found {
            plain_live: true,
            permits: 1,
            capacity: Some(3),
            ..Found::default()
        };
        assert!(matches!(
            semaphore.decide("a", 1, s),
            Err(Error::InvalidOption(_))
        ));
        // A permit claim finding readers is refused.
        assert!(matches!(
            readers.decide("a", 3, LockMode::Exclusive),
            Err(Error::InvalidOption(_))
        ));
    }

    #[test]
    fn decisions() {
        let x = LockMode::Exclusive;
        let free = Found::default();
        assert_eq!(free.decide("a", 3, x).unwrap(), Decision::Take);
        let plain = Found {
            plain_live: true,
            ..Found::default()
        };
        assert!(matches!(
            plain.decide("a", 3, x),
            Err(Error::InvalidOption(_))
        ));
        let two = Found {
            plain_live: true,
            permits: 2,
            capacity: Some(3),
            ..Found::default()
        };
        assert_eq!(two.decide("a", 3, x).unwrap(), Decision::Take);
        assert!(matches!(
            two.decide("a", 4, x),
            Err(Error::InvalidOption(_))
        ));
        let full = Found {
            permits: 3,
            capacity: Some(3),
            ..Found::default()
        };
        assert_eq!(full.decide("a", 3, x).unwrap(), Decision::Full);
    }
}
