//! Lease throughput against the physical limit, and lease scale.
//!
//! - **Dedicated baselines**: raw SQL doing what a lease pair does, each
//!   task on one connection of its own (no pool checkout, no health-check
//!   ping), beside the pooled raw figures of the lease sections. With one
//!   task that is one dedicated connection; with 8 tasks, 8 of them. Redis'
//!   raw baseline is one multiplexed connection already (see `redis_section`).
//! - **Scale** (`DBLOCK_BENCH_ONLY=leasescale`): one process holds
//!   `DBLOCK_BENCH_SCALE_LEASES` leases (default 100,000) per backend and
//!   the time of one batched renewal tick is read from the backend's
//!   renewal counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use sqlx::{Connection, MySqlConnection, PgConnection, Row as _, SqliteConnection};
use tokio::sync::Mutex;

use super::{
    name, owner, rate, Op, Res, Row, MY_RELEASE, MY_UPSERT, PG_CLAIM, PG_RELEASE,
    PG_RELEASE_NOTIFY, SQ_CLAIM, SQ_RELEASE, TASKS,
};

/// One connection per task index, each used by that task alone.
pub(super) struct Dedicated<C>(Vec<Mutex<C>>);

impl<C> Dedicated<C> {
    fn new(conns: Vec<C>) -> Arc<Self> {
        Arc::new(Dedicated(conns.into_iter().map(Mutex::new).collect()))
    }
}

async fn connect_all<C: Connection>(url: &str) -> Res<Vec<C>> {
    let mut out = Vec::with_capacity(TASKS);
    for _ in 0..TASKS {
        out.push(C::connect(url).await?);
    }
    Ok(out)
}

/// The pooled raw upsert + release of the pg lease section, on dedicated
/// connections; `notify` releases with `pg_notify`, as dblock does.
pub(super) async fn pg_lease_op(url: &str, names: Arc<Vec<String>>, notify: bool) -> Res<Op> {
    let conns = Dedicated::new(connect_all::<PgConnection>(url).await?);
    Ok(Arc::new(move |i| {
        let (conns, name) = (conns.clone(), names[i].clone());
        Box::pin(async move {
            let mut c = conns.0[i].lock().await;
            let owner = owner();
            let token: i64 = sqlx::query_scalar(PG_CLAIM)
                .bind(&name)
                .bind(&owner)
                .bind("bench")
                .bind(30_000_000i64)
                .fetch_optional(&mut *c)
                .await?
                .ok_or("raw: the lease was busy")?;
            // With NOTIFY the statement answers one row per lease released.
            let released = if notify {
                sqlx::query(PG_RELEASE_NOTIFY)
                    .bind(&name)
                    .bind(&owner)
                    .bind(token)
                    .fetch_all(&mut *c)
                    .await?
                    .len() as u64
            } else {
                sqlx::query(PG_RELEASE)
                    .bind(&name)
                    .bind(&owner)
                    .bind(token)
                    .execute(&mut *c)
                    .await?
                    .rows_affected()
            };
            if released != 1 {
                return Err("raw: the lease was not ours at release".into());
            }
            Ok(())
        })
    }))
}

/// One MySQL connection per task, shared by the dedicated-connection ops
/// of the section (they run in turns, never at once): the server's
/// connection limit is shared with others.
pub(super) type MyConns = Arc<Dedicated<MySqlConnection>>;

pub(super) async fn my_conns(url: &str) -> Res<MyConns> {
    Ok(Dedicated::new(connect_all::<MySqlConnection>(url).await?))
}

/// The raw MySQL upsert + release (two statements) on dedicated connections.
pub(super) fn my_upsert_op(conns: MyConns, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let (conns, name) = (conns.clone(), names[i].clone());
        Box::pin(async move {
            let mut c = conns.0[i].lock().await;
            let owner = owner();
            let done = sqlx::query(MY_UPSERT)
                .bind(name.as_bytes())
                .bind(owner.as_bytes())
                .bind("bench")
                .bind(30_000_000i64)
                .execute(&mut *c)
                .await?;
            let token = done.last_insert_id();
            if token == 0 {
                return Err("raw: the lease was busy".into());
            }
            let done = sqlx::query(MY_RELEASE)
                .bind(name.as_bytes())
                .bind(owner.as_bytes())
                .bind(token)
                .execute(&mut *c)
                .await?;
            if done.rows_affected() != 1 {
                return Err("raw: the lease was not ours at release".into());
            }
            Ok(())
        })
    })
}

/// dblock's own MariaDB lease pair (its one-statement claim and its
/// release, the same SQL text, binds and checks; a missing row created as
/// dblock creates it) on dedicated connections: "raw, same work". With
/// `bell`, each task also takes and lets go of a doorbell (`GET_LOCK(bell,
/// 0)` after the claim, `DO RELEASE_LOCK(bell)` after the release) on a
/// second connection of its own (`bells`), as dblock's ringer did for every
/// lease.
pub(super) fn my_same_work_op(
    conns: MyConns,
    bells: Option<MyConns>,
    table: &str,
    names: Arc<Vec<String>>,
) -> Res<Op> {
    let [claim, release] = dblock::mysql::bench_claim_release_sql(table)?;
    let (claim, release): (Arc<str>, Arc<str>) = (claim.into(), release.into());
    let create: Arc<str> = format!(
        "INSERT IGNORE INTO {table} (name, owner, holder, mode, token, acquired_at, expires_at) \
         VALUES (?, NULL, NULL, 'x', 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"
    )
    .into();
    Ok(Arc::new(move |i| {
        let (conns, bells, name) = (conns.clone(), bells.clone(), names[i].clone());
        let (claim, release, create) = (claim.clone(), release.clone(), create.clone());
        Box::pin(async move {
            let mut c = conns.0[i].lock().await;
            let owner = owner();
            let bell_name = format!("dblock-bench:{}:bell:{i}", std::process::id());
            let row = loop {
                let row = sqlx::query(sqlx::AssertSqlSafe(claim.clone()))
                    .bind(owner.as_bytes())
                    .bind("bench-host:0")
                    .bind(30_000_000i64)
                    .bind(name.as_bytes())
                    // No writer waiting (a plain claim's `writer_waits`).
                    .bind(None::<i64>)
                    .bind(None::<i64>)
                    .fetch_optional(&mut *c)
                    .await;
                match row {
                    Ok(Some(row)) => break row,
                    // NOWAIT found the row locked: dblock's sweep of ended
                    // rows (it locks them in a transaction, `SKIP LOCKED`)
                    // takes these rows now and then. dblock answers "busy"
                    // and tries again; so does this.
                    Err(sqlx::Error::Database(e))
                        if matches!(e.code().as_deref(), Some("HY000" | "40001"))
                            && e.message().contains("Lock wait timeout") =>
                    {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(e) => return Err(e.into()),
                    Ok(None) => {
                        sqlx::query(sqlx::AssertSqlSafe(create.clone()))
                            .bind(name.as_bytes())
                            .execute(&mut *c)
                            .await?;
                    }
                }
            };
            let mine: Option<Vec<u8>> = row.try_get(0)?;
            if mine.as_deref() != Some(owner.as_bytes()) {
                return Err("raw (same work): the lease was busy".into());
            }
            let token: u64 = row.try_get(1)?;
            if let Some(bells) = &bells {
                let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
                    .bind(&bell_name)
                    .fetch_one(&mut *bells.0[i].lock().await)
                    .await?;
                if got != Some(1) {
                    return Err("raw (same work): the bell was busy".into());
                }
            }
            let done = sqlx::query(sqlx::AssertSqlSafe(release.clone()))
                .bind(0i64)
                .bind(name.as_bytes())
                .bind(owner.as_bytes())
                .bind(token)
                .execute(&mut *c)
                .await?;
            if done.last_insert_id() == 0 && done.rows_affected() == 0 {
                return Err("raw (same work): the lease was not ours at release".into());
            }
            if let Some(bells) = &bells {
                sqlx::query("DO RELEASE_LOCK(?)")
                    .bind(&bell_name)
                    .execute(&mut *bells.0[i].lock().await)
                    .await?;
            }
            Ok(())
        })
    }))
}

/// The raw SQLite upsert + release on dedicated connections to `file`.
pub(super) async fn sqlite_op(file: &std::path::Path, names: Arc<Vec<String>>) -> Res<Op> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(file)
        .busy_timeout(Duration::from_secs(5));
    let mut conns = Vec::with_capacity(TASKS);
    for _ in 0..TASKS {
        conns.push(SqliteConnection::connect_with(&options).await?);
    }
    let conns = Dedicated::new(conns);
    Ok(Arc::new(move |i| {
        let (conns, name) = (conns.clone(), names[i].clone());
        Box::pin(async move {
            let mut c = conns.0[i].lock().await;
            let owner = owner();
            let token: i64 = sqlx::query_scalar(SQ_CLAIM)
                .bind(&name)
                .bind(&owner)
                .bind("bench")
                .bind(30_000_000i64)
                .fetch_optional(&mut *c)
                .await?
                .ok_or("raw: the lease was busy")?;
            let done = sqlx::query(SQ_RELEASE)
                .bind(&name)
                .bind(&owner)
                .bind(token)
                .execute(&mut *c)
                .await?;
            if done.rows_affected() != 1 {
                return Err("raw: the lease was not ours at release".into());
            }
            Ok(())
        })
    }))
}

// ---------------------------------------------------------------------------
// Scale.

/// Leases held at once by the scale rows, unless `DBLOCK_BENCH_SCALE_LEASES`
/// says otherwise.
const SCALE_LEASES: usize = 100_000;
/// Their ttl: renewed every 20 s, so that leases taken within 10 s of each
/// other share a tick, and every lease does from the second round on.
const SCALE_TTL: Duration = Duration::from_secs(60);
/// Acquisitions in flight while taking them.
const SCALE_CONCURRENCY: usize = 64;

/// One backend's renewal counters.
type Stats = Box<dyn Fn() -> dblock::__unstable::RenewalStats + Send + Sync>;

/// Takes `n` leases through `locks`, then watches the renewal ticks until
/// one renews all of them (or six renewal periods pass), and adds a row
/// with the largest tick seen.
async fn scale_one(
    backend: &'static str,
    locks: dblock::Locks,
    stats: Stats,
    n: usize,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let started = Instant::now();
    let mut guards = Vec::with_capacity(n);
    let mut pending = stream::iter(0..n)
        .map(|i| {
            let locks = locks.clone();
            async move {
                locks
                    .acquire(name("scale", i))
                    .ttl(SCALE_TTL)
                    .wait(Duration::from_secs(30))
                    .await
            }
        })
        .buffer_unordered(SCALE_CONCURRENCY);
    while let Some(guard) = pending.next().await {
        guards.push(guard?);
    }
    drop(pending);
    let took = started.elapsed();
    // The largest tick: (leases, time).
    let mut best = (0usize, Duration::ZERO);
    // Leases taken over more than a renewal period (MariaDB takes 100,000
    // in about 40 s here) are renewed in several ticks at first, which
    // merge a round later (an earlier group joins a later one's tick once
    // it is within half a period): watch up to six renewal periods for a
    // tick with all of them. The largest batch since the start, not the
    // last: a short retry batch right after a full tick (leases whose rows
    // were busy) would hide it between two looks.
    let end = Instant::now() + 2 * SCALE_TTL + Duration::from_secs(5);
    while Instant::now() < end && best.0 < n {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = stats();
        best = (s.largest_batch_len, s.largest_batch_time);
    }
    let lost = guards.iter().filter(|g| g.is_lost()).count();
    let statements = stats().statements;
    drop(guards);
    let per = if best.0 > 0 {
        format!(
            "; {:.1} µs per lease",
            best.1.as_secs_f64() * 1e6 / best.0 as f64
        )
    } else {
        String::new()
    };
    rows.push(
        Row::new(
            backend,
            format!(
                "renewal tick with {} leases held (release build)",
                rate(n as f64)
            ),
        )
        .dblock(format!(
            "{} ms for {} leases",
            (best.1.as_secs_f64() * 1000.0).round(),
            rate(best.0 as f64)
        ))
        .note(format!(
            "taking them: {:.1} s; {statements} renewal statements so far; {lost} lost{per}",
            took.as_secs_f64()
        )),
    );
    Ok(())
}

/// The scale rows of every lease backend reachable.
pub(super) async fn scale(
    pg: &str,
    my: &str,
    redis: &str,
    dir: &std::path::Path,
    rows: &mut Vec<Row>,
) {
    let n = std::env::var("DBLOCK_BENCH_SCALE_LEASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SCALE_LEASES);
    let failed = |backend: &'static str, e: super::E| {
        Row::new(backend, "scale section failed").dblock(format!("error: {e}"))
    };
    let outcome: Res<()> = async {
        let pool = super::pg_pool(pg, super::POOL).await?;
        super::pg_bench_table(&pool).await?;
        let lease = dblock::postgres::Lease::new(pool.clone()).with_table(super::TABLE)?;
        let counted = lease.clone();
        let stats: Stats = Box::new(move || counted.renewal_stats());
        scale_one("pg lease", dblock::Locks::new(lease), stats, n, rows).await?;
        pool.close().await;
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        rows.push(failed("pg lease", e));
    }
    let outcome: Res<()> = async {
        let pool = super::my_pool(my, super::POOL).await?;
        super::my_bench_table(&pool).await?;
        let lease = dblock::mysql::Lease::new(pool.clone()).with_table(super::TABLE)?;
        let counted = lease.clone();
        let stats: Stats = Box::new(move || counted.renewal_stats());
        scale_one("mysql lease", dblock::Locks::new(lease), stats, n, rows).await?;
        pool.close().await;
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        rows.push(failed("mysql lease", e));
    }
    let outcome: Res<()> = async {
        let lease = dblock::sqlite::Lease::open(dir.join("scale.db")).await?;
        let counted = lease.clone();
        let stats: Stats = Box::new(move || counted.renewal_stats());
        scale_one("sqlite lease", dblock::Locks::new(lease), stats, n, rows).await
    }
    .await;
    if let Err(e) = outcome {
        rows.push(failed("sqlite lease", e));
    }
    let outcome: Res<()> = async {
        let lease = dblock::redis::Lease::open(redis)
            .await?
            .with_prefix("dblock-bench-scale:")?;
        let counted = lease.clone();
        let stats: Stats = Box::new(move || counted.renewal_stats());
        scale_one("redis lease", dblock::Locks::new(lease), stats, n, rows).await
    }
    .await;
    if let Err(e) = outcome {
        rows.push(failed("redis lease", e));
    }
}
