//! Job scheduling across several instances, with `dblock::schedule`.
//!
//! Three scheduler instances (each with its own connection pool, as three
//! processes would have) run the same job every second. For each slot:
//!
//! - the scheduler claims the lease `schedule:billing@<slot>` for exactly
//!   one instance, by the database clock, and keeps it past the slot, so an
//!   instance that comes late finds the slot taken and it runs once across
//!   the fleet;
//! - the job's own writes happen in one transaction that takes the
//!   transaction-scoped lock `billing:ledger` (released by COMMIT), so they
//!   never interleave with other writers of the ledger;
//! - its output is fenced with the slot lease's token: a holder paused past
//!   its lease cannot overwrite a later holder's result.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example scheduler
//! ```

use std::time::Duration;

use dblock::postgres::{lock_in_transaction, Lease};
use dblock::schedule::{Job, Schedule, Slot};
use dblock::{LockGuard, Locks};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
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
    // A job name per run of this example keeps its slots apart from earlier
    // runs'.
    let job_name = format!("billing:{}", chrono::Utc::now().timestamp_millis());
    let began = Locks::new(Lease::new(admin.clone())).now().await?;

    let mut instances = Vec::new();
    for instance in 1..=3 {
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .connect(&url)
            .await?;
        let locks = Locks::new(Lease::new(pool.clone()));
        let job = Job::new(
            job_name.clone(),
            Schedule::every(Duration::from_secs(1))?,
            move |slot: Slot, guard: LockGuard| run_job(pool.clone(), instance, slot, guard),
        )
        .max_run_time(Duration::from_secs(5))
        .on_outcome(move |outcome| println!("instance {instance}: {outcome}"));
        // Each instance runs the schedule for 5.5 s, then stops.
        instances.push(tokio::spawn(async move {
            job.run_until(&locks, tokio::time::sleep(Duration::from_millis(5500)))
                .await
        }));
    }
    for i in instances {
        i.await??;
    }

    let runs: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT slot, instance, fence FROM example_billing_runs WHERE slot LIKE $1 ORDER BY slot",
    )
    .bind(format!("{job_name}@%"))
    .fetch_all(&admin)
    .await?;
    for (slot, instance, fence) in &runs {
        println!("{slot} ran once, on instance {instance}, fenced with token {fence}");
    }
    let mut slots: Vec<&str> = runs.iter().map(|(s, _, _)| s.as_str()).collect();
    slots.dedup();
    assert_eq!(slots.len(), runs.len(), "no slot ran twice");
    // The first slot may have started before the instances; every later
    // one within the 5.5 s ran.
    assert!(
        runs.len() >= 4,
        "the 4 slots wholly inside the 5.5 s ran: {} runs since {began}",
        runs.len()
    );
    Ok(())
}

/// The job: one ledger entry and one fenced result row per slot.
async fn run_job(
    pool: PgPool,
    instance: i32,
    slot: Slot,
    guard: LockGuard,
) -> Result<(), BoxError> {
    let key = format!("{}@{}", slot.job(), slot.rfc3339());
    let mut tx = pool.begin().await?;
    // Serialise the ledger's writers for the length of this transaction.
    lock_in_transaction(&mut tx, "billing:ledger").await?;
    sqlx::query("INSERT INTO example_ledger VALUES ($1, 100)")
        .bind(&key)
        .execute(&mut *tx)
        .await?;
    // Fenced output: only a holder with a higher token may overwrite it.
    sqlx::query(
        "INSERT INTO example_billing_runs AS r VALUES ($1, $2, $3)
         ON CONFLICT (slot) DO UPDATE SET instance = excluded.instance, fence = excluded.fence
          WHERE r.fence < excluded.fence",
    )
    .bind(&key)
    .bind(instance)
    .bind(guard.token() as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    // The slot's lease stays until after the next slot anyway (the
    // scheduler asked for it): releasing only ends the renewal.
    guard.release().await?;
    Ok(())
}
