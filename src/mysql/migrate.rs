//! `dblock::mysql::migrate`.

use sqlx::MySqlPool;

use super::Conn;
use crate::migrate::{apply, migrations, Bookkeeping, Migration};
use crate::{Error, Result};

const MIGRATIONS: &[Migration] = migrations!("mysql";
    1, "lease table", "0001_dblock.sql";
    2, "token floor of swept lease rows", "0002_token_floor.sql";
    3, "holders of semaphores", "0003_semaphore_holders.sql";
    4, "shared (reader) leases: the waiting writer's mark", "0004_shared_leases.sql";
);

/// dblock's bookkeeping table in MySQL/MariaDB.
const BOOKKEEPING: Bookkeeping = Bookkeeping {
    create: "CREATE TABLE IF NOT EXISTS dblock_schema_migrations (
            version     BIGINT       NOT NULL PRIMARY KEY,
            description VARCHAR(255) NOT NULL,
            applied_at  DATETIME(6)  NOT NULL
        ) ENGINE = InnoDB",
    record: "INSERT INTO dblock_schema_migrations (version, description, applied_at) \
             VALUES (?, ?, UTC_TIMESTAMP(6))",
    persistent: true,
};

/// The named lock that serialises migrators of one database (names are
/// server-wide and at most 64 characters, hence the hash of the database).
const LOCK_NAME: &str = "CONCAT('dblock:migrate:', SHA1(COALESCE(DATABASE(), '')))";

/// Creates or updates dblock's schema in the pool's database: the lease
/// table `dblock_leases` of [`Lease`](super::Lease) and
/// [`lock_in_transaction`](super::lock_in_transaction).
///
/// Idempotent, and safe when many processes call it at once. MySQL cannot
/// roll back DDL, so the steps are serialised with a named lock
/// (`GET_LOCK`) held on one connection, every step is itself idempotent
/// (`CREATE TABLE IF NOT EXISTS`), and what was applied is recorded in
/// `dblock_schema_migrations` (never in the application's
/// `_sqlx_migrations`). The same SQL is in `migrations/mysql/` for those who
/// prefer their own migration tool.
///
/// # Cancel safety
/// Cancel safe: if dropped, the connection holding the named lock is closed
/// (which releases the lock) rather than returned to the pool; a step cut
/// short is applied again by the next call.
pub async fn migrate(pool: &MySqlPool) -> Result<()> {
    let mut conn = Conn::acquire(pool).await?;
    let c = conn.begin_use();
    loop {
        let got: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT GET_LOCK({LOCK_NAME}, 60)"
        )))
        .fetch_one(&mut *c)
        .await?;
        match got {
            Some(1) => break,
            // Another migrator has held it for a minute: keep waiting.
            Some(_) => tracing::info!("dblock: waiting for another process migrating the schema"),
            None => {
                return Err(Error::internal(
                    "GET_LOCK returned NULL while serialising dblock::mysql::migrate",
                ))
            }
        }
    }
    let applied = apply_steps(c).await;
    let released = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT RELEASE_LOCK({LOCK_NAME})"
    )))
    .execute(&mut *c)
    .await;
    applied?;
    released?;
    conn.done();
    Ok(())
}

async fn apply_steps(c: &mut sqlx::MySqlConnection) -> Result<()> {
    apply::<sqlx::MySql>(c, MIGRATIONS, &BOOKKEEPING, |version| {
        tracing::info!(version, "dblock: applied MySQL schema step");
    })
    .await?;
    Ok(())
}
