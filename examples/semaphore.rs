//! At most 3 concurrent exports per tenant: each export job takes a permit
//! of the tenant's semaphore (`max_holders(3)`) before it runs, however
//! many jobs are started, and in however many processes.
//!
//! ```text
//! cargo run --example semaphore                     # an embedded SQLite file
//! DATABASE_URL=postgres://postgres@127.0.0.1/db cargo run --example semaphore
//! # the same on PostgreSQL advisory locks (permits live with their session):
//! ADVISORY=1 DATABASE_URL=postgres://postgres@127.0.0.1/db cargo run --example semaphore
//! DATABASE_URL=mysql://root@127.0.0.1/db cargo run --example semaphore
//! DATABASE_URL=redis://127.0.0.1:6379/0 cargo run --example semaphore
//! ```
//!
//! It exits with an error if a tenant ever had more than 3 exports running.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dblock::{Locks, Result};

/// Exports of one tenant that may run at once.
const PER_TENANT: u32 = 3;

#[tokio::main]
async fn main() -> Result<()> {
    let locks = connect().await?;
    let mut jobs = Vec::new();
    for tenant in 1..=2 {
        let running = Arc::new(AtomicU32::new(0));
        let most = Arc::new(AtomicU32::new(0));
        for job in 1..=8 {
            let (locks, running, most) = (locks.clone(), running.clone(), most.clone());
            jobs.push(tokio::spawn(async move {
                let permit = locks
                    .acquire(format!("export:tenant-{tenant}"))
                    .max_holders(PER_TENANT)
                    .wait(Duration::from_secs(60))
                    .await?;
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                println!(
                    "tenant {tenant}: export {job} runs ({now} of at most {PER_TENANT}), token {}",
                    permit.token()
                );
                // The export: pass permit.token() to what it writes.
                tokio::time::sleep(Duration::from_millis(200)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                permit.release().await?;
                Ok::<u32, dblock::Error>(most.load(Ordering::SeqCst))
            }));
        }
    }
    let mut most = 0;
    for job in jobs {
        most = most.max(job.await.expect("an export job panicked")?);
    }
    println!("at most {most} exports of one tenant ran at once");
    if most > PER_TENANT {
        return Err(dblock::Error::InvalidOption(format!(
            "{most} exports of one tenant ran at once, more than {PER_TENANT}"
        )));
    }
    Ok(())
}

/// The backend named by `DATABASE_URL`, or an embedded SQLite file.
async fn connect() -> Result<Locks> {
    let url = std::env::var("DATABASE_URL").unwrap_or_default();
    Ok(match url.split(':').next().unwrap_or_default() {
        "postgres" | "postgresql" => {
            let pool = sqlx::PgPool::connect(&url).await?;
            dblock::postgres::migrate(&pool).await?;
            if std::env::var_os("ADVISORY").is_some_and(|v| v == "1") {
                Locks::new(dblock::postgres::Advisory::new(pool))
            } else {
                Locks::new(dblock::postgres::Lease::new(pool))
            }
        }
        "mysql" | "mariadb" => {
            let pool = sqlx::MySqlPool::connect(&url.replacen("mariadb:", "mysql:", 1)).await?;
            dblock::mysql::migrate(&pool).await?;
            Locks::new(dblock::mysql::Lease::new(pool))
        }
        "redis" | "rediss" => Locks::new(dblock::redis::Lease::open(&url).await?),
        "sqlite" => {
            let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
            Locks::new(dblock::sqlite::Lease::open(path).await?)
        }
        "" => {
            let path = std::env::temp_dir().join("dblock-semaphore.db");
            Locks::new(dblock::sqlite::Lease::open(&path).await?)
        }
        other => {
            return Err(dblock::Error::InvalidOption(format!(
                "DATABASE_URL: unknown scheme {other:?} (postgres, mysql, mariadb, redis, sqlite)"
            )))
        }
    })
}
