//! dblock's metrics exported for Prometheus: a few acquisitions on an
//! embedded SQLite file (a granted one, a busy try, a timeout, a renewal
//! batch and a loss), then the scrape text printed once.
//!
//! ```text
//! cargo run --example prometheus --features metrics
//! ```
//!
//! A service would serve the same text on `/metrics` instead (the
//! exporter's `http-listener` feature does that).

use std::time::Duration;

use dblock::sqlite::Lease;
use dblock::Locks;
use metrics_exporter_prometheus::PrometheusBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    dblock::metrics::describe();

    let dir = std::env::temp_dir().join(format!("dblock-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let locks = Locks::new(Lease::open(dir.join("locks.db")).await?);

    // Granted, then busy and timed out while it is held.
    let guard = locks
        .acquire("reports:nightly")
        .ttl(Duration::from_millis(300))
        .await?;
    assert!(locks.try_acquire("reports:nightly").await?.is_none());
    let timeout = locks
        .acquire("reports:nightly")
        .wait(Duration::from_millis(50))
        .await;
    assert!(matches!(timeout, Err(dblock::Error::Timeout { .. })));

    // Held past a renewal (every ttl/3), then broken behind its back: the
    // next renewal finds it gone and the guard reports the loss.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(locks.force_release("reports:nightly").await?);
    tokio::time::timeout(Duration::from_secs(5), guard.lost()).await?;
    drop(guard);

    // A plain acquire-and-release.
    locks.acquire("reports:weekly").await?.release().await?;

    // Loss reports are counted by a task of their own: give it a moment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    print!("{}", prometheus.render());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
