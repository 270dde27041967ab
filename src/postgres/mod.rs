//! PostgreSQL: session-level advisory locks ([`Advisory`]), the lease table
//! ([`Lease`]), transaction-scoped locks ([`lock_xact`]) and the schema
//! ([`migrate`]).

mod advisory;
mod engine;
mod key;
mod lease;
mod migrate;
mod notify;
mod token;
mod xact;

pub use advisory::{Advisory, AdvisoryOptions, WaitStrategy};
pub use key::advisory_key;
pub use lease::Lease;
pub use migrate::migrate;
pub use xact::{lock_xact, lock_xact_with};

pub(crate) const SCHEMA_MISSING: crate::Error = crate::Error::SchemaMissing {
    migrate: "dblock::postgres::migrate(&pool)",
    dir: "postgres",
};

/// Maps "relation does not exist" (42P01) to [`Error::SchemaMissing`](crate::Error::SchemaMissing).
pub(crate) fn map_err(e: sqlx::Error) -> crate::Error {
    if let sqlx::Error::Database(db) = &e {
        if db.code().as_deref() == Some("42P01") {
            return SCHEMA_MISSING;
        }
    }
    crate::Error::Database(e)
}
