//! The lease backends, constructed in one place.

use std::path::Path;
use std::sync::Arc;

use dblock::Backend;
use sqlx::{MySqlPool, PgPool};

use crate::exit::{CliResult, Failure};

/// `dblock::postgres::Lease` on `pool`.
pub fn postgres(pool: PgPool) -> CliResult<Arc<dyn Backend>> {
    Ok(Arc::new(dblock::postgres::Lease::new(pool)))
}

/// `dblock::mysql::Lease` on `pool`.
pub fn mysql(pool: MySqlPool) -> CliResult<Arc<dyn Backend>> {
    Ok(Arc::new(dblock::mysql::Lease::new(pool)))
}

/// `dblock::mysql::migrate`.
pub async fn mysql_migrate(pool: &MySqlPool) -> CliResult<()> {
    dblock::mysql::migrate(pool).await.map_err(Failure::from)
}

/// `dblock::sqlite::Lease::open(path)`: creates the file and its schema.
pub async fn sqlite_open(path: &Path) -> CliResult<Arc<dyn Backend>> {
    dblock::sqlite::Lease::open(path)
        .await
        .map(|l| Arc::new(l) as Arc<dyn Backend>)
        .map_err(Failure::from)
}

/// `dblock::redis::Lease::open(url)`: connects and checks that Redis answers.
pub async fn redis_open(url: &str) -> CliResult<Arc<dyn Backend>> {
    dblock::redis::Lease::open(url)
        .await
        .map(|l| Arc::new(l) as Arc<dyn Backend>)
        .map_err(Failure::from)
}
