//! Test support: database URLs and unique names.
//!
//! URLs come from environment variables first:
//! - `DBLOCK_TEST_POSTGRES_URL`, e.g. `postgres://postgres@127.0.0.1:5432/test`
//! - `DBLOCK_TEST_MYSQL_URL`, e.g. `mysql://root@127.0.0.1:3306/test`
//! - `DBLOCK_TEST_GALERA_URLS`: the nodes of a Galera cluster, no fallback
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

/// The SQL URLs of the three Galera nodes (`DBLOCK_TEST_GALERA_URLS`,
/// comma-separated, as `scripts/topology/galera.sh urls` prints them).
/// There is no container fallback: the test fails naming the variable.
pub fn galera_urls() -> Vec<String> {
    let urls = std::env::var("DBLOCK_TEST_GALERA_URLS").unwrap_or_default();
    let urls: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(
        urls.len() >= 2,
        "no Galera cluster for the tests: set DBLOCK_TEST_GALERA_URLS to the nodes' URLs, \
         comma-separated (scripts/test starts one with scripts/topology/galera.sh and sets it; \
         by hand: `bash scripts/topology/galera.sh start` then \
         `export DBLOCK_TEST_GALERA_URLS=$(bash scripts/topology/galera.sh urls)`)"
    );
    urls
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

/// A PostgreSQL pool of at most `max` connections on `url`, waiting up to
/// 20 s for a connection.
#[cfg(feature = "postgres")]
pub async fn pg_pool(url: &str, max: u32) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(std::time::Duration::from_secs(20))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to PostgreSQL at {url}: {e}"))
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

/// A fresh folder for one test's database file, removed afterwards.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(prefix).replace(':', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The SQLite database file in it.
    pub fn db(&self) -> std::path::PathBuf {
        self.0.join("locks.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
