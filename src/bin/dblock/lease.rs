//! The lease backends, constructed in one place.
//!
//! The lease backends (`dblock::postgres::Lease`, `dblock::mysql::Lease`,
//! `dblock::sqlite::Lease::open` and `dblock::mysql::migrate`) are
//! being built on other branches. Until they are merged, each function here
//! reports that the backend is not in this build (exit 69); each one's doc
//! names the line that replaces its body once the API is in the library.

use std::path::Path;
use std::sync::Arc;

use dblock::Backend;
use sqlx::{MySqlPool, PgPool};

use crate::exit::{CliResult, Failure};

fn not_built(what: &str) -> Failure {
    Failure::unavailable(format!(
        "the {what} backend is not in this build of dblock yet; use a postgres:// URL \
         with advisory locks meanwhile"
    ))
}

/// `dblock::postgres::Lease` on `pool`.
///
/// Once merged: `Ok(Arc::new(dblock::postgres::Lease::new(pool)))`.
pub fn postgres(pool: PgPool) -> CliResult<Arc<dyn Backend>> {
    drop(pool);
    Err(not_built("PostgreSQL lease"))
}

/// `dblock::mysql::Lease` on `pool`.
///
/// Once merged: `Ok(Arc::new(dblock::mysql::Lease::new(pool)))`.
pub fn mysql(pool: MySqlPool) -> CliResult<Arc<dyn Backend>> {
    drop(pool);
    Err(not_built("MySQL/MariaDB lease"))
}

/// `dblock::mysql::migrate`.
///
/// Once merged: `dblock::mysql::migrate(pool).await.map_err(Failure::from)`.
pub async fn mysql_migrate(pool: &MySqlPool) -> CliResult<()> {
    let _ = pool;
    Err(not_built("MySQL/MariaDB lease"))
}

/// `dblock::sqlite::Lease::open(path)`: creates the file and its schema.
///
/// Once merged:
/// `dblock::sqlite::Lease::open(path).await.map(|l| Arc::new(l) as Arc<dyn Backend>).map_err(Failure::from)`.
pub async fn sqlite_open(path: &Path) -> CliResult<Arc<dyn Backend>> {
    let _ = path;
    Err(not_built("SQLite lease"))
}
