//! PostgreSQL: session-level advisory locks ([`Advisory`]), the lease table
//! ([`Lease`]), transaction-scoped locks ([`lock_in_transaction`]) and the schema
//! ([`migrate`]).

pub(crate) mod advisory;
mod engine;
mod key;
mod lease;
mod migrate;
mod notify;
mod token;
mod xact;

pub use advisory::{
    bench_try_exclusive_sql, bench_wait_exclusive_sql, Advisory, AdvisoryOptions, WaitStrategy,
};
pub use key::advisory_key;
pub use lease::Lease;
pub use migrate::migrate;
pub use xact::{lock_in_transaction, lock_in_transaction_with};
#[allow(deprecated)]
pub use xact::{lock_xact, lock_xact_with};

pub(crate) const SCHEMA_MISSING: crate::Error = crate::Error::SchemaMissing {
    migrate: "dblock::postgres::migrate(&pool)",
    dir: "postgres",
};

/// Lifts the role's and database's `statement_timeout` and
/// `idle_in_transaction_session_timeout` for the rest of the current
/// transaction, so that a wait is bounded by `.wait(d)` (through a
/// transaction-local `lock_timeout`) and nothing else. It must run as a
/// statement of its own, before the waiting one: PostgreSQL arms a
/// statement's timeout when the statement starts. Answers the two previous
/// values, then the two new ones.
pub(crate) const LIFT_SERVER_TIMEOUTS: &str = "SELECT current_setting('statement_timeout'), \
            current_setting('idle_in_transaction_session_timeout'), \
            set_config('statement_timeout', '0', true), \
            set_config('idle_in_transaction_session_timeout', '0', true)";

/// The answer of [`LIFT_SERVER_TIMEOUTS`].
pub(crate) type Lifted = (String, String, String, String);
/// The server's `clock_timestamp()`: the clock both PostgreSQL backends
/// decide by.
pub(crate) async fn clock_timestamp(
    pool: &sqlx::PgPool,
) -> crate::Result<chrono::DateTime<chrono::Utc>> {
    // A simple query: one message, one implicit transaction, so that a
    // transaction-pooling proxy answers it on one server connection. (An
    // unnamed prepared statement outside a transaction is parsed and bound
    // in two exchanges, which such a proxy may send to two server
    // connections: "unnamed prepared statement does not exist".)
    let row = sqlx::raw_sql("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await
        .map_err(map_err)?;
    sqlx::Row::try_get(&row, 0).map_err(map_err)
}

/// Maps "relation does not exist" (42P01) and "column does not exist"
/// (42703: a schema older than this version of dblock) to
/// [`Error::SchemaMissing`](crate::Error::SchemaMissing).
pub(crate) fn map_err(e: sqlx::Error) -> crate::Error {
    if let sqlx::Error::Database(db) = &e {
        if matches!(db.code().as_deref(), Some("42P01" | "42703")) {
            return SCHEMA_MISSING;
        }
    }
    crate::Error::Database(e)
}
