//! PostgreSQL advisory locks against the physical limit (issue 14).
//!
//! - **pairs/s at the limit**: uncontended `try_acquire` + `release` on
//!   `postgres::Advisory`, beside raw `pg_try_advisory_lock` +
//!   `pg_advisory_unlock` on one dedicated connection per task (no pool
//!   checkout), the same raw SQL on a pool of the same size, and sqlx's
//!   `PgAdvisoryLock` (`acquire` + `release_now`) on a dedicated connection
//!   per task; 1 task and 8 tasks. The ratio is dblock's against the
//!   dedicated connection, per round, median of rounds. Beside them, dblock's
//!   own statements (session check, fencing token) on dedicated
//!   connections: what the SQL costs apart from dblock.
//! - **10,000 locks on a pool of 10**: time to take them, to hold them
//!   (one heartbeat period) and to release them. The lock table of the
//!   bench's server is only used if it has room for them with a wide
//!   margin (others share it); otherwise a cluster of the bench's own is
//!   started with a larger `max_locks_per_transaction`, or the server's
//!   limit is reported.
//!
//! `DBLOCK_BENCH_STEADY=1` runs only the method check instead: dblock
//! against its own SQL, timed call by call and in blocks of 500 pairs, for
//! each placement (see `method_check`).
//!
//! `DBLOCK_BENCH_PAIRS=<dblock|dblock-wide|raw|pooled|sqlx|dblock-sql|nextval>` runs only 5,000 pairs of one
//! of them, one task, and prints their time: for counting system calls
//! (`strace -f -c -e trace=write,futex,sendto`). `DBLOCK_BENCH_PAIRS_COUNT`
//! sets how many (for `perf record`, where 5,000 are short beside the
//! set-up).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dblock::postgres::Advisory;
use dblock::{Error as LockError, Locks};
use futures::stream::{self, StreamExt};
use sqlx::postgres::{PgAdvisoryLock, PgAdvisoryLockKey, PgConnection, PgPoolOptions};
use sqlx::Connection;
use tokio::sync::Mutex;

use super::placement::{self, Placement};
use super::{compare, median, names, rate, Env, Op, Res, Row, PG_TRY, PG_TRY_NEXTVAL, POOL, TASKS};

const B: &str = "pg advisory";
/// Locks held at once in the scale row.
const SCALE_LOCKS: usize = 10_000;
/// Tasks taking them.
const SCALE_TASKS: usize = 64;
/// `max_locks_per_transaction` of the bench's own cluster: 10,000 locks
/// need more than the default 64 × (100 + 0) slots.
const OWN_CLUSTER_LOCKS_PER_TX: u32 = 1024;
const OWN_CLUSTER_PORT: u16 = 54_399;

/// A dedicated connection, with the marker and pid dblock's statement checks.
struct Dedicated {
    conn: PgConnection,
    marker: String,
    pid: i32,
}

/// One dedicated connection per task.
async fn dedicated(url: &str, n: usize) -> Res<Arc<Vec<Mutex<Dedicated>>>> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut conn = PgConnection::connect(url).await?;
        let marker = format!("bench-{}-{i}", std::process::id());
        let pid: i32 = sqlx::query_scalar(
            "SELECT pg_backend_pid() FROM (SELECT set_config('dblock.session', $1, false)) s",
        )
        .bind(&marker)
        .fetch_one(&mut conn)
        .await?;
        conns.push(Mutex::new(Dedicated { conn, marker, pid }));
    }
    Ok(Arc::new(conns))
}

/// dblock's own statements on a dedicated connection: what the SQL costs
/// without dblock around it.
fn raw_dblock_sql_op(conns: Arc<Vec<Mutex<Dedicated>>>, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let (conns, names) = (conns.clone(), names.clone());
        Box::pin(async move {
            // The key is made inside the future, as dblock makes it inside
            // its own: `scripts/pair-cost` counts only the futures.
            let key = dblock::advisory_key(&names[i]);
            let mut d = conns[i].lock().await;
            let d = &mut *d;
            // dblock's own statement (`bench_try_exclusive_sql`), with the
            // parameters a holder session gives it: the key, the session's
            // marker and pid. It answers the raw value of the fencing
            // sequence, which dblock turns into the token with the
            // session's timeline (arithmetic, read once per session).
            let raw: Option<i64> = sqlx::query_scalar(dblock::postgres::bench_try_exclusive_sql())
                .bind(key)
                .bind(&d.marker)
                .bind(d.pid)
                .fetch_one(&mut d.conn)
                .await?;
            if raw.is_none_or(|raw| raw < 0) {
                return Err("raw (dblock's SQL): the advisory lock was busy".into());
            }
            let freed: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .fetch_one(&mut d.conn)
                .await?;
            if !freed {
                return Err("raw (dblock's SQL): the advisory lock was not held".into());
            }
            Ok(())
        })
    })
}

fn dblock_try_op(locks: Locks, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let locks = locks.clone();
        let names = names.clone();
        Box::pin(async move {
            let guard = locks
                .try_acquire(names[i].as_str())
                .await?
                .ok_or("dblock: the advisory lock was busy")?;
            guard.release().await?;
            Ok(())
        })
    })
}

fn raw_dedicated_op(
    conns: Arc<Vec<Mutex<Dedicated>>>,
    names: Arc<Vec<String>>,
    sql: &'static str,
) -> Op {
    Arc::new(move |i| {
        let (conns, names) = (conns.clone(), names.clone());
        Box::pin(async move {
            let key = dblock::advisory_key(&names[i]);
            let mut d = conns[i].lock().await;
            let got: bool = sqlx::query_scalar(sql)
                .bind(key)
                .fetch_one(&mut d.conn)
                .await?;
            if !got {
                return Err("raw: the advisory lock was busy".into());
            }
            let freed: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .fetch_one(&mut d.conn)
                .await?;
            if !freed {
                return Err("raw: the advisory lock was not held".into());
            }
            Ok(())
        })
    })
}

fn sqlx_op(conns: Arc<Vec<Mutex<Dedicated>>>, names: Arc<Vec<String>>) -> Op {
    let locks: Arc<Vec<PgAdvisoryLock>> = Arc::new(
        names
            .iter()
            .map(|n| PgAdvisoryLock::with_key(PgAdvisoryLockKey::BigInt(dblock::advisory_key(n))))
            .collect(),
    );
    Arc::new(move |i| {
        let conns = conns.clone();
        let locks = locks.clone();
        Box::pin(async move {
            let mut d = conns[i].lock().await;
            let guard = locks[i].acquire(&mut d.conn).await?;
            guard.release_now().await?;
            Ok(())
        })
    })
}

/// Like `compare` with one task, but each turn calls the implementations
/// in a random order rather than a rotating one. Three of them draw from
/// the one fencing sequence, and one draw in 33 makes its statement wait
/// for a WAL flush (see docs/performance.md). In a fixed rotation the draws
/// follow a cycle of 18, so which implementation pays the flushes is
/// decided by the cycle's phase against the sequence's: one can pay 2/3 of
/// them for a whole run (dblock / its own SQL scattered from 0.52 to 1.39
/// between runs). A random order shares them out alike.
async fn compare_shuffled(ops: &[Op]) -> Res<Vec<Vec<f64>>> {
    use rand::seq::SliceRandom;
    for op in ops {
        super::run_window(op, 1, super::WARMUP).await?;
    }
    let mut results = vec![Vec::new(); ops.len()];
    let mut order: Vec<usize> = (0..ops.len()).collect();
    for _ in 0..super::ROUNDS {
        let mut spent = vec![Duration::ZERO; ops.len()];
        let mut calls = vec![0u32; ops.len()];
        let end = Instant::now() + super::WINDOW * ops.len() as u32;
        while Instant::now() < end {
            order.shuffle(&mut rand::rng());
            for &i in &order {
                let t = Instant::now();
                ops[i](0).await?;
                spent[i] += t.elapsed();
                calls[i] += 1;
            }
        }
        for (i, r) in results.iter_mut().enumerate() {
            r.push(f64::from(calls[i]) / spent[i].as_secs_f64());
        }
    }
    Ok(results)
}

/// Pairs per block in [`method_check`].
const STEADY_BLOCK: usize = 500;
/// Rounds of blocks in [`method_check`].
const STEADY_ROUNDS: usize = 40;

/// Each op's pairs/s, per round, `block` pairs of one op in a row, the ops
/// taking turns (the first rotating round by round).
async fn compare_blocks(ops: &[Op], block: usize, rounds: usize) -> Res<Vec<Vec<f64>>> {
    let mut results = vec![Vec::new(); ops.len()];
    for round in 0..rounds {
        for k in 0..ops.len() {
            let i = (round + k) % ops.len();
            let start = Instant::now();
            for _ in 0..block {
                ops[i](0).await?;
            }
            results[i].push(block as f64 / start.elapsed().as_secs_f64());
        }
    }
    Ok(results)
}

/// `DBLOCK_BENCH_STEADY=1`: whether the 1-task method costs dblock. `ops`
/// are dblock, its own SQL sent raw, and that SQL again on connections of
/// its own (the control). They are timed call by call, shuffled (as the
/// throughput rows are), and in blocks of [`STEADY_BLOCK`] pairs, where
/// each runs warm, without the others' code between its calls. This is done
/// unpinned, then with the bench and the server on one core, then on two
/// (docs/performance.md, issue 14, eighteenth pass).
async fn method_check(pool: &sqlx::PgPool, ops: &[Op], rows: &mut Vec<Row>) -> Res<()> {
    let one = Placement {
        client: 0,
        server: 0,
    };
    let two = Placement {
        client: 0,
        server: 1,
    };
    for at in [None, Some(one), Some(two)] {
        let label = at.map_or("unpinned", Placement::label);
        let pinned = match at {
            Some(at) => match placement::postgres_server(pool).await {
                Ok(server) => placement::pin(server, at).map(Some),
                Err(why) => Err(why),
            },
            None => Ok(None),
        };
        if let Err(why) = pinned {
            rows.push(
                Row::new(B, format!("method check, 1 task, {label}"))
                    .dblock("—")
                    .note(format!("not measured: {why}")),
            );
            continue;
        }
        let shuffled = compare_shuffled(ops).await?;
        let blocks = compare_blocks(ops, STEADY_BLOCK, STEADY_ROUNDS).await?;
        drop(pinned);
        for (how, r) in [
            ("call by call".to_owned(), &shuffled),
            (format!("blocks of {STEADY_BLOCK}"), &blocks),
        ] {
            let measure = format!("method check, 1 task, {label}, {how}");
            let vs = median(r[0].iter().zip(&r[1]).map(|(d, x)| d / x).collect());
            rows.push(
                Row::new(B, format!("{measure}: vs raw, same work, dedicated"))
                    .dblock(format!(
                        "{} ({})",
                        rate(median(r[0].clone())),
                        super::spread(r, 0, 1)
                    ))
                    .raw(rate(median(r[1].clone())))
                    .ratio(vs)
                    .target("≥ 0.95 × same work", vs >= 0.95),
            );
            rows.push(super::noise_row(B, &measure, r, 2, 1));
        }
    }
    Ok(())
}

/// Pairs of each op in one block of the CPU rows.
const CPU_BLOCK: usize = 500;

/// The throughput rows (and, with `DBLOCK_BENCH_PAIRS`, only the pairs for
/// counting system calls).
pub(super) async fn advisory_limit(env: &Env, rows: &mut Vec<Row>) -> Res<()> {
    let pool = super::pg_pool(&env.pg, POOL).await?;
    dblock::postgres::migrate(&pool).await?;
    let n = names("adv-limit", TASKS);
    let dblock = dblock_try_op(Locks::new(Advisory::new(pool.clone())), n.clone());
    // As many holder sessions as the raw side has connections with 8 tasks.
    let wide = Advisory::new(super::pg_pool(&env.pg, POOL).await?).with_holder_sessions(TASKS)?;
    let dblock_wide = dblock_try_op(Locks::new(wide), n.clone());
    let raw = raw_dedicated_op(dedicated(&env.pg, TASKS).await?, n.clone(), PG_TRY);
    // The lock and a bare nextval (no timeline, no session check): what the
    // fencing sequence alone costs.
    let nextval = raw_dedicated_op(dedicated(&env.pg, TASKS).await?, n.clone(), PG_TRY_NEXTVAL);
    let pooled = super::raw_advisory_op(pool.clone(), n.clone(), PG_TRY);
    let sqlx = sqlx_op(dedicated(&env.pg, TASKS).await?, n.clone());
    let same_sql = raw_dblock_sql_op(dedicated(&env.pg, TASKS).await?, n.clone());
    // The same again on connections of its own: two copies of one op, whose
    // ratio would be 1.00 on a quiet machine, show how far a ratio of this
    // run moves by chance (which server process each op's connection has,
    // where the scheduler puts it).
    let same_sql_again = raw_dblock_sql_op(dedicated(&env.pg, TASKS).await?, n.clone());

    if let Ok(which) = std::env::var("DBLOCK_BENCH_PAIRS") {
        let op = match which.as_str() {
            "dblock" => &dblock,
            "dblock-wide" => &dblock_wide,
            "raw" => &raw,
            "pooled" => &pooled,
            "sqlx" => &sqlx,
            "dblock-sql" => &same_sql,
            "nextval" => &nextval,
            other => return Err(format!("DBLOCK_BENCH_PAIRS: unknown {other:?}").into()),
        };
        // With DBLOCK_BENCH_PAIRS_TASKS=8: 8 tasks for 3 s instead.
        if std::env::var("DBLOCK_BENCH_PAIRS_TASKS").as_deref() == Ok("8") {
            super::run_window(op, TASKS, super::WARMUP).await?;
            let rate8 = super::run_window(op, TASKS, Duration::from_secs(3)).await?;
            eprintln!("pairs: {which}, {TASKS} tasks: {} /s", rate(rate8));
            return Ok(());
        }
        // DBLOCK_BENCH_PAIRS_COUNT=N: N pairs instead (for `perf record`,
        // where 5,000 are too few beside the set-up).
        let count = match std::env::var("DBLOCK_BENCH_PAIRS_COUNT") {
            Ok(n) => n
                .parse()
                .map_err(|_| format!("DBLOCK_BENCH_PAIRS_COUNT: not a count: {n:?}"))?,
            Err(_) => 5_000,
        };
        return super::timed_pairs(op, &which, count).await;
    }

    if std::env::var_os("DBLOCK_BENCH_STEADY").is_some() {
        let ops = [dblock.clone(), same_sql.clone(), same_sql_again.clone()];
        return method_check(&pool, &ops, rows).await;
    }

    for tasks in [1, TASKS] {
        // With 8 tasks dblock runs with 8 holder sessions, as many
        // connections as the raw side's; the default (2) is reported too.
        let main = if tasks == 1 { &dblock } else { &dblock_wide };
        let mut ops = vec![
            main.clone(),
            raw.clone(),
            pooled.clone(),
            sqlx.clone(),
            same_sql.clone(),
            nextval.clone(),
            same_sql_again.clone(),
        ];
        if tasks > 1 {
            ops.push(dblock.clone());
        }
        let r = if tasks == 1 {
            compare_shuffled(&ops).await?
        } else {
            compare(&ops, tasks).await?
        };
        let unit = if tasks == 1 {
            "1 task".to_owned()
        } else {
            format!("{TASKS} tasks, {TASKS} holder sessions")
        };
        let ratio =
            |a: usize, k: usize| median(r[a].iter().zip(&r[k]).map(|(d, x)| d / x).collect());
        let vs = |k: usize| ratio(0, k);
        let figure = |k: usize| rate(median(r[k].clone()));
        rows.push(
            Row::new(
                B,
                format!("pairs/s at the limit, {unit}: try_acquire+release vs raw try_lock+unlock, dedicated connections"),
            )
            .dblock(figure(0))
            .raw(format!(
                "dedicated {} (pool {}, sqlx PgAdvisoryLock {})",
                figure(1),
                figure(2),
                figure(3)
            ))
            .ratio(vs(1))
            .target("≥ 0.95 × dedicated", vs(1) >= 0.95),
        );
        rows.push(
            Row::new(B, format!("pairs/s at the limit, {unit}: vs sqlx PgAdvisoryLock acquire+release_now, dedicated"))
                .dblock(figure(0))
                .raw(figure(3))
                .ratio(vs(3))
                .target("ahead of sqlx (> 1.00)", vs(3) > 1.0),
        );
        rows.push(
            Row::new(
                B,
                format!("pairs/s at the limit, {unit}: vs raw try_lock+unlock on a pool of {POOL}"),
            )
            .dblock(figure(0))
            .raw(figure(2))
            .ratio(vs(2)),
        );
        rows.push(
            Row::new(
                B,
                format!("pairs/s at the limit, {unit}: vs raw, same work (dblock's own SQL: session check, token) on dedicated connections"),
            )
            .dblock(format!("{} ({})", figure(0), super::spread(&r, 0, 4)))
            .raw(figure(4))
            .ratio(vs(4))
            .target("≥ 0.95 × same work", vs(4) >= 0.95),
        );
        rows.push(super::noise_row(
            B,
            &format!("pairs/s at the limit, {unit}"),
            &r,
            6,
            4,
        ));
        rows.push(
            Row::new(
                B,
                format!(
                    "pairs/s at the limit, {unit}: raw same work vs raw try_lock+unlock, dedicated"
                ),
            )
            .dblock("—")
            .raw(format!("{} vs {}", figure(4), figure(1)))
            .ratio(ratio(4, 1))
            .note("reported: the price of dblock's SQL (fencing token, session check)"),
        );
        rows.push(
            Row::new(
                B,
                format!("pairs/s at the limit, {unit}: raw try_lock+nextval+unlock vs raw try_lock+unlock, dedicated"),
            )
            .dblock("—")
            .raw(format!("{} vs {}", figure(5), figure(1)))
            .ratio(ratio(5, 1))
            .note(format!(
                "reported: the fencing sequence alone; dblock's full SQL is at {:.2} × raw",
                ratio(4, 1)
            )),
        );
        if tasks > 1 {
            rows.push(
                Row::new(
                    B,
                    format!("pairs/s at the limit, {TASKS} tasks, default 2 holder sessions: vs raw, dedicated connections"),
                )
                .dblock(figure(7))
                .raw(figure(1))
                .ratio(ratio(7, 1))
                .note("reported: 2 connections against raw's 8"),
            );
        }
    }
    // Where the 1-task gap goes: CPU time per pair, the bench's and the
    // server's, for dblock and for its own SQL sent raw (unpinned here, and
    // again in each placement below).
    let cpu_ops = [dblock.clone(), same_sql.clone()];
    let server = placement::postgres_server(&pool).await;
    rows.push(placement::cpu_row(B, &cpu_ops, server, "unpinned", CPU_BLOCK).await?);
    // The 1-task rows again with the placement fixed (see `placement`):
    // dblock, its own SQL, the bare lock and the lock with nextval alone.
    let placed = [
        dblock.clone(),
        same_sql.clone(),
        raw.clone(),
        nextval.clone(),
    ];
    for at in [
        Placement {
            client: 0,
            server: 0,
        },
        Placement {
            client: 0,
            server: 1,
        },
    ] {
        let label = at.label();
        let pinned = match placement::postgres_server(&pool).await {
            Ok(server) => placement::pin(server, at),
            Err(why) => Err(why),
        };
        let measured = match pinned {
            Ok(pinned) => {
                let r = compare_shuffled(&placed).await;
                let server = placement::postgres_server(&pool).await;
                let cpu = placement::cpu_row(B, &cpu_ops, server, label, CPU_BLOCK).await;
                drop(pinned);
                rows.push(cpu?);
                r?
            }
            Err(why) => {
                rows.push(
                    Row::new(B, format!("pairs/s at the limit, 1 task, {label}"))
                        .dblock("—")
                        .note(format!("not measured: {why}")),
                );
                continue;
            }
        };
        let ratio = |a: usize, k: usize| {
            median(
                measured[a]
                    .iter()
                    .zip(&measured[k])
                    .map(|(d, x)| d / x)
                    .collect(),
            )
        };
        let figure = |k: usize| rate(median(measured[k].clone()));
        rows.push(
            Row::new(
                B,
                format!("pairs/s at the limit, 1 task, {label}: vs raw, same work, dedicated"),
            )
            .dblock(figure(0))
            .raw(figure(1))
            .ratio(ratio(0, 1))
            .target("≥ 0.95 × same work", ratio(0, 1) >= 0.95),
        );
        rows.push(
            Row::new(
                B,
                format!("pairs/s at the limit, 1 task, {label}: vs raw try_lock+unlock, dedicated"),
            )
            .dblock(figure(0))
            .raw(format!(
                "{} (same work {}: {:.2} ×; lock + nextval {}: {:.2} ×)",
                figure(2),
                figure(1),
                ratio(1, 2),
                figure(3),
                ratio(3, 2)
            ))
            .ratio(ratio(0, 2))
            .target("≥ 0.95 × dedicated", ratio(0, 2) >= 0.95),
        );
    }
    pool.close().await;
    if super::quick() {
        return Ok(());
    }
    scale(env, rows).await
}

// ---------------------------------------------------------------------------
// 10,000 locks on a pool of 10.

/// A PostgreSQL cluster of the bench's own, stopped and removed on drop.
struct OwnCluster {
    bin: PathBuf,
    dir: PathBuf,
    url: String,
}

impl OwnCluster {
    /// Starts one with room for `SCALE_LOCKS` advisory locks, if the
    /// server's binaries are at hand. Runs as the `postgres` user when this
    /// process is root (initdb refuses root).
    fn start() -> Res<OwnCluster> {
        let bin = std::env::var_os("DBLOCK_BENCH_PG_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                    .ok()?
                    .filter_map(|e| Some(e.ok()?.path().join("bin")))
                    .filter(|b| b.join("initdb").exists())
                    .collect();
                found.sort();
                found.pop()
            })
            .ok_or("no PostgreSQL binaries (set DBLOCK_BENCH_PG_BIN)")?;
        let dir = std::env::temp_dir().join(format!("dblock-bench-pg-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let cluster = OwnCluster {
            bin,
            url: format!("postgres://postgres@127.0.0.1:{OWN_CLUSTER_PORT}/postgres"),
            dir,
        };
        let root = Command::new("id").arg("-u").output()?.stdout == b"0\n";
        if root {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&cluster.dir)
                .status()?;
            if !status.success() {
                return Err("chown of the bench cluster's folder failed".into());
            }
        }
        let data = cluster.dir.join("data");
        cluster.run(
            root,
            &format!(
                "{} -D {} -A trust -U postgres --no-sync >/dev/null",
                cluster.bin.join("initdb").display(),
                data.display()
            ),
        )?;
        cluster.run(
            root,
            &format!(
                "{} -D {} -w -l {} -o \"-p {OWN_CLUSTER_PORT} -c listen_addresses=127.0.0.1 \
                 -k {} -c max_locks_per_transaction={OWN_CLUSTER_LOCKS_PER_TX} -c fsync=off\" start >/dev/null",
                cluster.bin.join("pg_ctl").display(),
                data.display(),
                cluster.dir.join("log").display(),
                cluster.dir.display(),
            ),
        )?;
        Ok(cluster)
    }

    fn run(&self, root: bool, script: &str) -> Res<()> {
        let status = if root {
            Command::new("su")
                .args(["postgres", "-s", "/bin/sh", "-c", script])
                .status()?
        } else {
            Command::new("sh").args(["-c", script]).status()?
        };
        if status.success() {
            Ok(())
        } else {
            Err(format!("the bench's own cluster: `{script}` failed").into())
        }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n");
        let _ = self.run(
            root,
            &format!(
                "{} -D {} -m fast stop >/dev/null",
                self.bin.join("pg_ctl").display(),
                self.dir.join("data").display()
            ),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Lock-table slots of the server at `url`.
async fn lock_slots(url: &str) -> Res<i64> {
    let mut conn = PgConnection::connect(url).await?;
    let slots: i64 = sqlx::query_scalar(
        "SELECT current_setting('max_locks_per_transaction')::bigint \
              * (current_setting('max_connections')::bigint \
                 + current_setting('max_prepared_transactions')::bigint)",
    )
    .fetch_one(&mut conn)
    .await?;
    Ok(slots)
}

struct Held {
    take: Duration,
    hold: Duration,
    release: Duration,
    holder_sessions: i64,
}

/// Takes `SCALE_LOCKS` locks on a pool of 10, holds them for one heartbeat
/// period (checking they are all still held), releases them.
async fn hold_10k(url: &str) -> Res<Held> {
    let pool = PgPoolOptions::new()
        .max_connections(POOL)
        .connect(url)
        .await?;
    dblock::postgres::migrate(&pool).await?;
    let locks = Locks::new(Advisory::new(pool.clone()));
    let base = format!("dblock-bench:{}:adv-10k", std::process::id());
    let t = Instant::now();
    let guards: Vec<_> = stream::iter(0..SCALE_LOCKS)
        .map(|i| {
            let locks = locks.clone();
            let name = format!("{base}:{i}");
            async move { locks.try_acquire(name).await }
        })
        .buffer_unordered(SCALE_TASKS)
        .collect()
        .await;
    let take = t.elapsed();
    let mut held = Vec::with_capacity(SCALE_LOCKS);
    for g in guards {
        match g {
            Ok(Some(g)) => held.push(g),
            Ok(None) => return Err("a scale lock was busy".into()),
            Err(LockError::LockTableFull { detail }) => {
                return Err(format!("LockTableFull after {} locks: {detail}", held.len()).into())
            }
            Err(e) => return Err(e.into()),
        }
    }
    let holder_sessions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    )
    .fetch_one(&pool)
    .await?;
    let t = Instant::now();
    tokio::time::sleep(
        dblock::postgres::AdvisoryOptions::default().heartbeat + Duration::from_millis(500),
    )
    .await;
    if let Some(g) = held.iter().find(|g| g.is_lost()) {
        return Err(format!("{} was lost while held", g.name()).into());
    }
    let hold = t.elapsed();
    let t = Instant::now();
    let released: Vec<_> = stream::iter(held)
        .map(|g| g.release())
        .buffer_unordered(SCALE_TASKS)
        .collect()
        .await;
    let release = t.elapsed();
    for r in released {
        r?;
    }
    drop(locks);
    pool.close().await;
    Ok(Held {
        take,
        hold,
        release,
        holder_sessions,
    })
}

async fn scale(env: &Env, rows: &mut Vec<Row>) -> Res<()> {
    let what = format!(
        "{} locks held on a pool of {POOL}: take / hold (checked) / release",
        rate(SCALE_LOCKS as f64)
    );
    let slots = lock_slots(&env.pg).await?;
    // Others share the bench server's lock table: use it only with room
    // to spare for them.
    let (outcome, server) = if slots >= 4 * SCALE_LOCKS as i64 {
        (
            hold_10k(&env.pg).await,
            format!("bench server, {} lock slots", rate(slots as f64)),
        )
    } else {
        match OwnCluster::start() {
            Ok(cluster) => {
                let own = lock_slots(&cluster.url).await?;
                let outcome = hold_10k(&cluster.url).await;
                drop(cluster);
                (
                    outcome,
                    format!(
                        "the bench's own cluster, max_locks_per_transaction = \
                         {OWN_CLUSTER_LOCKS_PER_TX} ({} lock slots; the bench server has {}, \
                         too few to use with others on it)",
                        rate(own as f64),
                        rate(slots as f64)
                    ),
                )
            }
            Err(e) => {
                rows.push(Row::new(B, what).dblock(format!(
                    "not run: the bench server's lock table has {} slots for all its sessions \
                     (an acquisition past it fails with Error::LockTableFull), and no cluster \
                     of the bench's own could be started: {e}",
                    rate(slots as f64)
                )));
                return Ok(());
            }
        }
    };
    match outcome {
        Ok(h) => rows.push(
            Row::new(B, what)
                .dblock(format!(
                    "{:.2} s ({} locks/s) / {:.1} s / {:.2} s ({} /s); on {} holder sessions",
                    h.take.as_secs_f64(),
                    rate(SCALE_LOCKS as f64 / h.take.as_secs_f64()),
                    h.hold.as_secs_f64(),
                    h.release.as_secs_f64(),
                    rate(SCALE_LOCKS as f64 / h.release.as_secs_f64()),
                    h.holder_sessions
                ))
                .note(server),
        ),
        Err(e) => rows.push(Row::new(B, what).dblock(format!("error: {e}")).note(server)),
    }
    Ok(())
}
