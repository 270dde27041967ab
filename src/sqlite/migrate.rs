//! `dblock::sqlite::migrate`.

use sqlx::SqlitePool;

use crate::migrate::{apply, migrations, Bookkeeping, Migration, BOOKKEEPING};
use crate::Result;

const MIGRATIONS: &[Migration] = migrations!("sqlite";
    1, "lease table", "0001_dblock.sql";
    2, "token floor of deleted lease rows", "0002_token_floor.sql";
    3, "holders of semaphores", "0003_semaphore_holders.sql";
    4, "shared (reader) leases: the waiting writer's mark", "0004_shared_leases.sql";
);

/// dblock's bookkeeping table in SQLite.
const TABLE: Bookkeeping = Bookkeeping {
    create: "CREATE TABLE IF NOT EXISTS dblock_schema_migrations (
            version     INTEGER PRIMARY KEY NOT NULL,
            description TEXT    NOT NULL,
            applied_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        )",
    record: "INSERT INTO dblock_schema_migrations (version, description) VALUES (?1, ?2)",
    persistent: true,
};

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
    apply::<sqlx::Sqlite>(&mut tx, MIGRATIONS, &TABLE, |version| {
        tracing::info!(
            version,
            table = BOOKKEEPING,
            "dblock: applied SQLite schema step"
        );
    })
    .await?;
    tx.commit().await
}
