//! Job scheduling across several instances.
//!
//! Three scheduler instances (each with its own connection pool, as three
//! processes would have) tick through the same job slots. For each slot:
//!
//! - the instance that claims the lease `billing:<slot>` runs the job; the
//!   lease is held with `hold_at_least` for the slot's length, so an instance
//!   that comes late (or after the job already finished) finds it taken and
//!   the slot runs once across the fleet;
//! - the job's own writes happen in one transaction that takes the
//!   transaction-scoped lock `billing:ledger` (released by COMMIT), so they
//!   never interleave with other writers of the ledger;
//! - its output is fenced with the lease's token: a holder paused past its
//!   lease cannot overwrite a later holder's result.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example scheduler
//! ```

use std::time::Duration;

use dblock::postgres::{lock_xact, Lease};
use dblock::Locks;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

const SLOT: Duration = Duration::from_millis(800);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    dblock::postgres::migrate(&admin).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS example_billing_runs (
             slot text PRIMARY KEY, instance int NOT NULL, fence bigint NOT NULL);
         CREATE TABLE IF NOT EXISTS example_ledger (slot text, amount int)",
    )
    .execute(&admin)
    .await?;
    // A run id keeps slots of earlier runs of this example apart.
    let run = chrono::Utc::now().timestamp_millis();

    let mut instances = Vec::new();
    for instance in 1..=3 {
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .connect(&url)
            .await?;
        instances.push(tokio::spawn(scheduler(instance, pool, run)));
    }
    for i in instances {
        i.await??;
    }

    let runs: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT slot, instance, fence FROM example_billing_runs WHERE slot LIKE $1 ORDER BY slot",
    )
    .bind(format!("{run}:%"))
    .fetch_all(&admin)
    .await?;
    for (slot, instance, fence) in &runs {
        println!("slot {slot} ran once, on instance {instance}, fenced with token {fence}");
    }
    assert_eq!(runs.len(), 5, "every slot ran exactly once");
    Ok(())
}

/// One instance: for each of 5 slots, try to claim it; run the job if won.
async fn scheduler(
    instance: i32,
    pool: PgPool,
    run: i64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let locks = Locks::new(Lease::new(pool.clone()));
    for n in 0..5 {
        let slot = format!("{run}:{n}");
        // Instances wake at slightly different moments, as real ones do.
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..150))).await;
        let claim = locks
            .acquire(format!("billing:{slot}"))
            .ttl(Duration::from_secs(10))
            .hold_at_least(SLOT)
            .wait(Duration::ZERO)
            .await;
        match claim {
            Ok(guard) => {
                run_job(&pool, instance, &slot, guard.token()).await?;
                // The job took less than the slot: the lease stays until the
                // slot is over, so a late instance does not run it again.
                guard.release().await?;
            }
            Err(dblock::Error::Timeout { .. }) => {
                println!("instance {instance}: slot {slot} already claimed, skipping");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(SLOT).await;
    }
    Ok(())
}

async fn run_job(
    pool: &PgPool,
    instance: i32,
    slot: &str,
    token: u64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut tx = pool.begin().await?;
    // Serialise the ledger's writers for the length of this transaction.
    lock_xact(&mut tx, "billing:ledger").await?;
    sqlx::query("INSERT INTO example_ledger VALUES ($1, 100)")
        .bind(slot)
        .execute(&mut *tx)
        .await?;
    // Fenced output: only a holder with a higher token may overwrite it.
    let written = sqlx::query(
        "INSERT INTO example_billing_runs AS r VALUES ($1, $2, $3)
         ON CONFLICT (slot) DO UPDATE SET instance = excluded.instance, fence = excluded.fence
          WHERE r.fence < excluded.fence",
    )
    .bind(slot)
    .bind(instance)
    .bind(token as i64)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    println!(
        "instance {instance}: ran slot {slot} with token {token} (output written: {})",
        written == 1
    );
    Ok(())
}
