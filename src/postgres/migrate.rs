//! `dblock::postgres::migrate`.

use sqlx::PgPool;

use crate::migrate::{apply, migrations, Bookkeeping, Migration};
use crate::Result;

const MIGRATIONS: &[Migration] = migrations!("postgres";
    1, "fencing sequence and lease table", "0001_dblock.sql";
    2, "lease tokens from the fencing sequence", "0002_lease_tokens_from_sequence.sql";
    3, "holders of semaphores", "0003_semaphore_holders.sql";
    4, "holder identities of advisory locks", "0004_advisory_holders.sql";
    5, "shared (reader) leases: the waiting writer's mark", "0005_shared_leases.sql";
);

/// dblock's bookkeeping table in PostgreSQL. Unnamed statements: they also
/// work through a transaction-pooling proxy.
const BOOKKEEPING: Bookkeeping = Bookkeeping {
    create: "CREATE TABLE IF NOT EXISTS dblock_schema_migrations (
            version     bigint      PRIMARY KEY,
            description text        NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
        )",
    record: "INSERT INTO dblock_schema_migrations (version, description) VALUES ($1, $2)",
    persistent: false,
};

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
    apply::<sqlx::Postgres>(&mut tx, MIGRATIONS, &BOOKKEEPING, |version| {
        tracing::info!(version, "dblock: applied PostgreSQL schema step");
    })
    .await?;
    tx.commit().await?;
    Ok(())
}
