//! A migration runner that only one deploying node executes.
//!
//! Four nodes start at once, as replicas of a deployment do. Each takes the
//! advisory lock `migrations:example` (waiting up to a minute), looks at
//! what is applied, applies what is missing, and lets go. The first one in
//! migrates; the others wait for it, then find nothing to do.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example migration_runner
//! ```

use std::time::Duration;

use dblock::postgres::Advisory;
use dblock::Locks;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE example_accounts (id bigserial PRIMARY KEY, email text NOT NULL)",
    ),
    (
        2,
        "ALTER TABLE example_accounts ADD COLUMN created_at timestamptz NOT NULL DEFAULT now()",
    ),
    (
        3,
        "CREATE UNIQUE INDEX example_accounts_email ON example_accounts (email)",
    ),
];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    dblock::postgres::migrate(&admin).await?;
    // Start from scratch so every run shows the same story.
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS example_accounts;
         DROP TABLE IF EXISTS example_schema_versions;
         CREATE TABLE example_schema_versions (version bigint PRIMARY KEY)",
    )
    .execute(&admin)
    .await?;

    let mut nodes = Vec::new();
    for node in 1..=4 {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await?;
        nodes.push(tokio::spawn(deploy(node, pool)));
    }
    let mut applied_total = 0;
    for n in nodes {
        applied_total += n.await??;
    }
    assert_eq!(
        applied_total,
        MIGRATIONS.len(),
        "each migration applied exactly once"
    );
    println!("all nodes up; {applied_total} migrations applied in all");
    Ok(())
}

/// One node's start-up: migrate under the lock, then "start serving".
async fn deploy(
    node: u32,
    pool: PgPool,
) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let locks = Locks::new(Advisory::new(pool.clone()));
    let guard = locks
        .acquire("migrations:example")
        .wait(Duration::from_secs(60))
        .await?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM example_schema_versions")
        .fetch_all(&pool)
        .await?;
    let mut count = 0;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| !applied.contains(v)) {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO example_schema_versions VALUES ($1)")
            .bind(version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        // Slow enough that the other nodes really do wait.
        tokio::time::sleep(Duration::from_millis(150)).await;
        count += 1;
    }
    let token = guard.token();
    // The guard must still be ours: had the session died, another node could
    // be migrating concurrently.
    if guard.is_lost() {
        return Err("lost the migration lock while migrating".into());
    }
    guard.release().await?;
    if count == 0 {
        println!("node {node}: waited for the lock, found nothing to do");
    } else {
        println!("node {node}: applied {count} migrations under the lock (token {token})");
    }
    Ok(count)
}
