//! The behavioural suite on PostgreSQL advisory locks (server-side waits and
//! polling), plus what only advisory locks have: the key function's SQL
//! twin, `pg_locks`, terminated sessions, and the pool's hygiene.

mod common;
#[allow(dead_code)]
#[path = "torture/proxy.rs"]
mod proxy;
mod suite;

use std::time::Duration;

use dblock::postgres::{advisory_key, Advisory, AdvisoryOptions, WaitStrategy};
use dblock::{Error, Locks, LostReason};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::{RwLock, RwLockReadGuard};

pub struct AdvisoryFixture {
    url: String,
    wait: WaitStrategy,
    _share: LockTableShare,
}

/// The server's lock table is shared by every test here; the test that
/// fills it up takes it alone, every other test that takes locks shares it.
static LOCK_TABLE: RwLock<()> = RwLock::const_new(());
type LockTableShare = RwLockReadGuard<'static, ()>;

async fn share_lock_table() -> LockTableShare {
    LOCK_TABLE.read().await
}

use common::pg_pool as pool;

fn options(wait: WaitStrategy) -> AdvisoryOptions {
    AdvisoryOptions::default()
        .wait(wait)
        .heartbeat(Duration::from_millis(200))
}

/// Terminates the server session `pid`; every one of `guards` (on it)
/// must report lost within two heartbeats and a second.
async fn terminate_and_see_lost(
    admin: &PgPool,
    pid: i32,
    guards: &[&dblock::LockGuard],
    heartbeat: Duration,
) {
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(admin)
        .await
        .unwrap();
    assert!(killed);
    tokio::time::timeout(
        heartbeat * 2 + Duration::from_secs(1),
        futures::future::join_all(guards.iter().map(|g| g.lost())),
    )
    .await
    .expect("a guard on the terminated session did not report lost within a heartbeat");
}

/// Advisory locks on `pg` with server-side waits, `sessions` holder
/// sessions and `heartbeat`.
fn server_waits(pg: PgPool, sessions: usize, heartbeat: Duration) -> Locks {
    Locks::new(
        Advisory::new(pg)
            .with_options(
                AdvisoryOptions::default()
                    .wait(WaitStrategy::Server)
                    .heartbeat(heartbeat),
            )
            .unwrap()
            .with_holder_sessions(sessions)
            .unwrap(),
    )
}

impl suite::Fixture for AdvisoryFixture {
    async fn locks(&self) -> Locks {
        let backend = Advisory::new(pool(&self.url, 6).await)
            .with_options(options(self.wait))
            .unwrap();
        Locks::new(backend)
    }
    fn unreachable(&self) -> Locks {
        Locks::new(Advisory::new(common::lazy_pool(common::NOWHERE_PG)))
    }
    fn lease(&self) -> bool {
        false
    }
    fn writer_first(&self) -> bool {
        self.wait == WaitStrategy::Server
    }
}

async fn fixture(wait: WaitStrategy) -> AdvisoryFixture {
    let share = share_lock_table().await;
    let url = common::postgres_url().await;
    dblock::postgres::migrate(&pool(&url, 1).await)
        .await
        .unwrap();
    AdvisoryFixture {
        url,
        wait,
        _share: share,
    }
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
    // The operator's lock is a lock: a semaphore's permit is refused
    // rather than waiting.
    let permit = locks
        .acquire(&name)
        .max_holders(2)
        .wait(Duration::from_secs(5));
    let err = permit.await.unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "{err:?}");
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
    let guard = locks.try_acquire(&name).await.unwrap().expect("free again");
    guard.release().await.unwrap();
    let permit = locks.acquire(&name).max_holders(2).await.unwrap();
    permit.release().await.unwrap();
}

/// A permit whose take sees the name held as a lock looks again before it
/// calls that a disagreement: a holder session that ends gives its locks
/// back one lock-table partition at a time, so the take can catch it
/// holding the name's key but no longer its semaphore marker. Held at the
/// second look (`__unstable::pause_before_second_look`), a lock still there
/// is a disagreement, and one gone by then leaves the name busy: the permit
/// is taken at the next try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_second_look_tells_a_lock_from_one_gone() {
    let f = fixture(WaitStrategy::Server).await;
    let locks = suite::Fixture::locks(&f).await;
    let operator = pool(&f.url, 1).await;
    let mut op = operator.acquire().await.unwrap();
    let name = common::unique("second-look");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(advisory_key(&name))
        .execute(&mut *op)
        .await
        .unwrap();
    // A permit of 3, held at its second look once it gets there.
    let at_second_look = || async {
        let (reached, go) = dblock::__unstable::pause_before_second_look(&name);
        let (locks, name) = (locks.clone(), name.clone());
        let taking = tokio::spawn(async move {
            locks
                .acquire(&name)
                .max_holders(3)
                .wait(Duration::from_secs(10))
                .await
        });
        tokio::time::timeout(Duration::from_secs(10), reached)
            .await
            .expect("the permit never reached its second look")
            .unwrap();
        (taking, go)
    };

    // Still held at the second look: a disagreement.
    let (taking, go) = at_second_look().await;
    go.send(()).unwrap();
    let err = taking.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "{err:?}");

    // Gone by the second look: busy, then the permit is taken.
    let (taking, go) = at_second_look().await;
    let unlocked: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
        .bind(advisory_key(&name))
        .fetch_one(&mut *op)
        .await
        .unwrap();
    assert!(unlocked);
    go.send(()).unwrap();
    let guard = taking
        .await
        .unwrap()
        .expect("the lock was gone at the second look: the permit must be taken");
    let info = locks.inspect(&name).await.unwrap().expect("held");
    assert_eq!((info.holders, info.max_holders), (1, Some(3)));
    guard.release().await.unwrap();
}

/// `inspect` and `list` count the sessions waiting for an advisory lock
/// (ungranted `pg_locks` entries); a lock with only waiters is not listed.
#[tokio::test]
async fn waiters_are_counted() {
    let f = fixture(WaitStrategy::Server).await;
    let holder = suite::Fixture::locks(&f).await;
    let name = common::unique("waiters");
    let guard = holder.acquire(&name).await.unwrap();
    let info = holder.inspect(&name).await.unwrap().expect("held");
    assert_eq!(info.waiters, Some(0));

    let mut waiting = Vec::new();
    for _ in 0..2 {
        let locks = suite::Fixture::locks(&f).await;
        let name = name.clone();
        waiting.push(tokio::spawn(async move {
            let g = locks
                .acquire(&name)
                .wait(Duration::from_secs(30))
                .await
                .unwrap();
            g.release().await.unwrap();
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = holder.inspect(&name).await.unwrap().expect("held");
        if info.waiters == Some(2) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waiters: {:?}",
            info.waiters
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = holder.list().await.unwrap();
    let mine = listed
        .iter()
        .find(|i| i.key == Some(advisory_key(&name)))
        .expect("listed");
    assert_eq!(mine.waiters, Some(2));
    assert_eq!(mine.holders, 1, "waiters are not holders");
    guard.release().await.unwrap();
    for w in waiting {
        w.await.unwrap();
    }
    assert!(holder.inspect(&name).await.unwrap().is_none());
}

/// Connections go back to the pool holding nothing: after many grants,
/// releases, drops and cancellations on a pool of 2, no session holds the
/// key and the pool still serves work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_connections_come_back_clean() {
    let _share = share_lock_table().await;
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
    let _share = share_lock_table().await;
    let url = common::postgres_url().await;
    let heartbeat = Duration::from_millis(500);
    let backend = Advisory::new(pool(&url, 2).await)
        .with_options(AdvisoryOptions::default().heartbeat(heartbeat))
        .unwrap();
    let locks = Locks::new(backend);
    let name = common::unique("terminate");
    let g = locks.acquire(&name).await.unwrap();
    common::terminate_advisory_holder(&pool(&url, 1).await, &name).await;
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
        .with_options(AdvisoryOptions::default().heartbeat(Duration::from_secs(3600)))
        .unwrap();
    let locks = Locks::new(backend);
    let name = common::unique("terminate-release");
    let g = locks.acquire(&name).await.unwrap();
    common::terminate_advisory_holder(&pool(&url, 1).await, &name).await;
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
    let _share = share_lock_table().await;
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
    let _share = share_lock_table().await;
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
    use dblock::postgres::{lock_in_transaction, lock_in_transaction_with};
    use dblock::Wait;

    async fn setup() -> (PgPool, String, LockTableShare) {
        let share = share_lock_table().await;
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
        (pg, common::unique("xact"), share)
    }

    #[tokio::test]
    async fn held_until_commit_and_excludes_session_locks() {
        let (pg, name, _share) = setup().await;
        let locks = Locks::new(Advisory::new(pg.clone()));
        let mut tx = pg.begin().await.unwrap();
        let t1 = lock_in_transaction(&mut tx, &name).await.unwrap();
        assert!(
            locks.try_acquire(&name).await.unwrap().is_none(),
            "session lock got in"
        );
        let mut other = pg.begin().await.unwrap();
        assert_eq!(
            lock_in_transaction_with(&mut other, &name, Wait::No)
                .await
                .unwrap(),
            None
        );
        tx.commit().await.unwrap();
        let t2 = lock_in_transaction_with(&mut other, &name, Wait::No)
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
        let (pg, name, _share) = setup().await;
        let locks = Locks::new(Advisory::new(pg.clone()));
        let g = locks.acquire(&name).await.unwrap();
        let mut tx = pg.begin().await.unwrap();
        sqlx::query("SET LOCAL lock_timeout = '7s'")
            .execute(&mut *tx)
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let e = lock_in_transaction_with(&mut tx, &name, Wait::For(Duration::from_millis(300)))
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
            lock_in_transaction(&mut tx, "").await,
            Err(Error::InvalidName(_))
        ));
        g.release().await.unwrap();
        let token = lock_in_transaction_with(&mut tx, &name, Wait::For(Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap();
        let setting: String = sqlx::query_scalar("SHOW lock_timeout")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(
            setting, "7s",
            "lock_in_transaction leaked its lock_timeout into the transaction"
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
        let (pg, name, _share) = setup().await;
        let mut holder = pg.begin().await.unwrap();
        lock_in_transaction(&mut holder, &name).await.unwrap();
        let waiter = {
            let (pg, name) = (pg.clone(), name.clone());
            tokio::spawn(async move {
                let mut tx = pg.begin().await.unwrap();
                let t = lock_in_transaction(&mut tx, &name).await.unwrap();
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

/// Many locks on few connections: the holder sessions.
mod multiplexed {
    use std::collections::{BTreeSet, HashMap};

    use super::*;
    use dblock::LockGuard;
    use futures::{stream, StreamExt};
    use tokio::time::{sleep, timeout, Instant};

    /// `(key, pid)` of every granted advisory lock on `keys`.
    async fn holders_of(pool: &PgPool, keys: &[i64]) -> Vec<(i64, i32)> {
        sqlx::query_as(
            "SELECT (classid::bigint << 32) | objid::bigint, pid FROM pg_locks
              WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                AND ((classid::bigint << 32) | objid::bigint) = ANY($1)",
        )
        .bind(keys)
        .fetch_all(pool)
        .await
        .unwrap()
    }

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}:{i}")).collect()
    }

    fn keys(names: &[String]) -> Vec<i64> {
        names.iter().map(|n| advisory_key(n)).collect()
    }

    /// Takes every name at once (`width` acquisitions in flight).
    async fn take_all(locks: &Locks, names: &[String], width: usize) -> Vec<LockGuard> {
        stream::iter(names.to_vec())
            .map(|name| {
                let locks = locks.clone();
                async move { locks.acquire(name).wait(suite::HUNG).await.unwrap() }
            })
            .buffer_unordered(width)
            .collect()
            .await
    }

    async fn release_all(guards: Vec<LockGuard>, width: usize) {
        stream::iter(guards)
            .map(|g| g.release())
            .buffer_unordered(width)
            .for_each(|r| {
                r.expect("release");
                async {}
            })
            .await;
    }

    /// Whether one session waits on the server for `name` (within 5 s).
    async fn one_waits_on_server(observer: &PgPool, name: &str) -> bool {
        suite::eventually(Duration::from_secs(5), || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                   AND ((classid::bigint << 32) | objid::bigint) = $1",
            )
            .bind(advisory_key(name))
            .fetch_one(observer)
            .await
            .unwrap();
            waiting == 1
        })
        .await
    }

    /// Once every lock is released, the holder sessions go back to the pool
    /// and no pooled connection holds an advisory lock.
    async fn idle_connections_hold_nothing(pg: &PgPool) {
        assert!(
            suite::eventually(Duration::from_secs(10), || async {
                pg.num_idle() as u32 == pg.size()
            })
            .await,
            "connections did not come back to the pool: {} idle of {}",
            pg.num_idle(),
            pg.size()
        );
        let mut conns = Vec::new();
        for _ in 0..pg.size() {
            conns.push(pg.acquire().await.unwrap());
        }
        for c in &mut conns {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            )
            .fetch_one(&mut **c)
            .await
            .unwrap();
            assert_eq!(n, 0, "a pooled connection holds an advisory lock");
        }
    }

    /// Advisory locks on `pg` as the suite sets them, waiting on the server.
    fn server_locks(pg: PgPool) -> Locks {
        Locks::new(
            Advisory::new(pg)
                .with_options(options(WaitStrategy::Server))
                .unwrap(),
        )
    }

    /// Advisory locks on `pg` as the suite sets them, waiting by `wait`, on
    /// `sessions` holder sessions.
    fn sessions_locks(pg: PgPool, wait: WaitStrategy, sessions: usize) -> Locks {
        Locks::new(
            Advisory::new(pg)
                .with_options(options(wait))
                .unwrap()
                .with_holder_sessions(sessions)
                .unwrap(),
        )
    }

    async fn setup(max: u32) -> (String, PgPool) {
        let url = common::postgres_url().await;
        dblock::postgres::migrate(&pool(&url, 1).await)
            .await
            .unwrap();
        let pg = pool(&url, max).await;
        (url, pg)
    }

    /// 5,000 locks held at once by one process with a pool of 10, on the
    /// default server configuration.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn five_thousand_locks_on_a_pool_of_ten() {
        let _share = share_lock_table().await;
        let (url, pg) = setup(10).await;
        let locks = server_locks(pg.clone());
        let prefix = common::unique("many");
        let names = names(&prefix, 5000);
        let keys = keys(&names);

        let started = Instant::now();
        let guards = take_all(&locks, &names, 100).await;
        let took = started.elapsed();
        assert_eq!(guards.len(), 5000);
        assert!(pg.size() <= 10);
        let tokens: BTreeSet<u64> = guards.iter().map(|g| g.token()).collect();
        assert_eq!(tokens.len(), 5000, "tokens are not distinct");

        let observer = pool(&url, 1).await;
        let held = holders_of(&observer, &keys).await;
        assert_eq!(held.len(), 5000, "not every lock is in pg_locks");
        let sessions: BTreeSet<i32> = held.iter().map(|(_, pid)| *pid).collect();
        assert!(sessions.len() <= 2, "{} sessions", sessions.len());
        let listed = locks.list().await.unwrap();
        let ours = listed
            .iter()
            .filter(|i| i.name.as_deref().is_some_and(|n| n.starts_with(&prefix)))
            .count();
        assert_eq!(ours, 5000, "list() does not name them all");

        // Kept alive by one heartbeat per session, not per lock.
        sleep(Duration::from_millis(700)).await;
        assert!(guards.iter().all(|g| !g.is_lost()));

        let started = Instant::now();
        release_all(guards, 100).await;
        let released = started.elapsed();
        eprintln!(
            "5000 advisory locks taken in {took:?} on {} holder session(s), released in {released:?}",
            sessions.len()
        );
        assert!(holders_of(&observer, &keys).await.is_empty(), "locks left");
        idle_connections_hold_nothing(&pg).await;
    }

    /// Past the server's lock table: a clear error, promptly, and the
    /// backend goes on working. This test fills the table of the whole
    /// server for a moment, so it runs alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_lock_table_is_a_clear_error_and_the_backend_recovers() {
        let _alone = LOCK_TABLE.write().await;
        let (url, pg) = setup(10).await;
        // More holder sessions fill the table sooner.
        let locks = sessions_locks(pg.clone(), WaitStrategy::Server, 8);
        let prefix = common::unique("full");
        let mut guards = Vec::new();
        let started = Instant::now();
        let error = loop {
            assert!(
                guards.len() < 200_000 && started.elapsed() < Duration::from_secs(120),
                "no error after {} locks in {:?}",
                guards.len(),
                started.elapsed()
            );
            let from = guards.len();
            let batch: Vec<_> = stream::iter(from..from + 500)
                .map(|i| {
                    let locks = locks.clone();
                    let name = format!("{prefix}:{i}");
                    async move { locks.acquire(name).wait(suite::HUNG).await }
                })
                .buffer_unordered(100)
                .collect()
                .await;
            let mut first_error = None;
            for r in batch {
                match r {
                    Ok(g) => guards.push(g),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error {
                break e;
            }
        };
        let filled = started.elapsed();
        let held = guards.len();
        let text = error.to_string();
        assert!(matches!(error, Error::LockTableFull { .. }), "{error:?}");
        assert!(text.contains("max_locks_per_transaction"), "{text}");

        // Still full: trying and waiting both fail at once, not by timeout.
        let t = Instant::now();
        let e = locks
            .try_acquire(format!("{prefix}:more"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::LockTableFull { .. }), "{e:?}");
        let e = locks
            .acquire(format!("{prefix}:more"))
            .wait(Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::LockTableFull { .. }), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(guards.iter().all(|g| !g.is_lost()), "a held lock was lost");

        // Room again once some are released.
        let rest = guards.split_off(100);
        release_all(guards, 100).await;
        let g = timeout(
            Duration::from_secs(10),
            locks.acquire(format!("{prefix}:after")),
        )
        .await
        .expect("hung after the table was full")
        .unwrap();
        g.release().await.unwrap();
        release_all(rest, 100).await;
        eprintln!("lock table full after {held} locks, {filled:?}: {text}");

        let observer = pool(&url, 1).await;
        let mut all = names(&prefix, held + 500);
        all.push(format!("{prefix}:more"));
        all.push(format!("{prefix}:after"));
        assert!(holders_of(&observer, &keys(&all)).await.is_empty());
        idle_connections_hold_nothing(&pg).await;
    }

    /// Terminating one holder session loses exactly the guards on it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminating_a_holder_session_loses_exactly_its_guards() {
        let _share = share_lock_table().await;
        let (url, pg) = setup(10).await;
        let heartbeat = Duration::from_millis(300);
        let locks = server_waits(pg.clone(), 3, heartbeat);
        let names = names(&common::unique("victims"), 300);
        let keys = keys(&names);
        let guards = take_all(&locks, &names, 50).await;

        let admin = pool(&url, 1).await;
        let pid_of: HashMap<i64, i32> = holders_of(&admin, &keys).await.into_iter().collect();
        assert_eq!(pid_of.len(), 300);
        let pids: BTreeSet<i32> = pid_of.values().copied().collect();
        assert!(
            (2..=3).contains(&pids.len()),
            "locks on {} sessions",
            pids.len()
        );
        let victim = *pids.iter().next().unwrap();
        let (doomed, spared): (Vec<_>, Vec<_>) = guards
            .into_iter()
            .partition(|g| pid_of[&advisory_key(g.name())] == victim);
        assert!(!doomed.is_empty() && !spared.is_empty());

        let doomed_ref: Vec<&LockGuard> = doomed.iter().collect();
        terminate_and_see_lost(&admin, victim, &doomed_ref, heartbeat).await;
        sleep(heartbeat * 3).await;
        let lost: Vec<_> = spared.iter().filter(|g| g.is_lost()).collect();
        assert!(
            lost.is_empty(),
            "{} guards on other sessions lost",
            lost.len()
        );

        // The doomed names are free for others; the spared ones are not.
        let other = Locks::new(Advisory::new(pool(&url, 3).await));
        assert!(other.try_acquire(doomed[0].name()).await.unwrap().is_some());
        assert!(other.try_acquire(spared[0].name()).await.unwrap().is_none());
        for g in doomed {
            assert!(matches!(g.release().await, Err(Error::Lost { .. })));
        }
        release_all(spared, 50).await;
        assert!(
            suite::eventually(Duration::from_secs(5), || async {
                holders_of(&admin, &keys).await.is_empty()
            })
            .await
        );
        idle_connections_hold_nothing(&pg).await;
    }

    /// Releases and other acquisitions never queue behind a server-side
    /// wait: it has a connection of its own. (A hang check, not a speed
    /// test.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_does_not_wait_behind_a_blocked_server_side_waiter() {
        let _share = share_lock_table().await;
        let (url, pg) = setup(4).await;
        let locks = server_locks(pg.clone());
        let prefix = common::unique("behind");
        let (a, b, c) = (
            format!("{prefix}:a"),
            format!("{prefix}:b"),
            format!("{prefix}:c"),
        );
        let held_a = locks.acquire(&a).await.unwrap();
        let held_c = locks.acquire(&c).await.unwrap();
        let waiter = {
            let (locks, a) = (locks.clone(), a.clone());
            tokio::spawn(async move { locks.acquire(a).wait(suite::HUNG).await })
        };
        // The waiter is blocked on the server.
        let observer = pool(&url, 1).await;
        assert!(
            one_waits_on_server(&observer, &a).await,
            "the waiter never blocked on the server"
        );
        let bound = Duration::from_secs(5);
        timeout(bound, async {
            let g = locks.acquire(&b).await.unwrap();
            g.release().await.unwrap();
            held_c.release().await.unwrap();
        })
        .await
        .expect("acquire/release queued behind a blocked waiter");
        assert!(!waiter.is_finished());
        let first = held_a.token();
        timeout(bound, held_a.release())
            .await
            .expect("release of the awaited lock hung")
            .unwrap();
        let g = timeout(bound, waiter)
            .await
            .expect("the waiter was not handed the lock")
            .unwrap()
            .unwrap();
        assert!(g.token() > first);
        g.release().await.unwrap();
        idle_connections_hold_nothing(&pg).await;
    }

    /// Many locks on one session, and still a held name is never granted
    /// twice: exclusive after exclusive, shared after exclusive and
    /// exclusive after shared wait; shared beside shared is granted (stacked
    /// on the one session) and each guard releases its own hold.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn not_reentrant_with_many_locks_on_one_session() {
        let _share = share_lock_table().await;
        for wait in [
            WaitStrategy::Server,
            WaitStrategy::Poll {
                min: Duration::from_millis(5),
                max: Duration::from_millis(50),
            },
        ] {
            let (url, pg) = setup(4).await;
            let locks = sessions_locks(pg.clone(), wait, 1);
            let prefix = common::unique("reentrant");
            let ex_names = names(&format!("{prefix}:x"), 50);
            let sh_names = names(&format!("{prefix}:s"), 50);
            let all: Vec<String> = ex_names.iter().chain(&sh_names).cloned().collect();
            let ex = take_all(&locks, &ex_names, 25).await;
            let mut sh = Vec::new();
            for n in &sh_names {
                sh.push(locks.acquire(n).shared().await.unwrap());
            }
            let observer = pool(&url, 1).await;
            let pids: BTreeSet<i32> = holders_of(&observer, &keys(&all))
                .await
                .into_iter()
                .map(|(_, pid)| pid)
                .collect();
            assert_eq!(pids.len(), 1, "{wait:?}: not all on one session");

            for n in &ex_names {
                assert!(locks.try_acquire(n).await.unwrap().is_none(), "re-entered");
                let r = locks.acquire(n).shared().wait(Duration::ZERO).await;
                assert!(
                    matches!(r, Err(Error::Timeout { .. })),
                    "shared after exclusive: {r:?}"
                );
            }
            for n in &sh_names {
                assert!(
                    locks.try_acquire(n).await.unwrap().is_none(),
                    "exclusive after shared"
                );
            }
            // Waiting for them (on the server, or polling) times out too.
            for n in [&ex_names[0], &sh_names[0]] {
                let r = locks.acquire(n).wait(Duration::from_millis(200)).await;
                assert!(matches!(r, Err(Error::Timeout { .. })), "{wait:?}: {r:?}");
            }
            // Shared beside shared: granted, on the same session.
            let mut sh2 = Vec::new();
            for n in &sh_names {
                let g = locks
                    .acquire(n)
                    .shared()
                    .wait(Duration::ZERO)
                    .await
                    .unwrap();
                sh2.push(g);
            }
            let info = locks.inspect(&sh_names[0]).await.unwrap().unwrap();
            assert_eq!(info.holders, 2);
            assert_eq!(info.mode, dblock::LockMode::Shared);
            let pids: BTreeSet<i32> = holders_of(&observer, &keys(&all))
                .await
                .into_iter()
                .map(|(_, pid)| pid)
                .collect();
            assert_eq!(
                pids.len(),
                1,
                "{wait:?}: stacked shared locks left the session"
            );

            // One unlock per lock: with one of two shared guards released,
            // the name is still held.
            let other = Locks::new(Advisory::new(pool(&url, 2).await));
            release_all(sh, 25).await;
            for n in &sh_names {
                assert!(
                    other.try_acquire(n).await.unwrap().is_none(),
                    "freed while a shared guard still holds it"
                );
                assert!(locks.try_acquire(n).await.unwrap().is_none());
            }
            release_all(sh2, 25).await;
            release_all(ex, 25).await;
            let mut taken = Vec::new();
            for n in &all {
                taken.push(other.try_acquire(n).await.unwrap().expect("still held"));
            }
            release_all(taken, 25).await;
            assert!(holders_of(&observer, &keys(&all)).await.is_empty());
            idle_connections_hold_nothing(&pg).await;
        }
    }

    /// A shared lock stacked on a session that holds the name shared
    /// already does not jump a writer queued on the server: it waits like
    /// a shared request from another session would.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stacked_shared_lock_does_not_jump_a_queued_writer() {
        let _share = share_lock_table().await;
        let (url, pg) = setup(4).await;
        let locks = sessions_locks(pg.clone(), WaitStrategy::Server, 1);
        let name = common::unique("queued");
        let reader = locks.acquire(&name).shared().await.unwrap();
        // Without a writer queued, a second reader is stacked at once.
        let second = locks
            .acquire(&name)
            .shared()
            .wait(Duration::ZERO)
            .await
            .unwrap();
        second.release().await.unwrap();

        let writers = Locks::new(Advisory::new(pool(&url, 2).await));
        let writer = {
            let name = name.clone();
            tokio::spawn(async move { writers.acquire(name).wait(suite::HUNG).await })
        };
        let observer = pool(&url, 1).await;
        assert!(
            one_waits_on_server(&observer, &name).await,
            "the writer never queued"
        );
        let r = locks
            .acquire(&name)
            .shared()
            .wait(Duration::from_millis(300))
            .await;
        assert!(
            matches!(r, Err(Error::Timeout { .. })),
            "jumped the writer: {r:?}"
        );
        reader.release().await.unwrap();
        let w = timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer was not handed the lock")
            .unwrap()
            .unwrap();
        w.release().await.unwrap();
        idle_connections_hold_nothing(&pg).await;
    }

    /// `force_release` of a lock this backend holds unlocks it on its
    /// session (only its guard is lost); from elsewhere it terminates the
    /// holding session, which ends the other locks on it too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn force_release_breaks_one_of_our_locks_or_a_whole_foreign_session() {
        let _share = share_lock_table().await;
        let (url, pg) = setup(4).await;
        let heartbeat = Duration::from_millis(200);
        let locks = sessions_locks(pg.clone(), WaitStrategy::Server, 1);
        let prefix = common::unique("force");
        let [x, y, z] = ["x", "y", "z"].map(|s| format!("{prefix}:{s}"));
        let gx = locks.acquire(&x).await.unwrap();
        let gy = locks.acquire(&y).await.unwrap();
        let gz = locks.acquire(&z).await.unwrap();

        assert!(locks.force_release(&x).await.unwrap());
        timeout(Duration::from_secs(2), gx.lost())
            .await
            .expect("broken guard not lost");
        sleep(heartbeat * 3).await;
        assert!(!gy.is_lost() && !gz.is_lost(), "collateral damage");
        let other = Locks::new(Advisory::new(pool(&url, 2).await));
        assert!(other.try_acquire(&x).await.unwrap().is_some());
        assert_eq!(gx.lost_reason(), Some(LostReason::ForceReleased));
        assert!(matches!(
            gx.release().await,
            Err(Error::Lost {
                reason: LostReason::ForceReleased,
                ..
            })
        ));

        // From another backend: the session holding y is terminated, and z
        // (on the same session) goes with it.
        assert!(other.force_release(&y).await.unwrap());
        for g in [&gy, &gz] {
            timeout(heartbeat * 2 + Duration::from_secs(1), g.lost())
                .await
                .expect("not lost within a heartbeat");
            assert_eq!(
                g.lost_reason(),
                Some(LostReason::Terminated),
                "{:?}",
                g.lost_detail()
            );
        }
        assert!(
            !locks.force_release(&y).await.unwrap(),
            "nothing left to break"
        );
        drop((gy, gz));
        idle_connections_hold_nothing(&pg).await;
    }

    /// A mix of everything (grants, drops, cancellations, server-side waits
    /// granted and given up, force_release), then no pooled connection
    /// holds an advisory lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_come_back_clean_after_a_mix() {
        let _share = share_lock_table().await;
        let (url, pg) = setup(5).await;
        let locks = server_locks(pg.clone());
        let prefix = common::unique("mix");
        let names = names(&prefix, 40);
        let guards = take_all(&locks, &names, 20).await;
        let mut tasks = Vec::new();
        for (i, n) in names.iter().enumerate().take(20) {
            let (locks, n) = (locks.clone(), n.clone());
            tasks.push(tokio::spawn(async move {
                match i % 4 {
                    // A server-side wait granted later, then dropped.
                    0 => drop(locks.acquire(&n).wait(suite::HUNG).await.unwrap()),
                    // Given up by timeout.
                    1 => {
                        let _ = locks.acquire(&n).wait(Duration::from_millis(50)).await;
                    }
                    // Cancelled mid-wait.
                    2 => {
                        let _ = timeout(Duration::from_millis(30), locks.acquire(&n)).await;
                    }
                    _ => {
                        let _ = locks.try_acquire(&n).await.unwrap();
                    }
                }
            }));
        }
        sleep(Duration::from_millis(100)).await;
        let mut guards = guards.into_iter();
        for g in guards.by_ref().take(20) {
            g.release().await.unwrap();
        }
        locks.force_release(&names[30]).await.unwrap();
        drop(guards);
        for t in tasks {
            timeout(suite::HUNG, t).await.unwrap().unwrap();
        }
        let observer = pool(&url, 1).await;
        assert!(
            suite::eventually(Duration::from_secs(10), || async {
                holders_of(&observer, &keys(&names)).await.is_empty()
            })
            .await
        );
        idle_connections_hold_nothing(&pg).await;
    }

    /// An unlock that fails (here on a session terminated behind the
    /// heartbeat's back) closes the session: the release reports the loss
    /// (someone else may have had the lock meanwhile) and every other guard
    /// on it is lost at once, not a heartbeat later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_unlock_closes_the_session_and_loses_its_guards() {
        let _share = share_lock_table().await;
        let (url, pg) = setup(3).await;
        let locks = server_waits(pg.clone(), 1, Duration::from_secs(600));
        let names = names(&common::unique("unlock"), 20);
        let mut guards = take_all(&locks, &names, 10).await;
        let admin = pool(&url, 1).await;
        let pids: BTreeSet<i32> = holders_of(&admin, &keys(&names))
            .await
            .into_iter()
            .map(|(_, pid)| pid)
            .collect();
        assert_eq!(pids.len(), 1);
        let pid = *pids.iter().next().unwrap();
        let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&admin)
            .await
            .unwrap();
        let first = guards.pop().unwrap();
        let e = timeout(Duration::from_secs(5), first.release())
            .await
            .expect("release hung")
            .unwrap_err();
        assert!(matches!(e, Error::Lost { .. }), "{e:?}");
        for g in &guards {
            timeout(Duration::from_secs(1), g.lost())
                .await
                .expect("a guard on the closed session is not lost");
        }
        // The names are free, and the closed connection was not pooled.
        let other = Locks::new(Advisory::new(pool(&url, 2).await));
        for n in &names {
            assert!(other.try_acquire(n).await.unwrap().is_some(), "{n} held");
        }
        drop(guards);
        idle_connections_hold_nothing(&pg).await;
    }

    /// A lock statement that fails after taking the lock (here `nextval`,
    /// for a role without rights on the sequence) is undone on its session
    /// by one unlock; the session and its other locks go on. Beside a
    /// stacked shared hold the undo could not be told apart from the
    /// earlier hold, so the session is closed and its guards report lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_statement_failing_after_the_lock_is_undone() {
        let _share = share_lock_table().await;
        let (url, admin) = setup(2).await;
        let role = format!("dblock_noseq_{}", std::process::id());
        let run = |sql: String| {
            let admin = admin.clone();
            async move {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&admin)
                    .await
                    .unwrap();
            }
        };
        run(format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN PASSWORD 'noseq'; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             GRANT USAGE ON SEQUENCE dblock_fencing_seq TO {role}"
        ))
        .await;
        let as_role: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        let pg = PgPoolOptions::new()
            .max_connections(3)
            .connect_with(as_role.username(&role).password("noseq"))
            .await
            .unwrap();
        let locks = sessions_locks(pg.clone(), WaitStrategy::Server, 1);
        let prefix = common::unique("undo");
        let [a, b, s] = ["a", "b", "s"].map(|x| format!("{prefix}:{x}"));
        let ga = locks.acquire(&a).await.unwrap();
        let gs = locks.acquire(&s).shared().await.unwrap();
        run(format!(
            "REVOKE USAGE ON SEQUENCE dblock_fencing_seq FROM {role}"
        ))
        .await;

        let e = locks.try_acquire(&b).await.unwrap_err();
        assert!(
            matches!(&e, Error::Database(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501")),
            "{e:?}"
        );
        assert_eq!(
            sessions_holding(&admin, advisory_key(&b)).await,
            0,
            "b left held"
        );
        sleep(Duration::from_millis(600)).await;
        assert!(
            !ga.is_lost() && !gs.is_lost(),
            "the session did not survive"
        );
        assert_eq!(sessions_holding(&admin, advisory_key(&a)).await, 1);

        // Beside a stacked shared hold: the session is closed.
        let e = locks.acquire(&s).shared().await.unwrap_err();
        assert!(matches!(e, Error::Database(_)), "{e:?}");
        timeout(Duration::from_secs(2), gs.lost())
            .await
            .expect("not lost");
        assert!(ga.is_lost());
        assert!(
            suite::eventually(Duration::from_secs(5), || async {
                sessions_holding(&admin, advisory_key(&s)).await == 0
                    && sessions_holding(&admin, advisory_key(&a)).await == 0
            })
            .await
        );
        drop((ga, gs));
        pg.close().await;
        run(format!("DROP ROLE {role}")).await;
    }

    /// Measurements for the record (not a test): time to take and release
    /// 5,000 locks by number of holder sessions, and the statements per
    /// second that keep them alive. Run alone, on a server nobody else
    /// uses: it counts every transaction of the database.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement; run by hand on a quiet server"]
    async fn measure_holder_sessions() {
        let _alone = LOCK_TABLE.write().await;
        let (url, _) = setup(1).await;
        let observer = pool(&url, 1).await;
        let heartbeat = Duration::from_millis(500);
        for sessions in [1, 2, 4, 8] {
            let pg = pool(&url, 10).await;
            let locks = server_waits(pg.clone(), sessions, heartbeat);
            let names = names(&common::unique("measure"), 5000);
            let started = Instant::now();
            let guards = take_all(&locks, &names, 100).await;
            let took = started.elapsed();
            // Count the statements on the holder sessions by watching each
            // one's query_start change (sampled far faster than they run).
            let pids: Vec<i32> = holders_of(&observer, &keys(&names))
                .await
                .into_iter()
                .map(|(_, pid)| pid)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let window = Duration::from_secs(5);
            let mut seen: HashMap<i32, chrono::DateTime<chrono::Utc>> = HashMap::new();
            let mut statements = 0u32;
            let end = Instant::now() + window;
            while Instant::now() < end {
                let rows: Vec<(i32, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
                    "SELECT pid, query_start FROM pg_stat_activity WHERE pid = ANY($1)",
                )
                .bind(&pids)
                .fetch_all(&observer)
                .await
                .unwrap();
                for (pid, start) in rows {
                    let Some(start) = start else { continue };
                    if seen.insert(pid, start).is_some_and(|prev| prev != start) {
                        statements += 1;
                    }
                }
                sleep(Duration::from_millis(10)).await;
            }
            let started = Instant::now();
            release_all(guards, 100).await;
            let released = started.elapsed();
            eprintln!(
                "holder sessions {sessions} (in use {}): 5000 locks taken in {took:?} ({:.0}/s), \
                 released in {released:?}; {:.1} statements/s keep them alive (heartbeat {heartbeat:?})",
                pids.len(),
                5000.0 / took.as_secs_f64(),
                f64::from(statements) / window.as_secs_f64(),
            );
            pg.close().await;
        }
    }
}

/// Semaphores on advisory locks: what only they have (their keys in
/// `pg_locks`, sessions many permits share, disagreement between processes
/// as a race). The suite's semaphore behaviours run above.
mod semaphores {
    use super::*;

    /// A permit's key in SQL, as the README shows it: the SHA-256 of the
    /// name, a NUL byte and `suffix`.
    async fn key_in_sql(pool: &PgPool, name: &str, suffix: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT ('x' || left(encode(sha256(convert_to($1, 'UTF8') || '\\x00'::bytea
                     || convert_to($2, 'UTF8')), 'hex'), 16))::bit(64)::bigint",
        )
        .bind(name)
        .bind(suffix)
        .fetch_one(pool)
        .await
        .unwrap()
    }

    /// How the key is held in `pg_locks`: by how many sessions, in which modes.
    async fn held_as(pool: &PgPool, key: i64) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT mode FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted
               AND ((classid::bigint << 32) | objid::bigint) = $1 ORDER BY mode",
        )
        .bind(key)
        .fetch_all(pool)
        .await
        .unwrap()
    }

    async fn backend(url: &str, size: u32, sessions: usize, heartbeat: Duration) -> Locks {
        server_waits(pool(url, size).await, sessions, heartbeat)
    }

    /// The keys the README documents are the ones held: each permit its
    /// own slot (exclusive), and the name's key, the semaphore marker and
    /// the capacity marker shared.
    #[tokio::test]
    async fn permits_hold_the_documented_keys() {
        let f = fixture(WaitStrategy::Server).await;
        let admin = pool(&f.url, 1).await;
        let name = common::unique("sem-keys 🔒");
        let a = suite::Fixture::locks(&f).await;
        let b = suite::Fixture::locks(&f).await;
        let p1 = a.acquire(&name).max_holders(3).await.unwrap();
        let p2 = b.acquire(&name).max_holders(3).await.unwrap();
        let exclusive = vec!["ExclusiveLock".to_owned()];
        let shared = vec!["ShareLock".to_owned(); 2];
        for (suffix, expected) in [
            ("slot:0", &exclusive),
            ("slot:1", &exclusive),
            ("slot:2", &vec![]),
            ("semaphore", &shared),
            ("max_holders:3", &shared),
        ] {
            let key = key_in_sql(&admin, &name, suffix).await;
            assert_eq!(&held_as(&admin, key).await, expected, "{suffix}");
        }
        assert_eq!(held_as(&admin, advisory_key(&name)).await, shared);
        // Another process's inspect sees the semaphore by its keys alone.
        let c = suite::Fixture::locks(&f).await;
        let info = c.inspect(&name).await.unwrap().expect("held");
        assert_eq!((info.holders, info.max_holders), (2, Some(3)));
        assert_eq!(info.mode, dblock::LockMode::Exclusive);
        p1.release().await.unwrap();
        p2.release().await.unwrap();
        for suffix in ["slot:0", "slot:1", "semaphore", "max_holders:3"] {
            assert!(held_as(&admin, key_in_sql(&admin, &name, suffix).await)
                .await
                .is_empty());
        }
        assert!(held_as(&admin, advisory_key(&name)).await.is_empty());
    }

    /// Acquisitions that disagree, racing from two backends with pools of
    /// their own: never granted together, and each refusal is
    /// `InvalidOption`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disagreeing_acquisitions_race_across_processes() {
        let f = fixture(WaitStrategy::Server).await;
        let a = suite::Fixture::locks(&f).await;
        let b = suite::Fixture::locks(&f).await;
        // (a's n, b's n); 1 is a plain lock, 0 a reader.
        let pairs = [(2, 3), (2, 1), (3, 0), (1, 4)];
        let mut refused = 0;
        for round in 0..60 {
            let (na, nb) = pairs[round % pairs.len()];
            let name = common::unique("sem-race");
            let take = |locks: Locks, n: u32, name: String| async move {
                let acquire = locks.acquire(&name).wait(Duration::from_millis(300));
                let acquire = match n {
                    0 => acquire.shared(),
                    n => acquire.max_holders(n),
                };
                acquire.await
            };
            let (ra, rb) = tokio::join!(
                take(a.clone(), na, name.clone()),
                take(b.clone(), nb, name.clone())
            );
            match (&ra, &rb) {
                (Ok(_), Ok(_)) => panic!("{na} and {nb} holders granted together on {name}"),
                (Err(e), _) | (_, Err(e)) => {
                    assert!(matches!(e, Error::InvalidOption(_)), "{e:?}");
                    refused += 1;
                }
            }
            for g in [ra, rb].into_iter().flatten() {
                g.release().await.unwrap();
            }
            assert!(
                a.inspect(&name).await.unwrap().is_none(),
                "{name} still held"
            );
        }
        assert_eq!(refused, 60);
    }

    /// Many permits on one holder session (of one name, stacked, and of
    /// others): terminating it reports every one lost, and frees them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminating_the_session_loses_every_permit_on_it() {
        let _share = share_lock_table().await;
        let url = common::postgres_url().await;
        let heartbeat = Duration::from_millis(300);
        let locks = backend(&url, 3, 1, heartbeat).await;
        let name = common::unique("sem-victim");
        let other = common::unique("sem-victim-2");
        let mut permits = Vec::new();
        for _ in 0..3 {
            permits.push(locks.acquire(&name).max_holders(3).await.unwrap());
        }
        permits.push(locks.acquire(&other).max_holders(2).await.unwrap());
        let plain = locks
            .acquire(common::unique("sem-victim-plain"))
            .await
            .unwrap();
        let admin = pool(&url, 1).await;
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1
               AND granted AND ((classid::bigint << 32) | objid::bigint) = ANY($1)",
        )
        .bind(vec![advisory_key(&name), advisory_key(&other)])
        .fetch_all(&admin)
        .await
        .unwrap();
        assert_eq!(pids.len(), 1, "the permits are on one session");
        let all: Vec<&dblock::LockGuard> = permits.iter().chain([&plain]).collect();
        terminate_and_see_lost(&admin, pids[0], &all, heartbeat).await;
        for p in permits {
            assert!(matches!(p.release().await, Err(Error::Lost { .. })));
        }
        let again = backend(&url, 2, 1, heartbeat).await;
        let mut fresh = Vec::new();
        for _ in 0..3 {
            let p = again.acquire(&name).max_holders(3).wait(Duration::ZERO);
            fresh.push(p.await.expect("a freed permit"));
        }
        for p in fresh {
            p.release().await.unwrap();
        }
    }

    /// Permits taken, released, dropped and cancelled mid-acquire on a
    /// small pool: afterwards no session holds any of the semaphore's keys
    /// and pooled connections hold nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_permits_leave_nothing_held() {
        let _share = share_lock_table().await;
        let url = common::postgres_url().await;
        let pg = pool(&url, 3).await;
        let locks = Locks::new(Advisory::new(pg.clone()));
        let name = common::unique("sem-clean");
        let mut keep = Vec::new();
        for i in 0..90u64 {
            match i % 3 {
                0 => keep.push(locks.acquire(&name).max_holders(3).await.unwrap()),
                1 => drop(locks.acquire(&name).max_holders(3).await.unwrap()),
                _ => {
                    let _ = timeout(
                        Duration::from_micros(i * 211 % 3000),
                        locks.acquire(&name).max_holders(3),
                    )
                    .await;
                }
            }
            if keep.len() == 2 {
                for p in keep.drain(..) {
                    p.release().await.unwrap();
                }
            }
        }
        for p in keep {
            p.release().await.unwrap();
        }
        let admin = pool(&url, 1).await;
        let mut keys = vec![
            advisory_key(&name),
            key_in_sql(&admin, &name, "semaphore").await,
            key_in_sql(&admin, &name, "max_holders:3").await,
        ];
        for i in 0..3 {
            keys.push(key_in_sql(&admin, &name, &format!("slot:{i}")).await);
        }
        for key in keys {
            assert!(
                suite::eventually(Duration::from_secs(10), || async {
                    sessions_holding(&admin, key).await == 0
                })
                .await,
                "a session still holds key {key}"
            );
        }
        let info = locks.inspect(&name).await.unwrap();
        assert!(info.is_none(), "{info:?}");
    }

    use tokio::time::timeout;
}

mod semaphore_waits {
    use super::*;
    use tokio::time::{sleep, timeout, Instant};

    /// A release in this process hands the permit to a local waiter at
    /// once: with polls 10 s apart, only the wake-up can be that prompt.
    #[tokio::test]
    async fn a_local_release_wakes_a_permit_waiter_at_once() {
        let _share = share_lock_table().await;
        let url = common::postgres_url().await;
        let slow = Duration::from_secs(10);
        let locks = Locks::new(
            Advisory::new(pool(&url, 4).await)
                .with_options(
                    AdvisoryOptions::default()
                        .wait(WaitStrategy::Poll {
                            min: slow,
                            max: slow,
                        })
                        .heartbeat(Duration::from_secs(5)),
                )
                .unwrap(),
        );
        let name = common::unique("sem-wake");
        let p1 = locks.acquire(&name).max_holders(2).await.unwrap();
        let p2 = locks.acquire(&name).max_holders(2).await.unwrap();
        let waiter = {
            let (locks, name) = (locks.clone(), name.clone());
            tokio::spawn(async move {
                let p = locks.acquire(&name).max_holders(2).wait(slow * 3).await;
                (p, Instant::now())
            })
        };
        sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "a third permit of two was granted");
        let released = Instant::now();
        p1.release().await.unwrap();
        let (p3, granted) = timeout(slow, waiter).await.expect("not woken").unwrap();
        let p3 = p3.expect("the freed permit");
        let after = granted - released;
        assert!(
            after < Duration::from_secs(2),
            "handed over after {after:?}"
        );
        p2.release().await.unwrap();
        p3.release().await.unwrap();
    }

    /// Permit waiters take no connection of the pool (they poll): with many
    /// of them waiting, the application still gets one at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn permit_waiters_leave_the_pool_to_the_application() {
        let _share = share_lock_table().await;
        let url = common::postgres_url().await;
        let pg = pool(&url, 4).await;
        let locks = Locks::new(Advisory::new(pg.clone()));
        let name = common::unique("sem-pool");
        let p1 = locks.acquire(&name).max_holders(2).await.unwrap();
        let p2 = locks.acquire(&name).max_holders(2).await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..30 {
            let (locks, name) = (locks.clone(), name.clone());
            waiters.push(tokio::spawn(async move {
                let p = locks
                    .acquire(&name)
                    .max_holders(2)
                    .wait(Duration::from_secs(30))
                    .await
                    .expect("a permit in the end");
                sleep(Duration::from_millis(5)).await;
                p.release().await.unwrap();
            }));
        }
        sleep(Duration::from_millis(500)).await;
        for _ in 0..3 {
            let mut conn = timeout(Duration::from_secs(1), pg.acquire())
                .await
                .expect("the waiters hold the pool")
                .unwrap();
            let one: i32 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            assert_eq!(one, 1);
        }
        p1.release().await.unwrap();
        p2.release().await.unwrap();
        for w in waiters {
            timeout(Duration::from_secs(60), w)
                .await
                .expect("a waiter hung")
                .unwrap();
        }
        assert!(locks.inspect(&name).await.unwrap().is_none());
    }
}

/// A holder session whose connection is black-holed (a proxy stops
/// forwarding; nothing is reset) while the caller's own statement runs on
/// it: the lock statement and the unlock are each given up at the answer
/// bound (the heartbeat, at least 2 s), not left hanging until TCP gives
/// up; the session is closed then, so the lock it held is reported lost at
/// that moment, and the caller gets an error (for a lock, after its try on
/// a new session, which waits for the pool's `acquire_timeout`, 1 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_holder_session_bounds_the_lock_and_the_unlock() {
    let _share = share_lock_table().await;
    let url = common::postgres_url().await;
    dblock::postgres::migrate(&pool(&url, 1).await)
        .await
        .unwrap();
    // The answer bound is max(heartbeat, 2 s) = 2 s; a heartbeat of 1 s is
    // not what notices first, as the caller's statement holds the session.
    let bound = Duration::from_secs(2);
    let pool_wait = Duration::from_secs(1);
    for unlock in [false, true] {
        let what = if unlock { "unlock" } else { "lock" };
        let (proxy, through) = proxy::Proxy::in_front_of(&url).await;
        let pg = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(pool_wait)
            .connect(&through)
            .await
            .unwrap();
        let advisory = Advisory::new(pg)
            .with_options(AdvisoryOptions::default().heartbeat(Duration::from_secs(1)))
            .unwrap()
            .with_holder_sessions(1)
            .unwrap();
        let locks = Locks::new(advisory);
        let held = locks
            .try_acquire(common::unique("hole-held").as_str())
            .await
            .unwrap()
            .expect("free");
        let other = locks
            .try_acquire(common::unique("hole-other").as_str())
            .await
            .unwrap()
            .expect("free");
        proxy.pause(0, true);
        let started = tokio::time::Instant::now();
        let lost = held.lost_owned();
        let lost_at = tokio::spawn(async move {
            lost.lost().await;
            started.elapsed()
        });
        // On the one holder session: an unlock, or a lock statement.
        let outcome = if unlock {
            other.release().await.map(drop)
        } else {
            let new = locks
                .try_acquire(common::unique("hole-new").as_str())
                .await
                .map(drop);
            drop(other);
            new
        };
        let took = started.elapsed();
        assert!(
            outcome.is_err(),
            "{what} on a black-holed session: {outcome:?}"
        );
        let lost_after = lost_at.await.unwrap();
        let slack = Duration::from_millis(1500);
        assert!(
            lost_after >= bound - Duration::from_millis(100) && lost_after < bound + slack,
            "{what}: the session was closed after {lost_after:?}, the bound being {bound:?}"
        );
        let limit = if unlock { bound } else { bound + pool_wait };
        assert!(
            took < limit + slack,
            "{what}: the caller got its error after {took:?} (expected by {limit:?})"
        );
        assert!(
            matches!(held.release().await, Err(Error::Lost { .. })),
            "{what}: releasing the lost lock"
        );
        println!("{what}: session closed after {lost_after:?}, caller's error after {took:?}");
        proxy.pause(0, false);
        proxy.down(0, true);
    }
}
