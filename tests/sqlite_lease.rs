//! `dblock::sqlite::Lease` on temporary database files.
#![cfg(feature = "sqlite")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::TempDir;
use dblock::sqlite::Lease;
use dblock::{Error, LeaseOptions, Locks};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::SqlitePool;
use tokio::time::{sleep, Instant};

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

/// `list` of a file's leases is in name order, and readers are leases too
/// (the lease suite's acquire_try_timeout_release_inspect covers the rest).
#[tokio::test]
async fn list_is_in_name_order_and_readers_are_leases() {
    let dir = TempDir::new("sqlite-basic");
    let locks = open(&dir.db()).await;
    let name = "reports:nightly";
    let guard = locks.acquire(name).await.unwrap();
    common::listed_in_name_order(&locks, name).await;
    guard.release().await.unwrap();
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

#[tokio::test]
async fn thirty_two_racers_in_four_backends_one_winner() {
    let dir = TempDir::new("sqlite-race");
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(open(&dir.db()).await);
    }
    for round in 0..3 {
        suite::lease::one_winner(&backends, &format!("race-{round}")).await;
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

/// `Lease::new` on a pool that was never migrated reports the schema
/// missing (the lease suite's a_missing_table_reports_schema_missing covers
/// a table that does not exist).
#[tokio::test]
async fn lease_new_on_an_unmigrated_pool_reports_schema_missing() {
    let dir = TempDir::new("sqlite-missing");
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

// ---- The behavioural suite on an SQLite file. ----

mod suite;

#[derive(Clone)]
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
}

mod behaviour {
    use super::*;
    behaviour_suite!(async { SqliteFixture::new() });
}

impl SqliteFixture {
    /// A new file in a directory of its own.
    fn new() -> Self {
        let dir = std::env::temp_dir().join(common::unique("suite").replace(':', "_"));
        std::fs::create_dir_all(&dir).unwrap();
        SqliteFixture(dir.join("locks.db"))
    }

    async fn pool(&self) -> SqlitePool {
        Lease::open(&self.0).await.unwrap().pool().clone()
    }
}

impl suite::lease::LeaseFixture for SqliteFixture {
    async fn db_now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(db_now(&self.pool().await).await).unwrap()
    }
    async fn expire_now(&self, name: &str) {
        sqlx::query("UPDATE dblock_leases SET expires_at = 0 WHERE name = ?")
            .bind(name)
            .execute(&self.pool().await)
            .await
            .unwrap();
    }
}

impl suite::lease::TableFixture for SqliteFixture {
    fn schema_missing(&self) -> (&'static str, &'static str) {
        ("dblock::sqlite::migrate(&pool)", "sqlite")
    }
    async fn with_table(&self, table: &str) -> Result<Locks, Error> {
        Lease::open(&self.0)
            .await?
            .with_table(table)
            .map(Locks::new)
    }
    async fn custom_table(&self) -> String {
        sqlx::raw_sql(
            "CREATE TABLE \"Custom\" (name TEXT PRIMARY KEY NOT NULL, owner TEXT, holder TEXT,
                mode TEXT NOT NULL DEFAULT 'x', token INTEGER NOT NULL,
                acquired_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
                writer_waiting_until INTEGER) WITHOUT ROWID",
        )
        .execute(&self.pool().await)
        .await
        .unwrap();
        "main.Custom".to_owned()
    }
    async fn doomed(&self) -> (Locks, suite::lease::Cut) {
        let lease = Lease::open(&self.0).await.unwrap();
        let doomed = lease.pool().clone();
        (
            Locks::new(lease),
            Box::pin(async move { doomed.close().await }),
        )
    }
    async fn starved(&self) -> (Locks, Box<dyn std::any::Any + Send>) {
        drop(self.pool().await); // creates the file and its table
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(SqliteConnectOptions::new().filename(&self.0))
            .await
            .unwrap();
        let busy = pool.acquire().await.unwrap();
        (Locks::new(Lease::new(pool)), Box::new(busy))
    }
    async fn lease_rows(&self, prefix: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM dblock_leases WHERE name LIKE ? || ':%'")
            .bind(prefix)
            .fetch_one(&self.pool().await)
            .await
            .unwrap()
    }
}

mod lease {
    use super::*;
    lease_suite!(tables async { SqliteFixture::new() });
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
