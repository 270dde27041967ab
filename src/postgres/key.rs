//! The name-to-key function of advisory locks.

use sha2::{Digest, Sha256};

/// The 64-bit PostgreSQL advisory key of a lock name: the first 8 bytes of
/// the SHA-256 digest of the name's UTF-8 bytes, read as a big-endian signed
/// integer.
///
/// This function is stable: it will not change within a major version, so
/// that other programs, and operators in `psql`, can take the same lock. In
/// SQL (PostgreSQL 11 or later):
///
/// ```sql
/// SELECT ('x' || left(encode(sha256(convert_to('reports:nightly', 'UTF8')), 'hex'), 16))::bit(64)::bigint;
/// ```
///
/// Test vectors:
///
/// ```
/// use dblock::postgres::advisory_key;
/// assert_eq!(advisory_key(""), -2039914840885289964);
/// assert_eq!(advisory_key("reports:nightly"), -2263639456624937944);
/// assert_eq!(advisory_key("🔒"), 7701668758205862634);
/// ```
pub fn advisory_key(name: &str) -> i64 {
    let digest = Sha256::digest(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The key of one of a semaphore's marker or slot locks: like
/// [`advisory_key`], over the name's UTF-8 bytes, a NUL byte and `suffix`.
/// A name never contains NUL, so these keys are not the key of any name.
fn derived_key(name: &str, suffix: &str) -> i64 {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([0u8]);
    hasher.update(suffix.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The advisory keys of a semaphore's permits (`max_holders(n)` on
/// [`Advisory`](super::Advisory)), each the first 8 bytes of the SHA-256 of
/// the name's UTF-8 bytes, a NUL byte and an ASCII suffix, read as a
/// big-endian signed integer:
///
/// - slot `i` (0 ≤ i < n), one exclusive lock per permit: suffix `slot:{i}`;
/// - the semaphore marker, held shared by every permit: suffix `semaphore`;
/// - the capacity marker of `n`, held shared by every permit of a semaphore
///   of `n`: suffix `max_holders:{n}`.
///
/// Every permit also holds the name's own key ([`advisory_key`]) shared.
/// In SQL, slot 0 of `export:tenant-7`:
///
/// ```sql
/// SELECT ('x' || left(encode(sha256(convert_to('export:tenant-7', 'UTF8')
///        || '\x00'::bytea || convert_to('slot:0', 'UTF8')), 'hex'), 16))::bit(64)::bigint;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PermitKeys {
    /// The name's own key.
    pub name: i64,
    /// The semaphore marker.
    pub semaphore: i64,
    /// The capacity marker of `n`.
    pub capacity: i64,
    /// The `n` slots, in the order they are tried.
    pub slots: Vec<i64>,
}

impl PermitKeys {
    /// The keys of the semaphore of `n` named `name`.
    pub(crate) fn new(name: &str, n: u32) -> Self {
        PermitKeys {
            name: advisory_key(name),
            semaphore: semaphore_key(name),
            capacity: capacity_key(name, n),
            slots: (0..n).map(|i| slot_key(name, i)).collect(),
        }
    }
}

/// The key of slot `i` of the semaphore named `name` (see [`PermitKeys`]).
pub(crate) fn slot_key(name: &str, i: u32) -> i64 {
    derived_key(name, &format!("slot:{i}"))
}

/// The key every permit of `name` holds shared (see [`PermitKeys`]).
pub(crate) fn semaphore_key(name: &str) -> i64 {
    derived_key(name, "semaphore")
}

/// The key every permit of a semaphore of `n` named `name` holds shared
/// (see [`PermitKeys`]).
pub(crate) fn capacity_key(name: &str, n: u32) -> i64 {
    derived_key(name, &format!("max_holders:{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permit_keys_are_apart_from_names() {
        let k = PermitKeys::new("export:tenant-7", 3);
        assert_eq!(k.slots.len(), 3);
        let mut all = vec![k.name, k.semaphore, k.capacity];
        all.extend(&k.slots);
        let mut unique = all.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), all.len());
        assert_eq!(k.name, advisory_key("export:tenant-7"));
        assert_ne!(slot_key("a", 0), advisory_key("a\0slot:0\0"));
    }
}
