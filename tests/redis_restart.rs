//! Fencing tokens across a restart of Redis without saving: the counter is
//! lost with everything else, and tokens still go up.
//!
//! This restarts the local Redis (`redis-cli shutdown nosave`, then
//! `start_redis` of `scripts/services.sh`), so it is a test binary of its
//! own: cargo runs test binaries one after another, so no other Redis test
//! runs meanwhile. `DBLOCK_TEST_REDIS_URL` must name that local server
//! (127.0.0.1:6379).

mod common;

use std::process::Command;
use std::time::Duration;

use dblock::redis::Lease;
use dblock::Locks;
use tokio::time::{sleep, timeout, Instant};

const PREFIX: &str = "dblock-restart-test:";

fn restart_local_redis() {
    let down = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"])
        .status()
        .expect("run redis-cli");
    // redis-cli reports the dropped connection of a successful shutdown as
    // an error on some versions: check that the server is really down.
    let _ = down;
    let gone = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379", "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
    });
    assert!(gone, "Redis did not shut down");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let up = Command::new("bash")
        .args(["-c", &format!(". '{script}' && start_redis")])
        .status()
        .expect("run start_redis");
    assert!(up.success(), "start_redis failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_strictly_increase_across_a_restart_without_saving() {
    let url = common::redis_url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let addr = client.get_connection_info().addr().to_string();
    assert!(
        addr == "127.0.0.1:6379" || addr == "localhost:6379",
        "this test restarts the local Redis on 127.0.0.1:6379; \
         DBLOCK_TEST_REDIS_URL names {addr}"
    );
    let lease = Lease::open(&url)
        .await
        .expect("open Redis")
        .with_prefix(PREFIX)
        .unwrap();
    let locks = Locks::new(lease);

    let mut last = 0;
    for name in ["a", "b", "a"] {
        let g = locks.acquire(name).await.unwrap();
        assert!(g.token() > last);
        last = g.token();
        g.release().await.unwrap();
    }
    // One lease held across the restart, and one waiter for it.
    let held = locks
        .acquire("held")
        .ttl(Duration::from_secs(3))
        .await
        .unwrap();
    last = last.max(held.token());
    let w = locks.clone();
    // A claim attempted while the server is down fails (as on the SQL
    // backends, an unreachable database is an error, not a wait): the
    // waiter tries again then.
    let waiter = tokio::spawn(async move {
        loop {
            match w.acquire("held").wait(Duration::from_secs(60)).await {
                Ok(g) => {
                    let token = g.token();
                    g.release().await?;
                    return Ok::<u64, dblock::Error>(token);
                }
                Err(dblock::Error::Redis(e)) => {
                    eprintln!("waiter: {e}; trying again");
                    sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    });
    sleep(Duration::from_millis(300)).await;

    // A key nothing writes again: whether it survives tells whether the
    // restart kept the data (the token counter cannot tell: the waiter may
    // claim, and so create it again, before it is looked at).
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{PREFIX}sentinel"))
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();

    let restarted_at = Instant::now();
    restart_local_redis();
    eprintln!("Redis restarted in {:?}", restarted_at.elapsed());

    // Nothing survived: the sentinel (and with it the counter) is gone.
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let kept: bool = redis::cmd("EXISTS")
        .arg(format!("{PREFIX}sentinel"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !kept,
        "the restart kept the data: not a restart without saving"
    );

    // The held lease is gone with the data: its guard says so in time.
    timeout(Duration::from_secs(3), held.lost())
        .await
        .expect("the guard of a lease lost in the restart did not report it");

    // The waiter gets the name, with a larger token, on the same backend
    // (which reconnected by itself).
    let waited = timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter hung after the restart")
        .unwrap()
        .expect("the waiter failed");
    assert!(waited > last, "token {waited} after the restart <= {last}");

    for name in ["a", "b", "c"] {
        let g = locks.acquire(name).await.unwrap();
        assert!(g.token() > last, "{name}: {} after {last}", g.token());
        last = g.token();
        g.release().await.unwrap();
    }
    let _: () = redis::cmd("DEL")
        .arg(format!("{PREFIX}token"))
        .query_async(&mut conn)
        .await
        .unwrap();
}
