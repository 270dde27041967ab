//! Validation of lock names and table names.

use crate::{Error, Result};

/// The longest lock name accepted, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 255;

/// Checks a lock name: 1 to 255 bytes of UTF-8, no NUL.
///
/// Names are data: backends always bind them as parameters, so quotes,
/// semicolons and the like are ordinary characters.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidName("a lock name may not be empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidName(format!(
            "a lock name may be at most {MAX_NAME_LEN} bytes of UTF-8; this one has {}",
            name.len()
        )));
    }
    // A plain scan: names are short, and `contains` calls memchr, whose
    // set-up costs more than the scan on every acquisition.
    if name.bytes().any(|b| b == 0) {
        return Err(Error::InvalidName(
            "a lock name may not contain a NUL byte".into(),
        ));
    }
    Ok(())
}

/// Checks a holder identity (a leader's, see
/// [`Locks::elect`](crate::Locks::elect)): the same rules as a name, 1 to
/// 255 bytes of UTF-8 without NUL, reported as [`Error::InvalidOption`].
pub(crate) fn validate_identity(identity: &str) -> Result<()> {
    validate_name(identity).map_err(|e| match e {
        Error::InvalidName(why) => Error::InvalidOption(format!(
            "invalid holder identity: {}",
            why.replace("a lock name", "an identity")
        )),
        other => other,
    })
}

/// Checks a table name given to a lease backend: an optional schema and a
/// table, each an ASCII letter or underscore followed by letters, digits or
/// underscores, at most 63 bytes each (PostgreSQL's limit).
///
/// Table names cannot be bound as parameters, so this check is what keeps
/// them from carrying SQL.
pub fn validate_table(table: &str) -> Result<()> {
    let parts: Vec<&str> = table.split('.').collect();
    let ok = parts.len() <= 2
        && parts.iter().all(|p| {
            let mut chars = p.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                && p.len() <= 63
        });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidOption(format!(
            "table name {table:?} is not a plain identifier (letters, digits and `_`, optionally `schema.table`)"
        )))
    }
}

/// Quotes a table name that passed [`validate_table`] as an SQL identifier
/// (`schema.table` becomes `"schema"."table"`). Quoted identifiers are case
/// sensitive: `MyLocks` names the table created as `"MyLocks"`, not `mylocks`.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) fn quote_table(table: &str) -> String {
    debug_assert!(validate_table(table).is_ok());
    table
        .split('.')
        .map(|part| format!("\"{part}\""))
        .collect::<Vec<_>>()
        .join(".")
}

/// A map keyed by lock names. Hashed with foldhash rather than the
/// standard SipHash: its per-map random seed still keeps crafted names
/// (they may come from outside) from colliding on purpose, and a short
/// name hashes in a few dozen instructions instead of about 200 (about 14
/// hashes in a MySQL lease's acquire + release: docs/performance.md).
pub(crate) type NameMap<V> = foldhash::HashMap<String, V>;

/// A set of lock names (see [`NameMap`]).
#[cfg(feature = "mysql")]
pub(crate) type NameSet = foldhash::HashSet<String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("reports:nightly").is_ok());
        assert!(validate_name("'; DROP TABLE dblock_leases; --").is_ok());
        assert!(validate_name("🔒").is_ok());
        assert!(validate_name(&"a".repeat(255)).is_ok());
        assert!(matches!(validate_name(""), Err(Error::InvalidName(_))));
        assert!(matches!(
            validate_name(&"a".repeat(256)),
            Err(Error::InvalidName(_))
        ));
        // 64 four-byte characters are 256 bytes.
        assert!(matches!(
            validate_name(&"🔒".repeat(64)),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(validate_name("a\0b"), Err(Error::InvalidName(_))));
    }

    #[test]
    fn tables() {
        assert!(validate_table("dblock_leases").is_ok());
        assert!(validate_table("ops.locks_2").is_ok());
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "a.b.c",
            "x; DROP TABLE y",
            "\"quoted\"",
            "a.",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(validate_table(bad), Err(Error::InvalidOption(_))),
                "{bad:?}"
            );
        }
        assert_eq!(quote_table("dblock_leases"), "\"dblock_leases\"");
        assert_eq!(quote_table("ops.Locks_2"), "\"ops\".\"Locks_2\"");
    }
}
