//! `dblock::postgres::Lease` against a real PostgreSQL
//! (`DBLOCK_TEST_POSTGRES_URL`, see `tests/common`).
#![cfg(feature = "postgres")]

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dblock::postgres::Lease;
use dblock::{Error, LeaseOptions, Locks};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::time::{sleep, timeout, Instant};

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
async fn acquire_try_timeout_release_inspect() {
    let locks = new_locks().await;
    let name = common::unique("pg-lease-basic");

    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(guard.name(), name);
    assert!(!guard.is_lost());
    let expires = guard.expires_at().expect("a lease has an expiry");
    let left = expires - Utc::now();
    assert!(
        left > chrono::Duration::seconds(8) && left <= chrono::Duration::seconds(11),
        "{left}"
    );

    assert!(locks.try_acquire(&name).await.unwrap().is_none());
    let started = Instant::now();
    let err = locks
        .acquire(&name)
        .wait(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    let info = locks.inspect(&name).await.unwrap().expect("held");
    assert_eq!(info.name.as_deref(), Some(name.as_str()));
    assert_eq!(info.token, Some(guard.token()));
    assert!(info.holder.ends_with(&format!(":{}", std::process::id())));
    assert!(locks
        .list()
        .await
        .unwrap()
        .iter()
        .any(|i| i.name.as_deref() == Some(name.as_str())));

    guard.release().await.unwrap();
    assert!(locks.inspect(&name).await.unwrap().is_none());
    assert!(!locks
        .list()
        .await
        .unwrap()
        .iter()
        .any(|i| i.name.as_deref() == Some(name.as_str())));
    let again = locks.try_acquire(&name).await.unwrap().expect("free again");
    drop(again);
    // Dropping releases in the background.
    let deadline = Instant::now() + Duration::from_secs(5);
    while locks.inspect(&name).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "a dropped guard was not released"
        );
        sleep(Duration::from_millis(10)).await;
    }
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

/// A holder whose process dies: its runtime (and keeper task) is torn down
/// without a release.
fn die_holding(url: String, name: String, ttl: Duration) -> u64 {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let token = runtime.block_on(async {
            let pool = PgPool::connect(&url).await.unwrap();
            let locks = Locks::new(Lease::new(pool));
            let guard = locks.acquire(&name).ttl(ttl).await.unwrap();
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
    let url = common::postgres_url().await;
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("pg-lease-dead");
    let dead = die_holding(url, name.clone(), Duration::from_millis(1500));

    let before = locks.inspect(&name).await.unwrap().expect("still leased");
    assert_eq!(before.token, Some(dead));
    assert!(locks.try_acquire(&name).await.unwrap().is_none());

    let guard = locks
        .acquire(&name)
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(guard.token() > dead);
    // Granted only once the database clock passed the dead lease's expiry.
    let after = locks.inspect(&name).await.unwrap().expect("held");
    assert!(
        after.acquired_at.unwrap() >= before.expires_at.unwrap(),
        "{after:?} vs {before:?}"
    );
    guard.release().await.unwrap();
}

#[tokio::test]
async fn a_stale_holder_can_neither_release_nor_extend_the_next_lease() {
    let pool = pool().await;
    let a = Locks::new(Lease::new(pool.clone()));
    let b = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("pg-lease-stale");

    let stale = a.acquire(&name).ttl(Duration::from_secs(60)).await.unwrap();
    // A pauses past its lease: the database lets it run out.
    sqlx::query("UPDATE dblock_leases SET expires_at = clock_timestamp() WHERE name = $1")
        .bind(&name)
        .execute(&pool)
        .await
        .unwrap();
    let next = b
        .acquire(&name)
        .ttl(Duration::from_secs(60))
        .wait(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(next.token() > stale.token());

    let err = stale.extend(Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err:?}");
    assert!(stale.is_lost());
    let err = stale.release().await.unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err:?}");

    let info = b.inspect(&name).await.unwrap().expect("still held by B");
    assert_eq!(info.token, Some(next.token()));
    assert!(b.try_acquire(&name).await.unwrap().is_none());
    assert!(next
        .extend(Duration::from_secs(30))
        .await
        .unwrap()
        .is_some());
    assert!(!next.is_lost());
    next.release().await.unwrap();
}

async fn race(options: PgConnectOptions) {
    let pool = connect_with(options, 32).await;
    let locks = Locks::new(Lease::new(pool));
    for round in 0..3 {
        let name = common::unique(&format!("pg-lease-race-{round}"));
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (locks, name, barrier) = (locks.clone(), name.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    locks.try_acquire(name).await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            // Every contender gets an answer, none an error.
            if let Some(g) = task.await.unwrap().expect("no error in the race") {
                winners.push(g);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}");
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

#[tokio::test]
async fn hold_at_least_keeps_the_lease_after_release() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("pg-lease-hold");

    let guard = locks
        .acquire(&name)
        .hold_at_least(Duration::from_secs(2))
        .await
        .unwrap();
    let acquired_at = locks
        .inspect(&name)
        .await
        .unwrap()
        .unwrap()
        .acquired_at
        .unwrap();
    guard.release().await.unwrap();

    assert!(locks.try_acquire(&name).await.unwrap().is_none());
    let info = locks.inspect(&name).await.unwrap().expect("kept");
    assert_eq!(
        info.expires_at,
        Some(acquired_at + chrono::Duration::seconds(2))
    );

    let next = locks
        .acquire(&name)
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    let next_at = locks
        .inspect(&name)
        .await
        .unwrap()
        .unwrap()
        .acquired_at
        .unwrap();
    assert!(next_at >= acquired_at + chrono::Duration::seconds(2));
    next.release().await.unwrap();

    // A hold already past does not delay the release.
    let name = common::unique("pg-lease-hold-past");
    let guard = locks
        .acquire(&name)
        .hold_at_least(Duration::from_millis(200))
        .await
        .unwrap();
    sleep(Duration::from_millis(400)).await;
    guard.release().await.unwrap();
    assert!(locks.try_acquire(&name).await.unwrap().is_some());
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
async fn lost_fires_when_the_lease_is_broken() {
    let locks = new_locks().await;
    let operator = new_locks().await;
    let name = common::unique("pg-lease-broken");
    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(operator.force_release(&name).await.unwrap());
    assert!(!operator.force_release(&name).await.unwrap());
    // The next renewal (within ttl/3) finds the lease no longer ours.
    timeout(Duration::from_millis(1500), guard.lost())
        .await
        .expect("lost() resolves after the next renewal");
    assert!(guard.is_lost());
    assert!(matches!(guard.release().await, Err(Error::Lost { .. })));
}

#[tokio::test]
async fn lost_fires_before_the_database_expires_the_lease() {
    let doomed = pool().await;
    let observer = connect_with(options().await, 1).await;
    let locks = Locks::new(Lease::new(doomed.clone()));
    let name = common::unique("pg-lease-closed");
    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_secs(2))
        .await
        .unwrap();
    // Renewals can no longer reach the database.
    doomed.close().await;
    timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("lost() resolves at the local deadline");
    // ... while the database still counts the lease as held: the holder
    // learns of the loss before anyone else can be granted the lock.
    let expires_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT expires_at FROM dblock_leases WHERE name = $1")
            .bind(&name)
            .fetch_one(&observer)
            .await
            .unwrap();
    let now = db_now(&observer).await;
    assert!(
        expires_at > now,
        "lost only at {now}, lease ran out at {expires_at}"
    );
    assert!(guard.is_lost());
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

#[tokio::test]
async fn a_missing_table_reports_schema_missing() {
    let lease = Lease::new(pool().await)
        .with_table("dblock_missing_xyz")
        .unwrap();
    let locks = Locks::new(lease);
    let name = common::unique("pg-lease-missing");
    for err in [
        locks.try_acquire(&name).await.map(|_| ()).unwrap_err(),
        locks.inspect(&name).await.map(|_| ()).unwrap_err(),
        locks.list().await.map(|_| ()).unwrap_err(),
    ] {
        match err {
            Error::SchemaMissing { migrate, dir } => {
                assert_eq!(migrate, "dblock::postgres::migrate(&pool)");
                assert_eq!(dir, "postgres");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn with_table_rejects_injection_and_quotes_identifiers() {
    let pool = pool().await;
    for bad in [
        "dblock_leases; DROP TABLE dblock_leases",
        "dblock_leases --",
        "\"dblock_leases\"",
        "a.b.c",
        "",
    ] {
        let err = Lease::new(pool.clone()).with_table(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "{bad:?}: {err:?}");
    }
    // A mixed-case table in a schema is found only because it is quoted.
    // (A table made before migration 5 gets that migration's column.)
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS public.\"dblock_Custom_test\" (LIKE dblock_leases INCLUDING ALL);
         ALTER TABLE public.\"dblock_Custom_test\"
           ADD COLUMN IF NOT EXISTS writer_waiting_until timestamptz",
    )
    .execute(&pool)
    .await
    .unwrap();
    let custom = Locks::new(
        Lease::new(pool.clone())
            .with_table("public.dblock_Custom_test")
            .unwrap(),
    );
    let default = Locks::new(Lease::new(pool));
    let name = common::unique("pg-lease-custom");
    let guard = custom.acquire(&name).await.unwrap();
    assert!(custom.try_acquire(&name).await.unwrap().is_none());
    assert!(default.inspect(&name).await.unwrap().is_none());
    guard.release().await.unwrap();
}

// ---- The behavioural suite on the PostgreSQL lease table. ----

mod suite;

struct LeaseFixture;

impl suite::Fixture for LeaseFixture {
    async fn locks(&self) -> Locks {
        new_locks().await
    }
    fn unreachable(&self) -> Locks {
        let pool = PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy("postgres://postgres@127.0.0.1:1/nowhere")
            .unwrap();
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
    behaviour_suite!(async { LeaseFixture });
}

/// Acquisitions cancelled while they wait for a pooled connection claim
/// nothing once they get one. (Found by the torture test's cancellation
/// storm: queued claims of cancelled acquisitions went on taking leases
/// after their callers had gone, starving the pool and blocking real
/// acquirers.) A claim leaves a row behind, so no row may exist.
#[tokio::test]
async fn acquisitions_cancelled_while_waiting_for_a_connection_claim_nothing() {
    let pool = connect_with(options().await, 1).await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let prefix = common::unique("queued-cancel");
    let busy = pool.acquire().await.unwrap();
    for i in 0..10 {
        let name = format!("{prefix}:{i}");
        assert!(timeout(Duration::from_millis(20), locks.acquire(&name))
            .await
            .is_err());
    }
    drop(busy);
    // Let every queued attempt get the connection in turn.
    sleep(Duration::from_millis(500)).await;
    let observer = connect_with(options().await, 1).await;
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dblock_leases WHERE name LIKE $1 || ':%'")
            .bind(&prefix)
            .fetch_one(&observer)
            .await
            .unwrap();
    assert_eq!(rows, 0, "cancelled acquisitions claimed leases");
    // The pool still serves.
    let g = locks
        .acquire(format!("{prefix}:after"))
        .wait(Duration::from_secs(5))
        .await
        .unwrap();
    g.release().await.unwrap();
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
