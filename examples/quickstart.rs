//! Several workers contend for one lock on an embedded SQLite file (no
//! server, no set-up) and report who held it, with which fencing token.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::time::Duration;

use dblock::sqlite::Lease;
use dblock::Locks;

#[tokio::main]
async fn main() -> dblock::Result<()> {
    // Opens (or creates) the file and its schema.
    let path = std::env::temp_dir().join("dblock-quickstart.db");
    let locks = Locks::new(Lease::open(&path).await?);

    let mut workers = Vec::new();
    for worker in 1..=4 {
        let locks = locks.clone();
        workers.push(tokio::spawn(async move {
            for round in 1..=2 {
                let guard = locks
                    .acquire("reports:nightly")
                    .ttl(Duration::from_secs(10))
                    .wait(Duration::from_secs(30))
                    .await?;
                println!(
                    "worker {worker} holds {:?} (round {round}) with token {}, lease until {}",
                    guard.name(),
                    guard.token(),
                    guard
                        .expires_at()
                        .expect("a lease has an expiry")
                        .format("%H:%M:%S%.3f"),
                );
                // The critical section: only one worker is ever here.
                tokio::time::sleep(Duration::from_millis(100)).await;
                guard.release().await?;
            }
            Ok::<(), dblock::Error>(())
        }));
    }
    for w in workers {
        w.await.expect("worker panicked")?;
    }

    // Nothing is held any more; the next holder's token is higher still.
    assert!(locks.inspect("reports:nightly").await?.is_none());
    let guard = locks.try_acquire("reports:nightly").await?.expect("free");
    println!(
        "afterwards: free; the next holder gets token {}",
        guard.token()
    );
    // Release explicitly: a guard merely dropped as the runtime shuts down
    // leaves its lease to run out by its ttl.
    guard.release().await?;
    println!("(lock file: {})", path.display());
    Ok(())
}
