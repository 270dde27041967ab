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

#[path = "compare/limit.rs"]
mod limit;

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

#[path = "compare/advisory_limit.rs"]
mod advisory_limit;
#[path = "compare/cross.rs"]
mod cross;

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

// ---------------------------------------------------------------------------
// Counting the statements this process sends.
//
// sqlx logs every statement it runs on the `sqlx::query` target when that is
// enabled; this subscriber enables it only while counting, and counts. Pool
// health pings are not statements and are not counted. dblock's own
// warnings are printed (first few) and counted.
mod count {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use tracing::field::{Field, Visit};
    use tracing::subscriber::Interest;
    use tracing::{span, Event, Level, Metadata, Subscriber};

    static ON: AtomicBool = AtomicBool::new(false);
    static STATEMENTS: AtomicU64 = AtomicU64::new(0);
    static WARNINGS: AtomicU64 = AtomicU64::new(0);
    /// Per statement (its first words): how many, and their total time.
    /// (op, statement's first words) → (count, total seconds).
    type Tally = HashMap<(usize, String), (u64, f64)>;
    static BREAKDOWN: Mutex<Option<Tally>> = Mutex::new(None);
    /// Which op the statements logged now belong to, for the breakdown.
    static OP: AtomicUsize = AtomicUsize::new(0);
    /// Statements as (start, end, first words), while recording.
    static TIMELINE: Mutex<Option<Vec<(Instant, Instant, String)>>> = Mutex::new(None);

    pub struct Counter;

    fn is_query(m: &Metadata<'_>) -> bool {
        m.target() == "sqlx::query"
    }

    fn is_warning(m: &Metadata<'_>) -> bool {
        *m.level() <= Level::WARN && m.target().starts_with("dblock")
    }

    struct Text<'a>(&'a mut String);

    impl Visit for Text<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            use std::fmt::Write;
            let _ = write!(self.0, " {}={:?}", field.name(), value);
        }
    }

    /// The statement's summary and duration, as sqlx logs them.
    #[derive(Default)]
    struct Timing {
        summary: String,
        secs: f64,
    }

    impl Visit for Timing {
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "summary" {
                self.summary = value.to_owned();
            }
        }
        fn record_f64(&mut self, field: &Field, value: f64) {
            if field.name() == "elapsed_secs" {
                self.secs = value;
            }
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "summary" && self.summary.is_empty() {
                self.summary = format!("{value:?}");
            }
        }
    }

    impl Subscriber for Counter {
        fn register_callsite(&self, m: &'static Metadata<'static>) -> Interest {
            if is_query(m) {
                Interest::sometimes()
            } else if is_warning(m) {
                Interest::always()
            } else {
                Interest::never()
            }
        }
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            (is_query(m) && ON.load(Relaxed)) || is_warning(m)
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, event: &Event<'_>) {
            let m = event.metadata();
            if is_query(m) {
                STATEMENTS.fetch_add(1, Relaxed);
                let end = Instant::now();
                if let Some(timeline) = TIMELINE.lock().unwrap().as_mut() {
                    let mut t = Timing::default();
                    event.record(&mut t);
                    let start = end - Duration::from_secs_f64(t.secs);
                    timeline.push((start, end, t.summary));
                }
                let mut breakdown = BREAKDOWN.lock().unwrap();
                if let Some(map) = breakdown.as_mut() {
                    let mut t = Timing::default();
                    event.record(&mut t);
                    let e = map.entry((OP.load(Relaxed), t.summary)).or_default();
                    e.0 += 1;
                    e.1 += t.secs;
                }
            } else if WARNINGS.fetch_add(1, Relaxed) < 5 {
                let mut text = String::new();
                event.record(&mut Text(&mut text));
                eprintln!("  [{} {}]{}", m.level(), m.target(), text);
            }
        }
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }

    pub fn start() {
        STATEMENTS.store(0, Relaxed);
        ON.store(true, Relaxed);
    }

    pub fn stop() -> u64 {
        ON.store(false, Relaxed);
        STATEMENTS.load(Relaxed)
    }

    /// Starts counting and timing statements by their first words.
    pub fn breakdown_start() {
        *BREAKDOWN.lock().unwrap() = Some(HashMap::new());
        start();
    }

    /// Attributes the statements logged from now on to op `i`.
    pub fn set_op(i: usize) {
        OP.store(i, Relaxed);
    }

    /// Per op and statement: first words, count, total seconds.
    pub fn breakdown_stop() -> Vec<(usize, String, u64, f64)> {
        stop();
        let map = BREAKDOWN.lock().unwrap().take().unwrap_or_default();
        let mut v: Vec<_> = map
            .into_iter()
            .map(|((op, k), (n, s))| (op, k, n, s))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0).then(b.3.total_cmp(&a.3)));
        v
    }

    /// Starts recording when each statement runs.
    pub fn timeline_start() {
        *TIMELINE.lock().unwrap() = Some(Vec::new());
        start();
    }

    pub fn timeline_stop() -> Vec<(Instant, Instant, String)> {
        stop();
        TIMELINE.lock().unwrap().take().unwrap_or_default()
    }

    pub fn warnings() -> u64 {
        WARNINGS.load(Relaxed)
    }
}

// ---------------------------------------------------------------------------
// The table.

struct Row {
    backend: &'static str,
    measure: String,
    dblock: String,
    raw: String,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

impl Row {
    fn new(backend: &'static str, measure: impl Into<String>) -> Row {
        Row {
            backend,
            measure: measure.into(),
            dblock: String::new(),
            raw: "—".into(),
            ratio: None,
            target: "reported".into(),
            met: None,
        }
    }
    fn dblock(mut self, s: impl Into<String>) -> Row {
        self.dblock = s.into();
        self
    }
    fn raw(mut self, s: impl Into<String>) -> Row {
        self.raw = s.into();
        self
    }
    fn ratio(mut self, r: f64) -> Row {
        self.ratio = Some(r);
        self
    }
    fn target(mut self, t: impl Into<String>, met: bool) -> Row {
        self.target = t.into();
        self.met = Some(met);
        self
    }
    fn note(mut self, t: impl Into<String>) -> Row {
        self.target = t.into();
        self
    }
}

fn print_table(rows: &[Row]) -> String {
    let head = [
        "backend",
        "measure",
        "dblock",
        "raw SQL",
        "dblock/raw",
        "target",
        "met",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.backend.to_owned(),
                r.measure.clone(),
                r.dblock.clone(),
                r.raw.clone(),
                r.ratio.map(|x| format!("{x:.2}")).unwrap_or("—".into()),
                r.target.clone(),
                match r.met {
                    Some(true) => "yes".into(),
                    Some(false) => "**NO**".into(),
                    None => "—".into(),
                },
            ]
        })
        .collect();
    let mut widths = head.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::from("|");
        for (c, w) in cols.iter().zip(widths) {
            let pad = w - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s
    };
    let mut out = String::new();
    out.push_str(&line(&head.map(String::from)));
    out.push('\n');
    out.push('|');
    for w in widths {
        out.push_str(&"-".repeat(w + 2));
        out.push('|');
    }
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// Figures.

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rate(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn ms(d: Duration) -> String {
    let x = d.as_secs_f64() * 1000.0;
    if x < 10.0 {
        format!("{x:.2} ms")
    } else {
        format!("{x:.0} ms")
    }
}

struct Latency {
    p50: Duration,
    p99: Duration,
    max: Duration,
    n: usize,
}

impl Latency {
    fn of(mut v: Vec<Duration>) -> Latency {
        v.sort();
        Latency {
            p50: pct(&v, 50.0),
            p99: pct(&v, 99.0),
            max: *v.last().expect("samples"),
            n: v.len(),
        }
    }
    fn show(&self) -> String {
        format!("{} / {} (n={})", ms(self.p50), ms(self.p99), self.n)
    }
}

fn owner() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

fn name(kind: &str, i: usize) -> String {
    format!("dblock-bench:{}:{kind}:{i}", std::process::id())
}

fn names(kind: &str, n: usize) -> Arc<Vec<String>> {
    Arc::new((0..n).map(|i| name(kind, i)).collect())
}

// ---------------------------------------------------------------------------
// Throughput.

async fn run_window(op: &Op, tasks: usize, window: Duration) -> Res<f64> {
    let start = Instant::now();
    let end = start + window;
    let mut set = JoinSet::new();
    for i in 0..tasks {
        let op = op.clone();
        set.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                op(i).await?;
                n += 1;
            }
            Ok::<u64, E>(n)
        });
    }
    let mut total = 0;
    while let Some(done) = set.join_next().await {
        total += done??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Median pairs/s of each op, the ops taking turns round by round.
/// Pairs/s of each op, per round. With one task the ops take turns call by
/// call (rotating which goes first), and a round is a block of such turns;
/// with several tasks each round runs each op's tasks for a window, the
/// ops taking turns. Either way load from elsewhere falls on all of them
/// alike, and the ratio of a round's figures is a fair comparison.
async fn compare(ops: &[Op], tasks: usize) -> Res<Vec<Vec<f64>>> {
    for op in ops {
        run_window(op, tasks, WARMUP).await?;
    }
    let mut results = vec![Vec::new(); ops.len()];
    if tasks == 1 {
        let mut turn = 0;
        for _ in 0..ROUNDS {
            let mut spent = vec![Duration::ZERO; ops.len()];
            let mut calls = vec![0u32; ops.len()];
            let end = Instant::now() + WINDOW * ops.len() as u32;
            while Instant::now() < end {
                for k in 0..ops.len() {
                    let i = (turn + k) % ops.len();
                    let t = Instant::now();
                    ops[i](0).await?;
                    spent[i] += t.elapsed();
                    calls[i] += 1;
                }
                turn += 1;
            }
            for (i, r) in results.iter_mut().enumerate() {
                r.push(calls[i] as f64 / spent[i].as_secs_f64());
            }
        }
        return Ok(results);
    }
    for round in 0..ROUNDS {
        for k in 0..ops.len() {
            let i = (round + k) % ops.len();
            results[i].push(run_window(&ops[i], tasks, WINDOW).await?);
        }
    }
    Ok(results)
}

/// Statements sent per call of `op`, over `n` calls one after another.
async fn statements_per_call(op: &Op, n: usize) -> Res<f64> {
    op(0).await?;
    count::start();
    for _ in 0..n {
        op(0).await?;
    }
    Ok(count::stop() as f64 / n as f64)
}

/// With `DBLOCK_BENCH_BREAKDOWN=1`: where the time of one call of each op
/// goes, by statement (sqlx's own timing, from sending the statement to the
/// last row), against the wall time per call. The rest is pool checkouts
/// (with their health-check pings) and task scheduling.
fn breakdown_wanted() -> bool {
    std::env::var_os("DBLOCK_BENCH_BREAKDOWN").is_some()
}

/// `DBLOCK_BENCH_QUICK=1`: the throughput rows only (no handoff or scale
/// rows in the mysql and advisory-limit sections), for repeated runs.
fn quick() -> bool {
    std::env::var_os("DBLOCK_BENCH_QUICK").is_some()
}

async fn breakdown(backend: &str, labels: &[&str], ops: &[Op]) -> Res<()> {
    if !breakdown_wanted() {
        return Ok(());
    }
    const CYCLES: usize = 300;
    for op in ops {
        op(0).await?;
    }
    // The ops take turns call by call, as in the 1-task comparison.
    let mut wall = vec![Duration::ZERO; ops.len()];
    count::breakdown_start();
    for c in 0..CYCLES {
        for k in 0..ops.len() {
            let i = (c + k) % ops.len();
            count::set_op(i);
            let t = Instant::now();
            ops[i](0).await?;
            wall[i] += t.elapsed();
        }
    }
    let parts = count::breakdown_stop();
    for (i, label) in labels.iter().enumerate() {
        let mine: Vec<_> = parts.iter().filter(|p| p.0 == i).collect();
        let wall = wall[i].as_secs_f64() * 1e6 / CYCLES as f64;
        let in_statements = mine.iter().map(|p| p.3).sum::<f64>() * 1e6 / CYCLES as f64;
        let mut line = format!(
            "{backend}, {label}: {wall:.0} µs per pair, {in_statements:.0} µs in statements, \
             {:.0} µs elsewhere:",
            wall - in_statements
        );
        for (_, summary, n, secs) in mine {
            let _ = write!(
                line,
                "\n    {:>5.2} × {:>6.0} µs  {summary}",
                *n as f64 / CYCLES as f64,
                secs * 1e6 / *n as f64
            );
        }
        BREAKDOWNS.lock().unwrap().push(line);
    }
    Ok(())
}

static BREAKDOWNS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Releases what an acquisition took.
type Release = Box<dyn FnOnce() -> BoxFut + Send>;
type AcquireFn =
    Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = Res<Release>> + Send>> + Send + Sync>;

/// Raw SQL run the way dblock runs it (for the breakdown): the attempt in
/// a spawned task that answers on a oneshot, the release sent over an mpsc
/// to a keeper task (which also arms a timer, as the renewal or heartbeat
/// does) that answers on a oneshot. What the task hand-offs cost.
fn mimic_op(acquire: AcquireFn) -> Op {
    Arc::new(move |i| {
        let acquire = acquire.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let (ctx, mut crx) = tokio::sync::mpsc::channel::<oneshot::Sender<Res<()>>>(4);
            tokio::spawn(async move {
                match acquire(i).await {
                    Ok(release) => {
                        tokio::spawn(async move {
                            tokio::select! {
                                biased;
                                reply = crx.recv() => if let Some(reply) = reply {
                                    let _ = reply.send(release().await);
                                },
                                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                            }
                        });
                        let _ = tx.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
            rx.await??;
            let (rtx, rrx) = oneshot::channel();
            ctx.send(rtx).await?;
            rrx.await?
        })
    })
}

fn dblock_op(locks: Locks, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let locks = locks.clone();
        let name = names[i].clone();
        Box::pin(async move {
            locks.acquire(name).await?.release().await?;
            Ok(())
        })
    })
}

/// Throughput rows for dblock (`ops[0]`) against each raw op, and where
/// the time of one pair goes.
async fn throughput_rows(
    backend: &'static str,
    ops: &[Op],
    raws: &[(&str, Option<(&str, f64)>)],
    extra: Vec<(&'static str, Op)>,
    rows: &mut Vec<Row>,
) -> Res<Vec<(usize, Vec<Vec<f64>>)>> {
    let results = ratio_rows(backend, ops, raws, rows).await?;
    let mut labels = vec!["dblock"];
    labels.extend(raws.iter().map(|r| r.0));
    let mut all = ops.to_vec();
    for (label, op) in extra {
        labels.push(label);
        all.push(op);
    }
    breakdown(backend, &labels, &all).await?;
    let mut d = Vec::new();
    for op in ops {
        d.push(statements_per_call(op, 100).await?);
    }
    let raw: Vec<String> = d[1..].iter().map(|x| format!("{x:.1}")).collect();
    rows.push(
        Row::new(backend, "statements per pair (client count)")
            .dblock(format!("{:.1}", d[0]))
            .raw(raw.join(" / ")),
    );
    Ok(results)
}

/// The pairs/s rows: dblock (`ops[0]`) against each raw op, with 1 and with
/// 8 tasks.
async fn ratio_rows(
    backend: &'static str,
    ops: &[Op],
    raws: &[(&str, Option<(&str, f64)>)],
    rows: &mut Vec<Row>,
) -> Res<Vec<(usize, Vec<Vec<f64>>)>> {
    let mut all = Vec::new();
    for tasks in [1, TASKS] {
        let r = compare(ops, tasks).await?;
        let unit = if tasks == 1 { "1 task" } else { "8 tasks" };
        for (k, (label, target)) in raws.iter().enumerate() {
            // The median of the per-round ratios: each round's pair ran
            // back to back, under much the same load.
            let ratio = median(r[0].iter().zip(&r[k + 1]).map(|(d, x)| d / x).collect());
            let mut row = Row::new(backend, format!("pairs/s, {unit}, vs {label}"))
                .dblock(rate(median(r[0].clone())))
                .raw(rate(median(r[k + 1].clone())))
                .ratio(ratio);
            if let Some((text, min)) = target {
                row = row.target(*text, ratio >= *min);
            }
            rows.push(row);
        }
        all.push((tasks, r));
    }
    Ok(all)
}

/// A row comparing two raw ops of one `compare` run (`a` against `b`),
/// per round, median of rounds: what some work costs the database itself.
fn raw_ratio_row(
    backend: &'static str,
    measure: String,
    r: &[Vec<f64>],
    a: usize,
    b: usize,
    note: &str,
) -> Row {
    let ratio = median(r[a].iter().zip(&r[b]).map(|(x, y)| x / y).collect());
    Row::new(backend, measure)
        .dblock("—")
        .raw(format!(
            "{} vs {}",
            rate(median(r[a].clone())),
            rate(median(r[b].clone()))
        ))
        .ratio(ratio)
        .note(note)
}

// ---------------------------------------------------------------------------
// Handoff.

#[derive(Clone)]
enum Blocked {
    /// Wait until `pg_locks` shows the waiter blocked on the advisory key.
    Probe(PgPool),
    /// Hold for a random time in this range (ms).
    Hold(u64, u64),
}

impl Blocked {
    async fn wait(&self, key: i64) -> Res<()> {
        match self {
            Blocked::Probe(pool) => wait_for_advisory_waiter(pool, key).await,
            Blocked::Hold(lo, hi) => {
                let ms = rand::rng().random_range(*lo..=*hi);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
        }
    }
}

fn split_key(key: i64) -> (i64, i64) {
    let k = key as u64;
    ((k >> 32) as i64, (k & 0xffff_ffff) as i64)
}

async fn wait_for_advisory_waiter(pool: &PgPool, key: i64) -> Res<()> {
    let (classid, objid) = split_key(key);
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
               AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2)",
        )
        .bind(classid)
        .bind(objid)
        .fetch_one(pool)
        .await?;
        if waiting {
            return Ok(());
        }
        if Instant::now() > give_up {
            return Err("the waiter never showed up in pg_locks".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Handoff {
    /// Holder calls release → waiter's acquire returns.
    call: Latency,
    /// Holder's release statement done → the waiter's next statement starts:
    /// how soon a waiter is woken (an upper bound: it includes the waiter's
    /// pool checkout). Only for waiters in the same process, one pair.
    wake: Option<Latency>,
    /// Medians of: release called → release statement sent; the release
    /// statement; release statement done → waiter granted.
    phases: Option<[Duration; 3]>,
}

impl Handoff {
    /// For the breakdown: where a handoff's time goes.
    fn explain(&self, what: &str) {
        if !breakdown_wanted() {
            return;
        }
        if let Some([a, b, c]) = self.phases {
            BREAKDOWNS.lock().unwrap().push(format!(
                "{what}: release called → release statement sent {:.0} µs; release statement \
                 {:.0} µs; statement done → waiter granted {:.0} µs (medians)",
                a.as_secs_f64() * 1e6,
                b.as_secs_f64() * 1e6,
                c.as_secs_f64() * 1e6
            ));
        }
    }
}

/// Handoffs from `holder` to `waiter` on `pairs` names side by side. With
/// `release_sql` (the first words of the backend's release statement, as
/// sqlx logs them), also times the wake-up from the statement timeline.
async fn handoff(
    holder: &Locks,
    waiter: &Locks,
    kind: &str,
    pairs: usize,
    per_pair: usize,
    blocked: Blocked,
    release_sql: Option<&'static str>,
) -> Res<Handoff> {
    let mut set = JoinSet::new();
    for pair in 0..pairs {
        let (holder, waiter, blocked) = (holder.clone(), waiter.clone(), blocked.clone());
        let name = name(kind, pair);
        set.spawn(async move {
            let key = dblock::advisory_key(&name);
            let mut out = Vec::new();
            for _ in 0..=per_pair {
                let guard = holder.acquire(&name).await?;
                let (tx, rx) = oneshot::channel();
                let (w, n) = (waiter.clone(), name.clone());
                let task = tokio::spawn(async move {
                    let g = w.acquire(&n).wait(Duration::from_secs(30)).await?;
                    let _ = tx.send(Instant::now());
                    g.release().await?;
                    Ok::<(), E>(())
                });
                blocked.wait(key).await?;
                if release_sql.is_some() {
                    count::timeline_start();
                }
                let t0 = Instant::now();
                guard.release().await?;
                let granted = rx.await;
                let timeline = count::timeline_stop();
                task.await??;
                let granted = granted?;
                if granted < t0 {
                    return Err("the waiter was granted before the holder released".into());
                }
                let release = release_sql.and_then(|marker| {
                    timeline
                        .iter()
                        .filter(|(start, _, sql)| *start >= t0 && sql.starts_with(marker))
                        .map(|(start, end, _)| (*start, *end))
                        .min()
                });
                let wake = release.and_then(|(_, released)| {
                    let next = timeline
                        .iter()
                        .map(|(start, _, _)| *start)
                        .filter(|start| *start >= released)
                        .min()?;
                    Some(next - released)
                });
                let phases = release.map(|(start, end)| {
                    [
                        start.saturating_duration_since(t0),
                        end - start,
                        granted.saturating_duration_since(end),
                    ]
                });
                out.push((granted - t0, wake, phases));
            }
            // The first handoff warms up connections and listeners.
            out.remove(0);
            Ok::<_, E>(out)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = set.join_next().await {
        all.extend(done??);
    }
    let wakes: Vec<Duration> = all.iter().filter_map(|x| x.1).collect();
    let phases: Vec<[Duration; 3]> = all.iter().filter_map(|x| x.2).collect();
    let phase = |k: usize| {
        let mut v: Vec<Duration> = phases.iter().map(|p| p[k]).collect();
        v.sort();
        v[v.len() / 2]
    };
    Ok(Handoff {
        call: Latency::of(all.iter().map(|x| x.0).collect()),
        wake: (!wakes.is_empty()).then(|| Latency::of(wakes)),
        phases: (!phases.is_empty()).then(|| [phase(0), phase(1), phase(2)]),
    })
}

/// The raw figure: a session blocked in `pg_advisory_lock`, woken by another
/// session's `pg_advisory_unlock`; clock from the unlock call to the grant.
/// `waiter_sql` is `pg_advisory_lock` alone, or what dblock's waiter runs.
/// With `hops`, the statements run as dblock runs them: the holder's unlock
/// by a keeper task told over an mpsc (answering on a oneshot), the
/// waiter's lock in a task of its own that answers the acquirer on a
/// oneshot. The SQL is the same; only the task hand-offs are added.
async fn raw_advisory_handoff(
    pool: &PgPool,
    probe: &PgPool,
    samples: usize,
    waiter_sql: &'static str,
    hops: bool,
) -> Res<Latency> {
    type Conn = sqlx::pool::PoolConnection<sqlx::Postgres>;
    async fn unlock(mut conn: Conn, key: i64) -> Res<Conn> {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut *conn)
            .await?;
        Ok(conn)
    }
    async fn lock(mut conn: Conn, key: i64, sql: &'static str) -> Res<Conn> {
        sqlx::query(sql).bind(key).execute(&mut *conn).await?;
        Ok(conn)
    }
    let key: i64 = rand::rng().random();
    let mut holder = Some(pool.acquire().await?);
    let mut waiter = Some(pool.acquire().await?);
    let mut out = Vec::new();
    for _ in 0..=samples {
        let mut h = holder.take().expect("holder connection");
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut *h)
            .await?;
        // With hops, a keeper task owns the holder's connection and waits
        // for the release command.
        let (command, mut commands) = tokio::sync::mpsc::channel::<oneshot::Sender<Res<Conn>>>(4);
        let (keeper, mut inline) = if hops {
            let keeper = tokio::spawn(async move {
                tokio::select! {
                    biased;
                    reply = commands.recv() => if let Some(reply) = reply {
                        let _ = reply.send(unlock(h, key).await);
                    },
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            });
            (Some(keeper), None)
        } else {
            (None, Some(h))
        };
        let w = waiter.take().expect("waiter connection");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let locked = if hops {
                let (itx, irx) = oneshot::channel();
                tokio::spawn(async move {
                    let _ = itx.send(lock(w, key, waiter_sql).await);
                });
                irx.await?
            } else {
                lock(w, key, waiter_sql).await
            };
            let _ = tx.send(Instant::now());
            unlock(locked?, key).await
        });
        wait_for_advisory_waiter(probe, key).await?;
        let t0 = Instant::now();
        holder = Some(match (keeper, inline.take()) {
            (Some(keeper), _) => {
                let (rtx, rrx) = oneshot::channel();
                command.send(rtx).await?;
                let conn = rrx.await??;
                keeper.await?;
                conn
            }
            (None, Some(h)) => unlock(h, key).await?,
            (None, None) => return Err("no holder connection".into()),
        });
        let granted = rx.await?;
        waiter = Some(task.await??);
        out.push(granted.saturating_duration_since(t0));
    }
    out.remove(0);
    Ok(Latency::of(out))
}

// ---------------------------------------------------------------------------
// Scale.

enum Server {
    Pg { pool: PgPool, statements: bool },
    My(MySqlPool),
    None,
}

impl Server {
    async fn counters(&self) -> Res<Vec<(&'static str, i64)>> {
        Ok(match self {
            Server::Pg { pool, statements } => {
                let mut v = Vec::new();
                if *statements {
                    let calls: i64 = sqlx::query_scalar(
                        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
                          WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    )
                    .fetch_one(pool)
                    .await?;
                    v.push(("pg_stat_statements calls (database)", calls));
                }
                let commits: i64 = sqlx::query_scalar(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                )
                .fetch_one(pool)
                .await?;
                v.push(("xact_commit (database)", commits));
                let updates: Option<i64> = sqlx::query_scalar(
                    "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'dblock_bench_leases'",
                )
                .fetch_optional(pool)
                .await?;
                v.push(("n_tup_upd (bench table)", updates.unwrap_or(0)));
                v
            }
            Server::My(pool) => {
                let rows = sqlx::query(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Com_update')",
                )
                .fetch_all(pool)
                .await?;
                let mut v = Vec::new();
                for row in rows {
                    let key: String = row.try_get(0)?;
                    let value: String = row.try_get(1)?;
                    let key = if key.eq_ignore_ascii_case("Questions") {
                        "Questions (server)"
                    } else {
                        "Com_update (server)"
                    };
                    v.push((key, value.parse()?));
                }
                v
            }
            Server::None => Vec::new(),
        })
    }
}

struct Scale {
    held: usize,
    failure: Option<String>,
    stmts_per_s: f64,
    window: Duration,
    server: String,
    lost: usize,
}

/// Takes locks level by level until one fails, then counts the statements
/// that keeping them costs over `window`.
async fn hold_many(
    locks: &Locks,
    kind: &str,
    ttl: Option<Duration>,
    window: Duration,
    server: &Server,
) -> Res<Scale> {
    let mut guards: Vec<LockGuard> = Vec::new();
    let mut failure = None;
    for level in LEVELS {
        let start = guards.len();
        let mut pending = stream::iter(start..level)
            .map(|i| {
                let name = name(kind, i);
                async move {
                    let acquire = locks.acquire(name).wait(Duration::from_secs(5));
                    match ttl {
                        Some(ttl) => acquire.ttl(ttl).await,
                        None => acquire.await,
                    }
                }
            })
            .buffer_unordered(8);
        while let Some(outcome) = pending.next().await {
            match outcome {
                Ok(g) => guards.push(g),
                Err(e) => {
                    failure = Some(format!("lock #{} of {level}: {e}", guards.len() + 1));
                    break;
                }
            }
        }
        drop(pending);
        let lost = guards.iter().filter(|g| g.is_lost()).count();
        if failure.is_none() && lost > 0 {
            failure = Some(format!("{lost} of {level} reported lost"));
        }
        if failure.is_some() {
            break;
        }
    }
    let held = guards.iter().filter(|g| !g.is_lost()).count();
    let before = server.counters().await?;
    count::start();
    tokio::time::sleep(window).await;
    let n = count::stop();
    let after = server.counters().await?;
    let lost = guards.iter().filter(|g| g.is_lost()).count();
    let secs = window.as_secs_f64();
    let server = before
        .iter()
        .zip(&after)
        .map(|((k, a), (_, b))| format!("{k} {}/s", rate((b - a) as f64 / secs)))
        .collect::<Vec<_>>()
        .join("; ");
    // Release in the background; the pool is closed by the caller.
    drop(guards);
    Ok(Scale {
        held,
        failure,
        stmts_per_s: n as f64 / secs,
        window,
        server,
        lost,
    })
}

fn scale_rows(backend: &'static str, s: &Scale, raw_held: Option<String>, rows: &mut Vec<Row>) {
    let held = match &s.failure {
        None => format!("{} (all levels)", rate(s.held as f64)),
        Some(f) => format!("{}; then {f}", rate(s.held as f64)),
    };
    let mut row = Row::new(backend, "locks held at once, pool ≤ 10").dblock(held);
    if let Some(raw) = raw_held {
        row = row.raw(raw);
    }
    rows.push(row);
    // The window is one renewal (or heartbeat) period: one statement per
    // lock is what keeping them all alive needs.
    let needed = s.held as f64 / s.window.as_secs_f64();
    let mut note = format!(
        "one per lock per {} s = {}/s needed{}; server-side: {}",
        s.window.as_secs(),
        rate(needed),
        if s.stmts_per_s < 0.9 * needed {
            " (falling behind)"
        } else {
            ""
        },
        if s.server.is_empty() {
            "n/a".into()
        } else {
            s.server.clone()
        }
    );
    if s.lost > 0 {
        let _ = write!(note, "; {} lost during the window", s.lost);
    }
    rows.push(
        Row::new(
            backend,
            format!("keep-alive statements/s for {} held", rate(s.held as f64)),
        )
        .dblock(format!("{:.1}/s", s.stmts_per_s))
        .note(note),
    );
}

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

const PG_TRY: &str = "SELECT pg_try_advisory_lock($1)";
const PG_TRY_NEXTVAL: &str =
    "SELECT CASE WHEN pg_try_advisory_lock($1) THEN nextval('dblock_fencing_seq') END IS NOT NULL";

const RAW_WAIT: &str = "SELECT pg_advisory_lock($1)";
/// What dblock's server-side waiter runs (postgres/advisory.rs).
const DBLOCK_WAIT: &str = "SELECT nextval('dblock_fencing_seq') FROM (SELECT pg_advisory_lock($1) \
      FROM (SELECT set_config('lock_timeout', '30000ms', true)) cfg OFFSET 0) l";

fn latency_row(backend: &'static str, what: &str, l: &Latency) -> Row {
    Row::new(backend, format!("{what}: p50 / p99 (max {})", ms(l.max))).dblock(l.show())
}

/// A waiter polling from another instance: it tries again at most
/// `max_poll` after a release, and its attempt then takes as long as an
/// attempt takes (bounded here by `local`, the p99 of a same-process
/// handoff: one release and one claim).
fn poll_row(backend: &'static str, what: &str, l: &Latency, local: &Latency) -> Row {
    let max_poll = LeaseOptions::default().max_poll;
    let bound = max_poll + local.p99;
    latency_row(backend, what, l).target(
        format!(
            "p99 ≤ max_poll {} + one attempt ({})",
            ms(max_poll),
            ms(local.p99)
        ),
        l.p99 <= bound,
    )
}

/// An in-process waiter woken by a release.
fn wake_row(backend: &'static str, what: &str, l: &Latency) -> Row {
    Row::new(
        backend,
        format!(
            "wake-up, {what}, same Locks: release done → waiter's next statement: p50 / p99 (max {})",
            ms(l.max)
        ),
    )
    .dblock(l.show())
    .target(format!("p99 ≤ {}", ms(WAKE_BOUND)), l.p99 <= WAKE_BOUND)
}

fn raw_advisory_op(pool: PgPool, names: Arc<Vec<String>>, sql: &'static str) -> Op {
    Arc::new(move |i| {
        let pool = pool.clone();
        let key = dblock::advisory_key(&names[i]);
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            let got: bool = sqlx::query_scalar(sql)
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
            if !got {
                return Err("raw: the advisory lock was busy".into());
            }
            let freed: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
            if !freed {
                return Err("raw: the advisory lock was not held".into());
            }
            Ok(())
        })
    })
}

fn advisory_acquire(pool: PgPool, names: Arc<Vec<String>>) -> AcquireFn {
    Arc::new(move |i| {
        let pool = pool.clone();
        let key = dblock::advisory_key(&names[i]);
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            let got: bool = sqlx::query_scalar(PG_TRY_NEXTVAL)
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
            if !got {
                return Err("raw: the advisory lock was busy".into());
            }
            let release: Release = Box::new(move || {
                Box::pin(async move {
                    sqlx::query("SELECT pg_advisory_unlock($1)")
                        .bind(key)
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
            Ok(release)
        })
    })
}

async fn advisory(env: &Env, rows: &mut Vec<Row>) -> Res<Latency> {
    const B: &str = "pg advisory";
    let pool = pg_pool(&env.pg, POOL).await?;
    dblock::postgres::migrate(&pool).await?;
    let locks = Locks::new(Advisory::new(pool.clone()));

    // Uncontended pairs.
    let n = names("adv", TASKS);
    let ops = [
        dblock_op(locks.clone(), n.clone()),
        raw_advisory_op(pool.clone(), n.clone(), PG_TRY),
        raw_advisory_op(pool.clone(), n.clone(), PG_TRY_NEXTVAL),
    ];
    throughput_rows(
        B,
        &ops,
        &[
            ("raw try_lock+unlock", Some(("≥ 0.95 × raw", 0.95))),
            ("raw try_lock+nextval+unlock (dblock's SQL)", None),
        ],
        if breakdown_wanted() {
            let quiet = PgPoolOptions::new()
                .max_connections(POOL)
                .test_before_acquire(false)
                .connect(&env.pg)
                .await?;
            vec![
                (
                    "raw SQL in dblock's task structure",
                    mimic_op(advisory_acquire(pool.clone(), n.clone())),
                ),
                (
                    "raw try_lock+unlock, pool without test_before_acquire",
                    raw_advisory_op(quiet, n.clone(), PG_TRY),
                ),
            ]
        } else {
            Vec::new()
        },
        rows,
    )
    .await?;

    // Handoff: the raw figure, then dblock.
    let probe = pg_pool(&env.pg, 1).await?;
    let raw = raw_advisory_handoff(&pool, &probe, SEQ_SAMPLES, RAW_WAIT, false).await?;
    let other_pool = pg_pool(&env.pg, POOL).await?;
    let other = Locks::new(Advisory::new(other_pool.clone()));
    let server_other = handoff(
        &locks,
        &other,
        "adv-hand",
        1,
        SEQ_SAMPLES,
        Blocked::Probe(probe.clone()),
        Some("SELECT pg_advisory_unlock($1)"),
    )
    .await?;
    server_other.explain("pg advisory, handoff, server wait, other instance");
    let ratio = server_other.call.p50.as_secs_f64() / raw.p50.as_secs_f64();
    rows.push(
        latency_row(
            B,
            "handoff, server wait, other instance",
            &server_other.call,
        )
        .raw(raw.show())
        .ratio(ratio)
        .target("p50 ≤ 1.25 × raw", ratio <= 1.25),
    );
    let server_local = handoff(
        &locks,
        &locks,
        "adv-hand",
        1,
        SEQ_SAMPLES,
        Blocked::Probe(probe.clone()),
        Some("SELECT pg_advisory_unlock($1)"),
    )
    .await?;
    server_local.explain("pg advisory, handoff, server wait, same Locks");
    let ratio = server_local.call.p50.as_secs_f64() / raw.p50.as_secs_f64();
    rows.push(
        latency_row(B, "handoff, server wait, same Locks", &server_local.call)
            .raw(raw.show())
            .ratio(ratio)
            .target("p50 ≤ 1.25 × raw", ratio <= 1.25),
    );
    // The same raw handoff with the waiter running dblock's statement
    // (lock_timeout, lock, nextval for the token): what the SQL costs.
    let raw_dblock_sql =
        raw_advisory_handoff(&pool, &probe, SEQ_SAMPLES, DBLOCK_WAIT, false).await?;
    rows.push(
        latency_row(
            B,
            "handoff, server wait, raw with dblock's waiter SQL",
            &raw_dblock_sql,
        )
        .raw(raw.show())
        .ratio(raw_dblock_sql.p50.as_secs_f64() / raw.p50.as_secs_f64()),
    );
    // And with dblock's task hand-offs around the same SQL.
    let raw_hops = raw_advisory_handoff(&pool, &probe, SEQ_SAMPLES, DBLOCK_WAIT, true).await?;
    rows.push(
        latency_row(
            B,
            "handoff, server wait, raw with dblock's SQL and task hand-offs",
            &raw_hops,
        )
        .raw(raw.show())
        .ratio(raw_hops.p50.as_secs_f64() / raw.p50.as_secs_f64()),
    );

    let poll = AdvisoryOptions::default().wait(WaitStrategy::Poll {
        min: LeaseOptions::default().min_poll,
        max: LeaseOptions::default().max_poll,
    });
    let poll_holder = Locks::new(Advisory::new(pool.clone()).with_options(poll.clone())?);
    let poll_other = Locks::new(Advisory::new(other_pool.clone()).with_options(poll)?);
    let poll_cross = handoff(
        &poll_holder,
        &poll_other,
        "adv-poll",
        POLL_PAIRS,
        POLL_PER_PAIR,
        Blocked::Hold(POLL_HOLD_MS.0, POLL_HOLD_MS.1),
        None,
    )
    .await?;
    let poll_local = handoff(
        &poll_holder,
        &poll_holder,
        "adv-poll",
        1,
        SEQ_SAMPLES,
        Blocked::Hold(LOCAL_HOLD_MS.0, LOCAL_HOLD_MS.1),
        Some("SELECT pg_advisory_unlock($1)"),
    )
    .await?;
    rows.push(poll_row(
        B,
        "handoff, polling 5–250 ms, other instance",
        &poll_cross.call,
        &poll_local.call,
    ));
    rows.push(
        latency_row(B, "handoff, polling, same Locks", &poll_local.call)
            .raw(raw.show())
            .ratio(poll_local.call.p50.as_secs_f64() / raw.p50.as_secs_f64()),
    );
    poll_local.explain("pg advisory, handoff, polling, same Locks");
    if let Some(wake) = &poll_local.wake {
        rows.push(wake_row(B, "polling", wake));
    }
    drop((locks, other, poll_holder, poll_other));
    other_pool.close().await;

    // Scale.
    let scale_pool = PgPoolOptions::new()
        .max_connections(POOL)
        .acquire_timeout(SCALE_ACQUIRE_TIMEOUT)
        .connect(&env.pg)
        .await?;
    let scale_locks = Locks::new(Advisory::new(scale_pool.clone()));
    let server = Server::Pg {
        pool: probe.clone(),
        statements: false,
    };
    let s = hold_many(
        &scale_locks,
        "adv-scale",
        None,
        AdvisoryOptions::default().heartbeat,
        &server,
    )
    .await?;
    drop(scale_locks);
    let raw_held = raw_advisory_scale(&pool).await?;
    scale_rows(B, &s, Some(raw_held), rows);
    if let Some(keep_alive) = rows.last_mut() {
        keep_alive.raw = "none needed (session locks)".into();
    }
    scale_pool.close().await;
    probe.close().await;
    pool.close().await;
    Ok(raw)
}

/// Raw session locks, all on one pooled connection, taken a level at a time
/// in one statement each.
///
/// Stops at 1,000: advisory locks live in the server's shared lock table
/// (`max_locks_per_transaction` × (`max_connections` +
/// `max_prepared_transactions`) slots for all sessions together), and
/// filling most of it makes other sessions' statements fail with "out of
/// shared memory" on a server that others use too.
async fn raw_advisory_scale(pool: &PgPool) -> Res<String> {
    let mut conn = pool.acquire().await?;
    let slots: i64 = sqlx::query_scalar(
        "SELECT current_setting('max_locks_per_transaction')::bigint \
              * (current_setting('max_connections')::bigint \
                 + current_setting('max_prepared_transactions')::bigint)",
    )
    .fetch_one(&mut *conn)
    .await?;
    let base: i64 = rand::rng().random_range(0..i64::MAX / 2);
    let mut held = 0usize;
    let mut failure = None;
    for level in [100, 1_000] {
        let got: Result<i64, sqlx::Error> = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_try_advisory_lock(k)) \
               FROM generate_series($1::bigint, $2::bigint) k",
        )
        .bind(base + held as i64)
        .bind(base + level as i64 - 1)
        .fetch_one(&mut *conn)
        .await;
        match got {
            Ok(n) => {
                held += n as usize;
                if held < level {
                    failure = Some(format!("only {held} of {level}"));
                    break;
                }
            }
            Err(e) => {
                failure = Some(format!("{level}: {e}"));
                break;
            }
        }
    }
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut *conn)
        .await?;
    Ok(match failure {
        None => format!(
            "{} on 1 connection (not tried further; lock table: {} slots for all sessions)",
            rate(held as f64),
            rate(slots as f64)
        ),
        Some(f) => format!("{} on 1 connection; then {f}", rate(held as f64)),
    })
}

async fn pg_stat_statements_usable(pool: &PgPool) -> bool {
    let Ok(mut tx) = pool.begin().await else {
        return false;
    };
    let usable = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&mut *tx)
        .await
        .is_ok()
        && sqlx::query("SELECT calls FROM pg_stat_statements LIMIT 1")
            .fetch_optional(&mut *tx)
            .await
            .is_ok();
    if usable {
        tx.commit().await.is_ok()
    } else {
        let _ = tx.rollback().await;
        false
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL lease.

const PG_CLAIM: &str = "INSERT INTO dblock_bench_leases AS l \
        (name, owner, holder, mode, token, acquired_at, expires_at) \
     VALUES ($1, $2, $3, 'x', 1, clock_timestamp(), \
             clock_timestamp() + $4::bigint * interval '1 microsecond') \
     ON CONFLICT (name) DO UPDATE \
        SET owner = excluded.owner, holder = excluded.holder, token = l.token + 1, \
            acquired_at = excluded.acquired_at, expires_at = excluded.expires_at \
      WHERE l.expires_at <= clock_timestamp() \
     RETURNING token";
const PG_RELEASE: &str =
    "UPDATE dblock_bench_leases SET owner = NULL, expires_at = clock_timestamp() \
      WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp()";
const PG_RELEASE_NOTIFY: &str = "WITH released AS ( \
        UPDATE dblock_bench_leases SET owner = NULL, expires_at = clock_timestamp() \
         WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp() \
        RETURNING name) \
     SELECT pg_notify('dblock_bench_raw', name) FROM released";
const PG_RELEASE_NOTIFY_ASYNC: &str = "WITH released AS ( \
        UPDATE dblock_bench_leases SET owner = NULL, expires_at = clock_timestamp() \
         WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp() \
        RETURNING name) \
     SELECT pg_notify('dblock_bench_raw', name), \
            set_config('synchronous_commit', 'off', true) \
       FROM released";

/// How a raw PostgreSQL release ends the lease.
#[derive(Clone, Copy)]
enum PgRelease {
    Plain,
    /// With `pg_notify`, as dblock's release does.
    Notify,
    /// With `pg_notify`, committing without waiting for the WAL flush.
    NotifyAsync,
}

async fn raw_pg_claim(pool: &PgPool, name: &str, owner: &str) -> Res<Option<i64>> {
    Ok(sqlx::query_scalar(PG_CLAIM)
        .bind(name)
        .bind(owner)
        .bind("bench")
        .bind(30_000_000i64)
        .fetch_optional(pool)
        .await?)
}

async fn raw_pg_release(
    pool: &PgPool,
    name: &str,
    owner: &str,
    token: i64,
    how: PgRelease,
) -> Res<()> {
    let sql = match how {
        PgRelease::Plain => {
            let done = sqlx::query(PG_RELEASE)
                .bind(name)
                .bind(owner)
                .bind(token)
                .execute(pool)
                .await?;
            return if done.rows_affected() == 1 {
                Ok(())
            } else {
                Err("raw: the lease was not ours at release".into())
            };
        }
        PgRelease::Notify => PG_RELEASE_NOTIFY,
        PgRelease::NotifyAsync => PG_RELEASE_NOTIFY_ASYNC,
    };
    let row = sqlx::query(sql)
        .bind(name)
        .bind(owner)
        .bind(token)
        .fetch_optional(pool)
        .await?;
    row.map(drop)
        .ok_or_else(|| "raw: the lease was not ours at release".into())
}

fn raw_pg_lease_op(pool: PgPool, names: Arc<Vec<String>>, how: PgRelease) -> Op {
    Arc::new(move |i| {
        let pool = pool.clone();
        let name = names[i].clone();
        Box::pin(async move {
            let owner = owner();
            let token = raw_pg_claim(&pool, &name, &owner)
                .await?
                .ok_or("raw: the lease was busy")?;
            raw_pg_release(&pool, &name, &owner, token, how).await
        })
    })
}

/// The raw LISTEN/NOTIFY handoff: the waiter LISTENs on its own connection
/// and claims with the upsert on each notification for its name; the
/// holder releases with `pg_notify`. Clock from the release call to the
/// waiter's successful claim.
async fn raw_notify_handoff(pool: &PgPool, pairs: usize, per_pair: usize) -> Res<Latency> {
    let mut set = JoinSet::new();
    for pair in 0..pairs {
        let pool = pool.clone();
        set.spawn(async move {
            let name = name("raw-notify", pair);
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen("dblock_bench_raw").await?;
            let mut listener = Some(listener);
            let mut out = Vec::new();
            for _ in 0..=per_pair {
                let mine = owner();
                let token = raw_pg_claim(&pool, &name, &mine)
                    .await?
                    .ok_or("raw: the lease was busy")?;
                let mut l = listener.take().expect("listener");
                let (tx, rx) = oneshot::channel();
                let (p, n) = (pool.clone(), name.clone());
                let task = tokio::spawn(async move {
                    let me = owner();
                    loop {
                        if let Some(t) = raw_pg_claim(&p, &n, &me).await? {
                            let _ = tx.send(Instant::now());
                            raw_pg_release(&p, &n, &me, t, PgRelease::Plain).await?;
                            return Ok::<_, E>(l);
                        }
                        while l.recv().await?.payload() != n {}
                    }
                });
                let hold = rand::rng().random_range(POLL_HOLD_MS.0..=POLL_HOLD_MS.1);
                tokio::time::sleep(Duration::from_millis(hold)).await;
                let t0 = Instant::now();
                raw_pg_release(&pool, &name, &mine, token, PgRelease::Notify).await?;
                let granted = rx.await;
                listener = Some(task.await??);
                out.push(granted?.saturating_duration_since(t0));
            }
            out.remove(0);
            Ok::<_, E>(out)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = set.join_next().await {
        all.extend(done??);
    }
    Ok(Latency::of(all))
}

async fn pg_lease(env: &Env, raw_handoff: Option<&Latency>, rows: &mut Vec<Row>) -> Res<()> {
    const B: &str = "pg lease";
    let pool = pg_pool(&env.pg, POOL).await?;
    dblock::postgres::migrate(&pool).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS dblock_bench_leases (LIKE dblock_leases INCLUDING ALL) \
           WITH (fillfactor = 70); \
         TRUNCATE dblock_bench_leases",
    )
    .execute(&pool)
    .await?;
    sqlx::raw_sql(PG_TABLE_UPGRADE).execute(&pool).await?;
    let lease = |pool: &PgPool| -> Res<Locks> {
        Ok(Locks::new(
            dblock::postgres::Lease::new(pool.clone()).with_table(TABLE)?,
        ))
    };
    let locks = lease(&pool)?;

    let n = names("pgl", TASKS);
    let ops = [
        dblock_op(locks.clone(), n.clone()),
        raw_pg_lease_op(pool.clone(), n.clone(), PgRelease::Plain),
        raw_pg_lease_op(pool.clone(), n.clone(), PgRelease::Notify),
        raw_pg_lease_op(pool.clone(), n.clone(), PgRelease::NotifyAsync),
        limit::pg_lease_op(&env.pg, n.clone(), false).await?,
        limit::pg_lease_op(&env.pg, n.clone(), true).await?,
    ];
    throughput_rows(
        B,
        &ops,
        &[
            ("raw upsert + release", None),
            ("raw upsert + release with NOTIFY (dblock's SQL)", None),
            (
                "raw upsert + release with NOTIFY, synchronous_commit off",
                None,
            ),
            ("raw upsert + release, dedicated connection", None),
            (
                "raw upsert + release with NOTIFY (dblock's SQL), dedicated connection",
                None,
            ),
        ],
        Vec::new(),
        rows,
    )
    .await?;

    let other_pool = pg_pool(&env.pg, POOL).await?;
    let other = lease(&other_pool)?;
    let cross = handoff(
        &locks,
        &other,
        "pgl-hand",
        POLL_PAIRS,
        POLL_PER_PAIR,
        Blocked::Hold(POLL_HOLD_MS.0, POLL_HOLD_MS.1),
        None,
    )
    .await?;
    let raw_notify = raw_notify_handoff(&pool, POLL_PAIRS, POLL_PER_PAIR).await?;
    let mut row = latency_row(B, "handoff, LISTEN/NOTIFY, other instance", &cross.call);
    if let Some(raw) = raw_handoff {
        let ratio = cross.call.p50.as_secs_f64() / raw.p50.as_secs_f64();
        row = row
            .raw(format!("{} (advisory)", raw.show()))
            .ratio(ratio)
            .target("p50 ≤ 2 × raw", ratio <= 2.0);
    }
    rows.push(row);
    rows.push(
        latency_row(
            B,
            "handoff, LISTEN/NOTIFY, other instance, vs raw lease LISTEN/NOTIFY",
            &cross.call,
        )
        .raw(raw_notify.show())
        .ratio(cross.call.p50.as_secs_f64() / raw_notify.p50.as_secs_f64()),
    );
    let local = handoff(
        &locks,
        &locks,
        "pgl-local",
        1,
        SEQ_SAMPLES,
        Blocked::Hold(LOCAL_HOLD_MS.0, LOCAL_HOLD_MS.1),
        Some("WITH released AS"),
    )
    .await?;
    rows.push(latency_row(B, "handoff, same Locks", &local.call));
    local.explain(&format!("{B}, handoff, same Locks"));
    if let Some(wake) = &local.wake {
        rows.push(wake_row(B, "lease", wake));
    }
    drop(other);
    other_pool.close().await;

    let statements = pg_stat_statements_usable(&pool).await;
    let server = Server::Pg {
        pool: pg_pool(&env.pg, 1).await?,
        statements,
    };
    let s = hold_many(&locks, "pgl-scale", Some(SCALE_TTL), SCALE_TTL / 3, &server).await?;
    scale_rows(B, &s, None, rows);
    drop(locks);
    pool.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// MySQL / MariaDB lease.

const MY_LOCK: &str = "SELECT token, expires_at > UTC_TIMESTAMP(6) FROM dblock_bench_leases \
      WHERE name = ? FOR UPDATE";
const MY_TAKE: &str = "UPDATE dblock_bench_leases SET owner = ?, holder = ?, token = token + 1, \
        acquired_at = UTC_TIMESTAMP(6), expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
      WHERE name = ?";
const MY_CREATE: &str = "INSERT IGNORE INTO dblock_bench_leases \
        (name, owner, holder, mode, token, acquired_at, expires_at) \
     VALUES (?, NULL, NULL, 'x', 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))";
// The token comes back through LAST_INSERT_ID: 1 for a new row, the next
// token for a lease taken over, 0 when the lease is live (busy). Every
// condition reads the old expires_at, which is assigned last.
const MY_UPSERT: &str = "INSERT INTO dblock_bench_leases \
        (name, owner, holder, mode, token, acquired_at, expires_at) \
     VALUES (?, ?, ?, 'x', LAST_INSERT_ID(1), UTC_TIMESTAMP(6), \
             UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND) \
     ON DUPLICATE KEY UPDATE \
        owner = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(owner), owner), \
        holder = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(holder), holder), \
        token = IF(expires_at <= UTC_TIMESTAMP(6), LAST_INSERT_ID(token + 1), \
                   token + LAST_INSERT_ID(0)), \
        acquired_at = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(acquired_at), acquired_at), \
        expires_at = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(expires_at), expires_at)";
const MY_RELEASE: &str =
    "UPDATE dblock_bench_leases SET expires_at = UTC_TIMESTAMP(6), owner = NULL \
      WHERE name = ? AND owner = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)";

async fn my_release(pool: &MySqlPool, name: &str, owner: &str, token: u64) -> Res<()> {
    let done = sqlx::query(MY_RELEASE)
        .bind(name.as_bytes())
        .bind(owner.as_bytes())
        .bind(token)
        .execute(pool)
        .await?;
    if done.rows_affected() != 1 {
        return Err("raw: the lease was not ours at release".into());
    }
    Ok(())
}

fn raw_my_tx_op(pool: MySqlPool, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let pool = pool.clone();
        let name = names[i].clone();
        Box::pin(async move {
            let owner = owner();
            let token = loop {
                let mut tx = pool.begin().await?;
                let row = sqlx::query(MY_LOCK)
                    .bind(name.as_bytes())
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(row) = row else {
                    tx.rollback().await?;
                    sqlx::query(MY_CREATE)
                        .bind(name.as_bytes())
                        .execute(&pool)
                        .await?;
                    continue;
                };
                let token: u64 = row.try_get(0)?;
                let live: i64 = row.try_get(1)?;
                if live != 0 {
                    return Err("raw: the lease was busy".into());
                }
                sqlx::query(MY_TAKE)
                    .bind(owner.as_bytes())
                    .bind("bench")
                    .bind(30_000_000i64)
                    .bind(name.as_bytes())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                break token + 1;
            };
            my_release(&pool, &name, &owner, token).await
        })
    })
}

fn raw_my_upsert_op(pool: MySqlPool, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let pool = pool.clone();
        let name = names[i].clone();
        Box::pin(async move {
            let owner = owner();
            let done = sqlx::query(MY_UPSERT)
                .bind(name.as_bytes())
                .bind(owner.as_bytes())
                .bind("bench")
                .bind(30_000_000i64)
                .execute(&pool)
                .await?;
            let token = done.last_insert_id();
            if token == 0 {
                return Err("raw: the lease was busy".into());
            }
            my_release(&pool, &name, &owner, token).await
        })
    })
}

async fn mysql(env: &Env, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Res<()> {
    const B: &str = "mysql lease";
    let pool = my_pool(&env.my, POOL).await?;
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&pool)
        .await?;
    notes.push(format!("MySQL/MariaDB server {version}"));
    dblock::mysql::migrate(&pool).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS dblock_bench_leases LIKE dblock_leases; \
         DELETE FROM dblock_bench_leases",
    )
    .execute(&pool)
    .await?;
    sqlx::raw_sql(my_table_upgrade()).execute(&pool).await?;
    let lease = |pool: &MySqlPool| -> Res<Locks> {
        Ok(Locks::new(
            dblock::mysql::Lease::new(pool.clone()).with_table(TABLE)?,
        ))
    };
    let locks = lease(&pool)?;

    let n = names("my", TASKS);
    let dedicated = limit::my_conns(&env.my).await?;
    let bells = limit::my_conns(&env.my).await?;
    let ops = [
        dblock_op(locks.clone(), n.clone()),
        raw_my_tx_op(pool.clone(), n.clone()),
        raw_my_upsert_op(pool.clone(), n.clone()),
        limit::my_upsert_op(dedicated.clone(), n.clone()),
        limit::my_same_work_op(dedicated.clone(), None, TABLE, n.clone())?,
        limit::my_same_work_op(dedicated, Some(bells), TABLE, n.clone())?,
    ];
    // DBLOCK_BENCH_PAIRS=dblock|same: only 3 s of pairs of one of them with
    // 8 tasks, for counting system calls (`strace -f -c`).
    if let Ok(which) = std::env::var("DBLOCK_BENCH_PAIRS") {
        let k = match which.as_str() {
            "dblock" => 0,
            "same" => 4,
            other => return Err(format!("DBLOCK_BENCH_PAIRS: unknown {other:?}").into()),
        };
        run_window(&ops[k], TASKS, WARMUP).await?;
        let pairs = run_window(&ops[k], TASKS, Duration::from_secs(3)).await?;
        eprintln!("pairs: {which}, {TASKS} tasks: {} /s", rate(pairs));
        return Ok(());
    }
    let results = throughput_rows(
        B,
        &ops,
        &[
            (
                "raw FOR UPDATE transaction + release",
                Some(("≥ 0.9 × raw", 0.9)),
            ),
            ("raw upsert + release", Some(("≥ 0.9 × raw", 0.9))),
            (
                "raw upsert + release, dedicated connection",
                Some(("≥ 0.9 × raw", 0.9)),
            ),
            (
                "raw, same work (dblock's claim + release SQL), dedicated connection",
                Some(("≥ 0.9 × same work", 0.9)),
            ),
            (
                "raw, same work + a doorbell GET_LOCK/RELEASE_LOCK per pair, dedicated",
                None,
            ),
        ],
        Vec::new(),
        rows,
    )
    .await?;
    for (tasks, r) in &results {
        rows.push(raw_ratio_row(
            B,
            format!("pairs/s, {tasks} task(s): raw same work vs raw upsert + release, dedicated"),
            r,
            4,
            3,
            "reported: the price of dblock's SQL (one-statement claim with NOWAIT)",
        ));
        rows.push(raw_ratio_row(
            B,
            format!(
                "pairs/s, {tasks} task(s): raw same work + doorbell vs raw same work, dedicated"
            ),
            r,
            5,
            4,
            "reported: the price of a doorbell taken and let go per pair",
        ));
    }
    if quick() {
        return Ok(());
    }

    let other_pool = my_pool(&env.my, POOL).await?;
    let other = lease(&other_pool)?;
    let cross = handoff(
        &locks,
        &other,
        "my-hand",
        POLL_PAIRS,
        POLL_PER_PAIR,
        Blocked::Hold(POLL_HOLD_MS.0, POLL_HOLD_MS.1),
        None,
    )
    .await?;
    let local = handoff(
        &locks,
        &locks,
        "my-local",
        1,
        SEQ_SAMPLES,
        Blocked::Hold(LOCAL_HOLD_MS.0, LOCAL_HOLD_MS.1),
        Some("UPDATE `dblock_bench_leases` SET expires_at"),
    )
    .await?;
    rows.push(poll_row(
        B,
        "handoff, polling, other instance",
        &cross.call,
        &local.call,
    ));
    rows.push(latency_row(B, "handoff, same Locks", &local.call));
    local.explain(&format!("{B}, handoff, same Locks"));
    if let Some(wake) = &local.wake {
        rows.push(wake_row(B, "lease", wake));
    }
    drop(other);
    other_pool.close().await;

    let server = Server::My(my_pool(&env.my, 1).await?);
    let s = hold_many(&locks, "my-scale", Some(SCALE_TTL), SCALE_TTL / 3, &server).await?;
    scale_rows(B, &s, None, rows);
    drop(locks);
    pool.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// SQLite lease.

const SQ_CLAIM: &str = "INSERT INTO dblock_leases AS l \
        (name, owner, holder, mode, token, acquired_at, expires_at) \
     VALUES (?1, ?2, ?3, 'x', 1, \
        (CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000), \
        (CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000) + ?4) \
     ON CONFLICT (name) DO UPDATE \
        SET owner = excluded.owner, holder = excluded.holder, token = l.token + 1, \
            acquired_at = excluded.acquired_at, expires_at = excluded.expires_at \
      WHERE l.expires_at <= excluded.acquired_at \
     RETURNING token";
const SQ_RELEASE: &str = "UPDATE dblock_leases SET owner = NULL, \
        expires_at = (CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000) \
      WHERE name = ?1 AND owner = ?2 AND token = ?3 \
        AND expires_at > (CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)";

async fn sqlite_claim(pool: &SqlitePool, name: &str, owner: &str) -> Res<Option<i64>> {
    Ok(sqlx::query_scalar(SQ_CLAIM)
        .bind(name)
        .bind(owner)
        .bind("bench")
        .bind(30_000_000i64)
        .fetch_optional(pool)
        .await?)
}

async fn sqlite_release(pool: SqlitePool, name: String, owner: String, token: i64) -> Res<()> {
    let done = sqlx::query(SQ_RELEASE)
        .bind(&name)
        .bind(&owner)
        .bind(token)
        .execute(&pool)
        .await?;
    if done.rows_affected() != 1 {
        return Err("raw: the lease was not ours at release".into());
    }
    Ok(())
}

fn raw_sqlite_op(pool: SqlitePool, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let pool = pool.clone();
        let name = names[i].clone();
        Box::pin(async move {
            let owner = owner();
            let token = sqlite_claim(&pool, &name, &owner)
                .await?
                .ok_or("raw: the lease was busy")?;
            sqlite_release(pool, name, owner, token).await
        })
    })
}

async fn sqlite(dir: &std::path::Path, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Res<()> {
    const B: &str = "sqlite lease";
    let file = dir.join("locks.db");
    let lease = dblock::sqlite::Lease::open(&file).await?;
    let version: String = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(lease.pool())
        .await?;
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(lease.pool())
        .await?;
    notes.push(format!(
        "SQLite {version} (bundled), file in {}, WAL, synchronous = {sync} (2 = FULL)",
        dir.display()
    ));
    let locks = Locks::new(lease);
    // Another pool on the same file, like another process's.
    let raw_pool = SqlitePoolOptions::new()
        .max_connections(SQLITE_POOL)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&file)
                .busy_timeout(Duration::from_secs(5)),
        )
        .await?;

    let n = names("sq", TASKS);
    let ops = [
        dblock_op(locks.clone(), n.clone()),
        raw_sqlite_op(raw_pool.clone(), n.clone()),
        limit::sqlite_op(&file, n.clone()).await?,
    ];
    let acquire: AcquireFn = {
        let (pool, n) = (raw_pool.clone(), n.clone());
        Arc::new(move |i| {
            let (pool, name) = (pool.clone(), n[i].clone());
            Box::pin(async move {
                let owner = owner();
                let token = sqlite_claim(&pool, &name, &owner)
                    .await?
                    .ok_or("raw: the lease was busy")?;
                let release: Release =
                    Box::new(move || Box::pin(sqlite_release(pool, name, owner, token)));
                Ok(release)
            })
        })
    };
    throughput_rows(
        B,
        &ops,
        &[
            ("raw upsert + release", None),
            ("raw upsert + release, dedicated connection", None),
        ],
        vec![("raw SQL in dblock's task structure", mimic_op(acquire))],
        rows,
    )
    .await?;

    let other = Locks::new(dblock::sqlite::Lease::new(raw_pool.clone()));
    let cross = handoff(
        &locks,
        &other,
        "sq-hand",
        POLL_PAIRS,
        POLL_PER_PAIR,
        Blocked::Hold(POLL_HOLD_MS.0, POLL_HOLD_MS.1),
        None,
    )
    .await?;
    let local = handoff(
        &locks,
        &locks,
        "sq-local",
        1,
        SEQ_SAMPLES,
        Blocked::Hold(LOCAL_HOLD_MS.0, LOCAL_HOLD_MS.1),
        Some("UPDATE \"dblock_leases\" SET owner"),
    )
    .await?;
    rows.push(poll_row(
        B,
        "handoff, polling, other pool (another process's view)",
        &cross.call,
        &local.call,
    ));
    rows.push(latency_row(B, "handoff, same Locks", &local.call));
    local.explain(&format!("{B}, handoff, same Locks"));
    if let Some(wake) = &local.wake {
        rows.push(wake_row(B, "lease", wake));
    }
    drop(other);

    let s = hold_many(
        &locks,
        "sq-scale",
        Some(SCALE_TTL),
        SCALE_TTL / 3,
        &Server::None,
    )
    .await?;
    scale_rows(B, &s, None, rows);
    drop(locks);
    raw_pool.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------

fn machine() -> Vec<String> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = read("/proc/meminfo");
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    vec![format!("{cpus} CPUs ({model}), {mem} memory")]
}

// ---------------------------------------------------------------------------
// Redis.

/// The naive lock's release: delete the key if it still holds our value.
const RAW_REDIS_RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Raw `SET key owner NX PX 30000` + the Lua owner `DEL`, on one
/// multiplexed connection.
fn raw_redis_op(conn: redis::aio::MultiplexedConnection, names: Arc<Vec<String>>) -> Op {
    let release = Arc::new(redis::Script::new(RAW_REDIS_RELEASE));
    Arc::new(move |i| {
        let (mut conn, release) = (conn.clone(), release.clone());
        let key = format!("dblock-bench-raw:{}", names[i]);
        Box::pin(async move {
            let owner = owner();
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&owner)
                .arg("NX")
                .arg("PX")
                .arg(30_000)
                .query_async(&mut conn)
                .await?;
            set.ok_or("raw: the key was busy")?;
            let deleted: i64 = release
                .key(&key)
                .arg(&owner)
                .invoke_async(&mut conn)
                .await?;
            if deleted != 1 {
                return Err("raw: the key was not ours on release".into());
            }
            Ok(())
        })
    })
}

async fn redis_section(url: &str, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Res<()> {
    const B: &str = "redis lease";
    let lease = dblock::redis::Lease::open(url)
        .await?
        .with_prefix("dblock-bench:")?;
    let conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn.clone())
        .await?;
    if let Some(v) = info.lines().find_map(|l| l.strip_prefix("redis_version:")) {
        notes.push(format!(
            "Redis server {}; raw: SET NX PX + a Lua owner DEL (EVALSHA) on one multiplexed \
             connection, dblock: redis::Lease on its own (also one multiplexed connection)",
            v.trim()
        ));
    }
    let n = names("rd", TASKS);
    let manager = redis::Client::open(url)?.get_connection_manager().await?;
    let ops = [
        dblock_op(Locks::new(lease), n.clone()),
        raw_redis_op(conn.clone(), n.clone()),
        raw_redis_same_op(conn, n.clone()),
        raw_redis_same_op(manager, n),
    ];
    // DBLOCK_BENCH_PAIRS=dblock|raw|same|same-manager: only pairs of one of
    // them, for profiling (`perf record`, `strace -c`).
    if let Ok(which) = std::env::var("DBLOCK_BENCH_PAIRS") {
        let k = ["dblock", "raw", "same", "same-manager"]
            .iter()
            .position(|w| *w == which)
            .ok_or_else(|| format!("DBLOCK_BENCH_PAIRS: unknown {which:?}"))?;
        return pairs_only(&ops[k], &which).await;
    }
    let results = ratio_rows(
        B,
        &ops,
        &[
            (
                "raw SET NX PX + Lua DEL, one dedicated connection",
                Some(("≥ 0.9 ×", 0.9)),
            ),
            (
                "raw, same work (dblock's claim + release scripts, EVALSHA), one multiplexed connection",
                Some(("≥ 0.9 × same work", 0.9)),
            ),
            (
                "raw, same work, on a ConnectionManager (the redis crate's reconnecting connection)",
                None,
            ),
        ],
        rows,
    )
    .await?;
    for (tasks, r) in &results {
        rows.push(raw_ratio_row(
            B,
            format!("pairs/s, {tasks} task(s): raw same work vs raw SET NX PX + Lua DEL"),
            r,
            2,
            1,
            "reported: the price of the work (token draw, owner-checked release)",
        ));
    }
    Ok(())
}

/// Runs `pairs` calls of `op` one after another (after one to warm up) and
/// prints their time (`DBLOCK_BENCH_PAIRS`, for `strace` / `perf`).
async fn timed_pairs(op: &Op, which: &str, pairs: usize) -> Res<()> {
    op(0).await?;
    eprintln!("pairs: {pairs} of {which} start");
    let t = Instant::now();
    for _ in 0..pairs {
        op(0).await?;
    }
    let took = t.elapsed();
    eprintln!(
        "pairs: {pairs} of {which}, 1 task, in {:.3} s ({:.1} µs each)",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / pairs as f64
    );
    Ok(())
}

/// Runs only pairs of `op` (`DBLOCK_BENCH_PAIRS`): 20,000 with 1 task,
/// then 2 s with 8 tasks, and prints their rates.
async fn pairs_only(op: &Op, which: &str) -> Res<()> {
    timed_pairs(op, which, 20_000).await?;
    let rate8 = run_window(op, TASKS, Duration::from_secs(2)).await?;
    eprintln!("pairs: {which}, {TASKS} tasks: {} /s", rate(rate8));
    Ok(())
}

/// dblock's own lease pair sent by hand: its claim and release scripts
/// (EVALSHA, loading them if needed), with the keys and arguments
/// `redis::Lease` gives them, on `conn` ("raw, same work"). Keys under
/// `dblock-bench-same:`.
fn raw_redis_same_op<C>(conn: C, names: Arc<Vec<String>>) -> Op
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    const PREFIX: &str = "dblock-bench-same:";
    let [claim, release] = dblock::redis::bench_scripts();
    let holder = Arc::new(format!("bench-host:{}", std::process::id()));
    Arc::new(move |i| {
        let (mut conn, holder) = (conn.clone(), holder.clone());
        let name = names[i].clone();
        Box::pin(async move {
            let owner = owner();
            let key = format!("{PREFIX}lock:{name}");
            let claimed: Option<(i64, i64)> = claim
                .prepare_invoke()
                .key(&key)
                .key(format!("{PREFIX}token"))
                .key(format!("{PREFIX}writer:{name}"))
                .arg(&owner)
                .arg(&*holder)
                .arg(30_000u64)
                .arg(0u64)
                .arg("0")
                .invoke_async(&mut conn)
                .await?;
            let (token, _expires) = claimed.ok_or("raw (same work): the key was busy")?;
            let released: i64 = release
                .prepare_invoke()
                .key(&key)
                .arg(&owner)
                .arg(token as u64)
                .arg(0u64)
                .arg(format!("{PREFIX}released:{name}"))
                .arg(&name)
                .invoke_async(&mut conn)
                .await?;
            if released != 1 {
                return Err("raw (same work): the key was not ours on release".into());
            }
            Ok(())
        })
    })
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
         {SEQ_SAMPLES} one at a time (server waits, same Locks), or {POLL_PAIRS} pairs × \
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
