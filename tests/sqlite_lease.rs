//! `dblock::sqlite::Lease` on temporary database files.
#![cfg(feature = "sqlite")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TempDir;
use dblock::sqlite::Lease;
use dblock::{Error, LeaseOptions, Locks};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::SqlitePool;
use tokio::time::{sleep, timeout, Instant};

async fn open(path: &Path) -> Locks {
    Locks::new(Lease::open(path).await.expect("open"))
}

/// The schema versions `migrate` recorded.
async fn versions(pool: &SqlitePool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM dblock_schema_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// SQLite's clock in microseconds, as the lease table stores it.
async fn db_now(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar(
        "SELECT CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn open_on_a_fresh_path_needs_no_setup() {
    let dir = TempDir::new("sqlite-fresh");
    let path = dir.db();
    assert!(!path.exists());
    let lease = Lease::open(&path).await.unwrap();
    assert!(path.exists());
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(lease.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    // migrate is idempotent: open already ran it, and so may anyone again.
    dblock::sqlite::migrate(lease.pool()).await.unwrap();
    assert_eq!(versions(lease.pool()).await, [1, 2, 3, 4]);

    let locks = Locks::new(lease);
    let guard = locks.acquire("jobs:nightly").await.unwrap();
    assert_eq!(guard.token(), 1);
    assert!(guard.expires_at().is_some());
    guard.release().await.unwrap();
}

#[tokio::test]
async fn open_refuses_private_databases() {
    for path in ["", ":memory:"] {
        let err = Lease::open(path).await.unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "{path:?}: {err:?}");
    }
}

#[tokio::test]
async fn racing_opens_of_one_fresh_file_all_succeed() {
    let dir = TempDir::new("sqlite-open-race");
    let path = dir.db();
    let opens: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move { Lease::open(path).await })
        })
        .collect();
    for open in opens {
        open.await.unwrap().expect("every racing open succeeds");
    }
}

#[tokio::test]
async fn acquire_try_timeout_release_inspect() {
    let dir = TempDir::new("sqlite-basic");
    let locks = open(&dir.db()).await;
    let name = "reports:nightly";

    let guard = locks
        .acquire(name)
        .ttl(Duration::from_secs(10))
        .await
        .unwrap();
    let left = guard.expires_at().unwrap() - chrono::Utc::now();
    assert!(
        left > chrono::Duration::seconds(8) && left <= chrono::Duration::seconds(11),
        "{left}"
    );
    assert!(locks.try_acquire(name).await.unwrap().is_none());
    let started = Instant::now();
    let err = locks
        .acquire(name)
        .wait(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    let info = locks.inspect(name).await.unwrap().expect("held");
    assert_eq!(info.token, Some(guard.token()));
    assert!(info.holder.ends_with(&format!(":{}", std::process::id())));
    assert!(info.acquired_at.unwrap() < info.expires_at.unwrap());
    let other = locks.acquire("another").await.unwrap();
    let listed: Vec<_> = locks
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name.unwrap())
        .collect();
    assert_eq!(listed, ["another", name]);
    drop(other);

    guard.release().await.unwrap();
    assert!(locks.inspect(name).await.unwrap().is_none());
    assert!(locks.try_acquire(name).await.unwrap().is_some());
    // Readers are leases too (the suite covers them in depth).
    let reader = locks.acquire("x").shared().await.unwrap();
    assert_eq!(reader.mode(), dblock::LockMode::Shared);
    reader.release().await.unwrap();
}

#[tokio::test]
async fn tokens_increase_and_survive_reopening() {
    let dir = TempDir::new("sqlite-tokens");
    let mut last = 0;
    {
        let locks = open(&dir.db()).await;
        for _ in 0..3 {
            let g = locks.acquire("t").await.unwrap();
            assert!(g.token() > last);
            last = g.token();
            g.release().await.unwrap();
        }
    }
    let locks = open(&dir.db()).await;
    let g = locks.acquire("t").await.unwrap();
    assert!(g.token() > last, "{} after {last}", g.token());
    assert_eq!(g.token(), 4);
}

/// A holder whose process dies: its runtime (and keeper task) is torn down
/// without a release.
fn die_holding(path: PathBuf, name: &'static str, ttl: Duration) -> u64 {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let token = runtime.block_on(async {
            let locks = open(&path).await;
            let guard = locks.acquire(name).ttl(ttl).await.unwrap();
            let token = guard.token();
            std::mem::forget(guard);
            token
        });
        drop(runtime);
        token
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn a_dead_holders_lease_is_taken_over_after_its_ttl() {
    let dir = TempDir::new("sqlite-dead");
    let dead = die_holding(dir.db(), "dead", Duration::from_millis(1500));
    let locks = open(&dir.db()).await;
    let before = locks.inspect("dead").await.unwrap().expect("still leased");
    assert_eq!(before.token, Some(dead));
    assert!(locks.try_acquire("dead").await.unwrap().is_none());

    let guard = locks
        .acquire("dead")
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(guard.token() > dead);
    let after = locks.inspect("dead").await.unwrap().unwrap();
    assert!(after.acquired_at.unwrap() >= before.expires_at.unwrap());
}

#[tokio::test]
async fn a_stale_holder_can_neither_release_nor_extend_the_next_lease() {
    let dir = TempDir::new("sqlite-stale");
    let a_lease = Lease::open(dir.db()).await.unwrap();
    let pool = a_lease.pool().clone();
    let a = Locks::new(a_lease);
    let b = open(&dir.db()).await;

    let stale = a.acquire("s").ttl(Duration::from_secs(60)).await.unwrap();
    // A pauses past its lease: the file's clock lets it run out.
    sqlx::query("UPDATE dblock_leases SET expires_at = 0 WHERE name = 's'")
        .execute(&pool)
        .await
        .unwrap();
    let next = b
        .acquire("s")
        .ttl(Duration::from_secs(60))
        .wait(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(next.token() > stale.token());

    let err = stale.extend(Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err:?}");
    let err = stale.release().await.unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err:?}");

    assert_eq!(
        b.inspect("s").await.unwrap().expect("still B's").token,
        Some(next.token())
    );
    assert!(b.try_acquire("s").await.unwrap().is_none());
    assert!(next
        .extend(Duration::from_secs(30))
        .await
        .unwrap()
        .is_some());
    next.release().await.unwrap();
}

#[tokio::test]
async fn thirty_two_racers_in_four_backends_one_winner() {
    let dir = TempDir::new("sqlite-race");
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(open(&dir.db()).await);
    }
    for round in 0..3 {
        let name = format!("race-{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let locks = backends[i % 4].clone();
                let (name, barrier) = (name.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    locks.try_acquire(name).await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            if let Some(g) = task.await.unwrap().expect("no error in the race") {
                winners.push(g);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}");
    }
}

/// Writers that give up on the file lock at once: every busy moment comes
/// back as `SQLITE_BUSY`, which dblock must absorb, and mutual exclusion must
/// hold throughout.
#[tokio::test]
async fn busy_files_do_not_surface_errors_or_break_exclusion() {
    let dir = TempDir::new("sqlite-busy");
    Lease::open(dir.db()).await.unwrap();
    let inside = Arc::new(AtomicBool::new(false));
    let entries = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..6 {
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(dir.db())
                    .busy_timeout(Duration::ZERO),
            )
            .await
            .unwrap();
        let locks = Locks::new(Lease::new(pool));
        let (inside, entries) = (inside.clone(), entries.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..10 {
                let guard = locks
                    .acquire("busy")
                    .wait(Duration::from_secs(30))
                    .await
                    .expect("no SQLITE_BUSY reaches the caller");
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                entries.fetch_add(1, Ordering::SeqCst);
                sleep(Duration::from_millis(2)).await;
                inside.store(false, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(entries.load(Ordering::SeqCst), 60);
}

#[tokio::test]
async fn hold_at_least_keeps_the_lease_after_release() {
    let dir = TempDir::new("sqlite-hold");
    let locks = open(&dir.db()).await;
    let guard = locks
        .acquire("h")
        .hold_at_least(Duration::from_secs(2))
        .await
        .unwrap();
    let acquired_at = locks
        .inspect("h")
        .await
        .unwrap()
        .unwrap()
        .acquired_at
        .unwrap();
    guard.release().await.unwrap();

    assert!(locks.try_acquire("h").await.unwrap().is_none());
    let info = locks.inspect("h").await.unwrap().expect("kept");
    assert_eq!(
        info.expires_at,
        Some(acquired_at + chrono::Duration::seconds(2))
    );
    let next = locks
        .acquire("h")
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    let next_at = locks
        .inspect("h")
        .await
        .unwrap()
        .unwrap()
        .acquired_at
        .unwrap();
    assert!(next_at >= acquired_at + chrono::Duration::seconds(2));
    next.release().await.unwrap();

    let guard = locks
        .acquire("h-past")
        .hold_at_least(Duration::from_millis(200))
        .await
        .unwrap();
    sleep(Duration::from_millis(400)).await;
    guard.release().await.unwrap();
    assert!(locks.try_acquire("h-past").await.unwrap().is_some());
}

#[tokio::test]
async fn lost_fires_when_the_lease_is_broken() {
    let dir = TempDir::new("sqlite-broken");
    let locks = open(&dir.db()).await;
    let operator = open(&dir.db()).await;
    let guard = locks
        .acquire("b")
        .ttl(Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(operator.force_release("b").await.unwrap());
    assert!(!operator.force_release("b").await.unwrap());
    timeout(Duration::from_millis(1500), guard.lost())
        .await
        .expect("lost() resolves after the next renewal");
    assert!(matches!(guard.release().await, Err(Error::Lost { .. })));
}

#[tokio::test]
async fn lost_fires_before_the_file_expires_the_lease() {
    let dir = TempDir::new("sqlite-closed");
    let lease = Lease::open(dir.db()).await.unwrap();
    let doomed = lease.pool().clone();
    let observer = Lease::open(dir.db()).await.unwrap().pool().clone();
    let locks = Locks::new(lease);
    let guard = locks
        .acquire("c")
        .ttl(Duration::from_secs(2))
        .await
        .unwrap();
    doomed.close().await;
    timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("lost() resolves at the local deadline");
    let expires_at: i64 =
        sqlx::query_scalar("SELECT expires_at FROM dblock_leases WHERE name = 'c'")
            .fetch_one(&observer)
            .await
            .unwrap();
    let now = db_now(&observer).await;
    assert!(
        expires_at > now,
        "lost only at {now}, lease ran out at {expires_at}"
    );
}

#[tokio::test]
async fn two_opens_of_one_file_exclude_each_other_and_hand_over_at_once() {
    let dir = TempDir::new("sqlite-two");
    let slow = LeaseOptions::default()
        .min_poll(Duration::from_secs(5))
        .max_poll(Duration::from_secs(5));
    let a = Locks::new(Lease::open(dir.db()).await.unwrap());
    let b = Locks::new(
        Lease::open(dir.db())
            .await
            .unwrap()
            .with_options(slow)
            .unwrap(),
    );
    let guard = a.acquire("one").await.unwrap();
    assert!(b.try_acquire("one").await.unwrap().is_none());
    let err = b
        .acquire("one")
        .wait(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }));

    let waiter = tokio::spawn(async move {
        let g = b.acquire("one").await.unwrap();
        (Instant::now(), g.token())
    });
    sleep(Duration::from_millis(500)).await;
    let released = Instant::now();
    let token = guard.token();
    guard.release().await.unwrap();
    let (granted, next) = waiter.await.unwrap();
    assert!(next > token);
    // B polls every 5 s; the release in A woke it.
    assert!(granted - released < Duration::from_millis(750));
}

#[tokio::test]
async fn a_missing_table_reports_schema_missing() {
    let dir = TempDir::new("sqlite-missing");
    let lease = Lease::open(dir.db())
        .await
        .unwrap()
        .with_table("dblock_missing_xyz")
        .unwrap();
    let locks = Locks::new(lease);
    for err in [
        locks.try_acquire("m").await.map(|_| ()).unwrap_err(),
        locks.inspect("m").await.map(|_| ()).unwrap_err(),
        locks.list().await.map(|_| ()).unwrap_err(),
    ] {
        match err {
            Error::SchemaMissing { migrate, dir } => {
                assert_eq!(migrate, "dblock::sqlite::migrate(&pool)");
                assert_eq!(dir, "sqlite");
            }
            other => panic!("{other:?}"),
        }
    }
    // Lease::new on a pool that was never migrated says the same.
    let pool = SqlitePoolOptions::new()
        .connect_with(
            SqliteConnectOptions::new()
                .filename(dir.0.join("bare.db"))
                .create_if_missing(true),
        )
        .await
        .unwrap();
    let err = Locks::new(Lease::new(pool.clone()))
        .try_acquire("m")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SchemaMissing { .. }), "{err:?}");
    dblock::sqlite::migrate(&pool).await.unwrap();
    assert!(Locks::new(Lease::new(pool))
        .try_acquire("m")
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn with_table_rejects_injection_and_quotes_identifiers() {
    let dir = TempDir::new("sqlite-table");
    let lease = Lease::open(dir.db()).await.unwrap();
    for bad in [
        "dblock_leases; DROP TABLE dblock_leases",
        "dblock_leases --",
        "\"dblock_leases\"",
        "a.b.c",
        "",
    ] {
        let err = lease.clone().with_table(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "{bad:?}: {err:?}");
    }
    sqlx::raw_sql(
        "CREATE TABLE \"Custom\" (name TEXT PRIMARY KEY NOT NULL, owner TEXT, holder TEXT,
            mode TEXT NOT NULL DEFAULT 'x', token INTEGER NOT NULL,
            acquired_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
            writer_waiting_until INTEGER) WITHOUT ROWID",
    )
    .execute(lease.pool())
    .await
    .unwrap();
    let custom = Locks::new(lease.clone().with_table("main.Custom").unwrap());
    let default = Locks::new(lease);
    let guard = custom.acquire("c").await.unwrap();
    assert!(custom.try_acquire("c").await.unwrap().is_none());
    assert!(default.inspect("c").await.unwrap().is_none());
    guard.release().await.unwrap();
}

// ---- The behavioural suite on an SQLite file. ----

/// Acquisitions cancelled while they wait for a pooled connection claim
/// nothing once they get one (see the PostgreSQL test of the same name).
#[tokio::test]
async fn acquisitions_cancelled_while_waiting_for_a_connection_claim_nothing() {
    let dir = TempDir::new("sqlite-queued-cancel");
    drop(open(&dir.db()).await); // creates the file and its table
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::new().filename(dir.db()))
        .await
        .unwrap();
    let locks = Locks::new(Lease::new(pool.clone()));
    let busy = pool.acquire().await.unwrap();
    for i in 0..10 {
        assert!(timeout(
            Duration::from_millis(20),
            locks.acquire(format!("queued:{i}"))
        )
        .await
        .is_err());
    }
    drop(busy);
    sleep(Duration::from_millis(500)).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM dblock_leases")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "cancelled acquisitions claimed leases");
    let g = locks
        .acquire("queued:after")
        .wait(Duration::from_secs(5))
        .await
        .unwrap();
    g.release().await.unwrap();
}

mod suite;

struct SqliteFixture(PathBuf);

impl suite::Fixture for SqliteFixture {
    async fn locks(&self) -> Locks {
        open(&self.0).await
    }
    fn unreachable(&self) -> Locks {
        let options = SqliteConnectOptions::new()
            .filename("/nonexistent-dir/dblock.db")
            .create_if_missing(false);
        let pool = SqlitePoolOptions::new()
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(options);
        Locks::new(Lease::new(pool))
    }
    fn shared(&self) -> bool {
        true
    }
    fn lease(&self) -> bool {
        true
    }
}

mod behaviour {
    use super::*;
    behaviour_suite!(async {
        let dir = std::env::temp_dir().join(common::unique("suite").replace(':', "_"));
        std::fs::create_dir_all(&dir).unwrap();
        SqliteFixture(dir.join("locks.db"))
    });
}

// ---- Batched renewal, on a file of its own per test. ----

mod batch;

struct SqliteHarness;

impl batch::Harness for SqliteHarness {
    async fn subject(&self, _pool_size: u32) -> batch::Subject {
        let dir = TempDir::new("batch");
        let lease = Lease::open(dir.db()).await.expect("open");
        let observer = Lease::open(dir.db()).await.expect("open");
        let counted = lease.clone();
        let holder = lease.pool().clone();
        batch::Subject {
            table: "dblock_leases".to_owned(),
            locks: Locks::new(lease),
            observer: Locks::new(observer),
            stats: Box::new(move || counted.renewal_stats()),
            cut: Some(Box::new(move || {
                Box::pin(async move { holder.close().await })
            })),
            db_updates: None,
            cleanup: Some(Box::pin(async move { drop(dir) })),
        }
    }
}

mod batched {
    use super::*;
    batch_suite!(SqliteHarness);
}

/// A database file migrated to version 3 (before shared leases), with a
/// lease held in it, is brought to version 4 by `open`: the held lease and
/// its token are kept, the name's next token continues from it, and
/// readers work.
#[tokio::test]
async fn migrating_from_version_3_keeps_held_leases_and_tokens() {
    let dir = TempDir::new("sqlite-upgrade");
    let path = dir.db();
    {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE dblock_schema_migrations (
                version     INTEGER PRIMARY KEY NOT NULL,
                description TEXT    NOT NULL,
                applied_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
        )
        .execute(&pool)
        .await
        .unwrap();
        for (version, sql) in [
            (1, include_str!("../migrations/sqlite/0001_dblock.sql")),
            (2, include_str!("../migrations/sqlite/0002_token_floor.sql")),
            (
                3,
                include_str!("../migrations/sqlite/0003_semaphore_holders.sql"),
            ),
        ] {
            sqlx::raw_sql(sql).execute(&pool).await.unwrap();
            sqlx::query(
                "INSERT INTO dblock_schema_migrations (version, description) VALUES (?1, 'old')",
            )
            .bind(version)
            .execute(&pool)
            .await
            .unwrap();
        }
        // Held by a process of the previous version, and an ended lease.
        let now = db_now(&pool).await;
        for (name, owner, token, expires) in [
            (
                "held",
                Some("0123456789abcdef0123456789abcdef"),
                41,
                now + 60_000_000,
            ),
            ("ended", None, 77, now - 1_000_000),
        ] {
            sqlx::query(
                "INSERT INTO dblock_leases (name, owner, holder, mode, token, acquired_at, expires_at)
                 VALUES (?1, ?2, 'old:1', 'x', ?3, ?4, ?5)",
            )
            .bind(name)
            .bind(owner)
            .bind(token)
            .bind(now)
            .bind(expires)
            .execute(&pool)
            .await
            .unwrap();
        }
        pool.close().await;
    }
    let lease = Lease::open(&path).await.unwrap();
    assert_eq!(versions(lease.pool()).await, [1, 2, 3, 4]);
    let locks = Locks::new(lease);
    let g = locks.acquire("ended").await.unwrap();
    assert_eq!(g.token(), 78, "a name's token continues from its row");
    g.release().await.unwrap();
    common::check_upgraded(&locks, 41, "ended", 78).await;
}
