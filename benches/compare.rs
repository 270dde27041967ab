//! dblock against raw SQL doing the same work, per backend, in one run.
//!
//! ```text
//! cargo bench --bench compare
//! ```
//!
//! Databases come from `DBLOCK_BENCH_POSTGRES_URL`, `DBLOCK_BENCH_MYSQL_URL`
//! and `DBLOCK_BENCH_REDIS_URL` (defaults: `postgres://postgres@127.0.0.1:5432/test`,
//! `mysql://root@127.0.0.1:3306/test` and `redis://127.0.0.1:6379/0`; Redis
//! keys under `dblock-bench:` and `dblock-bench-raw:`); SQLite uses a file in a fresh
//! temporary folder. Lease backends use their own table,
//! `dblock_bench_leases`, emptied at the start, so that the application
//! table `dblock_leases` is left alone.
//!
//! What is measured (see `docs/performance.md` for the discussion):
//! - **pairs/s**: uncontended `acquire` + `release` pairs per second, with 1
//!   and with 8 tasks on distinct names, against raw SQL doing the same on a
//!   pool of the same size. With 1 task dblock's and raw calls alternate one
//!   by one; with 8 tasks each implementation gets a short window per round,
//!   in turn. Figures are medians over rounds, ratios the median of the
//!   per-round ratios, so that load from elsewhere falls on both alike.
//! - **handoff**: a waiter is blocked, the holder releases; the clock starts
//!   when the holder calls release and stops when the waiter's acquire
//!   returns. For waiters in the same process the statement log also gives
//!   the **wake-up**: from the end of the holder's release statement to the
//!   start of the waiter's next statement (its pool checkout included).
//! - **scale**: how many locks one process holds with a pool of at most 10
//!   connections, and the statements per second that keeping them costs,
//!   counted from sqlx's statement log over one renewal period (with the
//!   server's own counters beside it).
//!
//! Every figure is printed in one table at the end. Options, by environment:
//! `DBLOCK_BENCH_ONLY=advisory,advisory-limit,pglease,mysql,sqlite,redis,cross` runs only those
//! sections (`leasescale`, 100,000 leases per lease backend, runs only when
//! named; see `compare/limit.rs`); `DBLOCK_BENCH_BREAKDOWN=1` adds where the time of one pair goes
//! (per statement, and for raw SQL run in dblock's task structure) and the
//! phases of a handoff.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dblock::postgres::{Advisory, AdvisoryOptions, WaitStrategy};
use dblock::{LeaseOptions, LockGuard, Locks};
use futures::stream::{self, StreamExt};
use rand::Rng;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::Row as _;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

type E = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, E>;
type BoxFut = Pin<Box<dyn Future<Output = Res<()>> + Send>>;
/// One acquire + release, by task index.
type Op = Arc<dyn Fn(usize) -> BoxFut + Send + Sync>;

const PG_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";
const MY_DEFAULT: &str = "mysql://root@127.0.0.1:3306/test";
const REDIS_DEFAULT: &str = "redis://127.0.0.1:6379/0";
const TABLE: &str = "dblock_bench_leases";

/// Gives a PostgreSQL bench table made before shared leases (migration 5)
/// their column, as a lease table of one's own needs.
const PG_TABLE_UPGRADE: &str =
    "ALTER TABLE dblock_bench_leases ADD COLUMN IF NOT EXISTS writer_waiting_until timestamptz";

/// The same for MySQL / MariaDB: migration 4, on the bench table.
fn my_table_upgrade() -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(
        include_str!("../migrations/mysql/0004_shared_leases.sql").replace("dblock_leases", TABLE),
    )
}

/// Migrates dblock's schema on `pool`, makes the PostgreSQL bench table
/// (fillfactor 70) if need be, empties it and upgrades it.
async fn pg_bench_table(pool: &PgPool) -> Res<()> {
    dblock::postgres::migrate(pool).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS dblock_bench_leases (LIKE dblock_leases INCLUDING ALL) \
           WITH (fillfactor = 70); \
         TRUNCATE dblock_bench_leases",
    )
    .execute(pool)
    .await?;
    sqlx::raw_sql(PG_TABLE_UPGRADE).execute(pool).await?;
    Ok(())
}

/// The same for MySQL / MariaDB.
async fn my_bench_table(pool: &MySqlPool) -> Res<()> {
    dblock::mysql::migrate(pool).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS dblock_bench_leases LIKE dblock_leases; \
         DELETE FROM dblock_bench_leases",
    )
    .execute(pool)
    .await?;
    sqlx::raw_sql(my_table_upgrade()).execute(pool).await?;
    Ok(())
}

/// Connections per pool, dblock's and raw's alike.
const POOL: u32 = 10;
/// `sqlite::Lease::open` makes a pool of 4; raw SQLite gets the same.
const SQLITE_POOL: u32 = 4;

/// Throughput: rounds, each giving every implementation a window of this
/// length (with one task, the implementations' calls interleave instead).
const ROUNDS: usize = 25;
const WINDOW: Duration = Duration::from_millis(100);
const WARMUP: Duration = Duration::from_millis(150);
/// Concurrent tasks of the second throughput measure.
const TASKS: usize = 8;

/// Handoffs measured one after another (server waits, in-process wake-ups).
const SEQ_SAMPLES: usize = 150;
/// Handoffs to polling waiters: pairs run side by side on distinct names.
const POLL_PAIRS: usize = 8;
const POLL_PER_PAIR: usize = 12;
/// How long the holder keeps a polling waiter waiting before it releases,
/// drawn uniformly: long enough that many waiters have backed off to
/// `max_poll`.
const POLL_HOLD_MS: (u64, u64) = (200, 500);
/// The same for in-process waiters, which are woken rather than polling.
const LOCAL_HOLD_MS: (u64, u64) = (5, 15);

/// Scale: the levels tried, the lease length while holding them, and the
/// fixed window over which keep-alive statements are counted (one renewal
/// period, ttl/3; the advisory heartbeat is 5 s).
const LEVELS: [usize; 3] = [100, 1_000, 5_000];
const SCALE_TTL: Duration = Duration::from_secs(15);
const SCALE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// How soon an in-process waiter must be woken after a release.
const WAKE_BOUND: Duration = Duration::from_millis(2);

// The parts, each in its own file under `compare/`; `run` below calls the
// sections in their order.
/// PostgreSQL advisory locks.
#[path = "compare/advisory.rs"]
mod advisory;
/// Advisory locks against their physical limit (`advisory-limit`).
#[path = "compare/advisory_limit.rs"]
mod advisory_limit;
/// Statement counting (a tracing subscriber on sqlx's statement log).
#[path = "compare/count.rs"]
mod count;
/// Across processes: handoff from a child process, 16 contending (`cross`).
#[path = "compare/cross.rs"]
mod cross;
/// A waiter blocked, the holder releases: handoff and wake-up.
#[path = "compare/handoff.rs"]
mod handoff;
/// Lease pairs against dedicated connections, and `leasescale`.
#[path = "compare/limit.rs"]
mod limit;
/// Pairs per window, interleaved rounds, breakdown, throughput rows.
#[path = "compare/measure.rs"]
mod measure;
/// MySQL / MariaDB lease.
#[path = "compare/mysql.rs"]
mod mysql;
/// PostgreSQL lease.
#[path = "compare/pglease.rs"]
mod pglease;
/// The bench and the server pinned to cores, for the 1-task limit rows.
#[path = "compare/placement.rs"]
mod placement;
/// Redis lease (not `redis`: that would hide the redis crate).
#[path = "compare/redis.rs"]
mod redis_section;
/// The table and the figures' formatting.
#[path = "compare/report.rs"]
mod report;
/// Many locks held by one process, and what keeping them costs.
#[path = "compare/scale.rs"]
mod scale;
/// SQLite lease.
#[path = "compare/sqlite.rs"]
mod sqlite;

use advisory::*;
use handoff::*;
use measure::*;
use mysql::*;
use pglease::*;
use redis_section::*;
use report::*;
use scale::*;
use sqlite::*;

// ---------------------------------------------------------------------------
// Backends.

struct Env {
    pg: String,
    my: String,
}

fn redact(url: &str) -> String {
    // scheme://user:password@host -> scheme://user:***@host
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((auth, host)) = rest.split_once('@') {
            if let Some((user, _)) = auth.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url.to_owned()
}

async fn pg_pool(url: &str, max: u32) -> Res<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await?)
}

async fn my_pool(url: &str, max: u32) -> Res<MySqlPool> {
    Ok(MySqlPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await?)
}

async fn run() {
    let var = |key: &str, default: &str| match std::env::var(key) {
        Ok(v) if !v.is_empty() => (v, format!("from {key}")),
        _ => (default.to_owned(), format!("default; set {key} to change")),
    };
    let (pg, pg_from) = var("DBLOCK_BENCH_POSTGRES_URL", PG_DEFAULT);
    let (my, my_from) = var("DBLOCK_BENCH_MYSQL_URL", MY_DEFAULT);
    let (redis_url, redis_from) = var("DBLOCK_BENCH_REDIS_URL", REDIS_DEFAULT);
    println!("dblock compare: dblock against raw SQL on the same kind of pool");
    println!("  PostgreSQL: {} ({pg_from})", redact(&pg));
    println!("  MySQL:      {} ({my_from})", redact(&my));
    println!("  Redis:      {} ({redis_from})", redact(&redis_url));
    let env = Env { pg, my };
    let dir = std::env::temp_dir().join(format!("dblock-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    println!("  SQLite:     a file in {}", dir.display());
    println!("  (this takes a few minutes; figures are medians of {ROUNDS} rounds)\n");

    let started = Instant::now();
    let mut rows = Vec::new();
    let mut notes = machine();

    match pg_pool(&env.pg, 1).await {
        Ok(pool) => {
            if let Ok(v) = sqlx::query_scalar::<_, String>("SHOW server_version")
                .fetch_one(&pool)
                .await
            {
                notes.push(format!("PostgreSQL server {v}"));
            }
            let usable = pg_stat_statements_usable(&pool).await;
            notes.push(if usable {
                "pg_stat_statements: usable (server-side counts include it)".into()
            } else {
                "pg_stat_statements: not usable here (CREATE EXTENSION is refused or the view \
                 needs shared_preload_libraries); server-side counts come from pg_stat_database \
                 and pg_stat_user_tables"
                    .into()
            });
            pool.close().await;
        }
        Err(e) => notes.push(format!("PostgreSQL unreachable: {e}")),
    }

    let section = |backend: &'static str, e: E| {
        Row::new(backend, "section failed").dblock(format!("error: {e}"))
    };
    // DBLOCK_BENCH_ONLY=advisory,mysql (say) runs only those sections.
    let only = std::env::var("DBLOCK_BENCH_ONLY").unwrap_or_default();
    let wanted = |section: &str| only.is_empty() || only.split(',').any(|s| s.trim() == section);
    let stamp = |what: &str| eprintln!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
    let mut raw = None;
    if wanted("advisory") {
        stamp("pg advisory");
        match advisory(&env, &mut rows).await {
            Ok(r) => raw = Some(r),
            Err(e) => rows.push(section("pg advisory", e)),
        }
    }
    if wanted("advisory-limit") {
        stamp("pg advisory at the limit");
        if let Err(e) = advisory_limit::advisory_limit(&env, &mut rows).await {
            rows.push(section("pg advisory", e));
        }
    }
    if wanted("pglease") {
        stamp("pg lease");
        if let Err(e) = pg_lease(&env, raw.as_ref(), &mut rows).await {
            rows.push(section("pg lease", e));
        }
    }
    if wanted("mysql") {
        stamp("mysql lease");
        if let Err(e) = mysql(&env, &mut rows, &mut notes).await {
            rows.push(section("mysql lease", e));
        }
    }
    if wanted("sqlite") {
        stamp("sqlite lease");
        if let Err(e) = sqlite(&dir, &mut rows, &mut notes).await {
            rows.push(section("sqlite lease", e));
        }
    }
    if wanted("redis") {
        stamp("redis lease");
        if let Err(e) = redis_section(&redis_url, &mut rows, &mut notes).await {
            rows.push(section("redis lease", e));
        }
    }
    if only.split(',').any(|s| s.trim() == "leasescale") {
        stamp("lease scale");
        limit::scale(&env.pg, &env.my, &redis_url, &dir, &mut rows).await;
    }
    if wanted("cross") {
        stamp("across processes");
        cross::section(&env.pg, &env.my, &redis_url, &dir, &mut rows).await;
    }
    let _ = std::fs::remove_dir_all(&dir);

    let o = LeaseOptions::default();
    println!("{}", print_table(&rows));
    println!(
        "Pools: {POOL} connections (SQLite: {SQLITE_POOL}, as sqlite::Lease::open makes), sqlx defaults \
         otherwise. Leases: ttl 30 s, except {}s while holding many. Lease polling: \
         min_poll {}, max_poll {} (LeaseOptions defaults); the advisory polling rows use the same bounds.",
        SCALE_TTL.as_secs(),
        ms(o.min_poll),
        ms(o.max_poll)
    );
    println!(
        "Throughput: {ROUNDS} rounds; with 1 task the implementations' calls alternate one by one, \
         with 8 tasks each implementation gets a {} window per round, in turn; figures are \
         medians over rounds, ratios the median of the per-round ratios. Handoffs: \
         {SEQ_SAMPLES} one at a time (server waits, same Locks; the advisory server waits \
         and their raw figures in turns of 10 each), or {POLL_PAIRS} pairs × \
         {POLL_PER_PAIR} side by side with the holder keeping the waiter {}–{} ms (polling waiters).",
        ms(WINDOW),
        POLL_HOLD_MS.0,
        POLL_HOLD_MS.1
    );
    for note in &notes {
        println!("{note}");
    }
    for line in BREAKDOWNS.lock().unwrap().iter() {
        println!("{line}");
    }
    println!(
        "dblock warnings logged: {}; total time {:.0} s",
        count::warnings(),
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    if cross::child() {
        return;
    }
    tracing::subscriber::set_global_default(count::Counter)
        .expect("no other tracing subscriber is installed");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(run());
}
