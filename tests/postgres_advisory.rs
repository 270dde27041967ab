//! The behavioural suite on PostgreSQL advisory locks (server-side waits and
//! polling), plus what only advisory locks have: the key function's SQL
//! twin, `pg_locks`, terminated sessions, and the pool's hygiene.

mod common;
mod suite;

use std::time::Duration;

use dblock::postgres::{advisory_key, Advisory, AdvisoryOptions, WaitStrategy};
use dblock::{Error, Locks};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

pub struct AdvisoryFixture {
    url: String,
    wait: WaitStrategy,
}

async fn pool(url: &str, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(20))
        .connect(url)
        .await
        .expect("connect to PostgreSQL (DBLOCK_TEST_POSTGRES_URL)")
}

fn options(wait: WaitStrategy) -> AdvisoryOptions {
    AdvisoryOptions {
        wait,
        heartbeat: Duration::from_millis(200),
    }
}

impl suite::Fixture for AdvisoryFixture {
    async fn locks(&self) -> Locks {
        let backend = Advisory::new(pool(&self.url, 6).await)
            .with_options(options(self.wait))
            .unwrap();
        Locks::new(backend)
    }
    fn unreachable(&self) -> Locks {
        let pool = PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy("postgres://postgres@127.0.0.1:1/nowhere")
            .unwrap();
        Locks::new(Advisory::new(pool))
    }
    fn shared(&self) -> bool {
        true
    }
    fn lease(&self) -> bool {
        false
    }
}

async fn fixture(wait: WaitStrategy) -> AdvisoryFixture {
    let url = common::postgres_url().await;
    dblock::postgres::migrate(&pool(&url, 1).await)
        .await
        .unwrap();
    AdvisoryFixture { url, wait }
}

mod server_wait {
    use super::*;
    behaviour_suite!(fixture(WaitStrategy::Server));
}

mod polling {
    use super::*;
    behaviour_suite!(fixture(WaitStrategy::Poll {
        min: Duration::from_millis(5),
        max: Duration::from_millis(100),
    }));
}

/// Advisory locks held by any session on `key`, seen in `pg_locks`.
async fn sessions_holding(pool: &PgPool, key: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted
           AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(key)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn key_function_matches_its_sql_twin() {
    let pool = pool(&common::postgres_url().await, 1).await;
    for name in [
        "",
        "reports:nightly",
        "🔒",
        "'; DROP TABLE x; --",
        &"é".repeat(127),
    ] {
        let in_sql: i64 = sqlx::query_scalar(
            "SELECT ('x' || left(encode(sha256(convert_to($1, 'UTF8')), 'hex'), 16))::bit(64)::bigint",
        )
        .bind(name)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(advisory_key(name), in_sql, "{name:?}");
    }
}

#[tokio::test]
async fn psql_operator_and_dblock_exclude_each_other() {
    let f = fixture(WaitStrategy::Server).await;
    let operator = pool(&f.url, 1).await;
    let mut op = operator.acquire().await.unwrap();
    let name = common::unique("psql");
    // What the README tells an operator to type in psql.
    let took: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_lock(('x' || left(encode(sha256(convert_to($1, 'UTF8')), 'hex'), 16))::bit(64)::bigint)",
    )
    .bind(&name)
    .fetch_one(&mut *op)
    .await
    .unwrap();
    assert!(took);
    let locks = suite::Fixture::locks(&f).await;
    assert!(locks.try_acquire(&name).await.unwrap().is_none());
    let info = locks
        .inspect(&name)
        .await
        .unwrap()
        .expect("the operator's lock is visible");
    assert_eq!(info.key, Some(advisory_key(&name)));
    let _: bool = sqlx::query_scalar("SELECT pg_advisory_unlock_all() IS NULL")
        .fetch_one(&mut *op)
        .await
        .unwrap();
    assert!(locks.try_acquire(&name).await.unwrap().is_some());
}

/// Connections go back to the pool holding nothing: after many grants,
/// releases, drops and cancellations on a pool of 2, no session holds the
/// key and the pool still serves work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_connections_come_back_clean() {
    let url = common::postgres_url().await;
    dblock::postgres::migrate(&pool(&url, 1).await)
        .await
        .unwrap();
    let pg = pool(&url, 2).await;
    let locks = Locks::new(Advisory::new(pg.clone()));
    let name = common::unique("clean");
    let key = advisory_key(&name);
    for i in 0..60u64 {
        match i % 3 {
            0 => locks.acquire(&name).await.unwrap().release().await.unwrap(),
            1 => drop(locks.acquire(&name).await.unwrap()),
            _ => {
                let _ = tokio::time::timeout(
                    Duration::from_micros(i * 131 % 2000),
                    locks.acquire(&name),
                )
                .await;
            }
        }
    }
    let observer = pool(&url, 1).await;
    assert!(
        suite::eventually(Duration::from_secs(10), || async {
            sessions_holding(&observer, key).await == 0
        })
        .await,
        "a session still holds the lock"
    );
    // Every pooled connection is usable and holds no advisory lock at all.
    for _ in 0..4 {
        let mut c = pg.acquire().await.unwrap();
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        )
        .fetch_one(&mut *c)
        .await
        .unwrap();
        assert_eq!(n, 0, "a pooled connection holds an advisory lock");
    }
}

/// `pg_terminate_backend` of the holder fires `lost()` within one heartbeat
/// (plus the round trip).
#[tokio::test]
async fn terminated_session_fires_lost_within_a_heartbeat() {
    let url = common::postgres_url().await;
    let heartbeat = Duration::from_millis(500);
    let backend = Advisory::new(pool(&url, 2).await)
        .with_options(AdvisoryOptions {
            heartbeat,
            ..Default::default()
        })
        .unwrap();
    let locks = Locks::new(backend);
    let name = common::unique("terminate");
    let g = locks.acquire(&name).await.unwrap();
    let admin = pool(&url, 1).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1
           AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(advisory_key(&name))
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(killed, vec![true]);
    let started = tokio::time::Instant::now();
    tokio::time::timeout(heartbeat * 2 + Duration::from_secs(1), g.lost())
        .await
        .expect("lost() did not fire within a heartbeat");
    assert!(started.elapsed() <= heartbeat * 2 + Duration::from_secs(1));
    assert!(g.is_lost());
    assert!(matches!(g.release().await, Err(Error::Lost { .. })));
}

/// A session terminated between two heartbeats, then released: `release`
/// reports `Error::Lost` and the guard is lost (found by the torture test:
/// release returned a bare database error and `lost()` never fired, although
/// another holder had the lock meanwhile).
#[tokio::test]
async fn release_after_termination_reports_lost() {
    let url = common::postgres_url().await;
    let backend = Advisory::new(pool(&url, 2).await)
        .with_options(AdvisoryOptions {
            heartbeat: Duration::from_secs(3600),
            ..Default::default()
        })
        .unwrap();
    let locks = Locks::new(backend);
    let name = common::unique("terminate-release");
    let g = locks.acquire(&name).await.unwrap();
    let admin = pool(&url, 1).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1
           AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(advisory_key(&name))
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(killed, vec![true]);
    // Someone else takes the lock before the holder notices.
    let other = Locks::new(Advisory::new(pool(&url, 1).await));
    let next = other
        .acquire(&name)
        .wait(Duration::from_secs(5))
        .await
        .unwrap();
    let outcome = g.release().await;
    assert!(matches!(outcome, Err(Error::Lost { .. })), "{outcome:?}");
    next.release().await.unwrap();
}

#[tokio::test]
async fn schema_missing_names_the_fix() {
    let url = common::postgres_url().await;
    let admin = pool(&url, 1).await;
    let db = format!("dblock_empty_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db}")))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&admin)
        .await
        .unwrap();
    let empty_url = match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("unexpected URL"),
    };
    let empty = pool(&empty_url, 2).await;
    let locks = Locks::new(Advisory::new(empty.clone()));
    let e = locks.acquire("x").await.unwrap_err();
    assert!(matches!(e, Error::SchemaMissing { .. }), "{e:?}");
    assert!(e.to_string().contains("dblock::postgres::migrate"), "{e}");
    // The failed attempt left no lock behind, and migrate fixes it.
    assert!(
        suite::eventually(Duration::from_secs(5), || async {
            sessions_holding(&empty, advisory_key("x")).await == 0
        })
        .await
    );
    dblock::postgres::migrate(&empty).await.unwrap();
    locks.acquire("x").await.unwrap().release().await.unwrap();
    empty.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {db} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_to_race() {
    let url = common::postgres_url().await;
    let pg = pool(&url, 10).await;
    let runs: Vec<_> = (0..8)
        .map(|_| {
            let pg = pg.clone();
            tokio::spawn(async move { dblock::postgres::migrate(&pg).await })
        })
        .collect();
    for r in runs {
        r.await.unwrap().unwrap();
    }
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dblock_schema_migrations WHERE version = 1")
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!(rows, 1);
    let theirs: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert!(
        theirs.is_none(),
        "dblock must not create the application's _sqlx_migrations"
    );
}

mod xact {
    use super::*;
    use dblock::postgres::{lock_xact, lock_xact_with};
    use dblock::Wait;

    async fn setup() -> (PgPool, String) {
        let url = common::postgres_url().await;
        let pg = pool(&url, 6).await;
        dblock::postgres::migrate(&pg).await.unwrap();
        sqlx::raw_sql(
            // One implicit transaction: the xact lock serialises the tests' CREATE.
            "SELECT pg_advisory_xact_lock(4242);
             CREATE TABLE IF NOT EXISTS dblock_test_xact (name text, token bigint, note text)",
        )
        .execute(&pg)
        .await
        .unwrap();
        (pg, common::unique("xact"))
    }

    #[tokio::test]
    async fn held_until_commit_and_excludes_session_locks() {
        let (pg, name) = setup().await;
        let locks = Locks::new(Advisory::new(pg.clone()));
        let mut tx = pg.begin().await.unwrap();
        let t1 = lock_xact(&mut tx, &name).await.unwrap();
        assert!(
            locks.try_acquire(&name).await.unwrap().is_none(),
            "session lock got in"
        );
        let mut other = pg.begin().await.unwrap();
        assert_eq!(
            lock_xact_with(&mut other, &name, Wait::No).await.unwrap(),
            None
        );
        tx.commit().await.unwrap();
        let t2 = lock_xact_with(&mut other, &name, Wait::No)
            .await
            .unwrap()
            .expect("free after commit");
        assert!(t2 > t1);
        other.rollback().await.unwrap();
        let g = locks
            .try_acquire(&name)
            .await
            .unwrap()
            .expect("free after rollback");
        assert!(g.token() > t2);
    }

    #[tokio::test]
    async fn timeout_and_errors_do_not_poison_the_transaction() {
        let (pg, name) = setup().await;
        let locks = Locks::new(Advisory::new(pg.clone()));
        let g = locks.acquire(&name).await.unwrap();
        let mut tx = pg.begin().await.unwrap();
        sqlx::query("SET LOCAL lock_timeout = '7s'")
            .execute(&mut *tx)
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let e = lock_xact_with(&mut tx, &name, Wait::For(Duration::from_millis(300)))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert!(started.elapsed() >= Duration::from_millis(290));
        // The transaction goes on, with its own lock_timeout intact.
        let setting: String = sqlx::query_scalar("SHOW lock_timeout")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(setting, "7s");
        sqlx::query("INSERT INTO dblock_test_xact VALUES ($1, 0, 'after timeout')")
            .bind(&name)
            .execute(&mut *tx)
            .await
            .unwrap();
        // A bad name is refused without touching the transaction either.
        assert!(matches!(
            lock_xact(&mut tx, "").await,
            Err(Error::InvalidName(_))
        ));
        g.release().await.unwrap();
        let token = lock_xact_with(&mut tx, &name, Wait::For(Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
        let setting: String = sqlx::query_scalar("SHOW lock_timeout")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(
            setting, "7s",
            "lock_xact leaked its lock_timeout into the transaction"
        );
        sqlx::query("INSERT INTO dblock_test_xact VALUES ($1, $2, 'locked')")
            .bind(&name)
            .bind(token as i64)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM dblock_test_xact WHERE name = $1")
            .bind(&name)
            .fetch_one(&pg)
            .await
            .unwrap();
        assert_eq!(rows, 2);
    }

    #[tokio::test]
    async fn a_waiter_gets_the_lock_when_the_holder_commits() {
        let (pg, name) = setup().await;
        let mut holder = pg.begin().await.unwrap();
        lock_xact(&mut holder, &name).await.unwrap();
        let waiter = {
            let (pg, name) = (pg.clone(), name.clone());
            tokio::spawn(async move {
                let mut tx = pg.begin().await.unwrap();
                let t = lock_xact(&mut tx, &name).await.unwrap();
                tx.commit().await.unwrap();
                t
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished());
        holder.commit().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("waiter hung")
            .unwrap();
    }
}
