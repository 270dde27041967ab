//! The settings and workloads of real servers (issue 11): a role's
//! `statement_timeout`, many waiters on a small pool, bounded tables and
//! maps, leases that come too late, connections left with changed settings.
//!
//! Against the real services (`DBLOCK_TEST_POSTGRES_URL`,
//! `DBLOCK_TEST_MYSQL_URL`, see `tests/common`).

mod common;

use std::str::FromStr;
use std::time::Duration;

use dblock::postgres::{Advisory, Lease};
use dblock::{Error, Locks, Wait};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::OnceCell;
use tokio::time::{sleep, Instant};

async fn pg_options() -> PgConnectOptions {
    PgConnectOptions::from_str(&common::postgres_url().await)
        .expect("a valid DBLOCK_TEST_POSTGRES_URL")
}

async fn pg_pool(options: PgConnectOptions, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(20))
        .connect_with(options)
        .await
        .expect("connect to PostgreSQL (DBLOCK_TEST_POSTGRES_URL)")
}

/// An administrator's pool, with the schema in place.
async fn admin(max: u32) -> PgPool {
    let pool = pg_pool(pg_options().await, max).await;
    dblock::postgres::migrate(&pool).await.expect("migrate");
    pool
}

/// The role of a managed database's application: `statement_timeout` is
/// set on the role, as providers do.
const APP_ROLE: &str = "dblock_t11_app";

/// A pool that logs in as [`APP_ROLE`], created once per run with
/// `statement_timeout = '300ms'`.
async fn app_pool(max: u32) -> PgPool {
    static ROLE: OnceCell<()> = OnceCell::const_new();
    ROLE.get_or_init(|| async {
        let pool = admin(1).await;
        // Roles are cluster-wide: created if missing, then (re)configured.
        sqlx::raw_sql(
            "DO $$ BEGIN
                 CREATE ROLE dblock_t11_app LOGIN SUPERUSER;
             EXCEPTION WHEN duplicate_object THEN NULL;
             END $$;
             ALTER ROLE dblock_t11_app SET statement_timeout = '300ms'",
        )
        .execute(&pool)
        .await
        .expect("create the application role");
    })
    .await;
    let pool = pg_pool(pg_options().await.username(APP_ROLE), max).await;
    // The setting is in force: a statement of 500 ms is cancelled.
    let slow = sqlx::query("SELECT pg_sleep(0.5)").execute(&pool).await;
    match slow {
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("57014") => {}
        other => panic!("the role's statement_timeout is not in force: {other:?}"),
    }
    pool
}

fn is_timeout(r: &dblock::Result<impl std::fmt::Debug>) -> bool {
    matches!(r, Err(Error::Timeout { .. }))
}

/// The holder lets go after a second; a waiter whose role has a 300 ms
/// `statement_timeout` is granted then, and a wait that runs out reports
/// `Timeout`, not the server's cancellation.
async fn a_role_timeout_does_not_cut_waits_short(holder: Locks, waiter: Locks, ttl: bool) {
    let name = common::unique("role-timeout");
    let mut acquire = holder.acquire(&name);
    if ttl {
        acquire = acquire.ttl(Duration::from_secs(10));
    }
    let held = acquire.await.expect("the holder's lock");
    let release = tokio::spawn(async move {
        sleep(Duration::from_secs(1)).await;
        held.release().await.expect("release");
    });
    let started = Instant::now();
    let got = waiter
        .acquire(&name)
        .wait(Duration::from_secs(3))
        .await
        .expect("the waiter is granted once the holder lets go");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "granted after {waited:?}, before the release"
    );
    release.await.unwrap();

    // Now held by the waiter: a second wait runs out after its own second.
    let started = Instant::now();
    let late = waiter.acquire(&name).wait(Duration::from_secs(1)).await;
    let waited = started.elapsed();
    assert!(is_timeout(&late), "expected Error::Timeout, got {late:?}");
    assert!(
        waited >= Duration::from_millis(950),
        "gave up after {waited:?}, before its wait"
    );
    got.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_statement_timeout_advisory() {
    let holder = Locks::new(Advisory::new(admin(3).await));
    let app = app_pool(4).await;
    // One core holder session: the granted wait's session is an extra one,
    // which goes back to the pool once it holds nothing.
    let waiter = Locks::new(Advisory::new(app.clone()).with_holder_sessions(1).unwrap());
    a_role_timeout_does_not_cut_waits_short(holder.clone(), waiter.clone(), false).await;
    // A wait on the server that runs out (the name held by another process).
    let name = common::unique("role-timeout-out");
    let held = holder.acquire(&name).await.unwrap();
    let late = waiter.acquire(&name).wait(Duration::from_millis(400)).await;
    assert!(is_timeout(&late), "expected Error::Timeout, got {late:?}");
    held.release().await.unwrap();
    // The waits lifted the session's statement_timeout for their statement
    // (a granted one, whose connection became a holder session and went
    // back to the pool after its release, and one that ran out): every
    // connection back in the pool has the role's settings again.
    let give_up = Instant::now() + Duration::from_secs(10);
    while app.num_idle() < 2 {
        assert!(
            Instant::now() < give_up,
            "the waits' connections never came back to the pool ({} idle)",
            app.num_idle()
        );
        sleep(Duration::from_millis(20)).await;
    }
    let mut idle = Vec::new();
    for _ in 0..app.num_idle() {
        idle.push(app.acquire().await.unwrap());
    }
    for conn in &mut idle {
        let (statement, lock, marker): (String, String, String) = sqlx::query_as(
            "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),
                    coalesce(current_setting('dblock.session', true), '')",
        )
        .fetch_one(&mut **conn)
        .await
        .unwrap();
        assert_eq!(
            (statement.as_str(), lock.as_str(), marker.as_str()),
            ("300ms", "0", ""),
            "a connection back in the pool (statement_timeout, lock_timeout, holder marker)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_statement_timeout_lease() {
    let holder = Locks::new(Lease::new(admin(3).await));
    let waiter = Locks::new(Lease::new(app_pool(4).await));
    a_role_timeout_does_not_cut_waits_short(holder, waiter, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_statement_timeout_lock_xact() {
    let holder = Locks::new(Advisory::new(admin(3).await));
    let app = app_pool(2).await;
    let name = common::unique("role-timeout-xact");
    let held = holder.acquire(&name).await.unwrap();
    let release = tokio::spawn(async move {
        sleep(Duration::from_secs(1)).await;
        held.release().await.unwrap();
    });
    let mut tx = app.begin().await.unwrap();
    let started = Instant::now();
    let token = dblock::postgres::lock_in_transaction_with(
        &mut tx,
        &name,
        Wait::For(Duration::from_secs(3)),
    )
    .await;
    assert!(
        matches!(token, Ok(Some(_))),
        "expected the lock, got {token:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    release.await.unwrap();
    // The caller's transaction keeps the role's settings for what follows.
    let (statement, idle): (String, String) = sqlx::query_as(
        "SELECT current_setting('statement_timeout'),
                current_setting('idle_in_transaction_session_timeout')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(statement, "300ms");
    assert_eq!(idle, "0");
    tx.commit().await.unwrap();

    // A wait that runs out is a Timeout, and the transaction goes on.
    let _held = holder.acquire(&name).await.unwrap();
    let mut tx = app.begin().await.unwrap();
    let started = Instant::now();
    let late = dblock::postgres::lock_in_transaction_with(
        &mut tx,
        &name,
        Wait::For(Duration::from_secs(1)),
    )
    .await;
    assert!(is_timeout(&late), "expected Error::Timeout, got {late:?}");
    assert!(started.elapsed() >= Duration::from_millis(950));
    let statement: String = sqlx::query_scalar("SELECT current_setting('statement_timeout')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(statement, "300ms");
    tx.commit().await.unwrap();
}

// ---- Bounded footprint. ----

/// The process's resident set, in bytes (Linux).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_forgets_names_nothing_holds() {
    let memory = dblock::memory::Memory::new();
    let locks = Locks::new(memory.clone());
    // Warm up the allocator and the runtime before measuring.
    for i in 0..1_000 {
        let g = locks.acquire(format!("warm:{i}")).await.unwrap();
        g.release().await.unwrap();
    }
    let before = rss();
    let first = locks.acquire("first").await.unwrap().token();
    let streams: Vec<_> = (0..4)
        .map(|s| {
            let locks = locks.clone();
            tokio::spawn(async move {
                let mut last = 0;
                for i in 0..50_000 {
                    let g = locks.acquire(format!("tenant:{s}:{i}")).await.unwrap();
                    assert!(g.token() > last, "tokens increase");
                    last = g.token();
                    if i % 2 == 0 {
                        g.release().await.unwrap();
                    } else {
                        drop(g); // released in the background
                    }
                }
            })
        })
        .collect();
    for s in streams {
        s.await.unwrap();
    }
    // Dropped guards release in the background: give them a moment.
    let until = Instant::now() + Duration::from_secs(5);
    while memory.entries() > 0 && Instant::now() < until {
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(memory.entries(), 0, "names nothing holds are forgotten");
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "200,000 names grew the process by {} MiB",
        grown >> 20
    );
    // A name taken again gets a greater token than it ever had (200,000
    // grants came after "first").
    let again = locks.acquire("first").await.unwrap();
    assert!(again.token() > first + 200_000);
}

#[tokio::test]
async fn memory_sweeps_expired_leases() {
    // Leases that run out (nobody renews them: the guards are leaked on a
    // runtime that is gone) are swept once the map has grown.
    let memory = dblock::memory::Memory::new();
    let locks = Locks::new(memory.clone());
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let l = locks.clone();
        std::thread::spawn(move || {
            rt.block_on(async {
                for i in 0..2_000 {
                    let g = l
                        .acquire(format!("expiring:{i}"))
                        .ttl(Duration::from_secs(1))
                        .await
                        .unwrap();
                    std::mem::forget(g);
                }
            });
        })
        .join()
        .unwrap();
    }
    assert!(memory.entries() >= 2_000);
    sleep(Duration::from_millis(1_200)).await;
    for i in 0..2_100 {
        let g = locks.acquire(format!("fresh:{i}")).await.unwrap();
        std::mem::forget(g); // held: these stay
    }
    assert!(
        memory.entries() <= 2_100 + 1,
        "expired entries were swept: {} left",
        memory.entries()
    );
}

// ---- Waiters use a bounded share of the pool. ----

type Probe = Box<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// A pool of 4, one holder of a hot name, 12 tasks waiting for it: the
/// application's own query (`probe`) and an acquisition of another name
/// each answer within a second, and every waiter is granted in turn.
async fn waiters_leave_room_in_the_pool(locks: Locks, probe: Probe, lease: bool) {
    let hot = common::unique("hot");
    let ttl = Duration::from_secs(10);
    let acquire = |name: &str| {
        let a = locks.acquire(name);
        if lease {
            a.ttl(ttl)
        } else {
            a
        }
    };
    let held = acquire(&hot).await.expect("the holder");
    let waiters: Vec<_> = (0..12)
        .map(|_| {
            let locks = locks.clone();
            let hot = hot.clone();
            tokio::spawn(async move {
                let mut a = locks.acquire(&hot).wait(Duration::from_secs(20));
                if lease {
                    a = a.ttl(ttl);
                }
                let g = a.await?;
                let got = (Instant::now(), g.token());
                sleep(Duration::from_millis(50)).await;
                g.release().await?;
                Ok::<_, Error>(got)
            })
        })
        .collect();
    sleep(Duration::from_millis(500)).await;
    for round in 0..3 {
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(1), probe())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the application's query waited over 1 s"));
        let answered = started.elapsed();
        let other = common::unique("other");
        let started = Instant::now();
        let g = acquire(&other)
            .wait(Duration::from_secs(1))
            .await
            .unwrap_or_else(|e| panic!("round {round}: an unrelated acquisition failed: {e}"));
        let acquired = started.elapsed();
        g.release().await.unwrap();
        assert!(
            acquired < Duration::from_secs(1),
            "round {round}: an unrelated acquisition took {acquired:?}"
        );
        eprintln!("round {round}: query {answered:?}, unrelated acquisition {acquired:?}");
        sleep(Duration::from_millis(200)).await;
    }
    let released_at = Instant::now();
    held.release().await.unwrap();
    let mut grants = Vec::new();
    for w in waiters {
        grants.push(w.await.unwrap().expect("every waiter is granted"));
    }
    grants.sort();
    let tokens: Vec<u64> = grants.iter().map(|g| g.1).collect();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens increase in grant order: {tokens:?}"
    );
    let last = grants.last().unwrap().0 - released_at;
    eprintln!("12 waiters granted in turn within {last:?} of the release");
}

fn pg_probe(pool: &PgPool) -> Probe {
    let pool = pool.clone();
    Box::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&pool).await.unwrap();
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_leave_room_advisory() {
    let pool = admin(4).await;
    let locks = Locks::new(Advisory::new(pool.clone()));
    waiters_leave_room_in_the_pool(locks, pg_probe(&pool), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_leave_room_postgres_lease() {
    let pool = admin(4).await;
    let locks = Locks::new(Lease::new(pool.clone()));
    waiters_leave_room_in_the_pool(locks, pg_probe(&pool), true).await;
}

async fn my_pool(max: u32) -> sqlx::MySqlPool {
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(20))
        .connect(&common::mysql_url().await)
        .await
        .expect("connect to MySQL/MariaDB (DBLOCK_TEST_MYSQL_URL)");
    dblock::mysql::migrate(&pool).await.expect("migrate");
    pool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_leave_room_mysql_lease() {
    let pool = my_pool(4).await;
    let locks = Locks::new(dblock::mysql::Lease::new(pool.clone()));
    let probe: Probe = Box::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&pool).await.unwrap();
        })
    });
    waiters_leave_room_in_the_pool(locks, probe, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_leave_room_sqlite_lease() {
    let dir = std::env::temp_dir().join(common::unique("sqlite").replace(':', "_"));
    std::fs::create_dir_all(&dir).unwrap();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.join("locks.db"))
        .create_if_missing(true);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    dblock::sqlite::migrate(&pool).await.unwrap();
    let locks = Locks::new(dblock::sqlite::Lease::new(pool.clone()));
    let probe: Probe = Box::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&pool).await.unwrap();
        })
    });
    waiters_leave_room_in_the_pool(locks, probe, true).await;
    let _ = std::fs::remove_dir_all(dir);
}

// ---- Bounded lease tables. ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lease_rows_are_swept() {
    let pool = admin(8).await;
    let locks = Locks::new(Lease::new(pool.clone()));
    common::ended_rows_are_swept(
        locks,
        crate::rows_like!(
            pool,
            "SELECT count(*) FROM dblock_leases WHERE name LIKE $1"
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_lease_rows_are_swept() {
    let dir = std::env::temp_dir().join(common::unique("sqlite-swept").replace(':', "_"));
    std::fs::create_dir_all(&dir).unwrap();
    let lease = dblock::sqlite::Lease::open(dir.join("locks.db"))
        .await
        .unwrap();
    let pool = lease.pool().clone();
    common::ended_rows_are_swept(
        Locks::new(lease),
        crate::rows_like!(
            pool,
            "SELECT count(*) FROM dblock_leases WHERE name LIKE ?1"
        ),
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

// ---- No lease handed out past its local deadline. ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_slower_than_the_margin_is_given_back() {
    // A pool of one, kept busy by the application for 1.5 s: a lease of 1 s
    // (local deadline 0.8 s after the claim was sent) is claimed too late.
    let pool = admin(1).await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("late-claim");
    let ttl = Duration::from_secs(1);

    let busy = pool.acquire().await.unwrap();
    let free_at = Instant::now() + Duration::from_millis(1500);
    let hog = tokio::spawn(async move {
        tokio::time::sleep_until(free_at).await;
        drop(busy);
    });
    // Within a wait of 5 s: the late lease is given back and claimed again.
    let guard = locks
        .acquire(&name)
        .ttl(ttl)
        .wait(Duration::from_secs(5))
        .await
        .expect("granted on a second claim");
    hog.await.unwrap();
    sleep(Duration::from_millis(100)).await;
    assert!(!guard.is_lost(), "the guard handed out is a live lease");
    let now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let left = guard.expires_at().unwrap() - now;
    assert!(
        left > chrono::Duration::milliseconds(600),
        "the lease has {left} left"
    );
    // The given-back claim took a token too: the guard's is a later one.
    let info = locks.inspect(&name).await.unwrap().unwrap();
    assert_eq!(info.token, Some(guard.token()));
    guard.release().await.unwrap();

    // With no time left to try again, the late claim is reported, and the
    // name is free (nothing was kept): a lease of 500 ms (local deadline
    // 400 ms after the claim was sent) claimed after 600 ms, with a wait of
    // 200 ms, inside the grace (5 s) a claim in flight is given past the
    // wait.
    let busy = pool.acquire().await.unwrap();
    let hog = tokio::spawn(async move {
        sleep(Duration::from_millis(600)).await;
        drop(busy);
    });
    let late = locks
        .acquire(&name)
        .ttl(Duration::from_millis(500))
        .wait(Duration::from_millis(200))
        .await;
    assert!(
        matches!(late, Err(Error::Lost { .. })),
        "expected Error::Lost, got {late:?}"
    );
    hog.await.unwrap();
    assert!(locks.inspect(&name).await.unwrap().is_none());

    // A claim still waiting for its connection 5 s after it was sent (past
    // the wait of 500 ms) is abandoned: the call ends then, as Unavailable,
    // and the claim, once it has a connection, takes nothing.
    let busy = pool.acquire().await.unwrap();
    let hog = tokio::spawn(async move {
        sleep(Duration::from_millis(6500)).await;
        drop(busy);
    });
    let started = Instant::now();
    let late = locks
        .acquire(&name)
        .ttl(ttl)
        .wait(Duration::from_millis(500))
        .await;
    let took = started.elapsed();
    assert!(
        matches!(late, Err(Error::Unavailable(_))),
        "expected Error::Unavailable, got {late:?}"
    );
    assert!(
        took < Duration::from_millis(6000),
        "a wait of 500 ms returned after {took:?}"
    );
    hog.await.unwrap();
    sleep(Duration::from_millis(200)).await;
    assert!(locks.inspect(&name).await.unwrap().is_none());
}

// ---- MySQL/MariaDB: lock_in_transaction leaves no settings behind. ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_lock_in_tx_leaves_the_connection_as_it_was() {
    let other = my_pool(2).await;
    let one = my_pool(1).await;
    let name = common::unique("lock-in-tx-cancel");
    let (default_wait,): (u64,) = sqlx::query_as("SELECT @@SESSION.innodb_lock_wait_timeout")
        .fetch_one(&one)
        .await
        .unwrap();
    // Another transaction holds the name.
    let mut holder = other.begin().await.unwrap();
    dblock::mysql::lock_in_transaction(&mut holder, &name)
        .await
        .unwrap();
    // A bounded wait, dropped half-way.
    let mut tx = one.begin().await.unwrap();
    let cut = tokio::time::timeout(
        Duration::from_millis(500),
        dblock::mysql::lock_in_transaction_with(&mut tx, &name, Wait::For(Duration::from_secs(3))),
    )
    .await;
    assert!(cut.is_err(), "the wait was cut short by the test");
    drop(tx);
    holder.rollback().await.unwrap();
    // The same (only) connection: its settings are as before.
    let (wait, var): (u64, Option<u64>) =
        sqlx::query_as("SELECT @@SESSION.innodb_lock_wait_timeout, @dblock_lock_wait")
            .fetch_one(&one)
            .await
            .unwrap();
    assert_eq!(
        wait, default_wait,
        "innodb_lock_wait_timeout was left changed"
    );
    assert_eq!(var, None, "a user variable was left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_statement_time_does_not_cut_lock_in_tx_short() {
    // A server (here: every session of this pool) that limits statements
    // to 300 ms, as MariaDB's max_statement_time does.
    let url = common::mysql_url().await;
    let limited = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(2)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET SESSION max_statement_time = 0.3")
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .expect("connect to MariaDB (DBLOCK_TEST_MYSQL_URL)");
    let other = my_pool(2).await;
    let name = common::unique("lock-in-tx-statement-time");
    let mut holder = other.begin().await.unwrap();
    dblock::mysql::lock_in_transaction(&mut holder, &name)
        .await
        .unwrap();
    let commit = tokio::spawn(async move {
        sleep(Duration::from_secs(1)).await;
        holder.commit().await.unwrap();
    });
    let mut tx = limited.begin().await.unwrap();
    let started = Instant::now();
    let token =
        dblock::mysql::lock_in_transaction_with(&mut tx, &name, Wait::For(Duration::from_secs(3)))
            .await;
    assert!(
        matches!(token, Ok(Some(_))),
        "expected the lock, got {token:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    tx.commit().await.unwrap();
    commit.await.unwrap();
}

// ---- No tracing under an internal lock. ----

/// A subscriber that calls back into dblock on every event and on every
/// span opened, recorded, entered or left, as a metrics or audit layer
/// might.
struct CallsBack(
    dblock::memory::Memory,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
);

impl CallsBack {
    /// Takes the backend's renewal registry lock.
    fn call_back(&self) {
        let _ = self.0.renewal_stats();
    }
}

impl tracing::Subscriber for CallsBack {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.call_back();
        self.2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {
        self.call_back();
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {
        self.call_back();
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn enter(&self, _: &tracing::span::Id) {
        self.call_back();
    }
    fn exit(&self, _: &tracing::span::Id) {
        self.call_back();
    }
}

#[test]
fn a_subscriber_that_calls_dblock_does_not_deadlock() {
    let memory = dblock::memory::Memory::new();
    let events = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let spans = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let subscriber = CallsBack(memory.clone(), events.clone(), spans.clone());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _default = tracing::subscriber::set_default(subscriber);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let locks = Locks::new(memory.clone());
            let guard = locks
                .acquire("callback")
                .ttl(Duration::from_millis(300))
                .await
                .unwrap();
            // Held past renewal batches (spans of their own).
            sleep(Duration::from_millis(250)).await;
            // Broken behind its back: the next renewal finds it gone and
            // marks it lost, which logs a warning.
            assert!(locks.force_release("callback").await.unwrap());
            tokio::time::timeout(Duration::from_secs(5), guard.lost())
                .await
                .expect("the guard reports lost");
            drop(guard);
            locks
                .acquire("callback")
                .await
                .unwrap()
                .release()
                .await
                .unwrap();
            sleep(Duration::from_millis(100)).await;
        });
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a subscriber calling back into dblock deadlocked it");
    assert!(
        events.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the warning was logged"
    );
    // Two acquisitions, two releases and at least one renewal batch.
    assert!(
        spans.load(std::sync::atomic::Ordering::Relaxed) >= 5,
        "the spans were opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_lease_rows_are_swept() {
    mysql_rows_are_swept(my_pool(8).await).await;
}

/// The same under READ COMMITTED, where a locking read of a missing row
/// locks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_lease_rows_are_swept_read_committed() {
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(20))
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::raw_sql("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .execute(conn)
                    .await
                    .map(drop)
            })
        })
        .connect(&common::mysql_url().await)
        .await
        .expect("connect to MySQL/MariaDB (DBLOCK_TEST_MYSQL_URL)");
    dblock::mysql::migrate(&pool).await.expect("migrate");
    mysql_rows_are_swept(pool).await;
}

async fn mysql_rows_are_swept(pool: sqlx::MySqlPool) {
    let locks = Locks::new(dblock::mysql::Lease::new(pool.clone()));
    common::ended_rows_are_swept(
        locks,
        crate::rows_like!(pool, "SELECT count(*) FROM dblock_leases WHERE name LIKE ?"),
    )
    .await;
}

/// A database on schema version 1 (rows never deleted), with rows and
/// tokens, migrated to version 2: its names' tokens keep increasing,
/// across a sweep too, and `lock_in_transaction` of a swept name starts above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_migration_keeps_tokens_increasing() {
    use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
    let options =
        MySqlConnectOptions::from_str(&common::mysql_url().await).expect("DBLOCK_TEST_MYSQL_URL");
    let db = common::unique("dblock_mig").replace([':', '-'], "_");
    let db = &db[..db.len().min(64)];
    let admin = MySqlPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .expect("connect to MySQL/MariaDB (DBLOCK_TEST_MYSQL_URL)");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{db}`")))
        .execute(&admin)
        .await
        .unwrap();
    let pool = MySqlPoolOptions::new()
        .max_connections(4)
        .connect_with(options.database(db))
        .await
        .unwrap();
    // Version 1, as an older dblock left it: ended rows with tokens.
    sqlx::raw_sql(include_str!("../migrations/mysql/0001_dblock.sql"))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE dblock_schema_migrations (
            version BIGINT NOT NULL PRIMARY KEY, description VARCHAR(255) NOT NULL,
            applied_at DATETIME(6) NOT NULL) ENGINE = InnoDB;
         INSERT INTO dblock_schema_migrations VALUES (1, 'lease table', UTC_TIMESTAMP(6));
         INSERT INTO dblock_leases (name, token, acquired_at, expires_at) VALUES
            ('old:a', 41, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR),
            ('old:b', 7, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR)",
    )
    .execute(&pool)
    .await
    .unwrap();
    dblock::mysql::migrate(&pool).await.expect("migrate");

    let locks = Locks::new(dblock::mysql::Lease::new(pool.clone()));
    let a = locks.acquire("old:a").await.unwrap();
    assert_eq!(a.token(), 42, "the migrated row's token goes on");
    a.release().await.unwrap();
    // The release schedules a sweep: both old rows go, the floor keeps 42.
    let until = Instant::now() + Duration::from_secs(15);
    let mut left: i64 = 2;
    while left > 0 && Instant::now() < until {
        sleep(Duration::from_millis(250)).await;
        left = sqlx::query_scalar("SELECT count(*) FROM dblock_leases")
            .fetch_one(&pool)
            .await
            .unwrap();
    }
    assert_eq!(left, 0, "ended rows are swept");
    let floor: u64 = sqlx::query_scalar(
        "SELECT floor FROM dblock_token_floor WHERE lease_table = 'dblock_leases'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(floor, 42, "the floor is the highest token swept");
    let b = locks.acquire("old:b").await.unwrap();
    assert_eq!(b.token(), 43, "a swept name starts above the floor");
    b.release().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let t = dblock::mysql::lock_in_transaction(&mut tx, "old:a")
        .await
        .unwrap();
    assert_eq!(
        t, 43,
        "lock_in_transaction of a swept name starts above the floor"
    );
    tx.rollback().await.unwrap();

    pool.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE `{db}`")))
        .execute(&admin)
        .await
        .unwrap();
}

// ---- Dead peers and holder sessions that end abnormally. ----

/// The server-side keepalive timer of the TCP connection whose client end
/// is `client_port`, in seconds, as `ss` shows it (`timer:(keepalive,9.2sec,0)`):
/// the time until the server's next probe on that socket.
fn server_keepalive_secs(server_port: u16, client_port: i32) -> f64 {
    let filter = format!("( sport = :{server_port} and dport = :{client_port} )");
    // Right after a statement the socket may show its retransmission
    // timer instead (`timer:(on,..)`, data not yet acknowledged): look again.
    let mut text = String::new();
    for _ in 0..100 {
        let out = std::process::Command::new("ss")
            .args(["-tnoH", "state", "established", &filter])
            .output()
            .expect("run `ss` (package iproute2) to read the server socket's keepalive timer");
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("timer:(keepalive,") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let timer = text
        .split("timer:(keepalive,")
        .nth(1)
        .unwrap_or_else(|| panic!("no keepalive timer on the server's socket: `ss` said {text:?}"));
    let spec = timer.split(',').next().unwrap_or_default();
    // `ss` prints e.g. `9.2sec`, `1min59sec`, `119min` or `2h0min`.
    let mut secs = 0.0;
    let mut number = String::new();
    let mut rest = spec;
    while let Some(c) = rest.chars().next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            rest = &rest[1..];
            continue;
        }
        let (unit, scale) = if let Some(r) = rest.strip_prefix("sec") {
            (r, 1.0)
        } else if let Some(r) = rest.strip_prefix("min") {
            (r, 60.0)
        } else if let Some(r) = rest.strip_prefix("ms") {
            (r, 0.001)
        } else if let Some(r) = rest.strip_prefix('h') {
            (r, 3600.0)
        } else if let Some(r) = rest.strip_prefix('d') {
            (r, 86400.0)
        } else {
            panic!("unexpected timer {spec:?} in `ss` output {text:?}");
        };
        secs += number.parse::<f64>().expect("a number in the timer") * scale;
        number.clear();
        rest = unit;
    }
    secs
}

/// A holder session probes its peer after 10 s of silence (server-side
/// `tcp_keepalives_idle`), so a holder whose host vanished loses its
/// advisory locks within about 25 s rather than the kernel's two hours.
/// Read on the server's own socket, beside an ordinary pooled connection
/// of the same server, whose timer runs on the system default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_sessions_have_short_keepalives() {
    let options = pg_options().await;
    let server_port = options.get_port();
    assert!(
        options.get_host().parse::<std::net::IpAddr>().is_ok() || options.get_host() == "localhost",
        "this test reads the TCP socket of the holder session: DBLOCK_TEST_POSTGRES_URL must \
         name a TCP host, not {:?}",
        options.get_host()
    );
    let pool = admin(4).await;
    let locks = Locks::new(Advisory::new(pool.clone()));
    let name = common::unique("keepalive");
    let guard = locks.acquire(&name).await.unwrap();
    let key = dblock::advisory_key(&name);

    let port_of = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>(sql)
                .bind(key)
                .fetch_one(&pool)
                .await
                .expect("the client port")
        }
    };
    let holder_port = port_of(
        "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a USING (pid)
          WHERE l.locktype = 'advisory' AND l.granted
            AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
    )
    .await;
    let ordinary_port = port_of(
        "SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid() AND $1 = $1",
    )
    .await;

    let holder = server_keepalive_secs(server_port, holder_port);
    let ordinary = server_keepalive_secs(server_port, ordinary_port);
    assert!(
        ordinary > 60.0,
        "an ordinary connection's keepalive timer is {ordinary} s: the machine's default \
         (net.ipv4.tcp_keepalive_time) is too short for this test to tell anything"
    );
    assert!(
        holder <= 10.5,
        "the holder session's next keepalive probe is {holder} s away (ordinary \
         connection: {ordinary} s): its tcp_keepalives_idle is not in force"
    );
    guard.release().await.unwrap();
}
