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
