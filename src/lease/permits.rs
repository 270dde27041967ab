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

use super::{LeaseStore, Renewal, Renewed};
use crate::{Error, LockInfo, LockMode};

/// The first character of a permit's owner id (a plain owner id is 32
/// lowercase hex digits, so it never starts with it).
pub(crate) const PERMIT_PREFIX: char = 'p';

/// Whether the lease of owner id `owner` is a permit of a semaphore.
pub(crate) fn is_permit(owner: &str) -> bool {
    owner.starts_with(PERMIT_PREFIX)
}

/// A fresh owner id for a request of `max_holders`.
pub(crate) fn owner_for(max_holders: u32) -> String {
    let owner = super::new_owner();
    if max_holders > 1 {
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

/// [`LeaseStore::renew_many`] for a batch that may hold permits: the plain
/// leases in one `renew_many`, each permit with its own `renew` (a process
/// holds few permits; their stores keep them in another table). Answers in
/// the batch's order; an error means nothing is known, as for `renew_many`.
pub(crate) async fn renew_many<S: LeaseStore>(
    store: &S,
    batch: &[Renewal],
) -> crate::Result<Vec<Renewed>> {
    if !batch.iter().any(|r| is_permit(&r.owner)) {
        return store.renew_many(batch).await;
    }
    let (permits, plain): (Vec<usize>, Vec<usize>) =
        (0..batch.len()).partition(|&i| is_permit(&batch[i].owner));
    let mut answers = vec![Renewed::Unknown; batch.len()];
    if !plain.is_empty() {
        let leases: Vec<Renewal> = plain.iter().map(|&i| batch[i].clone()).collect();
        for (&i, answer) in plain.iter().zip(store.renew_many(&leases).await?) {
            answers[i] = answer;
        }
    }
    for i in permits {
        let r = &batch[i];
        answers[i] = match store.renew(&r.name, &r.owner, r.token, r.ttl).await? {
            Some(at) => Renewed::Until(at),
            None => Renewed::Gone,
        };
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

/// The `LockInfo` of a name held by permits: `holders` live permits of a
/// semaphore of `max_holders`, the newest token, the earliest acquisition,
/// the latest expiry, and the holders' `host:pid`s.
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
    let mut info = LockInfo::new(Some(name), who, LockMode::Exclusive);
    info.holders = holders;
    info.max_holders = Some(max_holders);
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

/// What a permit claim found under the name's lock, and what it decides.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Found {
    /// A plain lease (or reader or writer lease) on the name is live.
    pub plain_live: bool,
    /// How many permits of the name are live.
    pub permits: u32,
    /// The capacity the live permits were taken with (the largest, should
    /// they ever differ).
    pub capacity: Option<u32>,
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
    /// Takes, waits, or refuses (holders that disagree on the capacity).
    pub(crate) fn decide(&self, name: &str, asked: u32) -> crate::Result<Decision> {
        if self.permits == 0 && self.plain_live {
            return Err(disagreement(name, asked, 1));
        }
        match self.capacity {
            Some(found) if found != asked => Err(disagreement(name, asked, found)),
            _ if self.permits >= asked => Ok(Decision::Full),
            _ => Ok(Decision::Take),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permit_owners_are_told_apart() {
        assert!(is_permit(&owner_for(3)));
        assert!(!is_permit(&owner_for(1)));
        assert_eq!(owner_for(1).len(), 32);
    }

    #[test]
    fn decisions() {
        let free = Found::default();
        assert_eq!(free.decide("a", 3).unwrap(), Decision::Take);
        let plain = Found {
            plain_live: true,
            ..Found::default()
        };
        assert!(matches!(plain.decide("a", 3), Err(Error::InvalidOption(_))));
        let two = Found {
            plain_live: true,
            permits: 2,
            capacity: Some(3),
        };
        assert_eq!(two.decide("a", 3).unwrap(), Decision::Take);
        assert!(matches!(two.decide("a", 4), Err(Error::InvalidOption(_))));
        let full = Found {
            permits: 3,
            capacity: Some(3),
            ..Found::default()
        };
        assert_eq!(full.decide("a", 3).unwrap(), Decision::Full);
    }
}
