//! `dblock::mysql` against a real MySQL/MariaDB (`DBLOCK_TEST_MYSQL_URL`).
#![cfg(feature = "mysql")]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use dblock::mysql::{lock_in_transaction, lock_in_transaction_with, migrate, Lease};
use dblock::{Error, LeaseOptions, Locks, Wait};
use sqlx::mysql::{MySqlConnection, MySqlPoolOptions};
use sqlx::{Connection, MySqlPool, Row};
use tokio::time::Instant;

/// Connection ids of a pool's sessions, to find their transactions.
type Ids = Arc<Mutex<HashSet<u64>>>;

/// A pool whose sessions run `setup` first; migrated.
async fn pool_with(setup: &'static str) -> (MySqlPool, Ids) {
    let ids: Ids = Arc::default();
    let seen = ids.clone();
    let pool = MySqlPoolOptions::new()
        .max_connections(40)
        .after_connect(move |conn, _| {
            let seen = seen.clone();
            Box::pin(async move {
                if !setup.is_empty() {
                    sqlx::raw_sql(setup).execute(&mut *conn).await?;
                }
                let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                    .fetch_one(&mut *conn)
                    .await?;
                seen.lock().unwrap().insert(id);
                Ok(())
            })
        })
        .connect(&common::mysql_url().await)
        .await
        .expect("connect to MySQL/MariaDB");
    migrate(&pool).await.expect("migrate");
    (pool, ids)
}

async fn pool() -> MySqlPool {
    pool_with("").await.0
}

async fn raw_conn() -> MySqlConnection {
    MySqlConnection::connect(&common::mysql_url().await)
        .await
        .expect("connect")
}

/// The token floor of `dblock_leases`: a new name's first token is one
/// above it (sweeps of ended rows, in this or another test, raise it).
async fn floor(pool: &MySqlPool) -> u64 {
    sqlx::query_scalar("SELECT floor FROM dblock_token_floor WHERE lease_table = 'dblock_leases'")
        .fetch_one(pool)
        .await
        .expect("migration 2 creates the floor row of dblock_leases")
}

/// `token` is a new name's first: one above the floor at some moment
/// between `before` (read before the claim) and now.
async fn assert_first_token(pool: &MySqlPool, before: u64, token: u64) {
    let after = floor(pool).await;
    assert!(
        before < token && token <= after + 1,
        "a new name starts above the floor ({before}..={after}): got {token}"
    );
}

async fn db_now(pool: &MySqlPool) -> DateTime<Utc> {
    let now: NaiveDateTime = sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)")
        .fetch_one(pool)
        .await
        .unwrap();
    now.and_utc()
}

/// Waits (up to 5 s) until none of `ids` has an open InnoDB transaction;
/// panics with the ones left otherwise.
async fn assert_no_open_transactions(ids: &Ids) {
    let mut probe = raw_conn().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open: Vec<u64> =
            sqlx::query_scalar("SELECT trx_mysql_thread_id FROM information_schema.INNODB_TRX")
                .fetch_all(&mut probe)
                .await
                .unwrap();
        let ours: Vec<u64> = {
            let ids = ids.lock().unwrap();
            open.into_iter().filter(|id| ids.contains(id)).collect()
        };
        if ours.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "our connections {ours:?} still have open transactions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server's error number behind an `Error::Database`.
fn db_code(e: &Error) -> Option<u16> {
    match e {
        Error::Database(e) => e
            .as_database_error()
            .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
            .map(|d| d.number()),
        _ => None,
    }
}

fn is_timeout(e: &Error) -> bool {
    matches!(e, Error::Timeout { .. })
}

#[tokio::test]
async fn waiter_gets_the_lock_when_it_is_released() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let other = Locks::new(Lease::new(pool));
    let name = common::unique("handoff");
    let guard = locks.acquire(&name).await.unwrap();
    let first = guard.token();
    let waiter = {
        let other = other.clone();
        let name = name.clone();
        tokio::spawn(async move { other.acquire(name).wait(Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    let released = Instant::now();
    guard.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    // Another Lease instance: no in-process wake-up, the poll finds it.
    assert!(released.elapsed() < Duration::from_secs(2));
    assert!(next.token() > first);
}

#[tokio::test]
async fn tokens_strictly_increase() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("tokens");
    let mut last = 0;
    let before = floor(&pool).await;
    for i in 0..6 {
        let guard = locks.acquire(&name).await.unwrap();
        if i == 0 {
            assert_first_token(&pool, before, guard.token()).await;
        }
        assert!(guard.token() > last, "{} after {last}", guard.token());
        last = guard.token();
        if i % 2 == 0 {
            guard.release().await.unwrap();
        } else {
            // Released in the background: the next acquire waits for it.
            drop(guard);
        }
    }
    // Another backend instance over the same table continues the sequence.
    let fresh = Locks::new(Lease::new(pool));
    let guard = fresh.acquire(&name).await.unwrap();
    assert!(guard.token() > last);
}

#[tokio::test]
async fn expiry_follows_the_database_clock() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("dbclock");
    // A lease row written by "someone else", expiring in 1.2 s by the
    // server's clock.
    sqlx::query(
        "INSERT INTO dblock_leases (name, owner, holder, mode, token, acquired_at, expires_at) \
         VALUES (?, 'ghost', 'elsewhere:1', 'x', 41, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) + INTERVAL 1200000 MICROSECOND)",
    )
    .bind(name.as_bytes())
    .execute(&pool)
    .await
    .unwrap();
    let info = locks.inspect(&name).await.unwrap().expect("live");
    assert_eq!(info.holder, "elsewhere:1");
    assert!(locks.try_acquire(&name).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let guard = locks.try_acquire(&name).await.unwrap().expect("expired");
    assert_eq!(guard.token(), 42);
}

async fn race(setup: &'static str, expect_isolation: &str) {
    let (pool, ids) = pool_with(setup).await;
    // MySQL 8 calls it transaction_isolation; MariaDB before 11.1 tx_isolation.
    let isolation: String = match sqlx::query_scalar("SELECT @@SESSION.transaction_isolation")
        .fetch_one(&pool)
        .await
    {
        Ok(level) => level,
        Err(_) => sqlx::query_scalar("SELECT @@SESSION.tx_isolation")
            .fetch_one(&pool)
            .await
            .unwrap(),
    };
    assert_eq!(isolation, expect_isolation);
    for round in 0..3 {
        let name = common::unique(&format!("race{round}"));
        let before = floor(&pool).await;
        // Separate backends: no in-process coordination at all.
        let backends: Vec<_> = (0..32)
            .map(|_| Locks::new(Lease::new(pool.clone())))
            .collect();
        let winner = suite::lease::one_winner(&backends, &name).await;
        assert_first_token(&pool, before, winner).await;
    }
    // Everyone waiting instead: one at a time, all served, tokens unique.
    let name = common::unique("queue");
    let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let locks = Locks::new(Lease::new(pool.clone()));
        let name = name.clone();
        let held = held.clone();
        tasks.push(tokio::spawn(async move {
            let guard = locks
                .acquire(&name)
                .wait(Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(held.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
            tokio::time::sleep(Duration::from_millis(5)).await;
            held.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let token = guard.token();
            guard.release().await.unwrap();
            token
        }));
    }
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.push(t.await.unwrap());
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 16);
    assert_no_open_transactions(&ids).await;
}

#[tokio::test]
async fn thirty_two_racers_one_winner_repeatable_read() {
    race(
        "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "REPEATABLE-READ",
    )
    .await;
}

#[tokio::test]
async fn thirty_two_racers_one_winner_read_committed() {
    race(
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "READ-COMMITTED",
    )
    .await;
}

#[tokio::test]
async fn row_locks_held_elsewhere_leave_no_transaction_open() {
    // Our sessions give up on row locks after 1 s.
    let (pool, ids) = pool_with("SET SESSION innodb_lock_wait_timeout = 1").await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("blocked");
    let guard = locks.acquire(&name).await.unwrap();

    // A second session holds the row lock.
    let mut blocker = raw_conn().await;
    sqlx::raw_sql("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("SELECT token FROM dblock_leases WHERE name = ? FOR UPDATE")
        .bind(name.as_bytes())
        .fetch_one(&mut blocker)
        .await
        .unwrap();

    // Renewal and release wait for the row, time out, and leave nothing open.
    let err = guard.extend(Duration::from_secs(30)).await.unwrap_err();
    assert!(matches!(err, Error::Database(_)), "{err:?}");
    let other = Locks::new(Lease::new(pool.clone()));
    // A claim never waits on the row: busy at once.
    let started = Instant::now();
    assert!(other.try_acquire(&name).await.unwrap().is_none());
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(matches!(
        other.acquire(&name).wait(Duration::from_millis(200)).await,
        Err(Error::Timeout { .. })
    ));
    assert_no_open_transactions(&ids).await;

    // The same for a name whose row is being created by the other session.
    let fresh = common::unique("blocked-new");
    sqlx::query(
        "INSERT INTO dblock_leases (name, token, acquired_at, expires_at) \
         VALUES (?, 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
    )
    .bind(fresh.as_bytes())
    .execute(&mut blocker)
    .await
    .unwrap();
    assert!(other.try_acquire(&fresh).await.unwrap().is_none());
    assert_no_open_transactions(&ids).await;

    sqlx::raw_sql("ROLLBACK")
        .execute(&mut blocker)
        .await
        .unwrap();
    // Free again: the renewal goes through, and the fresh name is claimable.
    guard.extend(Duration::from_secs(30)).await.unwrap();
    guard.release().await.unwrap();
    other.try_acquire(&fresh).await.unwrap().expect("free");
    assert_no_open_transactions(&ids).await;
}

#[tokio::test]
async fn a_deadlock_in_lock_in_tx_is_reported_and_leaves_nothing_open() {
    let (pool, ids) = pool_with("").await;
    let a = common::unique("dl-a");
    let b = common::unique("dl-b");
    // Rows exist for both names.
    for n in [&a, &b] {
        let mut tx = pool.begin().await.unwrap();
        lock_in_transaction(&mut tx, n).await.unwrap();
        tx.commit().await.unwrap();
    }
    let mut blocker = raw_conn().await;
    sqlx::raw_sql("BEGIN").execute(&mut blocker).await.unwrap();
    // The blocker writes more, so InnoDB picks our transaction as the victim.
    sqlx::query("UPDATE dblock_leases SET holder = 'blocker' WHERE name IN (?, ?)")
        .bind(b.as_bytes())
        .bind(common::unique("filler").as_bytes())
        .execute(&mut blocker)
        .await
        .unwrap();
    for _ in 0..3 {
        let filler = common::unique("filler");
        sqlx::query(
            "INSERT INTO dblock_leases (name, token, acquired_at, expires_at) \
             VALUES (?, 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
        )
        .bind(filler.as_bytes())
        .execute(&mut blocker)
        .await
        .unwrap();
    }

    let mut tx = pool.begin().await.unwrap();
    lock_in_transaction(&mut tx, &a).await.unwrap();
    let ours = tokio::spawn(async move {
        let r = lock_in_transaction(&mut tx, &b).await;
        (r, tx)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Closes the cycle: blocker waits for `a`, we wait for `b`.
    let theirs = sqlx::query("SELECT token FROM dblock_leases WHERE name = ? FOR UPDATE")
        .bind(a.as_bytes())
        .fetch_one(&mut blocker)
        .await;
    let (r, tx) = ours.await.unwrap();
    match (&r, &theirs) {
        (Err(e), Ok(_)) => assert_eq!(db_code(e), Some(1213), "{e:?}"),
        // The server chose the blocker after all.
        (Ok(_), Err(_)) => {}
        other => panic!("unexpected outcome {other:?}"),
    }
    drop(tx);
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut blocker)
        .await
        .unwrap();
    assert_no_open_transactions(&ids).await;
}

#[tokio::test]
async fn cancelled_acquisitions_leave_nothing_held_or_open() {
    let (pool, ids) = pool_with("").await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("cancel");
    for i in 0..60u64 {
        // Drop the acquisition at every stage of the claim.
        let cut = Duration::from_micros(i * 53 % 2500);
        let _ = tokio::time::timeout(cut, locks.acquire(&name)).await;
    }
    // Whatever was granted in the meantime was released in the background.
    let guard = locks
        .acquire(&name)
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    guard.release().await.unwrap();
    assert!(locks.inspect(&name).await.unwrap().is_none());
    assert_no_open_transactions(&ids).await;
}

#[tokio::test]
async fn expiry_is_right_whatever_the_session_time_zone() {
    let (east, _) = pool_with("SET time_zone = '+05:00'").await;
    let (west, _) = pool_with("SET time_zone = '-07:00'").await;
    let tz: String = sqlx::query_scalar("SELECT @@SESSION.time_zone")
        .fetch_one(&east)
        .await
        .unwrap();
    assert_eq!(tz, "+05:00");
    let locks = Locks::new(Lease::new(east.clone()));
    let name = common::unique("tz");
    let ttl = Duration::from_secs(20);
    let guard = locks.acquire(&name).ttl(ttl).await.unwrap();
    let now = db_now(&east).await;
    let left = (guard.expires_at().unwrap() - now).to_std().unwrap();
    assert!(
        left <= ttl && left > ttl - Duration::from_secs(2),
        "expires in {left:?}"
    );
    // Seen from sessions in other zones, and compared in SQL.
    let seen = Locks::new(Lease::new(west.clone()))
        .inspect(&name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.expires_at, guard.expires_at());
    let diff_ms: i64 = sqlx::query_scalar(
        "SELECT TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at) DIV 1000 \
           FROM dblock_leases WHERE name = ?",
    )
    .bind(name.as_bytes())
    .fetch_one(&west)
    .await
    .unwrap();
    assert!((18_000..=20_000).contains(&diff_ms), "{diff_ms} ms left");
    // Renewal too.
    let at = guard.extend(ttl).await.unwrap().unwrap();
    let left = (at - db_now(&west).await).to_std().unwrap();
    assert!(left <= ttl && left > ttl - Duration::from_secs(2));
    guard.release().await.unwrap();
}

#[tokio::test]
async fn renewals_in_the_same_millisecond_both_succeed() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("renew");
    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_secs(30))
        .await
        .unwrap();
    for _ in 0..50 {
        let a = guard
            .extend(Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        let b = guard
            .extend(Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        assert!(b >= a);
    }
    assert!(!guard.is_lost());
    // An UPDATE that changes nothing still counts its row: sqlx connects
    // with CLIENT_FOUND_ROWS, which the release and renewal rely on (with
    // LAST_INSERT_ID as a second signal).
    for _ in 0..2 {
        let done = sqlx::query("UPDATE dblock_leases SET mode = mode WHERE name = ?")
            .bind(name.as_bytes())
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }
    guard.release().await.unwrap();
}

#[tokio::test]
async fn names_are_bytes_and_shared_mode_is_unsupported() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool));
    let base = common::unique("bytes");
    let names = [
        format!("{base}:a"),
        format!("{base}:A"),
        format!("{base}:a "),
        format!("{base}:'; DROP TABLE dblock_leases; --"),
        format!("{base}:🔒"),
    ];
    let mut guards = Vec::new();
    for n in &names {
        guards.push(locks.try_acquire(n).await.unwrap().expect(n));
    }
    for (g, n) in guards.iter().zip(&names) {
        assert_eq!(
            locks.inspect(n).await.unwrap().unwrap().token,
            Some(g.token())
        );
    }
    // Readers are leases too (the suite covers them in depth).
    let reader = locks.acquire(&base).shared().await.unwrap();
    assert_eq!(reader.mode(), dblock::LockMode::Shared);
    reader.release().await.unwrap();
}

#[tokio::test]
async fn schema_missing_and_bad_table_names() {
    let pool = pool().await;
    let lease = Lease::new(pool.clone())
        .with_table("dblock_missing_xyz")
        .unwrap();
    assert_eq!(lease.table(), "dblock_missing_xyz");
    let is_missing = |e: &Error| {
        matches!(
            e,
            Error::SchemaMissing {
                migrate: "dblock::mysql::migrate(&pool)",
                dir: "mysql"
            }
        )
    };
    // (The other operations: the lease suite's a_missing_table_reports_schema_missing.)
    let mut tx = pool.begin().await.unwrap();
    let err = lease
        .lock_in_transaction_with(&mut tx, "x", Wait::No)
        .await
        .unwrap_err();
    assert!(is_missing(&err), "{err:?}");
    // The statement failed, not the transaction.
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();

    // (Bad table names: the lease suite's with_table_rejects_injection_and_quotes_identifiers.)
    let err = Lease::new(pool.clone())
        .with_options(
            LeaseOptions::default()
                .min_poll(Duration::from_millis(10))
                .max_poll(Duration::from_millis(1)),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)));
}

#[tokio::test]
async fn a_custom_table_qualified_by_its_schema_works() {
    let pool = pool().await;
    let table = suite::lease::TableFixture::custom_table(&MysqlFixture).await;
    let lease = Lease::new(pool.clone())
        .with_table(&table)
        .unwrap()
        .with_options(
            LeaseOptions::default()
                .min_poll(Duration::from_millis(2))
                .max_poll(Duration::from_millis(50)),
        )
        .unwrap();
    let locks = Locks::new(lease.clone());
    let name = common::unique("custom");
    let guard = locks.acquire(&name).await.unwrap();
    let in_default = Locks::new(Lease::new(pool.clone()));
    assert!(in_default.try_acquire(&name).await.unwrap().is_some());
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        lease
            .lock_in_transaction_with(&mut tx, &name, Wait::No)
            .await
            .unwrap(),
        None
    );
    tx.rollback().await.unwrap();
    guard.release().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let token = lease
        .lock_in_transaction_with(&mut tx, &name, Wait::No)
        .await
        .unwrap()
        .expect("free");
    tx.commit().await.unwrap();
    assert!(token > 1);
}

#[tokio::test]
async fn lock_in_tx_tokens_increase_with_leases() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("tx-tokens");
    let mut last = 0;
    for _ in 0..3 {
        let mut tx = pool.begin().await.unwrap();
        let t = lock_in_transaction(&mut tx, &name).await.unwrap();
        assert!(t > last, "{t} after {last}");
        tx.commit().await.unwrap();
        last = t;
        let guard = locks.acquire(&name).await.unwrap();
        assert!(guard.token() > last);
        last = guard.token();
        guard.release().await.unwrap();
    }
    // Re-entrant within a transaction, with a new token each time.
    let mut tx = pool.begin().await.unwrap();
    let t1 = lock_in_transaction(&mut tx, &name).await.unwrap();
    let t2 = lock_in_transaction_with(&mut tx, &name, Wait::No)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((t1, t2), (last + 1, last + 2));
    tx.commit().await.unwrap();
    last = t2;
    // Documented: a rolled-back transaction takes its increment with it.
    let mut tx = pool.begin().await.unwrap();
    let t = lock_in_transaction(&mut tx, &name).await.unwrap();
    assert_eq!(t, last + 1);
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(lock_in_transaction(&mut tx, &name).await.unwrap(), last + 1);
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn lock_in_tx_excludes_leases_and_other_transactions() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("tx-excl");

    let before = floor(&pool).await;
    let mut tx = pool.begin().await.unwrap();
    let t1 = lock_in_transaction(&mut tx, &name).await.unwrap();
    // Created by the transaction, above the floor.
    assert_first_token(&pool, before, t1).await;
    assert!(locks.try_acquire(&name).await.unwrap().is_none());
    assert!(is_timeout(
        &locks
            .acquire(&name)
            .wait(Duration::from_millis(200))
            .await
            .unwrap_err()
    ));

    // Another transaction waits in the server and gets it at COMMIT.
    let waiter = {
        let pool = pool.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let mut tx2 = pool.begin().await.unwrap();
            let started = Instant::now();
            let t = lock_in_transaction_with(&mut tx2, &name, Wait::For(Duration::from_secs(10)))
                .await
                .unwrap()
                .unwrap();
            let waited = started.elapsed();
            tx2.commit().await.unwrap();
            (t, waited)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.commit().await.unwrap();
    let (t2, waited) = waiter.await.unwrap();
    assert!(t2 > t1);
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(2));

    // Free after COMMIT, for leases too.
    let guard = locks.try_acquire(&name).await.unwrap().expect("free");
    assert!(guard.token() > t2);
}

#[tokio::test]
async fn lock_in_tx_timeout_leaves_the_transaction_usable() {
    let pool = pool().await;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS dblock_test_tx_marks (
            mark VARCHAR(200) NOT NULL PRIMARY KEY
        ) ENGINE = InnoDB",
    )
    .execute(&pool)
    .await
    .unwrap();
    let locks = Locks::new(Lease::new(pool.clone()));

    // 1. Held by a lease: fails at once (the lease outlasts the wait).
    let name = common::unique("tx-timeout-lease");
    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_secs(30))
        .await
        .unwrap();
    let mark1 = common::unique("mark");
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO dblock_test_tx_marks VALUES (?)")
        .bind(&mark1)
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = lock_in_transaction_with(&mut tx, &name, Wait::For(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(is_timeout(&err), "{err:?}");
    let mark2 = common::unique("mark");
    sqlx::query("INSERT INTO dblock_test_tx_marks VALUES (?)")
        .bind(&mark2)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The lease was left alone.
    guard.extend(Duration::from_secs(30)).await.unwrap();
    assert!(!guard.is_lost());
    assert_eq!(
        locks.inspect(&name).await.unwrap().unwrap().token,
        Some(guard.token())
    );

    // 2. Held by another transaction: the server-side wait times out.
    let name = common::unique("tx-timeout-tx");
    let mut holder = pool.begin().await.unwrap();
    lock_in_transaction(&mut holder, &name).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let before: u64 = sqlx::query_scalar("SELECT @@SESSION.innodb_lock_wait_timeout")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let mark3 = common::unique("mark");
    sqlx::query("INSERT INTO dblock_test_tx_marks VALUES (?)")
        .bind(&mark3)
        .execute(&mut *tx)
        .await
        .unwrap();
    let started = Instant::now();
    let err = lock_in_transaction_with(&mut tx, &name, Wait::For(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert!(is_timeout(&err), "{err:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let started = Instant::now();
    assert_eq!(
        lock_in_transaction_with(&mut tx, &name, Wait::No)
            .await
            .unwrap(),
        None
    );
    // MariaDB does not wait at all; MySQL 8 waits its minimum of 1 s.
    assert!(started.elapsed() < Duration::from_millis(1500));
    let after: u64 = sqlx::query_scalar("SELECT @@SESSION.innodb_lock_wait_timeout")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(after, before, "the session's lock wait is restored");
    let mark4 = common::unique("mark");
    sqlx::query("INSERT INTO dblock_test_tx_marks VALUES (?)")
        .bind(&mark4)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    holder.rollback().await.unwrap();

    for mark in [mark1, mark2, mark3, mark4] {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dblock_test_tx_marks WHERE mark = ?")
            .bind(&mark)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 1, "{mark} was committed");
    }
}

#[tokio::test]
async fn lock_in_tx_outwaits_a_short_lease() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("tx-outwait");
    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_millis(800))
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let started = Instant::now();
    let t = lock_in_transaction_with(&mut tx, &name, Wait::For(Duration::from_secs(5)))
        .await
        .unwrap()
        .unwrap();
    assert!(t > guard.token());
    assert!(started.elapsed() < Duration::from_secs(2));
    // The lease could not be renewed meanwhile: its guard knows it is lost.
    tokio::time::timeout(Duration::from_secs(2), guard.lost())
        .await
        .expect("the lease guard reports the loss");
    tx.commit().await.unwrap();
    assert!(guard.release().await.is_err());
    assert!(locks.try_acquire(&name).await.unwrap().is_some());
}

#[tokio::test]
async fn lock_in_tx_rejects_bad_input_before_sending_anything() {
    let pool = pool().await;
    let mut tx = pool.begin().await.unwrap();
    assert!(matches!(
        lock_in_transaction(&mut tx, "").await,
        Err(Error::InvalidName(_))
    ));
    assert!(matches!(
        lock_in_transaction_with(&mut tx, "x", Wait::For(Duration::from_secs(u64::MAX / 4))).await,
        Err(Error::InvalidOption(_))
    ));
    tx.rollback().await.unwrap();
}

/// A new, empty database named after `prefix` (to be dropped by the
/// caller through the first pool), and a pool of `size` on it.
async fn fresh_database(prefix: &str, size: u32) -> (MySqlPool, String, MySqlPool) {
    let admin = pool().await;
    let db = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        Utc::now().timestamp_micros()
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{db}`")))
        .execute(&admin)
        .await
        .unwrap();
    let url = common::mysql_url().await;
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap();
    let pool = MySqlPoolOptions::new()
        .max_connections(size)
        .connect(&format!("{base}/{db}"))
        .await
        .unwrap();
    (admin, db, pool)
}

#[tokio::test]
async fn migrate_raced_by_eight_tasks() {
    let (admin, db, pool) = fresh_database("dblock_migrate", 16).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move { migrate(&pool).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    migrate(&pool).await.unwrap();
    let rows =
        sqlx::query("SELECT version, COUNT(*) FROM dblock_schema_migrations GROUP BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(!rows.is_empty());
    for row in rows {
        assert_eq!(row.get::<i64, _>(1), 1, "version {}", row.get::<i64, _>(0));
    }
    let sqlx_table: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.TABLES \
          WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = '_sqlx_migrations'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(sqlx_table, 0);
    let locks = Locks::new(Lease::new(pool.clone()));
    locks.try_acquire("after-migrate").await.unwrap().unwrap();
    pool.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE `{db}`")))
        .execute(&admin)
        .await
        .unwrap();
}

/// MariaDB's `innodb_snapshot_isolation` (the default from 11.6) makes a
/// locking read of a row changed since the transaction's snapshot fail with
/// 1020 and roll the whole transaction back. dblock's own transactions and
/// `lock_in_transaction` called before any read never meet it.
#[tokio::test]
async fn snapshot_isolation_is_never_tripped() {
    let mut probe = raw_conn().await;
    let supported = sqlx::query("SELECT @@innodb_snapshot_isolation")
        .execute(&mut probe)
        .await
        .is_ok();
    let setup = if supported {
        "SET SESSION innodb_snapshot_isolation = ON; \
         SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ"
    } else {
        // MySQL: no such setting; the same flows under REPEATABLE READ.
        "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ"
    };
    let (pool, ids) = pool_with(setup).await;
    let name = common::unique("si");

    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let locks = Locks::new(Lease::new(pool.clone()));
        let (barrier, name) = (barrier.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            for _ in 0..3 {
                let guard = locks
                    .acquire(&name)
                    .ttl(Duration::from_millis(600))
                    .wait(Duration::from_secs(30))
                    .await
                    .unwrap();
                // A transaction in lock_in_transaction may outwait this lease (it
                // cannot be renewed or released while the transaction holds
                // the row): Lost is expected then, a database error never.
                for outcome in [
                    guard.extend(Duration::from_millis(600)).await.map(drop),
                    guard.release().await,
                ] {
                    if let Err(e) = outcome {
                        assert!(matches!(e, Error::Lost { .. }), "{e:?}");
                    }
                }
            }
        }));
    }
    // Transactions taking the name meanwhile, calling lock_in_transaction first.
    for _ in 0..5 {
        let mut tx = pool.begin().await.unwrap();
        lock_in_transaction_with(&mut tx, &name, Wait::For(Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        tx.commit().await.unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_no_open_transactions(&ids).await;

    if supported {
        // Documented: a read before lock_in_transaction, then a change of the row,
        // is the server's snapshot conflict, reported as such.
        let locks = Locks::new(Lease::new(pool.clone()));
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT token FROM dblock_leases WHERE name = ?")
            .bind(name.as_bytes())
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        locks.acquire(&name).await.unwrap().release().await.unwrap();
        let err = lock_in_transaction(&mut tx, &name).await.unwrap_err();
        assert_eq!(db_code(&err), Some(1020), "{err:?}");
        drop(tx);
        assert_no_open_transactions(&ids).await;
    }
}

// ---- The behavioural suite on MySQL/MariaDB. ----

mod suite;

#[derive(Clone)]
struct MysqlFixture;

impl suite::Fixture for MysqlFixture {
    async fn locks(&self) -> Locks {
        Locks::new(Lease::new(pool().await))
    }
    fn unreachable(&self) -> Locks {
        Locks::new(Lease::new(common::lazy_pool(common::NOWHERE_MY)))
    }
}

mod behaviour {
    use super::*;
    behaviour_suite!(async { MysqlFixture });
}

impl suite::lease::LeaseFixture for MysqlFixture {
    async fn db_now(&self) -> DateTime<Utc> {
        db_now(&pool().await).await
    }
    async fn expire_now(&self, name: &str) {
        sqlx::query("UPDATE dblock_leases SET expires_at = UTC_TIMESTAMP(6) WHERE name = ?")
            .bind(name.as_bytes())
            .execute(&pool().await)
            .await
            .unwrap();
    }
}

impl suite::lease::TableFixture for MysqlFixture {
    fn schema_missing(&self) -> (&'static str, &'static str) {
        ("dblock::mysql::migrate(&pool)", "mysql")
    }
    async fn with_table(&self, table: &str) -> Result<Locks, Error> {
        Lease::new(pool().await).with_table(table).map(Locks::new)
    }
    /// `dblock_custom_leases` qualified by its schema (the database).
    async fn custom_table(&self) -> String {
        let pool = pool().await;
        let db: String = sqlx::query_scalar("SELECT DATABASE()")
            .fetch_one(&pool)
            .await
            .unwrap();
        let table = "dblock_custom_leases";
        // A lease table of one's own: the steps of the lease table, with its name.
        for step in [
            include_str!("../migrations/mysql/0001_dblock.sql"),
            include_str!("../migrations/mysql/0004_shared_leases.sql"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(step.replace("dblock_leases", table)))
                .execute(&pool)
                .await
                .unwrap();
        }
        format!("{db}.{table}")
    }
    async fn doomed(&self) -> (Locks, suite::lease::Cut) {
        let doomed = pool().await;
        let locks = Locks::new(Lease::new(doomed.clone()));
        (locks, Box::pin(async move { doomed.close().await }))
    }
    async fn starved(&self) -> (Locks, Box<dyn std::any::Any + Send>) {
        let pool = MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&common::mysql_url().await)
            .await
            .unwrap();
        let busy = pool.acquire().await.unwrap();
        (Locks::new(Lease::new(pool)), Box::new(busy))
    }
    async fn lease_rows(&self, prefix: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM dblock_leases WHERE name LIKE ?")
            .bind(format!("{prefix}:%").into_bytes())
            .fetch_one(&pool().await)
            .await
            .unwrap()
    }
}

mod lease {
    use super::*;
    lease_suite!(tables async { MysqlFixture });
}

/// Not a test: compares the hot path (claim + release through `Locks`)
/// with the same work done raw. Run with
/// `cargo test --all-features --test mysql_lease hot_path -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn hot_path_vs_raw() {
    let pool = MySqlPoolOptions::new()
        .max_connections(4)
        .connect(&common::mysql_url().await)
        .await
        .unwrap();
    migrate(&pool).await.unwrap();
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("bench");
    locks.acquire(&name).await.unwrap().release().await.unwrap();
    let rounds = 1000;
    // Alternate, to even out warm-up and noise.
    let (mut t_raw, mut t_ours) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..3 {
        t_raw += raw_rounds(&pool, &name, rounds).await;
        let started = Instant::now();
        for _ in 0..rounds {
            let guard = locks.acquire(&name).await.unwrap();
            guard.release().await.unwrap();
        }
        t_ours += started.elapsed();
    }
    println!(
        "raw {:?}/op, dblock {:?}/op, throughput ratio dblock/raw {:.2}",
        t_raw / (3 * rounds),
        t_ours / (3 * rounds),
        t_raw.as_secs_f64() / t_ours.as_secs_f64()
    );
}

async fn raw_rounds(pool: &MySqlPool, name: &str, rounds: u32) -> Duration {
    let started = Instant::now();
    for _ in 0..rounds {
        let mut tx = pool.begin().await.unwrap();
        let row = sqlx::query(
            "SELECT token, expires_at > UTC_TIMESTAMP(6) FROM dblock_leases WHERE name = ? FOR UPDATE",
        )
        .bind(name.as_bytes())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let token: u64 = row.get(0);
        assert_eq!(row.get::<i64, _>(1), 0);
        sqlx::query(
            "UPDATE dblock_leases SET owner = 'raw', token = token + 1, acquired_at = UTC_TIMESTAMP(6), \
             expires_at = UTC_TIMESTAMP(6) + INTERVAL 30 SECOND WHERE name = ?",
        )
        .bind(name.as_bytes())
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let done = sqlx::query(
            "UPDATE dblock_leases SET expires_at = UTC_TIMESTAMP(6) \
             WHERE name = ? AND owner = 'raw' AND token = ?",
        )
        .bind(name.as_bytes())
        .bind(token + 1)
        .execute(pool)
        .await
        .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }
    started.elapsed()
}

// ---- Batched renewal, on a table of its own per test. ----

mod batch;

struct MysqlHarness;

impl batch::Harness for MysqlHarness {
    async fn subject(&self, pool_size: u32) -> batch::Subject {
        let admin = pool().await;
        let table = format!("dblock_batch_{}", common::unique("t").replace(':', "_"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} LIKE dblock_leases"
        )))
        .execute(&admin)
        .await
        .unwrap();
        let holder = MySqlPoolOptions::new()
            .max_connections(pool_size)
            .connect(&common::mysql_url().await)
            .await
            .unwrap();
        let lease = Lease::new(holder.clone()).with_table(&table).unwrap();
        let observer = Lease::new(admin.clone()).with_table(&table).unwrap();
        let counted = lease.clone();
        batch::Subject {
            table: table.clone(),
            locks: Locks::new(lease),
            observer: Locks::new(observer),
            stats: Box::new(move || counted.renewal_stats()),
            cut: Some(Box::new(move || {
                Box::pin(async move { holder.close().await })
            })),
            db_updates: None,
            cleanup: Some(Box::pin(async move {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
                    .execute(&admin)
                    .await
                    .unwrap();
            })),
        }
    }
}

mod batched {
    use super::*;
    batch_suite!(MysqlHarness);
}

/// A transaction in `lock_in_transaction` sitting on one lease's row does not hold
/// up the batch: the locked row is skipped (that lease runs out and is
/// reported lost), its neighbours go on being renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_locked_by_lock_in_tx_does_not_hold_up_the_batch() {
    let s = batch::Harness::subject(&MysqlHarness, 8).await;
    let ttl = Duration::from_millis(1500);
    let guards = batch::take(&s.locks, "batch-tx", 50, |_| ttl).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let victim = 25;
    let before = (s.stats)();
    let pool = pool().await;
    // lock_in_transaction on the subject's own table: takes the row lock at once,
    // then waits for the live lease to run out, and takes it over.
    let observer = Lease::new(pool.clone()).with_table(&s.table).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let taken = observer
        .lock_in_transaction_with(
            &mut tx,
            guards[victim].name(),
            Wait::For(Duration::from_secs(10)),
        )
        .await
        .unwrap()
        .expect("taken over once the lease ran out");
    assert!(taken > guards[victim].token());
    assert!(guards[victim].is_lost(), "the lease ran out unnoticed");
    // Keep the row locked over a few more ticks.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = (s.stats)();
    for (k, g) in guards.iter().enumerate() {
        if k != victim {
            assert!(!g.is_lost(), "{k}: {:?}", g.lost_reason());
        }
    }
    assert!(
        after.renewed - before.renewed >= 3 * 49,
        "the batch was held up: {before:?} -> {after:?}"
    );
    tx.commit().await.unwrap();
    batch::release_all_but(guards, victim).await;
    s.finish().await;
}

/// The engine self-test on the plain server: MariaDB or MySQL, not a
/// Galera node; leases and named locks allowed.
#[tokio::test]
async fn engine_self_test_on_a_single_server() {
    let lease = Lease::new(pool().await);
    let engine = lease.engine().await.unwrap();
    assert!(!engine.is_galera(), "{engine:?}");
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(lease.pool())
        .await
        .unwrap();
    assert_eq!(engine.version(), version);
    let flavor = if version.contains("MariaDB") {
        dblock::mysql::Flavor::MariaDb
    } else {
        dblock::mysql::Flavor::MySql
    };
    assert_eq!(engine.flavor(), flavor);
    assert!(engine.check_leases().is_ok());
    assert!(engine.check_named_locks().is_ok());
    assert!(engine.check_lock_in_tx().is_ok());
}

/// A database migrated to version 3 (before shared leases), with a lease
/// held in it, is brought to version 4 by `migrate`: the held lease and its
/// token are kept, the name's next token continues from it, and readers
/// work.
#[tokio::test]
async fn migrating_from_version_3_keeps_held_leases_and_tokens() {
    let (admin, db, pool) = fresh_database("dblock_upgrade", 4).await;
    sqlx::raw_sql(
        "CREATE TABLE dblock_schema_migrations (
            version     BIGINT       NOT NULL PRIMARY KEY,
            description VARCHAR(255) NOT NULL,
            applied_at  DATETIME(6)  NOT NULL
        ) ENGINE = InnoDB",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (version, sql) in [
        (1i64, include_str!("../migrations/mysql/0001_dblock.sql")),
        (2, include_str!("../migrations/mysql/0002_token_floor.sql")),
        (
            3,
            include_str!("../migrations/mysql/0003_semaphore_holders.sql"),
        ),
    ] {
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        sqlx::query(
            "INSERT INTO dblock_schema_migrations (version, description, applied_at) \
             VALUES (?, 'old', UTC_TIMESTAMP(6))",
        )
        .bind(version)
        .execute(&pool)
        .await
        .unwrap();
    }
    // Held by a process of the previous version, and an ended lease.
    sqlx::raw_sql(
        "INSERT INTO dblock_leases (name, owner, holder, mode, token, acquired_at, expires_at) VALUES
           ('held', '0123456789abcdef0123456789abcdef', 'old:1', 'x', 41,
            UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) + INTERVAL 60 SECOND),
           ('ended', NULL, NULL, 'x', 77, UTC_TIMESTAMP(6) - INTERVAL 1 SECOND,
            UTC_TIMESTAMP(6) - INTERVAL 1 SECOND)",
    )
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
    migrate(&pool).await.unwrap();
    // Idempotent, as every step must be (MySQL cannot roll DDL back).
    sqlx::raw_sql(include_str!("../migrations/mysql/0004_shared_leases.sql"))
        .execute(&pool)
        .await
        .unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM dblock_schema_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(versions, [1, 2, 3, 4]);
    let locks = Locks::new(Lease::new(pool.clone()));
    let g = locks.acquire("ended").await.unwrap();
    assert_eq!(g.token(), 78, "a name's token continues from its row");
    g.release().await.unwrap();
    common::check_upgraded(&locks, 41, "ended", 78).await;
    drop(locks);
    pool.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE `{db}`")))
        .execute(&admin)
        .await
        .unwrap();
}

/// Kills every session the pool has opened so far (ignoring those gone).
async fn kill_all(killer: &mut MySqlConnection, ids: &Ids) {
    let ids: Vec<u64> = ids.lock().unwrap().iter().copied().collect();
    for id in ids {
        // An id from the server, not input: formatted, as KILL takes no
        // placeholder.
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL {id}")))
            .execute(&mut *killer)
            .await;
    }
}

/// A lease keeps its connection between a claim and a release instead of
/// handing it back to the pool (which pings it on the way in and out); a
/// kept connection killed meanwhile is not pinged, so the claim or release
/// sent on it fails, and is sent again on a connection from the pool: the
/// caller sees no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_killed_meanwhile_costs_no_error() {
    let (pool, ids) = pool_with("").await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = common::unique("mysql-kept-killed");
    let mut killer = raw_conn().await;
    for round in 0..5 {
        locks.acquire(&name).await.unwrap().release().await.unwrap();
        kill_all(&mut killer, &ids).await;
        let guard = locks
            .try_acquire(&name)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the claim after a KILL failed: {e}"))
            .expect("the name is free");
        kill_all(&mut killer, &ids).await;
        guard
            .release()
            .await
            .unwrap_or_else(|e| panic!("round {round}: the release after a KILL failed: {e}"));
    }
}

/// The connections a lease keeps go back to the pool soon after the last
/// claim or release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_go_back_to_the_pool() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let names: Vec<String> = (0..4)
        .map(|i| common::unique(&format!("mysql-kept-{i}")))
        .collect();
    let pairs = names.iter().map(|n| {
        let locks = locks.clone();
        async move {
            for _ in 0..20 {
                locks.acquire(n).await.unwrap().release().await.unwrap();
            }
        }
    });
    futures::future::join_all(pairs).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (idle, size) = (pool.num_idle(), pool.size());
        if idle as u32 == size {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of the pool's {size} connections still out 2 s after the last release",
            size - idle as u32
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Holds the row lock of `name` in a transaction of its own (as a claim,
/// release or sweep of the name does for a moment), for `hold`.
async fn hold_row_lock(name: &str, hold: Duration) -> tokio::task::JoinHandle<()> {
    let mut conn = raw_conn().await;
    sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
    let locked = sqlx::query("SELECT token FROM dblock_leases WHERE name = ? FOR UPDATE")
        .bind(name.as_bytes())
        .fetch_optional(&mut conn)
        .await
        .unwrap();
    assert!(locked.is_some(), "the row of {name} exists");
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_name_briefly_row_locked_is_not_refused_as_busy() {
    // The row of a free name can be locked for a moment by a transaction
    // that holds no lease: above all the sweep deleting it once ended.
    // try_acquire used to answer busy then (its claim may not wait).
    let locks = Locks::new(Lease::new(pool().await));
    let name = "mysql-brief-row-lock";
    locks
        .try_acquire(name)
        .await
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
    for _ in 0..5 {
        let unlocked = hold_row_lock(name, Duration::from_millis(10)).await;
        let guard = locks.try_acquire(name).await.unwrap();
        assert!(
            guard.is_some(),
            "a free name whose row another transaction locks for 10 ms is taken once the lock goes"
        );
        guard.unwrap().release().await.unwrap();
        unlocked.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_row_locked_by_a_long_transaction_is_busy_promptly() {
    let pool = pool().await;
    let locks = Locks::new(Lease::new(pool.clone()));
    let name = "mysql-long-row-lock";
    locks
        .try_acquire(name)
        .await
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
    // As lock_in_transaction holds a name: for as long as it runs.
    let mut tx = pool.begin().await.unwrap();
    lock_in_transaction(&mut tx, name).await.unwrap();
    let started = Instant::now();
    assert!(locks.try_acquire(name).await.unwrap().is_none());
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "busy after a few short looks, not after the transaction: {took:?}"
    );
    tx.rollback().await.unwrap();
    locks
        .try_acquire(name)
        .await
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_claim_is_refused_while_ended_rows_are_swept() {
    // Ended rows, older than the sweep's grace, for the sweep to delete;
    // and claims of other names, and of those, while it runs (it runs
    // about 2 s after a lease of this backend ends). The sweep used to
    // lock a range of the expiry index, and a claim of another name whose
    // expiry entered or left it was answered busy; a claim of a row being
    // deleted was too.
    let pool = pool().await;
    let prefix = format!("sweep-busy-{}", std::process::id());
    sqlx::query(
        "INSERT IGNORE INTO dblock_leases (name, owner, holder, mode, token, acquired_at, expires_at) \
         WITH RECURSIVE k (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM k WHERE n < 300) \
         SELECT CONCAT(?, '-old-', n), NULL, NULL, 'x', 1, \
                UTC_TIMESTAMP(6) - INTERVAL 1 HOUR, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR \
           FROM k",
    )
    .bind(&prefix)
    .execute(&pool)
    .await
    .unwrap();
    let locks = Locks::new(Lease::new(pool.clone()));
    let end = Instant::now() + Duration::from_millis(3_500);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6 {
        let (locks, name) = (locks.clone(), format!("{prefix}-{i}"));
        tasks.spawn(async move {
            let mut pairs = 0u32;
            while Instant::now() < end {
                let guard = locks.try_acquire(name.as_str()).await.unwrap();
                let guard = guard.unwrap_or_else(|| panic!("{name} is free but was refused"));
                guard.release().await.unwrap();
                pairs += 1;
            }
            pairs
        });
    }
    // The old rows, one by one, across the sweep.
    let (old, prober) = (locks.clone(), prefix.clone());
    tasks.spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_800)).await;
        for k in 1..=300 {
            let name = format!("{prober}-old-{k}");
            let guard = old.try_acquire(name.as_str()).await.unwrap();
            let guard = guard.unwrap_or_else(|| panic!("{name} is free but was refused"));
            guard.release().await.unwrap();
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        1
    });
    let mut pairs = 0;
    while let Some(done) = tasks.join_next().await {
        pairs += done.unwrap();
    }
    assert!(pairs > 100, "the claims ran ({pairs} pairs)");
    // The sweep did run meanwhile: rows ended before the test are gone or
    // were taken over.
    let old_left: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM dblock_leases WHERE name LIKE CONCAT(?, '-old-%') AND token = 1 \
            AND expires_at < UTC_TIMESTAMP(6) - INTERVAL 30 MINUTE",
    )
    .bind(&prefix)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(old_left < 300, "the sweep ran during the test");
}
