//! PostgreSQL: session-level advisory locks ([`Advisory`]), the lease table
//! ([`Lease`]), transaction-scoped locks ([`lock_xact`]) and the schema
//! ([`migrate`]).

mod advisory;
mod key;
mod lease;
mod migrate;
mod notify;
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

/// The server's `clock_timestamp()`: the clock both PostgreSQL backends
/// decide by.
pub(crate) async fn clock_timestamp(
    pool: &sqlx::PgPool,
) -> crate::Result<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await
        .map_err(map_err)
}

/// Maps "relation does not exist" (42P01) to [`Error::SchemaMissing`](crate::Error::SchemaMissing).
pub(crate) fn map_err(e: sqlx::Error) -> crate::Error {
    if let sqlx::Error::Database(db) = &e {
        if db.code().as_deref() == Some("42P01") {
            return SCHEMA_MISSING;
        }
    }
    crate::Error::Database(e)
}
