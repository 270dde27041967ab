//! Test support: database URLs and unique names.
//!
//! URLs come from environment variables first:
//! - `DBLOCK_TEST_POSTGRES_URL`, e.g. `postgres://postgres@127.0.0.1:5432/test`
//! - `DBLOCK_TEST_MYSQL_URL`, e.g. `mysql://root@127.0.0.1:3306/test`
//! - `DBLOCK_TEST_REDIS_URL`, e.g. `redis://127.0.0.1:6379/0` (required: no
//!   container fallback)
//!
//! When a variable is unset, a container is started with testcontainers
//! (this needs a Docker engine). When neither works, the test fails with a
//! message naming the variable: it never passes by skipping.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::ContainerAsync;
use tokio::sync::OnceCell;

/// The PostgreSQL URL for tests.
pub async fn postgres_url() -> String {
    if let Ok(url) = std::env::var("DBLOCK_TEST_POSTGRES_URL") {
        return url;
    }
    static PG: OnceCell<(
        ContainerAsync<testcontainers_modules::postgres::Postgres>,
        String,
    )> = OnceCell::const_new();
    let (_, url) = PG
        .get_or_init(|| async {
            let container = testcontainers_modules::postgres::Postgres::default()
                .start()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "no PostgreSQL for the tests: set DBLOCK_TEST_POSTGRES_URL \
                         (e.g. postgres://postgres@127.0.0.1:5432/test), or make a Docker \
                         engine available for testcontainers (it failed: {e})"
                    )
                });
            let port = container
                .get_host_port_ipv4(5432)
                .await
                .expect("mapped port");
            let url = format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres");
            (container, url)
        })
        .await;
    url.clone()
}

/// The MySQL/MariaDB URL for tests.
pub async fn mysql_url() -> String {
    if let Ok(url) = std::env::var("DBLOCK_TEST_MYSQL_URL") {
        return url;
    }
    static MY: OnceCell<(
        ContainerAsync<testcontainers_modules::mariadb::Mariadb>,
        String,
    )> = OnceCell::const_new();
    let (_, url) = MY
        .get_or_init(|| async {
            let container = testcontainers_modules::mariadb::Mariadb::default()
                .start()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "no MySQL/MariaDB for the tests: set DBLOCK_TEST_MYSQL_URL \
                         (e.g. mysql://root@127.0.0.1:3306/test), or make a Docker \
                         engine available for testcontainers (it failed: {e})"
                    )
                });
            let port = container
                .get_host_port_ipv4(3306)
                .await
                .expect("mapped port");
            let url = format!("mysql://root@127.0.0.1:{port}/test");
            (container, url)
        })
        .await;
    url.clone()
}

/// A lock name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "test:{prefix}:{}:{}:{}",
        std::process::id(),
        chrono::Utc::now().timestamp_micros(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The Redis URL for tests, from `DBLOCK_TEST_REDIS_URL` (e.g.
/// `redis://127.0.0.1:6379/0`; `scripts/test` sets it and starts the
/// server). There is no container fallback: without it the test fails.
pub fn redis_url() -> String {
    std::env::var("DBLOCK_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "no Redis for the tests: set DBLOCK_TEST_REDIS_URL \
             (e.g. redis://127.0.0.1:6379/0), or run them through scripts/test, \
             which starts the local Redis"
        )
    })
}
