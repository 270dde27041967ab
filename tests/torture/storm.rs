//! The cancellation storm: 10,000 acquisitions dropped at random points,
//! spread over the backends, then checks that nothing is held, the pools
//! still serve, and no connection is stuck in a transaction.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::{sleep, timeout};

use crate::check::thousands;
use crate::proxy::Proxy;
use crate::target::{lease_ttl, Db, Endpoint, Kind};
use crate::{authority, direct, eventually, run_id};

/// A session holding a leaked advisory lock: pid, state, application, last query, granted.
type HolderRow = (i32, Option<String>, Option<String>, Option<String>, bool);

/// Acquisitions cancelled in all, across the backends.
const TOTAL: usize = 10_000;
const TASKS: usize = 16;
const NAMES: usize = 4;

pub async fn run(kinds: &[Kind]) -> bool {
    let per_backend = TOTAL.div_ceil(kinds.len().max(1));
    let mut ok = true;
    for &kind in kinds {
        ok &= one(kind, per_backend).await;
    }
    ok
}

#[derive(Default)]
struct Counts {
    granted: AtomicUsize,
    cancelled: AtomicUsize,
    timeouts: AtomicUsize,
    errors: AtomicUsize,
    dropped_held: AtomicUsize,
    cancelled_release: AtomicUsize,
}

async fn one(kind: Kind, total: usize) -> bool {
    let run = run_id();
    let dir = std::env::temp_dir().join(format!("dblock-storm-{run}"));
    std::fs::create_dir_all(&dir).unwrap();
    let app = format!("dblock-torture-storm-{run}");
    let ctl = direct(kind, &dir, &format!("dblock-torture-ctl-{run}")).await;
    let ctl_db = ctl.pool(2).await;
    ctl_db.migrate().await;
    let ctl_locks = ctl.locks().await;
    // The storm's connections go through a proxy slot, so that the server
    // side of each is known (MySQL shows no application name).
    let proxy = if kind.networked() {
        let (hostport, with_port) = authority(&ctl.url);
        let upstream = tokio::net::lookup_host(hostport.as_str())
            .await
            .unwrap()
            .find(|a| a.is_ipv4())
            .unwrap();
        let p = Proxy::start(1, &[upstream]).await;
        let url = with_port(p.port(0));
        Some((p, url))
    } else {
        None
    };
    let endpoint = Endpoint {
        kind,
        url: proxy.as_ref().map_or(ctl.url.clone(), |(_, u)| u.clone()),
        app: app.clone(),
    };
    let locks = endpoint.locks().await;
    let names: Vec<String> = (0..NAMES)
        .map(|i| format!("storm:{run}:{}:{i}", kind.label()))
        .collect();
    let counts = Arc::new(Counts::default());
    let left = Arc::new(AtomicUsize::new(total));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (locks, names, counts, left) =
            (locks.clone(), names.clone(), counts.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let (name, cut, wait, style) = {
                    let mut r = rand::rng();
                    (
                        names[r.random_range(0..names.len())].clone(),
                        // Log-uniform from 20 µs to 200 ms: every stage of an
                        // acquisition gets its share of cancellations.
                        Duration::from_micros((20.0f64 * 10_000f64.powf(r.random::<f64>())) as u64),
                        Duration::from_millis(r.random_range(0..40)),
                        r.random_range(0..4u8),
                    )
                };
                let acquire =
                    lease_ttl(locks.acquire(&name), kind, Duration::from_secs(2)).wait(wait);
                let outcome = if style == 0 {
                    // select! against a random sleep
                    tokio::select! {
                        r = acquire => Some(r),
                        _ = sleep(cut) => None,
                    }
                } else {
                    timeout(cut, acquire).await.ok()
                };
                match outcome {
                    None => {
                        counts.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Err(dblock::Error::Timeout { .. })) => {
                        counts.timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Err(_)) => {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(guard)) => {
                        counts.granted.fetch_add(1, Ordering::Relaxed);
                        let (nap, c) = {
                            let mut r = rand::rng();
                            (
                                Duration::from_micros(r.random_range(0..2000)),
                                Duration::from_micros(r.random_range(0..1500)),
                            )
                        };
                        sleep(nap).await;
                        match style {
                            1 => {
                                counts.dropped_held.fetch_add(1, Ordering::Relaxed);
                                drop(guard);
                            }
                            2 => {
                                if timeout(c, guard.release()).await.is_err() {
                                    counts.cancelled_release.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            _ => {
                                let _ = guard.release().await;
                            }
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("storm task");
    }
    let mut problems = Vec::new();
    let keys: Vec<i64> = names.iter().map(|n| dblock::advisory_key(n)).collect();
    let held = || async {
        let mut n = 0;
        for name in &names {
            if ctl_locks.inspect(name).await.expect("inspect").is_some() {
                n += 1;
            }
        }
        n + ctl_db.advisory_held(&keys).await
    };
    // Background releases finish promptly; a lease whose release was lost
    // with a cancelled future would show until its ttl (2 s) runs out,
    // which is why this waits at most 1 s: that would be a leak.
    if !eventually(Duration::from_secs(1), || async { held().await == 0 }).await {
        problems.push(format!("{} locks still held after the storm", held().await));
        if let Db::Pg(pool) = &ctl_db {
            let rows: Vec<HolderRow> = sqlx::query_as(
                "SELECT l.pid, a.state, a.application_name, a.query, l.granted FROM pg_locks l
                   LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                  WHERE l.locktype = 'advisory' AND ((l.classid::bigint << 32) | l.objid::bigint) = ANY($1)",
            )
            .bind(&keys)
            .fetch_all(pool)
            .await
            .unwrap_or_default();
            for r in rows {
                println!("  holder session: {r:?}");
            }
        }
    }
    let ports = proxy
        .as_ref()
        .map(|(p, _)| p.upstream_ports(0))
        .unwrap_or_default();
    let open = ctl_db.open_transactions(&app, &ports).await;
    if open > 0 {
        problems.push(format!(
            "{open} storm connections left inside a transaction"
        ));
    }
    if let Db::Lite(pool) = &ctl_db {
        // Nobody holds the file's write lock.
        let mut c = pool.acquire().await.unwrap();
        let took = timeout(Duration::from_secs(2), async {
            sqlx::query("BEGIN IMMEDIATE").execute(&mut *c).await?;
            sqlx::query("ROLLBACK").execute(&mut *c).await
        })
        .await;
        if !matches!(took, Ok(Ok(_))) {
            problems.push(format!(
                "the SQLite file's write lock is held after the storm: {took:?}"
            ));
        }
    }
    // The pool serves new work: every name can be taken and released.
    for name in &names {
        let r = timeout(Duration::from_secs(10), async {
            let g = lease_ttl(locks.acquire(name), kind, Duration::from_secs(2))
                .wait(Duration::from_secs(5))
                .await?;
            g.release().await
        })
        .await;
        if !matches!(r, Ok(Ok(()))) {
            problems.push(format!("{name} could not be taken after the storm: {r:?}"));
        }
    }
    let line = format!(
        "cancellation storm {}: {} acquisitions cancelled or raced ({} cancelled mid-acquire, {} granted: \
         {} dropped, {} releases cancelled; {} timeouts, {} errors), {} locks left held, {} connections in a transaction",
        kind.label(),
        thousands(total),
        thousands(counts.cancelled.load(Ordering::Relaxed)),
        thousands(counts.granted.load(Ordering::Relaxed)),
        thousands(counts.dropped_held.load(Ordering::Relaxed)),
        thousands(counts.cancelled_release.load(Ordering::Relaxed)),
        thousands(counts.timeouts.load(Ordering::Relaxed)),
        thousands(counts.errors.load(Ordering::Relaxed)),
        if problems.iter().any(|p| p.contains("still held")) { "some" } else { "0" },
        open
    );
    println!("{line}");
    if counts.cancelled.load(Ordering::Relaxed) < total / 4 {
        problems.push(
            "fewer than a quarter of the acquisitions were cancelled: the storm is too gentle"
                .into(),
        );
    }
    for p in &problems {
        println!("  VIOLATION storm {}: {p}", kind.label());
    }
    let _ = std::fs::remove_dir_all(&dir);
    problems.is_empty()
}
