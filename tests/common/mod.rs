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

/// Polls `check` every `every` until it holds (true) or `within` passes
/// (false).
pub async fn poll_until<F, Fut>(
    within: std::time::Duration,
    every: std::time::Duration,
    mut check: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// Runs `fut` on a thread of its own, on a current-thread runtime of its
/// own: a process apart, which can stall (block its thread) as a whole.
pub fn on_own_runtime<T: Send + 'static>(
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(fut)
    })
}

/// With `name` held (and nothing else on `locks`' store), takes "another"
/// beside it: `list` shows the two in name order. Releases "another".
pub async fn listed_in_name_order(locks: &dblock::Locks, name: &str) {
    let other = locks.acquire("another").await.unwrap();
    let listed: Vec<_> = locks
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name.unwrap())
        .collect();
    assert_eq!(listed, ["another", name]);
    other.release().await.unwrap();
}

/// Whether `locks.list()` shows `name`.
pub async fn is_listed(locks: &dblock::Locks, name: &str) -> bool {
    locks
        .list()
        .await
        .unwrap()
        .iter()
        .any(|i| i.name.as_deref() == Some(name))
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

/// Terminates the one PostgreSQL session holding `name`'s advisory lock.
#[cfg(feature = "postgres")]
pub async fn terminate_advisory_holder(admin: &sqlx::PgPool, name: &str) {
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1
           AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(dblock::postgres::advisory_key(name))
    .fetch_all(admin)
    .await
    .unwrap();
    assert_eq!(killed, vec![true]);
}

/// PostgreSQL and MySQL URLs where no server listens (port 1).
pub const NOWHERE_PG: &str = "postgres://postgres@127.0.0.1:1/nowhere";
pub const NOWHERE_MY: &str = "mysql://root@127.0.0.1:1/nowhere";

/// A pool on `url` that connects lazily and gives up acquiring after 2 s:
/// with [`NOWHERE_PG`] or [`NOWHERE_MY`], one whose every statement fails.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub fn lazy_pool<DB: sqlx::Database>(url: &str) -> sqlx::Pool<DB> {
    sqlx::pool::PoolOptions::<DB>::new()
        .acquire_timeout(std::time::Duration::from_secs(2))
        .connect_lazy(url)
        .unwrap()
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

/// 2,000 distinct names taken and released leave (almost) no rows a few
/// seconds later; a name taken again gets a greater token.
/// [`rows_like!`] makes the closure that counts rows with: `sql` (one
/// placeholder, the LIKE pattern) on `pool`.
#[macro_export]
macro_rules! rows_like {
    ($pool:expr, $sql:expr) => {{
        let pool = $pool.clone();
        move |like: String| -> futures::future::BoxFuture<'static, i64> {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query_scalar($sql)
                    .bind(like)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            })
        }
    }};
}

pub async fn ended_rows_are_swept(
    locks: dblock::Locks,
    rows: impl Fn(String) -> futures::future::BoxFuture<'static, i64>,
) {
    let prefix = unique("swept");
    let first = format!("{prefix}:first");
    let token = {
        let g = locks.acquire(&first).await.unwrap();
        let t = g.token();
        g.release().await.unwrap();
        t
    };
    let streams: Vec<_> = (0..8)
        .map(|s| {
            let locks = locks.clone();
            let prefix = prefix.clone();
            tokio::spawn(async move {
                for i in 0..250 {
                    let g = locks.acquire(format!("{prefix}:{s}:{i}")).await.unwrap();
                    g.release().await.unwrap();
                }
            })
        })
        .collect();
    for s in streams {
        s.await.unwrap();
    }
    let like = format!("{prefix}:%");
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut left = rows(like.clone()).await;
    while left > 10 && tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        left = rows(like.clone()).await;
    }
    assert!(left <= 10, "{left} rows of 2,001 released leases are left");
    let again = locks.acquire(&first).await.unwrap();
    assert!(
        again.token() > token,
        "a swept name's token went back: {} after {token}",
        again.token()
    );
}

/// After a schema upgrade: the lease `held` that a process of the previous
/// version took (token `held_token`, holder `old:1`) is still held, and
/// neither a writer nor a reader gets it; readers and then a writer take the
/// free name `free`, with tokens above `above`.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub async fn check_upgraded(locks: &dblock::Locks, held_token: u64, free: &str, above: u64) {
    let info = locks.inspect("held").await.unwrap().expect("still held");
    assert_eq!(
        (info.token, info.holder.as_str()),
        (Some(held_token), "old:1")
    );
    assert!(locks.try_acquire("held").await.unwrap().is_none());
    let reader = locks
        .acquire("held")
        .shared()
        .wait(std::time::Duration::ZERO)
        .await;
    assert!(reader.is_err(), "a reader beside an old writer: {reader:?}");
    let r1 = locks.acquire(free).shared().await.unwrap();
    let r2 = locks.acquire(free).shared().await.unwrap();
    assert!(r1.token() > above && r2.token() > r1.token());
    let last = r2.token();
    r1.release().await.unwrap();
    r2.release().await.unwrap();
    let g = locks.acquire(free).await.unwrap();
    assert!(g.token() > last);
    g.release().await.unwrap();
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
