//! The Redis lease backend against a real Redis (`DBLOCK_TEST_REDIS_URL`).
//!
//! Every test works under a key prefix of its own, so that `list()` and the
//! token counter of one test never see another's. The restart test (a
//! server restart without saving) is in `tests/redis_restart.rs`, its own
//! binary, so that it cannot disturb these.

mod common;

use std::time::Duration;

use dblock::redis::Lease;
use dblock::{Error, LeaseOptions, Locks};
use tokio::time::{sleep, timeout, Instant};

#[path = "torture/proxy.rs"]
#[allow(dead_code)]
mod proxy;

/// A key prefix no other test uses.
fn prefix(what: &str) -> String {
    format!(
        "{}:",
        common::unique(&format!("redis-{what}")).replace(' ', "_")
    )
}

async fn lease(prefix: &str) -> Lease {
    Lease::open(&common::redis_url())
        .await
        .expect("open Redis (is DBLOCK_TEST_REDIS_URL right?)")
        .with_prefix(prefix)
        .expect("prefix")
}

async fn open(prefix: &str) -> Locks {
    Locks::new(lease(prefix).await)
}

/// A plain connection for looking at (and tampering with) the keys.
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(common::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to DBLOCK_TEST_REDIS_URL")
}

/// Kills (`CLIENT KILL ID`) the connections named exactly `name` (see
/// `Lease::connection_name`), and only those: other tests share the
/// server. Answers how many were killed.
async fn kill_named(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .unwrap();
    let wanted = format!("name={name}");
    let ids: Vec<String> = list
        .lines()
        .filter(|line| line.split(' ').any(|field| field == wanted))
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect();
    let mut killed = 0;
    for id in ids {
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(&id)
            .query_async(conn)
            .await
            .unwrap();
        killed += n as usize;
    }
    killed
}

/// A backend under `prefix` whose connections go through a proxy on
/// 127.0.0.1 that can black-hole them (same server and logical database as
/// `DBLOCK_TEST_REDIS_URL`; a password in it is not carried over).
async fn through_proxy(prefix: &str) -> (proxy::Proxy, Lease) {
    let client = redis::Client::open(common::redis_url()).unwrap();
    let info = client.get_connection_info();
    let upstream = tokio::net::lookup_host(info.addr().to_string())
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = proxy::Proxy::start(1, &[upstream]).await;
    let db = info.redis_settings().db();
    let lease = Lease::open(&format!("redis://127.0.0.1:{}/{db}", proxy.port(0)))
        .await
        .unwrap()
        .with_prefix(prefix)
        .unwrap();
    (proxy, lease)
}

async fn server_micros(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    s * 1_000_000 + us
}

/// The key is what the docs say, with Redis' own expiry on it, gone once
/// released; `list` is in name order; readers are leases too. (The lease
/// suite's acquire_try_timeout_release_inspect covers the rest.)
#[tokio::test]
async fn acquire_try_timeout_release_inspect_list() {
    let p = prefix("basic");
    let locks = open(&p).await;
    let name = "reports:nightly";

    let guard = locks
        .acquire(name)
        .ttl(Duration::from_secs(10))
        .await
        .unwrap();
    let mut conn = raw().await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("{p}lock:{name}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 8_000 && pttl <= 10_000, "{pttl}");

    common::listed_in_name_order(&locks, name).await;

    guard.release().await.unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(format!("{p}lock:{name}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "a released lease leaves no key");
    assert!(locks.try_acquire(name).await.unwrap().is_some());
    // Readers are leases too (the suite covers them in depth).
    let reader = locks.acquire("x").shared().await.unwrap();
    assert_eq!(reader.mode(), dblock::LockMode::Shared);
    reader.release().await.unwrap();
}

#[tokio::test]
async fn list_pages_through_scan() {
    let p = prefix("scan");
    let locks = open(&p).await;
    let mut guards = Vec::new();
    for k in 0..2500 {
        guards.push(locks.acquire(format!("n{k:05}")).await.unwrap());
    }
    let listed = locks.list().await.unwrap();
    assert_eq!(listed.len(), 2500);
    assert!(listed.windows(2).all(|w| w[0].name < w[1].name));
    for g in guards {
        g.release().await.unwrap();
    }
    assert!(locks.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn tokens_increase_across_names_expiry_and_a_lost_counter() {
    let p = prefix("tokens");
    let locks = open(&p).await;
    let mut conn = raw().await;
    let before = server_micros(&mut conn).await;

    let mut last = 0;
    for name in ["a", "b", "a", "c", "a"] {
        let g = locks.acquire(name).await.unwrap();
        assert!(g.token() > last, "{} after {last}", g.token());
        last = g.token();
        g.release().await.unwrap();
    }
    // The floor is the server's clock in µs.
    assert!(last >= before, "{last} < server time {before}");

    // A lease that runs out and is claimed again: the counter survived.
    let expired =
        suite::lease::die_holding(&RedisFixture(p.clone()), "a", Duration::from_millis(300));
    let g = locks
        .acquire("a")
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(g.token() > expired);
    last = g.token();
    g.release().await.unwrap();

    // A counter far ahead of the clock (many claims in one µs, or a clock
    // stepped back) still wins: + 1.
    let ahead = server_micros(&mut conn).await + 3_600_000_000;
    let _: () = redis::cmd("SET")
        .arg(format!("{p}token"))
        .arg(ahead)
        .query_async(&mut conn)
        .await
        .unwrap();
    let g = locks.acquire("a").await.unwrap();
    assert_eq!(g.token(), ahead + 1);
    g.release().await.unwrap();

    // The counter lost (as in a restart without persistence): the clock
    // floor takes over, and stays above every token issued from the clock.
    let _: () = redis::cmd("DEL")
        .arg(format!("{p}token"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let g = locks.acquire("a").await.unwrap();
    assert!(g.token() > last, "{} after {last}", g.token());
    g.release().await.unwrap();
}

/// A release publishes only when a waiter marked the lease: the release of
/// a lease nobody waited for sends nothing on the name's channel; once a
/// claim that will wait has missed it, its release does. Its reader
/// (`inspect`) still sees an exclusive lease with the same token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_publishes_only_when_waited_for() {
    use futures::StreamExt;
    let p = prefix("publish");
    let locks = open(&p).await;
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(format!("{p}released:n")).await.unwrap();
    let mut messages = pubsub.into_on_message();

    // Nobody waits: no message.
    let g = locks.acquire("n").await.unwrap();
    assert!(locks.try_acquire("n").await.unwrap().is_none(), "held");
    g.release().await.unwrap();
    let quiet = timeout(Duration::from_millis(300), messages.next()).await;
    assert!(quiet.is_err(), "published without a waiter: {quiet:?}");

    // A waiter misses, then the release publishes the name.
    let g = locks.acquire("n").await.unwrap();
    let w = locks.clone();
    let waiting = tokio::spawn(async move {
        let g = w.acquire("n").wait(Duration::from_secs(30)).await.unwrap();
        g.release().await.unwrap();
    });
    let mut conn = raw().await;
    let key = format!("{p}lock:n");
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let v: String = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if v.split(' ').nth(3) == Some("w") {
            break;
        }
        assert!(Instant::now() < give_up, "the waiter never marked {v:?}");
        sleep(Duration::from_millis(10)).await;
    }
    let seen = locks.inspect("n").await.unwrap().expect("held");
    assert_eq!(seen.token, Some(g.token()));
    assert_eq!(seen.mode, dblock::LockMode::Exclusive);
    g.release().await.unwrap();
    let message = timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("the release of a waited-for lease published nothing")
        .expect("subscription ended");
    assert_eq!(message.get_payload::<String>().unwrap(), "n");
    timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter did not get the lock")
        .unwrap();
}

/// A waiter in another process (another `Lease`: no shared in-process
/// wake-ups) that would poll only every 20 s gets the lock at once on
/// release: through pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_waiter_in_another_process_at_once() {
    let p = prefix("wake");
    let slow_poll = LeaseOptions::default()
        .min_poll(Duration::from_secs(20))
        .max_poll(Duration::from_secs(20));
    let holder = open(&p).await;
    let waiter = Locks::new(lease(&p).await.with_options(slow_poll).unwrap());
    for round in 0..3 {
        let g = holder.acquire("w").await.unwrap();
        let w = waiter.clone();
        let waiting = tokio::spawn(async move {
            let g = w.acquire("w").wait(Duration::from_secs(60)).await.unwrap();
            let at = Instant::now();
            g.release().await.unwrap();
            at
        });
        // Let the waiter miss once and subscribe.
        sleep(Duration::from_millis(500)).await;
        let released = Instant::now();
        g.release().await.unwrap();
        let got = timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiter was not woken by the release")
            .unwrap();
        let after = got - released;
        eprintln!("round {round}: woken {after:?} after the release");
        assert!(after < Duration::from_secs(2), "{after:?}");
    }
}

/// With the pub/sub connection killed, waiters still get the lock: the
/// listener reconnects (and wakes them), and polling bounds the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_survive_a_killed_pubsub_connection() {
    let p = prefix("wake-kill");
    let options = LeaseOptions::default()
        .min_poll(Duration::from_millis(50))
        .max_poll(Duration::from_secs(2));
    let holder = open(&p).await;
    let waiter = lease(&p).await.with_options(options).unwrap();
    let pubsub_name = format!("{}:sub", waiter.connection_name());
    let waiter = Locks::new(waiter);
    let g = holder.acquire("k").await.unwrap();
    let w = waiter.clone();
    let waiting =
        tokio::spawn(async move { w.acquire("k").wait(Duration::from_secs(60)).await.is_ok() });
    sleep(Duration::from_millis(500)).await;
    let mut conn = raw().await;
    // The waiter's pub/sub connection, and no one else's.
    let killed = kill_named(&mut conn, &pubsub_name).await;
    assert_eq!(killed, 1, "the waiter had no pub/sub connection");
    g.release().await.unwrap();
    assert!(timeout(Duration::from_secs(10), waiting)
        .await
        .expect("waiter stuck")
        .unwrap());
}

/// `CLIENT KILL` of the backend's connection: the backend
/// reconnects, renewal goes on, the lease is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connection_is_replaced_and_the_lease_kept() {
    let p = prefix("kill");
    let lease = lease(&p).await;
    let name = lease.connection_name().to_owned();
    let locks = Locks::new(lease);
    let g = locks
        .acquire("k")
        .ttl(Duration::from_millis(1500))
        .await
        .unwrap();
    let mut conn = raw().await;
    let mut killed = Vec::new();
    for _ in 0..3 {
        // The backend's own connection, and no one else's.
        killed.push(kill_named(&mut conn, &name).await);
        sleep(Duration::from_millis(700)).await;
    }
    eprintln!("connections of {name} killed, per round: {killed:?}");
    assert_eq!(killed[0], 1, "the backend's connection was not found");
    assert!(!g.is_lost(), "the lease was lost after CLIENT KILL");
    assert_eq!(
        locks.inspect("k").await.unwrap().expect("held").token,
        Some(g.token())
    );
    g.release().await.unwrap();
    assert!(locks.inspect("k").await.unwrap().is_none());
}

/// A server that stops answering mid-claim does not keep an acquisition
/// with a wait much past it (the wait plus at most a second, well before
/// the connection's own 3 s response timeout): the caller gets
/// `Unavailable`,
/// and the claim, left to finish on its own, gives back the lease it took
/// once the server answers again. Nothing is leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_claim_times_out_within_its_wait_and_leaks_nothing() {
    let p = prefix("stall");
    let (proxy, via) = through_proxy(&p).await;
    let locks = Locks::new(via);
    let observer = open(&p).await;
    // The backend's connection is open (through the proxy) before the cut.
    let warm = locks.try_acquire("warm").await.unwrap().unwrap();
    warm.release().await.unwrap();
    let mut conn = raw().await;
    let counter = format!("{p}token");
    let drawn = async |conn: &mut redis::aio::MultiplexedConnection| -> Option<String> {
        redis::cmd("GET")
            .arg(&counter)
            .query_async(conn)
            .await
            .unwrap()
    };
    let before = drawn(&mut conn).await;

    proxy.pause(0, true);
    let started = Instant::now();
    let got = locks
        .acquire("stalled")
        .ttl(Duration::from_secs(20))
        .wait(Duration::from_millis(300))
        .await;
    let took = started.elapsed();
    assert!(
        matches!(&got, Err(Error::Unavailable(_))),
        "a stalled claim must end as Unavailable: {got:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2_000),
        "returned after {took:?}: the wait is 300 ms, Redis's grace for a claim in flight 1 s"
    );
    // The claim reaches Redis when the connection heals, takes the name,
    // and is given back by the task that finished it.
    proxy.pause(0, false);
    let given_back = common::poll_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async { observer.inspect("stalled").await.unwrap().is_none() },
    )
    .await;
    assert!(given_back, "the late claim's lease was not given back");
    assert_ne!(
        drawn(&mut conn).await,
        before,
        "the stalled claim never reached Redis (no token drawn): the test proves nothing"
    );
    let again = locks.try_acquire("stalled").await.unwrap();
    assert!(again.is_some(), "the backend works again after the stall");
}

/// A black-holed connection (nothing delivered, nothing reset): the guard
/// reports the lease lost before Redis lets it go, and once the network
/// heals, the backend works again on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_connection_loses_the_lease_in_time_and_recovers() {
    let p = prefix("blackhole");
    let (proxy, via) = through_proxy(&p).await;
    let locks = Locks::new(via);
    let observer = open(&p).await;

    let ttl = Duration::from_secs(4);
    let g = locks.acquire("b").ttl(ttl).await.unwrap();
    proxy.pause(0, true);
    let cut = Instant::now();
    timeout(ttl, g.lost())
        .await
        .expect("the guard did not report the loss within its ttl");
    let lost_after = cut.elapsed();
    // Redis still holds it (the loss is reported before the key expires).
    let still = observer.inspect("b").await.unwrap();
    eprintln!(
        "lost {lost_after:?} after the black hole; key still there: {}",
        still.is_some()
    );
    assert!(lost_after < ttl, "{lost_after:?}");
    let next = observer
        .acquire("b")
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(next.token() > g.token());
    next.release().await.unwrap();
    drop(g);

    proxy.pause(0, false);
    proxy.close(0);
    // A fresh name per try: a claim whose answer was lost with the closed
    // connection may have taken its name (until the ttl runs out).
    let again = timeout(Duration::from_secs(15), async {
        for k in 0.. {
            match locks.try_acquire(format!("b2:{k}")).await {
                Ok(Some(g)) => return g,
                Ok(None) => panic!("a fresh name was busy"),
                Err(e) => {
                    eprintln!("not yet: {e}");
                    sleep(Duration::from_millis(200)).await
                }
            }
        }
        unreachable!()
    })
    .await
    .expect("the backend did not recover after the network healed");
    again.release().await.unwrap();
}

/// The script cache flushed (as after a restart): EVALSHA falls back to
/// loading the script.
#[tokio::test]
async fn a_flushed_script_cache_is_reloaded() {
    let p = prefix("flush");
    let locks = open(&p).await;
    let g = locks.acquire("f").await.unwrap();
    let mut conn = raw().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(locks.try_acquire("f").await.unwrap().is_none());
    g.release().await.unwrap();
    let g = locks.acquire("f").await.unwrap();
    g.release().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_written() {
    // URLs: not parseable, wrong scheme (no password echoed).
    for url in ["", "not a url", "http://u:hunter22@127.0.0.1/0"] {
        let err = Lease::open(url).await.unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "{url:?}: {err:?}");
        assert!(!err.to_string().contains("hunter22"), "{err}");
    }
    // Unreachable: a Redis error, not a hang.
    let err = timeout(
        Duration::from_secs(30),
        Lease::open("redis://127.0.0.1:1/0"),
    )
    .await
    .expect("open of an unreachable server hung")
    .unwrap_err();
    assert!(matches!(err, Error::Redis(_)), "{err:?}");

    // Prefixes.
    let base = lease(&prefix("bad")).await;
    for bad in [
        "",
        "a*",
        "a?",
        "a[b]",
        "sp ace:",
        "nul\0",
        "é:",
        &"x".repeat(65),
    ] {
        let err = base.clone().with_prefix(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidOption(_)), "{bad:?}: {err:?}");
    }
    // Options.
    let err = base
        .clone()
        .with_options(
            LeaseOptions::default()
                .min_poll(Duration::ZERO)
                .max_poll(Duration::from_secs(1)),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "{err:?}");

    // Names: refused, and no key appears under the prefix.
    let p = prefix("bad-names");
    let locks = open(&p).await;
    let long = "n".repeat(256);
    for name in ["", "a\0b", long.as_str()] {
        let err = locks.acquire(name).await.unwrap_err();
        assert!(matches!(err, Error::InvalidName(_)), "{err:?}");
    }
    let mut conn = raw().await;
    let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(format!("{p}*"))
        .arg("COUNT")
        .arg(100_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

/// A value under dblock's prefix that dblock did not write is reported, not
/// misread.
#[tokio::test]
async fn a_foreign_value_is_an_error_not_a_lease() {
    let p = prefix("foreign");
    let locks = open(&p).await;
    let mut conn = raw().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{p}lock:f"))
        .arg("garbage")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(locks.inspect("f").await, Err(Error::Redis(_))));
    // It still excludes: SET NX does not overwrite it.
    assert!(locks.try_acquire("f").await.unwrap().is_none());
    assert!(locks.force_release("f").await.unwrap());
    assert!(locks.try_acquire("f").await.unwrap().is_some());
}

// ---- The behavioural suite on Redis. ----

mod suite;

#[derive(Clone)]
struct RedisFixture(String);

impl suite::Fixture for RedisFixture {
    async fn locks(&self) -> Locks {
        open(&self.0).await
    }
    fn unreachable(&self) -> Locks {
        Locks::new(Lease::new(
            redis::Client::open("redis://127.0.0.1:1/0").unwrap(),
        ))
    }
}

mod behaviour {
    use super::*;
    behaviour_suite!(async { RedisFixture(prefix("suite")) });
}

impl suite::lease::LeaseFixture for RedisFixture {
    async fn db_now(&self) -> chrono::DateTime<chrono::Utc> {
        let micros = server_micros(&mut raw().await).await;
        chrono::DateTime::from_timestamp_micros(micros as i64).unwrap()
    }
    async fn expire_now(&self, name: &str) {
        // Redis lets the key run out.
        let _: () = redis::cmd("PEXPIRE")
            .arg(format!("{}lock:{name}", self.0))
            .arg(1)
            .query_async(&mut raw().await)
            .await
            .unwrap();
    }
    fn exact_expiry(&self) -> bool {
        false
    }
}

mod lease {
    use super::*;
    lease_suite!(async { RedisFixture(prefix("lease")) });
}

// ---- Batched renewal: one script per tick. ----

mod batch;

struct RedisHarness;

impl batch::Harness for RedisHarness {
    async fn subject(&self, _pool_size: u32) -> batch::Subject {
        let p = prefix("batch");
        // The holder goes through a proxy, so that `cut` can black-hole it.
        let (proxy, holder) = through_proxy(&p).await;
        let counted = holder.clone();
        batch::Subject {
            table: p.clone(),
            locks: Locks::new(holder),
            observer: open(&p).await,
            stats: Box::new(move || counted.renewal_stats()),
            cut: Some(Box::new(move || {
                Box::pin(async move { proxy.pause(0, true) })
            })),
            db_updates: None,
            cleanup: None,
        }
    }
}

mod batched {
    use super::*;
    batch_suite!(RedisHarness);
}
