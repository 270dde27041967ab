//! `dblock::postgres::migrate`.

use sqlx::PgPool;

use crate::migrate::Migration;
use crate::Result;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "fencing sequence and lease table",
        sql: include_str!("../../migrations/postgres/0001_dblock.sql"),
    },
    Migration {
        version: 2,
        description: "lease tokens from the fencing sequence",
        sql: include_str!("../../migrations/postgres/0002_lease_tokens_from_sequence.sql"),
    },
    Migration {
        version: 3,
        description: "holders of semaphores",
        sql: include_str!("../../migrations/postgres/0003_semaphore_holders.sql"),
    },
    Migration {
        version: 4,
        description: "holder identities of advisory locks",
        sql: include_str!("../../migrations/postgres/0004_advisory_holders.sql"),
    },
    Migration {
        version: 5,
        description: "shared (reader) leases: the waiting writer's mark",
        sql: include_str!("../../migrations/postgres/0005_shared_leases.sql"),
    },
];

/// Creates or updates dblock's schema in the pool's database: the fencing
/// sequence of [`Advisory`](super::Advisory) and the lease table of
/// [`Lease`](super::Lease).
///
/// Idempotent, and safe when many processes call it at once: the steps run
/// in one transaction under a transaction-scoped advisory lock, and what was
/// applied is recorded in `dblock_schema_migrations` (never in the
/// application's `_sqlx_migrations`). The same SQL is in
/// `migrations/postgres/` for those who prefer their own migration tool.
///
/// Its statements are unnamed, so it also works through a
/// transaction-pooling proxy (PgBouncer `pool_mode=transaction`).
///
/// # Cancel safety
/// Cancel safe: if dropped, the transaction is rolled back and nothing is
/// applied.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    let mut tx = pool.begin().await?;
    // Serialise concurrent migrators; the key is advisory_key("dblock:migrate").
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .persistent(false)
        .bind(super::advisory_key("dblock:migrate"))
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS dblock_schema_migrations (
            version     bigint      PRIMARY KEY,
            description text        NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
        )",
    )
    .execute(&mut *tx)
    .await?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM dblock_schema_migrations")
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        sqlx::raw_sql(m.sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO dblock_schema_migrations (version, description) VALUES ($1, $2)")
            .persistent(false)
            .bind(m.version)
            .bind(m.description)
            .execute(&mut *tx)
            .await?;
        tracing::info!(
            version = m.version,
            "dblock: applied PostgreSQL schema step"
        );
    }
    tx.commit().await?;
    Ok(())
}
