//! Wake-ups across processes: a waiter whose polling is slowed far past
//! the bound (a pause of 10 s between two looks) is granted within a second
//! of a release made by a holder in ANOTHER process: this test binary, run
//! again as the ignored test `holder_process`.
//!
//! MySQL/MariaDB and SQLite wake through doorbells, PostgreSQL leases
//! through LISTEN/NOTIFY, Redis through pub/sub.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use dblock::{LeaseOptions, Locks};
use tokio::time::{sleep, timeout, Instant};

/// The holder process's backend (`mysql`, `sqlite`, `pglease`, `redis`).
const ROLE: &str = "DBLOCK_CROSS_HOLDER";
/// The name it holds.
const NAME: &str = "DBLOCK_CROSS_NAME";
/// The SQLite file, the Redis key prefix.
const WHERE: &str = "DBLOCK_CROSS_WHERE";

/// Polling far slower than the one-second bound the tests assert.
fn slow() -> LeaseOptions {
    LeaseOptions::default()
        .min_poll(Duration::from_secs(10))
        .max_poll(Duration::from_secs(10))
}

async fn backend(kind: &str, place: &str, options: LeaseOptions) -> Locks {
    match kind {
        "mysql" => {
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(4)
                .connect(&common::mysql_url().await)
                .await
                .expect("DBLOCK_TEST_MYSQL_URL reachable");
            dblock::mysql::migrate(&pool).await.unwrap();
            Locks::new(
                dblock::mysql::Lease::new(pool)
                    .with_options(options)
                    .unwrap(),
            )
        }
        "sqlite" => Locks::new(
            dblock::sqlite::Lease::open(place)
                .await
                .unwrap()
                .with_options(options)
                .unwrap(),
        ),
        "pglease" => {
            let pool = common::pg_pool(&common::postgres_url().await, 4).await;
            dblock::postgres::migrate(&pool).await.unwrap();
            Locks::new(
                dblock::postgres::Lease::new(pool)
                    .with_options(options)
                    .unwrap(),
            )
        }
        "redis" => Locks::new(
            dblock::redis::Lease::open(&common::redis_url())
                .await
                .expect("DBLOCK_TEST_REDIS_URL reachable")
                .with_prefix(place)
                .unwrap()
                .with_options(options)
                .unwrap(),
        ),
        other => panic!("unknown backend {other}"),
    }
}

/// The holder, in a process of its own: on `hold` (a line on stdin) takes
/// the name and prints `HELD <token>`; on `release` releases it and prints
/// `RELEASED`; ends with stdin. Run by the tests below, never on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the holder process of the cross-process tests; they run it"]
async fn holder_process() {
    let kind = std::env::var(ROLE).expect("run by the cross-process tests");
    let name = std::env::var(NAME).unwrap();
    let place = std::env::var(WHERE).unwrap();
    let locks = backend(&kind, &place, LeaseOptions::default()).await;
    let mut guard = None;
    for line in BufReader::new(std::io::stdin()).lines() {
        match line.unwrap().trim() {
            "hold" => {
                let g = locks
                    .acquire(&name)
                    .wait(Duration::from_secs(30))
                    .await
                    .unwrap();
                println!("HELD {}", g.token());
                guard = Some(g);
            }
            "release" => {
                guard.take().unwrap().release().await.unwrap();
                println!("RELEASED");
            }
            other => panic!("unknown order {other:?}"),
        }
        std::io::stdout().flush().unwrap();
    }
}

struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    /// The holder's stdout, line by line (read by a thread of its own).
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Holder {
    fn spawn(kind: &str, name: &str, place: &str) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "holder_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, kind)
            .env(NAME, name)
            .env(WHERE, place)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Holder {
            child,
            stdin,
            lines,
        }
    }

    /// What follows `marker` in the holder's next line that has it (the
    /// test harness may print its own text before it on the line).
    async fn expect(&mut self, marker: &'static str) -> String {
        loop {
            let line = self
                .lines
                .recv()
                .await
                .unwrap_or_else(|| panic!("the holder process ended before printing {marker}"));
            if let Some(at) = line.find(marker) {
                return line[at + marker.len()..].trim().to_owned();
            }
        }
    }

    fn order(&mut self, order: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{order}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // The holder exits when its stdin ends.
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < give_up {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three handoffs from a holder process to a waiter here that polls every
/// 10 s: each is granted within a second of the release.
async fn woken_across_processes(kind: &str, place: &str) {
    let name = common::unique(&format!("cross-{kind}"));
    let waiter = backend(kind, place, slow()).await;
    let mut holder = Holder::spawn(kind, &name, place);
    for round in 0..3 {
        holder.order("hold");
        let held: u64 = timeout(Duration::from_secs(60), holder.expect("HELD "))
            .await
            .expect("the holder process took the lock")
            .parse()
            .unwrap();
        let (w, n) = (waiter.clone(), name.clone());
        let waiting = tokio::spawn(async move {
            let g = w.acquire(&n).wait(Duration::from_secs(60)).await.unwrap();
            (Instant::now(), g)
        });
        // The waiter misses once, and waits (its next look is 5-10 s away).
        sleep(Duration::from_millis(500)).await;
        assert!(
            !waiting.is_finished(),
            "granted while the other process held it"
        );
        let released = Instant::now();
        holder.order("release");
        let (granted, guard) = timeout(Duration::from_secs(30), waiting)
            .await
            .expect("the waiter was granted at all")
            .unwrap();
        let after = granted - released;
        eprintln!("{kind} round {round}: granted {after:?} after the release was asked for");
        assert!(
            after < Duration::from_secs(1),
            "{kind}: a waiter in another process was granted {after:?} after the release \
             (its poll is 10 s: the release did not wake it)"
        );
        assert!(
            guard.token() > held,
            "fencing tokens increase across processes"
        );
        holder.expect("RELEASED").await;
        guard.release().await.unwrap();
    }
}

/// The MySQL tests count the doorbell connections of the test database:
/// one at a time.
static MYSQL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_waiter_woken_by_a_release_in_another_process() {
    let _one_at_a_time = MYSQL.lock().await;
    woken_across_processes("mysql", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_waiter_woken_by_a_release_in_another_process() {
    let dir: PathBuf = std::env::temp_dir().join(common::unique("dblock-cross"));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("locks.db");
    woken_across_processes("sqlite", db.to_str().unwrap()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_lease_waiter_woken_by_a_release_in_another_process() {
    woken_across_processes("pglease", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_waiter_woken_by_a_release_in_another_process() {
    let prefix = common::unique("dblock-cross:");
    woken_across_processes("redis", &prefix).await;
}

/// MySQL doorbells stay bounded: 8 names waited on at once get at most 4
/// watching connections (outside the pool: a pool of 2 still answers), and
/// every waiter is granted, the unwatched ones by their poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_doorbell_watches_are_capped() {
    let _one_at_a_time = MYSQL.lock().await;
    let url = common::mysql_url().await;
    let pool = |max| {
        sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(max)
            .connect(&url)
    };
    let holder_pool = pool(4).await.expect("DBLOCK_TEST_MYSQL_URL reachable");
    dblock::mysql::migrate(&holder_pool).await.unwrap();
    let holder = Locks::new(dblock::mysql::Lease::new(holder_pool));
    let waiter_pool = pool(2).await.unwrap();
    let waiter = Locks::new(
        dblock::mysql::Lease::new(waiter_pool.clone())
            .with_options(
                LeaseOptions::default()
                    .min_poll(Duration::from_secs(3))
                    .max_poll(Duration::from_secs(3)),
            )
            .unwrap(),
    );
    // The watches of a test that just ended linger for a second.
    let watching = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM information_schema.processlist \
              WHERE db = DATABASE() AND info LIKE '%IS_USED_LOCK%' \
                AND info NOT LIKE '%processlist%'",
        )
        .fetch_one(&waiter_pool)
        .await
        .unwrap()
    };
    let quiet_by = Instant::now() + Duration::from_secs(10);
    while watching().await > 0 && Instant::now() < quiet_by {
        sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<String> = (0..8).map(|i| common::unique(&format!("cap{i}"))).collect();
    let mut guards = Vec::new();
    for n in &names {
        guards.push(holder.acquire(n).await.unwrap());
    }
    let waiting: Vec<_> = names
        .iter()
        .map(|n| {
            let (w, n) = (waiter.clone(), n.clone());
            tokio::spawn(async move { w.acquire(&n).wait(Duration::from_secs(30)).await })
        })
        .collect();
    sleep(Duration::from_millis(1500)).await;
    let watching = watching().await;
    assert!(
        (1..=4).contains(&watching),
        "{watching} connections wait on doorbells (expected 1 to 4)"
    );
    let answered = timeout(
        Duration::from_secs(1),
        sqlx::query_scalar::<_, i64>("SELECT 1").fetch_one(&waiter_pool),
    )
    .await;
    assert!(
        matches!(answered, Ok(Ok(1))),
        "the waiters' pool answers an unrelated query"
    );
    let released = Instant::now();
    for g in guards {
        g.release().await.unwrap();
    }
    for w in waiting {
        let g = timeout(Duration::from_secs(20), w)
            .await
            .expect("every waiter is granted")
            .unwrap()
            .unwrap();
        g.release().await.unwrap();
    }
    assert!(
        released.elapsed() < Duration::from_secs(10),
        "waiters past the cap are granted by their 3 s poll"
    );
}
