//! `dblock::sqlite::migrate`.

use sqlx::SqlitePool;

use crate::migrate::{Migration, BOOKKEEPING};
use crate::Result;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "lease table",
        sql: include_str!("../../migrations/sqlite/0001_dblock.sql"),
    },
    Migration {
        version: 2,
        description: "token floor of deleted lease rows",
        sql: include_str!("../../migrations/sqlite/0002_token_floor.sql"),
    },
    Migration {
        version: 3,
        description: "holders of semaphores",
        sql: include_str!("../../migrations/sqlite/0003_semaphore_holders.sql"),
    },
    Migration {
        version: 4,
        description: "shared (reader) leases: the waiting writer's mark",
        sql: include_str!("../../migrations/sqlite/0004_shared_leases.sql"),
    },
];

/// Creates or updates dblock's schema in the pool's database file: the lease
/// table `dblock_leases` of [`Lease`](super::Lease).
/// [`Lease::open`](super::Lease::open) calls it for you.
///
/// Idempotent, and safe when many processes call it at once: the steps run
/// in one `BEGIN IMMEDIATE` transaction, which takes the file's write lock
/// before reading what was applied (retried while another writer holds it),
/// and what was applied is recorded in `dblock_schema_migrations` (never in
/// the application's `_sqlx_migrations`). The same SQL is in
/// `migrations/sqlite/` for those who prefer their own migration tool.
///
/// # Cancel safety
/// Cancel safe: if dropped, the transaction is rolled back and nothing is
/// applied.
pub async fn migrate(pool: &SqlitePool) -> Result<()> {
    super::retry_busy(|| migrate_once(pool)).await
}

async fn migrate_once(pool: &SqlitePool) -> sqlx::Result<()> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS dblock_schema_migrations (
            version     INTEGER PRIMARY KEY NOT NULL,
            description TEXT    NOT NULL,
            applied_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        )",
    )
    .execute(&mut *tx)
    .await?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM dblock_schema_migrations")
        .fetch_all(&mut *tx)
        .await?;
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        sqlx::raw_sql(m.sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO dblock_schema_migrations (version, description) VALUES (?1, ?2)")
            .bind(m.version)
            .bind(m.description)
            .execute(&mut *tx)
            .await?;
        tracing::info!(
            version = m.version,
            table = BOOKKEEPING,
            "dblock: applied SQLite schema step"
        );
    }
    tx.commit().await
}
