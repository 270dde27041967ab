//! dblock's PostgreSQL backends in the topologies users run them in, started
//! by `scripts/topology/pg.sh` (which `scripts/test` runs):
//!
//! - PgBouncer in transaction pooling mode (`DBLOCK_TEST_PGBOUNCER_TX_URL`):
//!   the behavioural suite on `postgres::Lease` with
//!   `transaction_pooling(true)`, `lock_in_transaction`, and `postgres::Advisory`
//!   refusing with `Error::Unsupported` and leaving no lock behind;
//! - PgBouncer in session pooling mode (`DBLOCK_TEST_PGBOUNCER_SESSION_URL`):
//!   the behavioural suite on `postgres::Advisory` and `postgres::Lease`
//!   (default settings), and `lock_in_transaction`;
//! - a primary and an asynchronous standby (`DBLOCK_TEST_PG_FAILOVER`, the
//!   path of `pg.sh`): the standby is promoted after the primary made
//!   commits it never shipped, and every token after the promotion is
//!   greater than every token before it.
//!
//! A test whose variable is unset fails, naming it.
#![cfg(feature = "postgres")]

mod common;
mod suite;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use dblock::postgres::{
    advisory_key, lock_in_transaction, lock_in_transaction_with, Advisory, AdvisoryOptions, Lease,
};
use dblock::{Error, Locks, Wait};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use common::{pg_pool as pool, unique};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run `bash scripts/topology/pg.sh pgbouncer` and \
             `eval \"$(bash scripts/topology/pg.sh env)\"`, or run the tests with \
             `bash scripts/test`"
        )
    })
}

/// A pool through PgBouncer in transaction mode, with the schema in place
/// (migrate runs through the pooler too).
async fn tx_pool(max: u32) -> PgPool {
    let pool = pool(&var("DBLOCK_TEST_PGBOUNCER_TX_URL"), max).await;
    dblock::postgres::migrate(&pool)
        .await
        .expect("migrate through PgBouncer in transaction mode");
    pool
}

/// A pool through PgBouncer in session mode, with the schema in place.
async fn session_pool(max: u32) -> PgPool {
    let pool = pool(&var("DBLOCK_TEST_PGBOUNCER_SESSION_URL"), max).await;
    dblock::postgres::migrate(&pool)
        .await
        .expect("migrate through PgBouncer in session mode");
    pool
}

fn unreachable_pool() -> PgPool {
    common::lazy_pool(common::NOWHERE_PG)
}

// ---- The behavioural suite through PgBouncer. ----

/// A backend with the settings the suite uses: a short heartbeat for
/// advisory locks.
fn advisory(pool: PgPool) -> Locks {
    let options = AdvisoryOptions::default().heartbeat(Duration::from_millis(200));
    Locks::new(Advisory::new(pool).with_options(options).unwrap())
}

/// The suite's backend through one of PgBouncer's pooling modes.
struct PoolerFixture {
    transaction_mode: bool,
    advisory: bool,
    /// In session mode every client connection holds one of PgBouncer's 20
    /// server connections for as long as it lives: one such test at a time.
    _turn: Option<tokio::sync::SemaphorePermit<'static>>,
}

static SESSION_MODE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

impl PoolerFixture {
    async fn new(transaction_mode: bool, advisory: bool) -> Self {
        let turn = if transaction_mode {
            None
        } else {
            Some(SESSION_MODE.acquire().await.unwrap())
        };
        PoolerFixture {
            transaction_mode,
            advisory,
            _turn: turn,
        }
    }

    fn backend(&self, pool: PgPool) -> Locks {
        if self.advisory {
            advisory(pool)
        } else {
            Locks::new(Lease::new(pool).transaction_pooling(self.transaction_mode))
        }
    }
}

impl suite::Fixture for PoolerFixture {
    async fn locks(&self) -> Locks {
        self.backend(if self.transaction_mode {
            tx_pool(8).await
        } else {
            session_pool(4).await
        })
    }
    fn unreachable(&self) -> Locks {
        self.backend(unreachable_pool())
    }
    fn lease(&self) -> bool {
        !self.advisory
    }
}

/// Transaction mode: the lease table, with `transaction_pooling(true)`.
mod pgbouncer_transaction_lease {
    use super::*;
    behaviour_suite!(PoolerFixture::new(true, false));
}

/// Session mode: every backend works as on a direct connection.
mod pgbouncer_session_lease {
    use super::*;
    behaviour_suite!(PoolerFixture::new(false, false));
}

mod pgbouncer_session_advisory {
    use super::*;
    behaviour_suite!(PoolerFixture::new(false, true));
}

/// The negative control of the suite above: without
/// `transaction_pooling(true)`, sqlx's named prepared statements meet on
/// PgBouncer's shared server connections and fail, with an error that
/// names the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn named_statements_fail_through_a_transaction_pooler() {
    let mut failures = Vec::new();
    for _ in 0..5 {
        let (a, b) = (tx_pool(4).await, tx_pool(4).await);
        let (a, b) = (Locks::new(Lease::new(a)), Locks::new(Lease::new(b)));
        let mut tasks = Vec::new();
        for locks in [a, b] {
            for _ in 0..4 {
                let locks = locks.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..5 {
                        let name = unique("named");
                        match locks.try_acquire(&name).await {
                            Ok(Some(g)) => {
                                if let Err(e) = g.release().await {
                                    return Err(e.to_string());
                                }
                            }
                            Ok(None) => {}
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                    Ok(())
                }));
            }
        }
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                failures.push(e);
            }
        }
        if !failures.is_empty() {
            break;
        }
    }
    assert!(
        failures
            .iter()
            .any(|e| e.contains("prepared statement") && e.contains("transaction_pooling(true)")),
        "expected prepared-statement errors naming transaction_pooling(true), got {failures:?}"
    );
}

// ---- PgBouncer, transaction mode: lock_in_transaction. ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_xact_excludes_and_fences_through_a_transaction_pooler() {
    lock_xact_excludes_and_fences(tx_pool(8).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_xact_excludes_and_fences_through_a_session_pooler() {
    lock_xact_excludes_and_fences(session_pool(8).await).await;
}

async fn lock_xact_excludes_and_fences(pool: PgPool) {
    let name = unique("xact-tx");
    let mut a = pool.begin().await.unwrap();
    let t1 = lock_in_transaction(&mut a, &name)
        .await
        .expect("lock_in_transaction");
    let mut b = pool.begin().await.unwrap();
    assert_eq!(
        lock_in_transaction_with(&mut b, &name, Wait::No)
            .await
            .unwrap(),
        None,
        "a second transaction got the lock"
    );
    let err = lock_in_transaction_with(&mut b, &name, Wait::For(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    // b is still usable after its failures.
    sqlx::query("SELECT 1")
        .persistent(false)
        .execute(&mut *b)
        .await
        .unwrap();
    a.commit().await.unwrap();
    let t2 = lock_in_transaction(&mut b, &name)
        .await
        .expect("lock_in_transaction after commit");
    assert!(t2 > t1, "{t2} <= {t1}");
    b.rollback().await.unwrap();

    // Many transactions at once: never two inside.
    let inside = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (pool, name, inside) = (pool.clone(), name.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for _ in 0..10 {
                let mut tx = pool.begin().await.unwrap();
                let token = lock_in_transaction(&mut tx, &name).await.unwrap();
                assert!(token > last);
                last = token;
                assert!(!inside.swap(true, Ordering::SeqCst));
                tokio::time::sleep(Duration::from_millis(1)).await;
                inside.store(false, Ordering::SeqCst);
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

// ---- PgBouncer, transaction mode: advisory locks are refused. ----

/// Every server session holding an advisory lock on `key` (seen directly,
/// not through the pooler).
async fn holders(direct: &PgPool, key: i64) -> Vec<i32> {
    let k = key as u64;
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1
            AND classid::bigint = $1 AND objid::bigint = $2",
    )
    .bind((k >> 32) as i64)
    .bind((k & 0xffff_ffff) as i64)
    .fetch_all(direct)
    .await
    .unwrap()
}

fn assert_refused(err: &Error) {
    match err {
        Error::Unsupported { what, .. } => {
            for word in [
                "transaction",
                "postgres::Lease",
                "lock_in_transaction",
                "pool_mode=session",
            ] {
                assert!(what.contains(word), "{word:?} not in {what:?}");
            }
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn advisory_refuses_a_transaction_pooler_at_first_use_and_leaves_no_lock() {
    let direct = pool(&common::postgres_url().await, 2).await;
    for round in 0..3 {
        let locks = Locks::new(Advisory::new(tx_pool(4).await));
        let name = unique("advisory-tx");
        let err = locks
            .acquire(&name)
            .wait(Duration::from_secs(5))
            .await
            .map(|g| g.token())
            .expect_err("an advisory lock granted through a transaction pooler");
        assert_refused(&err);
        // Refused for good: later calls, waiting or not, too.
        assert_refused(&locks.try_acquire(&name).await.map(|_| ()).unwrap_err());
        assert!(
            holders(&direct, advisory_key(&name)).await.is_empty(),
            "round {round}: a lock stayed on a server connection"
        );
    }
}

/// Through a transaction pooler, ended lease rows and semaphore permits are
/// swept as on a direct connection (the sweeps run unnamed, each in its own
/// transaction), and tokens keep increasing.
/// The database clock (`Locks::now`, which `dblock cron` and leader
/// terms read) through the pooler, from many tasks at once beside other
/// traffic: the proxy hands each exchange whichever server connection is
/// free, so a statement sent in two exchanges (an unnamed statement's
/// parse, then its bind) can meet a server connection that never saw its
/// first half. The full suite once failed so ("unnamed prepared statement
/// does not exist").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_clock_answers_through_a_transaction_pooler() {
    let pool = tx_pool(16).await;
    let locks = Locks::new(Lease::new(pool.clone()).transaction_pooling(true));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let (locks, pool) = (locks.clone(), pool.clone());
        tasks.spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..100 {
                if i % 2 == 0 {
                    if let Err(e) = locks.now().await {
                        failures.push(e.to_string());
                    }
                } else {
                    // Other clients' transactions, moving server connections.
                    sqlx::raw_sql("SELECT pg_sleep(0.0005)")
                        .execute(&pool)
                        .await
                        .expect("a simple query through the pooler");
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        failures.extend(done.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of 800 clock reads failed through the pooler, first: {}",
        failures.len(),
        failures[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ended_rows_are_swept_through_a_transaction_pooler() {
    let direct = pool(&common::postgres_url().await, 2).await;
    let locks = Locks::new(Lease::new(tx_pool(8).await).transaction_pooling(true));
    common::ended_rows_are_swept(
        locks.clone(),
        crate::rows_like!(
            direct,
            "SELECT count(*) FROM dblock_leases WHERE name LIKE $1"
        ),
    )
    .await;
    let prefix = unique("swept-permits");
    for i in 0..100 {
        let permit = locks
            .acquire(format!("{prefix}:{i}"))
            .max_holders(2)
            .await
            .expect("a permit through the pooler");
        permit.release().await.expect("release a permit");
    }
    let like = format!("{prefix}:%");
    let count = |sql: &'static str| {
        let (direct, like) = (direct.clone(), like.clone());
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(like)
                .fetch_one(&direct)
                .await
                .unwrap()
        }
    };
    let swept = suite::eventually(Duration::from_secs(15), || async {
        count("SELECT count(*) FROM dblock_leases_holders WHERE name LIKE $1").await <= 2
            && count("SELECT count(*) FROM dblock_leases WHERE name LIKE $1").await <= 2
    })
    .await;
    assert!(
        swept,
        "{} permit rows and {} marker rows of 100 released permits are left",
        count("SELECT count(*) FROM dblock_leases_holders WHERE name LIKE $1").await,
        count("SELECT count(*) FROM dblock_leases WHERE name LIKE $1").await
    );
}

/// Two backends through the pooler, one lock each: the second cannot be
/// granted the first one's lock through a shared server connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_advisory_backends_through_a_transaction_pooler_never_share_a_lock() {
    let direct = pool(&common::postgres_url().await, 2).await;
    let name = unique("advisory-tx-two");
    let a = advisory(tx_pool(4).await);
    let b = advisory(tx_pool(4).await);
    let ga = a.try_acquire(&name).await;
    let gb = b.try_acquire(&name).await;
    let granted = [&ga, &gb]
        .iter()
        .filter(|g| matches!(g, Ok(Some(_))))
        .count();
    assert!(granted <= 1, "two holders: {ga:?} {gb:?}");
    for g in [&ga, &gb] {
        if let Err(e) = g {
            assert_refused(e);
        }
    }
    assert!(
        ga.is_err() || gb.is_err(),
        "neither backend noticed the transaction pooler"
    );
    drop((ga, gb));
    assert!(
        suite::eventually(Duration::from_secs(5), || async {
            holders(&direct, advisory_key(&name)).await.is_empty()
        })
        .await,
        "a lock stayed on a server connection"
    );
}

// ---- Failover: an asynchronous standby promoted after lost commits. ----

fn topology(verb: &str) {
    let script = var("DBLOCK_TEST_PG_FAILOVER");
    let out = Command::new("bash")
        .arg(&script)
        .arg(verb)
        .output()
        .unwrap_or_else(|e| panic!("run {script} {verb}: {e}"));
    assert!(
        out.status.success(),
        "{script} {verb} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const PRIMARY: &str = "postgres://postgres@127.0.0.1:5433/postgres";
const STANDBY: &str = "postgres://postgres@127.0.0.1:5434/postgres";

/// Takes `n` tokens of each kind (advisory, lock_in_transaction, lease) on `url`,
/// each kind on its own name; returns them all.
async fn take_tokens(url: &str, names: &[String; 3], n: usize) -> Vec<u64> {
    let pool = pool(url, 4).await;
    let advisory = Locks::new(Advisory::new(pool.clone()));
    let lease = Locks::new(Lease::new(pool.clone()));
    let mut tokens = Vec::new();
    for _ in 0..n {
        let g = advisory.acquire(&names[0]).await.expect("advisory");
        tokens.push(g.token());
        g.release().await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        tokens.push(
            lock_in_transaction(&mut tx, &names[1])
                .await
                .expect("lock_in_transaction"),
        );
        tx.commit().await.unwrap();
        let g = lease
            .acquire(&names[2])
            .ttl(Duration::from_secs(5))
            .await
            .expect("lease");
        tokens.push(g.token());
        g.release().await.unwrap();
    }
    pool.close().await;
    tokens
}

/// The raw state the tokens are made from: the sequence's last value and
/// the lease row's token.
async fn raw_state(url: &str, lease_name: &str) -> (i64, i64) {
    let pool = pool(url, 1).await;
    let seq: i64 = sqlx::query_scalar("SELECT last_value FROM dblock_fencing_seq")
        .fetch_one(&pool)
        .await
        .unwrap();
    let row: i64 = sqlx::query_scalar("SELECT token FROM dblock_leases WHERE name = $1")
        .bind(lease_name)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    (seq, row)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_keep_increasing_across_the_promotion_of_a_standby_that_lost_commits() {
    let _pair = fresh_pair().await;
    let names = [unique("fo-adv"), unique("fo-xact"), unique("fo-lease")];
    let shipped = take_tokens(PRIMARY, &names, 3).await;
    topology("stop-standby");
    // Commits the standby never sees: more than the 32 values a sequence
    // logs ahead.
    let lost = take_tokens(PRIMARY, &names, 40).await;
    let (seq_before, row_before) = raw_state(PRIMARY, &names[2]).await;
    topology("kill-primary");
    // A holder session opened on the standby before its promotion: no
    // token can be drawn there yet (a read-only server), and once promoted
    // it draws on the new timeline (an advisory session reads its server's
    // timeline once, at its first grant).
    topology("start-standby");
    let early_pool = pool(STANDBY, 2).await;
    let early = Locks::new(
        Advisory::new(early_pool.clone())
            .with_holder_sessions(1)
            .unwrap(),
    );
    let refused = early.try_acquire(&names[0]).await;
    assert!(
        refused.is_err(),
        "a token drawn on a standby: {:?}",
        refused.map(|g| g.map(|g| g.token()))
    );
    let before_promotion: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&early_pool)
            .await
            .unwrap();
    topology("promote");

    // The negative control: the promoted standby did lose those commits, so
    // raw values would go back.
    let (seq_after, row_after) = raw_state(STANDBY, &names[2]).await;
    assert!(
        seq_after < seq_before && row_after < row_before,
        "the standby lost nothing (sequence {seq_after} vs {seq_before}, row {row_after} vs {row_before}): \
         the test proves nothing"
    );

    let after = take_tokens(STANDBY, &names, 3).await;
    let highest = shipped.iter().chain(&lost).max().copied().unwrap();
    let lowest_after = after.iter().min().copied().unwrap();
    assert!(
        lowest_after > highest,
        "a token went back across the promotion: {lowest_after} after {highest}"
    );
    // On the new timeline (2) in the high bits.
    assert!(after.iter().all(|t| t >> 48 == 2), "{after:?}");
    assert!(shipped.iter().chain(&lost).all(|t| t >> 48 == 1));

    let g = early
        .acquire(&names[0])
        .wait(Duration::from_secs(10))
        .await
        .expect("advisory on the session opened before the promotion");
    let on_early_session: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                         WHERE l.locktype = 'advisory' AND l.granted AND a.backend_start < $1)",
    )
    .bind(before_promotion)
    .fetch_one(&pool(STANDBY, 1).await)
    .await
    .unwrap();
    assert!(
        on_early_session,
        "the lock is not held on the session opened before the promotion: the test proves nothing"
    );
    assert!(
        g.token() >> 48 == 2 && g.token() > after.iter().copied().max().unwrap(),
        "token {} after {after:?}",
        g.token()
    );
    g.release().await.unwrap();
    early_pool.close().await;

    // A token drawn by a server-side wait (fenced with the timeline the
    // statement before the wait read) is on the new timeline too.
    let holder = Locks::new(Advisory::new(pool(STANDBY, 2).await));
    let waiter = Locks::new(Advisory::new(pool(STANDBY, 3).await));
    let held = holder.acquire(&names[0]).await.unwrap();
    let before_wait = held.token();
    let name = names[0].clone();
    let waiting =
        tokio::spawn(async move { waiter.acquire(&name).wait(Duration::from_secs(20)).await });
    let probe = pool(STANDBY, 1).await;
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while !sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)",
    )
    .fetch_one(&probe)
    .await
    .unwrap()
    {
        assert!(
            std::time::Instant::now() < give_up,
            "the waiter never waited on the server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    held.release().await.unwrap();
    let waited = waiting.await.unwrap().expect("the waiter's grant");
    assert!(
        waited.token() >> 48 == 2 && waited.token() > before_wait,
        "a server-side wait's token {} after {before_wait}",
        waited.token()
    );
    waited.release().await.unwrap();
}

/// A new primary/standby pair, the schema migrated on the primary and
/// replayed on the standby; removed when the result is dropped. Tests take
/// turns with it.
async fn fresh_pair() -> (DropPair, tokio::sync::MutexGuard<'static, ()>) {
    let turn = PAIR.lock().await;
    topology("pair");
    let teardown = DropPair;
    let setup = pool(PRIMARY, 1).await;
    dblock::postgres::migrate(&setup)
        .await
        .expect("migrate the primary");
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&setup)
        .await
        .unwrap();
    setup.close().await;
    let standby = pool(STANDBY, 1).await;
    assert!(
        suite::eventually(Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, bool>("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                .bind(&lsn)
                .fetch_one(&standby)
                .await
                .unwrap()
        })
        .await,
        "the standby did not replay the schema"
    );
    standby.close().await;
    // A tuple drops its fields in order: the pair goes before the turn.
    (teardown, turn)
}

/// The primary/standby pair is one: its tests take turns.
static PAIR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Removes the primary/standby pair when the test ends, passed or failed.
struct DropPair;

impl Drop for DropPair {
    fn drop(&mut self) {
        if let Ok(script) = std::env::var("DBLOCK_TEST_PG_FAILOVER") {
            let _ = Command::new("bash").arg(script).arg("drop-pair").status();
        }
    }
}

// ---- Failover under contention: workers through a "virtual IP". ----

/// A TCP forwarder on 127.0.0.1 whose upstream port can be moved, as a
/// failover tool moves a virtual IP: new connections go to the current
/// upstream; connections to a dead server end with it.
async fn virtual_ip(upstream: Arc<AtomicU16>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let up = upstream.load(Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", up)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    port
}

/// One fenced write: when the grant was taken, its token, whether the
/// register accepted it.
#[derive(Debug, Clone, Copy)]
struct Write {
    at: Instant,
    token: u64,
    accepted: bool,
}

/// Workers take `name` through `locks` until `stop`, and write each grant's
/// token to the fenced register `reg` (on the main cluster, which does not
/// fail over: the resource the locks protect).
async fn contend(
    locks: Locks,
    lease: bool,
    name: String,
    register: PgPool,
    reg: String,
    stop: Arc<AtomicBool>,
) -> Vec<Write> {
    let mut writes = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut acquire = locks.acquire(&name).wait(Duration::from_secs(1));
        if lease {
            // Advisory locks have no lease length (and refuse one).
            acquire = acquire.ttl(Duration::from_secs(2));
        }
        let guard = match acquire.await {
            Ok(g) => g,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let at = Instant::now();
        let token = guard.token();
        let accepted = sqlx::query(
            "UPDATE dblock_t9_fence SET fence = $2, value = value + 1 WHERE name = $1 AND fence < $2",
        )
        .bind(&reg)
        .bind(token as i64)
        .execute(&register)
        .await
        .expect("the register is on the main cluster")
        .rows_affected()
            == 1;
        writes.push(Write {
            at,
            token,
            accepted,
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let _ = guard.release().await;
    }
    writes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_under_contention_accepts_no_stale_token() {
    let _pair = fresh_pair().await;
    let register = pool(&common::postgres_url().await, 8).await;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS dblock_t9_fence (
            name text PRIMARY KEY, fence bigint NOT NULL, value bigint NOT NULL)",
    )
    .execute(&register)
    .await
    .unwrap();
    let run = unique("fo-torture");
    let regs = [format!("{run}:advisory"), format!("{run}:lease")];
    for reg in &regs {
        sqlx::query("INSERT INTO dblock_t9_fence VALUES ($1, 0, 0)")
            .bind(reg)
            .execute(&register)
            .await
            .unwrap();
    }

    let upstream = Arc::new(AtomicU16::new(5433));
    let vip = format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        virtual_ip(upstream.clone()).await
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6 {
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy(&vip)
            .unwrap();
        let (locks, reg) = if w % 2 == 0 {
            (advisory(pool), regs[0].clone())
        } else {
            (Locks::new(Lease::new(pool)), regs[1].clone())
        };
        workers.push(tokio::spawn(contend(
            locks,
            w % 2 == 1,
            run.clone(),
            register.clone(),
            reg,
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    topology("stop-standby");
    tokio::time::sleep(Duration::from_secs(2)).await; // commits never shipped
    let killed = Instant::now();
    topology("kill-primary");
    topology("promote");
    upstream.store(5434, Ordering::SeqCst);
    let promoted = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for w in workers {
        all.push(timeout_or_panic(w).await);
    }

    for (k, kind) in ["advisory", "lease"].iter().enumerate() {
        let writes: Vec<Write> = all
            .iter()
            .enumerate()
            .filter(|(w, _)| w % 2 == k)
            .flat_map(|(_, ws)| ws.iter().copied())
            .collect();
        let before: Vec<&Write> = writes.iter().filter(|w| w.at < killed).collect();
        let after: Vec<&Write> = writes.iter().filter(|w| w.at > promoted).collect();
        assert!(
            before.len() > 10 && after.len() > 10,
            "{kind}: too few grants to judge ({} before, {} after)",
            before.len(),
            after.len()
        );
        let highest_before = before.iter().map(|w| w.token).max().unwrap();
        let mask = (1u64 << 48) - 1;
        // The negative control: the new primary did hand out low bits that
        // had been handed out before (the lost commits); only the timeline
        // keeps the tokens apart.
        assert!(
            after
                .iter()
                .any(|w| w.token & mask <= highest_before & mask),
            "{kind}: the promoted standby lost no commits; the test proves nothing"
        );
        for w in &after {
            assert!(
                w.token > highest_before && w.token >> 48 == 2,
                "{kind}: token {} after the promotion, {highest_before} before",
                w.token
            );
            assert!(
                w.accepted,
                "{kind}: the register refused {} after the promotion",
                w.token
            );
        }
        let stale_accepted = writes
            .iter()
            .filter(|w| w.accepted && w.token >> 48 == 1)
            .filter(|w| after.iter().any(|a| a.at < w.at))
            .count();
        assert_eq!(
            stale_accepted, 0,
            "{kind}: stale tokens accepted after the promotion"
        );
        println!(
            "failover torture, {kind}: {} grants before the kill, {} after the promotion, \
             all accepted; 0 stale tokens accepted",
            before.len(),
            after.len()
        );
    }
    sqlx::query("DELETE FROM dblock_t9_fence WHERE name = ANY($1)")
        .bind(&regs[..])
        .execute(&register)
        .await
        .unwrap();
}

async fn timeout_or_panic<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("a worker did not stop within 30 s")
        .expect("a worker panicked")
}
