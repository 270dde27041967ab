//! SQLite: the lease table in an embedded database file ([`Lease`]) and its
//! schema ([`migrate`]). The zero-setup default: [`Lease::open`] creates the
//! file and the table, and every process that opens the same file shares
//! its locks.

mod doorbell;
mod lease;
mod migrate;

pub use lease::Lease;
pub use migrate::migrate;

pub(crate) const SCHEMA_MISSING: crate::Error = crate::Error::SchemaMissing {
    migrate: "dblock::sqlite::migrate(&pool)",
    dir: "sqlite",
};

/// Maps "no such table" and "no such column" (a schema older than this
/// version of dblock) to [`Error::SchemaMissing`](crate::Error::SchemaMissing).
pub(crate) fn map_err(e: sqlx::Error) -> crate::Error {
    if let sqlx::Error::Database(db) = &e {
        let message = db.message();
        if message.starts_with("no such table") || message.starts_with("no such column") {
            return SCHEMA_MISSING;
        }
    }
    crate::Error::Database(e)
}

/// `SQLITE_BUSY` and `SQLITE_LOCKED` with their extended codes: another
/// connection holds the write lock past the busy timeout.
pub(crate) fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
        _ => false,
    }
}

/// How long a statement is retried, beyond SQLite's own busy timeout, while
/// the file stays locked by other writers.
pub(crate) const BUSY_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `op` again while it fails with [`is_busy`], with jittered backoff,
/// for at most [`BUSY_RETRY_FOR`]. Each `op` is one statement or one whole
/// transaction, so running it again is safe.
pub(crate) async fn retry_busy<T, F, Fut>(op: F) -> crate::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = sqlx::Result<T>>,
{
    use std::time::Duration;
    let give_up = tokio::time::Instant::now() + BUSY_RETRY_FOR;
    let backoff = crate::retry::Backoff::new(Duration::from_millis(2), Duration::from_millis(100));
    let again = |e: &sqlx::Error, _| {
        let again = is_busy(e) && tokio::time::Instant::now() < give_up;
        if again {
            tracing::debug!(error = %e, "dblock: SQLite file busy; retrying");
        }
        again
    };
    crate::retry::retrying(backoff, again, op)
        .await
        .map_err(map_err)
}
