//! `dblock::postgres::Lease` against a real PostgreSQL
//! (`DBLOCK_TEST_POSTGRES_URL`, see `tests/common`).
#![cfg(feature = "postgres")]

mod common;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dblock::postgres::Lease;
use dblock::{Error, LeaseOptions, Locks};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::time::{sleep, Instant};

async fn connect_with(options: PgConnectOptions, size: u32) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .connect_with(options)
        .await
        .expect("connect to PostgreSQL");
    dblock::postgres::migrate(&pool).await.expect("migrate");
    pool
}

async fn options() -> PgConnectOptions {
    PgConnectOptions::from_str(&common::postgres_url().await).expect("a valid URL")
}

async fn pool() -> PgPool {
    connect_with(options().await, 8).await
}

async fn new_locks() -> Locks {
    Locks::new(Lease::new(pool().await))
}

/// The database's clock now.
async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn tokens_increase_and_survive_a_new_pool() {
    let name = common::unique("pg-lease-tokens");
    let mut last = 0;
    {
        let locks = new_locks().await;
        for _ in 0..3 {
            let g = locks.acquire(&name).await.unwrap();
            assert!(g.token() > last, "{} after {last}", g.token());
            last = g.token();
            g.release().await.unwrap();
        }
    }
    // A new backend on a new pool (a restarted process) continues the count.
    let locks = new_locks().await;
    let g = locks.acquire(&name).await.unwrap();
    assert!(g.token() > last, "{} after {last}", g.token());
    g.release().await.unwrap();
}

async fn race(options: PgConnectOptions) {
    let pool = connect_with(options, 32).await;
    let locks = Locks::new(Lease::new(pool));
    for round in 0..3 {
        let name = common::unique(&format!("pg-lease-race-{round}"));
        suite::lease::one_winner(std::slice::from_ref(&locks), &name).await;
    }
}

#[tokio::test]
async fn thirty_two_racers_one_winner_read_committed() {
    race(options().await).await;
}

#[tokio::test]
async fn thirty_two_racers_one_winner_repeatable_read() {
    let options = options()
        .await
        .options([("default_transaction_isolation", "repeatable read")]);
    let pool = connect_with(options.clone(), 1).await;
    let level: String = sqlx::query_scalar("SHOW transaction_isolation")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(level, "repeatable read");
    race(options).await;
}

/// A release commits without waiting for the WAL flush; that setting is
/// local to the release's own transaction and never sticks to the pooled
/// session that ran it.
#[tokio::test]
async fn release_leaves_the_session_synchronous() {
    let pool = connect_with(options().await, 1).await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("pg-lease-sync");
    locks.acquire(&name).await.unwrap().release().await.unwrap();
    let guard = locks
        .acquire(&name)
        .hold_at_least(Duration::from_secs(1))
        .await
        .unwrap();
    guard.release().await.unwrap();
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(setting, "on");
}

#[tokio::test]
async fn notify_wakes_a_waiter_in_another_backend() {
    let holder = new_locks().await;
    // The waiter polls every 5 s at best, and its pool has one connection
    // (the listener must not take it).
    let waiter_pool = connect_with(options().await, 1).await;
    let waiter = Locks::new(
        Lease::new(waiter_pool)
            .with_options(
                LeaseOptions::default()
                    .min_poll(Duration::from_secs(5))
                    .max_poll(Duration::from_secs(5)),
            )
            .unwrap(),
    );
    let name = common::unique("pg-lease-notify");
    let guard = holder.acquire(&name).await.unwrap();

    let task = {
        let name = name.clone();
        tokio::spawn(async move {
            let g = waiter
                .acquire(name)
                .wait(Duration::from_secs(20))
                .await
                .unwrap();
            let at = Instant::now();
            g.release().await.unwrap();
            at
        })
    };
    sleep(Duration::from_secs(1)).await;
    let released = Instant::now();
    guard.release().await.unwrap();
    let granted = task.await.unwrap();
    let after = granted - released;
    assert!(
        after < Duration::from_millis(750),
        "woken {after:?} after the release"
    );
}

/// Sessions of `app` whose last statement was LISTEN (the listener).
async fn listening(observer: &PgPool, app: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
    )
    .bind(app)
    .fetch_one(observer)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_listener_stops_with_its_backend() {
    let observer = connect_with(options().await, 1).await;
    let holder = new_locks().await;
    let app = common::unique("dblock-listener").replace(':', "-");
    let waiter_pool = connect_with(options().await.application_name(&app), 2).await;
    let waiter = Locks::new(Lease::new(waiter_pool.clone()));
    let name = common::unique("pg-lease-listener");
    let guard = holder.acquire(&name).await.unwrap();

    let task = tokio::spawn(async move { waiter.acquire(name).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while listening(&observer, &app).await != 1 {
        assert!(Instant::now() < deadline, "no listener started");
        sleep(Duration::from_millis(20)).await;
    }
    // Dropping the waiting acquisition drops the last handle on the backend.
    task.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    while listening(&observer, &app).await != 0 {
        assert!(
            Instant::now() < deadline,
            "the listener outlived its backend"
        );
        sleep(Duration::from_millis(20)).await;
    }
    // The application's pool was never touched by it and still works.
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&waiter_pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    guard.release().await.unwrap();
}

// ---- The behavioural suite on the PostgreSQL lease table. ----

mod suite;

#[derive(Clone)]
struct LeaseFixture;

impl suite::Fixture for LeaseFixture {
    async fn locks(&self) -> Locks {
        new_locks().await
    }
    fn unreachable(&self) -> Locks {
        Locks::new(Lease::new(common::lazy_pool(common::NOWHERE_PG)))
    }
}

mod behaviour {
    use super::*;
    behaviour_suite!(async { LeaseFixture });
}

impl suite::lease::LeaseFixture for LeaseFixture {
    async fn db_now(&self) -> DateTime<Utc> {
        db_now(&pool().await).await
    }
    async fn expire_now(&self, name: &str) {
        sqlx::query("UPDATE dblock_leases SET expires_at = clock_timestamp() WHERE name = $1")
            .bind(name)
            .execute(&pool().await)
            .await
            .unwrap();
    }
}

impl suite::lease::TableFixture for LeaseFixture {
    fn schema_missing(&self) -> (&'static str, &'static str) {
        ("dblock::postgres::migrate(&pool)", "postgres")
    }
    async fn with_table(&self, table: &str) -> Result<Locks, Error> {
        Lease::new(pool().await).with_table(table).map(Locks::new)
    }
    async fn custom_table(&self) -> String {
        // A table made before migration 5 gets that migration's column.
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS public.\"dblock_Custom_test\" (LIKE dblock_leases INCLUDING ALL);
             ALTER TABLE public.\"dblock_Custom_test\"
               ADD COLUMN IF NOT EXISTS writer_waiting_until timestamptz",
        )
        .execute(&pool().await)
        .await
        .unwrap();
        "public.dblock_Custom_test".to_owned()
    }
    async fn doomed(&self) -> (Locks, suite::lease::Cut) {
        let doomed = pool().await;
        let locks = Locks::new(Lease::new(doomed.clone()));
        (locks, Box::pin(async move { doomed.close().await }))
    }
    async fn starved(&self) -> (Locks, Box<dyn std::any::Any + Send>) {
        let pool = connect_with(options().await, 1).await;
        let busy = pool.acquire().await.unwrap();
        (Locks::new(Lease::new(pool)), Box::new(busy))
    }
    async fn lease_rows(&self, prefix: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM dblock_leases WHERE name LIKE $1 || ':%'")
            .bind(prefix)
            .fetch_one(&pool().await)
            .await
            .unwrap()
    }
}

mod lease {
    use super::*;
    lease_suite!(tables async { LeaseFixture });
}

// ---- Batched renewal, on a table of its own per test. ----

mod batch;

struct PgHarness;

impl batch::Harness for PgHarness {
    async fn subject(&self, pool_size: u32) -> batch::Subject {
        let admin = pool().await;
        let table = format!("dblock_batch_{}", common::unique("t").replace(':', "_"));
        // A statement-level trigger counts the UPDATE statements the
        // database runs on the table (pg_stat_statements needs
        // shared_preload_libraries, which the test server may not have).
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (LIKE dblock_leases INCLUDING ALL);
             CREATE TABLE {table}_n (n bigint NOT NULL);
             INSERT INTO {table}_n VALUES (0);
             CREATE FUNCTION {table}_count() RETURNS trigger LANGUAGE plpgsql
                 AS $$ BEGIN UPDATE {table}_n SET n = n + 1; RETURN NULL; END $$;
             CREATE TRIGGER {table}_count AFTER UPDATE ON {table}
                 FOR EACH STATEMENT EXECUTE FUNCTION {table}_count();"
        )))
        .execute(&admin)
        .await
        .unwrap();
        let holder = connect_with(options().await, pool_size).await;
        let lease = Lease::new(holder.clone()).with_table(&table).unwrap();
        let observer = Lease::new(pool().await).with_table(&table).unwrap();
        let counted = lease.clone();
        let (count_pool, count_sql) = (admin.clone(), format!("SELECT n FROM {table}_n"));
        batch::Subject {
            table: table.clone(),
            locks: Locks::new(lease),
            observer: Locks::new(observer),
            stats: Box::new(move || counted.renewal_stats()),
            cut: Some(Box::new(move || {
                Box::pin(async move { holder.close().await })
            })),
            db_updates: Some(Box::new(move || {
                let (pool, sql) = (count_pool.clone(), count_sql.clone());
                Box::pin(async move {
                    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
                        .fetch_one(&pool)
                        .await
                        .unwrap() as u64
                })
            })),
            cleanup: Some(Box::pin(async move {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP TABLE IF EXISTS {table}, {table}_n;
                     DROP FUNCTION IF EXISTS {table}_count();"
                )))
                .execute(&admin)
                .await
                .unwrap();
            })),
        }
    }
}

mod batched {
    use super::*;
    batch_suite!(PgHarness);
}

/// A database migrated to version 4 (before shared leases), with a lease
/// held in it, is brought to version 5 by `migrate`: the held lease and its
/// token are kept, later tokens are greater, and readers work.
#[tokio::test]
async fn migrating_from_version_4_keeps_held_leases_and_tokens() {
    let admin = pool().await;
    let db = format!(
        "dblock_upgrade_{}_{}",
        std::process::id(),
        Utc::now().timestamp_micros()
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&admin)
        .await
        .unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options().await.database(&db))
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE dblock_schema_migrations (
            version     bigint      PRIMARY KEY,
            description text        NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (version, sql) in [
        (1i64, include_str!("../migrations/postgres/0001_dblock.sql")),
        (
            2,
            include_str!("../migrations/postgres/0002_lease_tokens_from_sequence.sql"),
        ),
        (
            3,
            include_str!("../migrations/postgres/0003_semaphore_holders.sql"),
        ),
        (
            4,
            include_str!("../migrations/postgres/0004_advisory_holders.sql"),
        ),
    ] {
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        sqlx::query(
            "INSERT INTO dblock_schema_migrations (version, description) VALUES ($1, 'old')",
        )
        .bind(version)
        .execute(&pool)
        .await
        .unwrap();
    }
    // Held by a process of the previous version.
    let held: i64 = sqlx::query_scalar(
        "INSERT INTO dblock_leases (name, owner, holder, mode, token, acquired_at, expires_at)
         VALUES ('held', '0123456789abcdef0123456789abcdef', 'old:1', 'x',
                 nextval('dblock_fencing_seq') + 1000000, clock_timestamp(),
                 clock_timestamp() + interval '60 seconds')
         RETURNING token",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("SELECT setval('dblock_fencing_seq', $1)")
        .bind(held)
        .execute(&pool)
        .await
        .unwrap();

    // Before the upgrade, this version's claims name the migration to run
    // rather than failing with a bare database error.
    let before = Locks::new(Lease::new(pool.clone()))
        .try_acquire("fresh")
        .await;
    assert!(
        matches!(before, Err(dblock::Error::SchemaMissing { .. })),
        "a claim on the old schema: {before:?}"
    );
    dblock::postgres::migrate(&pool).await.unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM dblock_schema_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(versions, [1, 2, 3, 4, 5]);
    let locks = Locks::new(Lease::new(pool.clone()));
    common::check_upgraded(&locks, held as u64, "fresh", held as u64).await;
    drop(locks);
    pool.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {db} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
}
