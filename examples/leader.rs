//! Leader election: one active scheduler, the others waiting and
//! observing, and taking over when it dies.
//!
//! Three nodes, each with its own connections (as three processes would
//! have), campaign to lead `example:scheduler`. The leader runs the
//! scheduled jobs. The first leader "crashes" (its runtime is torn down
//! without resigning, as when its process is killed): the next node takes
//! over once the dead leader's lease runs out (at once on PostgreSQL
//! advisory locks, whose session dies with the process). The second leader
//! resigns after its jobs, and the third takes over at once. An observer
//! that never campaigns prints each change of leader. Ends by itself in
//! about five seconds.
//!
//! ```text
//! cargo run --example leader                              # embedded SQLite
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example leader
//! ```
//!
//! `DATABASE_URL` may also be `mysql://...` or `redis://...`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dblock::Locks;

const ELECTION: &str = "example:scheduler";
/// A dead leader is replaced within about this long.
const TTL: Duration = Duration::from_secs(2);

/// This node's own connections to the database of `DATABASE_URL`, or to an
/// embedded SQLite file.
async fn connect(sqlite: &PathBuf) -> dblock::Result<Locks> {
    let url = std::env::var("DATABASE_URL").ok();
    Ok(match url.as_deref() {
        Some(url) if url.starts_with("postgres") => {
            let pool = sqlx::PgPool::connect(url).await?;
            dblock::postgres::migrate(&pool).await?;
            Locks::new(dblock::postgres::Advisory::new(pool))
        }
        Some(url) if url.starts_with("mysql") || url.starts_with("mariadb") => {
            let pool = sqlx::MySqlPool::connect(url).await?;
            dblock::mysql::migrate(&pool).await?;
            Locks::new(dblock::mysql::Lease::new(pool))
        }
        Some(url) if url.starts_with("redis") => Locks::new(dblock::redis::Lease::open(url).await?),
        _ => Locks::new(dblock::sqlite::Lease::open(sqlite).await?),
    })
}

/// One node: campaigns, runs four jobs while it leads, then crashes (the
/// first leader) or resigns (the others).
fn node(id: usize, sqlite: PathBuf, wins: Arc<AtomicUsize>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let crashed = runtime.block_on(async {
            let locks = connect(&sqlite).await?;
            let election = locks.elect(ELECTION, format!("node-{id}"))?.ttl(TTL)?;
            let leader = election.campaign().await?;
            let first = wins.fetch_add(1, Ordering::SeqCst) == 0;
            println!("node-{id}: I lead (term {})", leader.term());
            for job in 1..=4 {
                tokio::select! {
                    // A leader that loses its lock stops at once.
                    _ = leader.lost() => {
                        println!("node-{id}: lost the leadership: {:?}", leader.lost_reason());
                        return Ok(None);
                    }
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {
                        println!("node-{id}: scheduled job {job} (term {})", leader.term());
                    }
                }
            }
            if first {
                println!("node-{id}: crashing without resigning");
                return Ok(Some(leader));
            }
            println!("node-{id}: resigning");
            leader.resign().await?;
            Ok::<_, dblock::Error>(None)
        });
        match crashed.expect("node failed") {
            Some(leader) => {
                // Like a killed process: no release, no more renewals.
                std::mem::forget(leader);
                runtime.shutdown_background();
            }
            None => drop(runtime),
        }
    })
}

#[tokio::main]
async fn main() -> dblock::Result<()> {
    let sqlite = std::env::temp_dir().join("dblock-leader-example.db");
    let locks = connect(&sqlite).await?;
    // An observer never campaigns; it only follows who leads.
    let mut leaders = locks
        .elect(ELECTION, "observer")?
        .ttl(TTL)?
        .observe()
        .await?;
    if let Some(leader) = &*leaders.borrow() {
        println!(
            "observer: {} leads from an earlier run; waiting",
            leader.identity
        );
    }

    let wins = Arc::new(AtomicUsize::new(0));
    let nodes: Vec<_> = (1..=3)
        .map(|id| node(id, sqlite.clone(), wins.clone()))
        .collect();
    let mut done = tokio::task::spawn_blocking(move || {
        nodes
            .into_iter()
            .for_each(|n| n.join().expect("node panicked"))
    });

    let mut terms = Vec::new();
    loop {
        tokio::select! {
            finished = &mut done => {
                finished.expect("nodes");
                break;
            }
            changed = leaders.changed() => {
                changed.expect("observer stopped");
                match &*leaders.borrow_and_update() {
                    Some(leader) => {
                        println!("observer: {} leads, term {}", leader.identity, leader.term);
                        terms.push(leader.term);
                    }
                    None => println!("observer: nobody leads"),
                }
            }
        }
    }
    assert_eq!(wins.load(Ordering::SeqCst), 3, "every node led once");
    assert!(
        !terms.is_empty() && terms.windows(2).all(|t| t[0] < t[1]),
        "terms {terms:?}"
    );
    println!("three leaders in turn; the observer saw terms {terms:?}");
    Ok(())
}
