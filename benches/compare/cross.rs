//! Across processes: handoffs from a holder in a CHILD process (this
//! benchmark run again, see [`child`]) beside the same handoff with the
//! holder in this process, and contention among 16 processes on one name.
//!
//! - **handoff**: the holder (child or local) takes the name; a waiter here
//!   starts `acquire`, and once it waits (20–40 ms later) the holder
//!   releases. The clock starts just before the holder's `release` call and
//!   stops when the waiter's `acquire` returns, both read from the system
//!   clock (one machine, so the two processes share it). Target: the
//!   cross-process p50 at most 2 × the same-process p50 of the same run.
//! - **contention**: 16 child processes loop on one name for a few
//!   seconds: acquire (wait), hold 1 ms, release, pause 1–3 ms. Reported:
//!   acquisitions per second, the spread of the waits (from the acquire
//!   call to the grant), and the fewest acquisitions any one process made
//!   (a starved process would show 0).

use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dblock::Locks;
use rand::Rng;

use super::{latency_row, ms, rate, Latency, Res, Row, POOL, TABLE};

const CHILD: &str = "DBLOCK_BENCH_CHILD";
const KIND: &str = "DBLOCK_BENCH_CHILD_KIND";
const WHERE: &str = "DBLOCK_BENCH_CHILD_WHERE";
const NAME: &str = "DBLOCK_BENCH_CHILD_NAME";

/// Handoffs measured per backend and holder place.
const HANDOFFS: usize = 60;
/// Contending processes, and how long they contend.
const PROCESSES: usize = 16;
const CONTEND_FOR: Duration = Duration::from_secs(4);
/// Connections per contending process's pool.
const CHILD_POOL: u32 = 2;

/// Where each backend lives, as the parent passes it on to its children.
pub struct Places {
    pub pg: String,
    pub my: String,
    pub redis: String,
    pub sqlite: std::path::PathBuf,
}

impl Places {
    fn of(&self, kind: &str) -> String {
        match kind {
            "advisory" | "pglease" => self.pg.clone(),
            "mysql" => self.my.clone(),
            "redis" => self.redis.clone(),
            _ => self.sqlite.display().to_string(),
        }
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos()
}

/// The backend `kind` at `place`, as the benchmark's own sections build it
/// (lease tables: `dblock_bench_leases`; Redis: the `dblock-bench:` prefix).
async fn backend(kind: &str, place: &str, pool: u32) -> Res<Locks> {
    Ok(match kind {
        "advisory" => {
            let pool = super::pg_pool(place, pool).await?;
            Locks::new(dblock::postgres::Advisory::new(pool))
        }
        "pglease" => {
            let pool = super::pg_pool(place, pool).await?;
            Locks::new(dblock::postgres::Lease::new(pool).with_table(TABLE)?)
        }
        "mysql" => {
            let pool = super::my_pool(place, pool).await?;
            Locks::new(dblock::mysql::Lease::new(pool).with_table(TABLE)?)
        }
        "sqlite" => Locks::new(dblock::sqlite::Lease::open(place).await?),
        "redis" => Locks::new(
            dblock::redis::Lease::open(place)
                .await?
                .with_prefix("dblock-bench:")?,
        ),
        other => return Err(format!("unknown backend {other}").into()),
    })
}

/// In a child process: plays its part and returns `true` (the benchmark's
/// `main` then ends); `false` in the parent.
pub fn child() -> bool {
    let Ok(role) = std::env::var(CHILD) else {
        return false;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(play(&role)) {
        println!("ERROR {e}");
        std::process::exit(1);
    }
    true
}

async fn play(role: &str) -> Res<()> {
    let kind = std::env::var(KIND)?;
    let place = std::env::var(WHERE)?;
    let name = std::env::var(NAME)?;
    let locks = backend(&kind, &place, CHILD_POOL).await?;
    let mut lines = BufReader::new(std::io::stdin()).lines();
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    match role {
        // `hold` → take the name, `HELD`; `release` → `T0 <ns>` (taken just
        // before the release call), release, `RELEASED`.
        "hold" => {
            let mut guard = None;
            while let Some(Ok(line)) = lines.next() {
                match line.trim() {
                    "hold" => {
                        let g = locks.acquire(&name).wait(Duration::from_secs(60)).await?;
                        guard = Some(g);
                        say("HELD".into());
                    }
                    "release" => {
                        let g = guard.take().ok_or("release without hold")?;
                        let t0 = now_ns();
                        g.release().await?;
                        say(format!("T0 {t0}"));
                    }
                    _ => break,
                }
            }
        }
        // `READY`; on `go`, contend for CONTEND_FOR; then `WAITS <µs,...>`.
        "contend" => {
            say("READY".into());
            lines.next();
            let until = std::time::Instant::now() + CONTEND_FOR;
            let mut waits = Vec::new();
            while std::time::Instant::now() < until {
                let t = std::time::Instant::now();
                let g = locks.acquire(&name).wait(Duration::from_secs(60)).await?;
                waits.push(t.elapsed().as_micros().to_string());
                tokio::time::sleep(Duration::from_millis(1)).await;
                g.release().await?;
                let pause = rand::rng().random_range(1_000..=3_000);
                tokio::time::sleep(Duration::from_micros(pause)).await;
            }
            say(format!("WAITS {}", waits.join(",")));
        }
        other => return Err(format!("unknown child role {other}").into()),
    }
    Ok(())
}

struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    fn spawn(role: &str, kind: &str, place: &str, name: &str) -> Res<Proc> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(CHILD, role)
            .env(KIND, kind)
            .env(WHERE, place)
            .env(NAME, name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        Ok(Proc {
            child,
            stdin,
            stdout,
        })
    }

    fn say(&mut self, line: &str) -> Res<()> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// The child's next line, read without blocking the runtime.
    async fn hear(&mut self) -> Res<String> {
        let stdout = &mut self.stdout;
        let line = tokio::task::block_in_place(|| {
            let mut line = String::new();
            stdout.read_line(&mut line).map(|n| (n, line))
        })?;
        match line {
            (0, _) => Err("the child process ended".into()),
            (_, l) if l.starts_with("ERROR") => Err(format!("child: {}", l.trim()).into()),
            (_, l) => Ok(l.trim_end().to_owned()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < give_up {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the holder of a handoff lives.
enum Holder {
    Local(Locks),
    Child(Proc),
}

impl Holder {
    /// Takes the name; the guard, if local.
    async fn hold(&mut self, name: &str) -> Res<Option<dblock::LockGuard>> {
        match self {
            Holder::Local(locks) => Ok(Some(locks.acquire(name).await?)),
            Holder::Child(p) => {
                p.say("hold")?;
                match p.hear().await?.as_str() {
                    "HELD" => Ok(None),
                    other => Err(format!("holder said {other:?}").into()),
                }
            }
        }
    }

    /// Releases; the system clock (ns) just before the release call.
    async fn release(&mut self, guard: Option<dblock::LockGuard>) -> Res<u128> {
        match (self, guard) {
            (Holder::Local(_), Some(g)) => {
                let t0 = now_ns();
                g.release().await?;
                Ok(t0)
            }
            (Holder::Child(p), None) => {
                p.say("release")?;
                let line = p.hear().await?;
                let t0 = line.strip_prefix("T0 ").ok_or("no T0 from the holder")?;
                Ok(t0.parse()?)
            }
            _ => Err("holder and guard do not match".into()),
        }
    }
}

/// `HANDOFFS` handoffs on one name from `holder` to a waiter on `waiter`.
async fn handoffs(holder: &mut Holder, waiter: &Locks, name: &str) -> Res<Latency> {
    let mut out = Vec::with_capacity(HANDOFFS);
    for k in 0..=HANDOFFS {
        let guard = holder.hold(name).await?;
        let (w, n) = (waiter.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            let g = w.acquire(&n).wait(Duration::from_secs(30)).await?;
            let t1 = now_ns();
            g.release().await?;
            Ok::<_, super::E>(t1)
        });
        let pause = rand::rng().random_range(20..=40);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if task.is_finished() {
            return Err("the waiter was granted while the holder held the name".into());
        }
        let t0 = holder.release(guard).await?;
        let t1 = task.await??;
        let took = t1.checked_sub(t0).ok_or("granted before the release")?;
        // The first handoff warms up connections, listeners and bells.
        if k > 0 {
            out.push(Duration::from_nanos(took as u64));
        }
    }
    Ok(Latency::of(out))
}

/// Cross-process handoff and contention rows for one backend.
async fn rows(backend_name: &'static str, kind: &str, places: &Places, rows: &mut Vec<Row>) {
    if let Err(e) = handoff_rows(backend_name, kind, places, rows).await {
        rows.push(Row::new(backend_name, "handoff across processes").dblock(format!("error: {e}")));
    }
    if let Err(e) = contention_row(backend_name, kind, places, rows).await {
        rows.push(Row::new(backend_name, "contention, 16 processes").dblock(format!("error: {e}")));
    }
}

async fn handoff_rows(
    b: &'static str,
    kind: &str,
    places: &Places,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let place = places.of(kind);
    let waiter = backend(kind, &place, POOL).await?;
    let name = format!("bench:cross:{kind}:{}", std::process::id());
    let mut local = Holder::Local(waiter.clone());
    let same = handoffs(&mut local, &waiter, &name).await?;
    let mut child = Holder::Child(Proc::spawn("hold", kind, &place, &name)?);
    let cross = handoffs(&mut child, &waiter, &name).await?;
    let bound = same.p50 * 2;
    rows.push(latency_row(
        b,
        "handoff, holder in this process (same Locks)",
        &same,
    ));
    rows.push(
        latency_row(b, "handoff, holder in a child process", &cross)
            .raw(format!("same process p50 {}", ms(same.p50)))
            .ratio(cross.p50.as_secs_f64() / same.p50.as_secs_f64())
            .target(
                format!("p50 ≤ 2 × same-process p50 ({})", ms(bound)),
                cross.p50 <= bound,
            ),
    );
    Ok(())
}

async fn contention_row(
    b: &'static str,
    kind: &str,
    places: &Places,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let place = places.of(kind);
    let name = format!("bench:contend:{kind}:{}", std::process::id());
    let mut procs = Vec::with_capacity(PROCESSES);
    for _ in 0..PROCESSES {
        procs.push(Proc::spawn("contend", kind, &place, &name)?);
    }
    for p in &mut procs {
        let ready = p.hear().await?;
        if ready != "READY" {
            return Err(format!("contender said {ready:?}").into());
        }
    }
    let started = std::time::Instant::now();
    for p in &mut procs {
        p.say("go")?;
    }
    let mut waits = Vec::new();
    let mut counts = Vec::with_capacity(PROCESSES);
    for p in &mut procs {
        let line = p.hear().await?;
        let list = line
            .strip_prefix("WAITS ")
            .ok_or("no WAITS from a contender")?;
        let mine: Vec<Duration> = list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|us| us.parse().map(Duration::from_micros))
            .collect::<Result<_, _>>()?;
        counts.push(mine.len());
        waits.extend(mine);
    }
    let elapsed = started.elapsed();
    drop(procs);
    let total = waits.len();
    if total == 0 {
        return Err("no acquisition at all".into());
    }
    let l = Latency::of(waits);
    let min = counts.iter().copied().min().unwrap_or(0);
    let max = counts.iter().copied().max().unwrap_or(0);
    rows.push(
        Row::new(
            b,
            format!(
                "contention, {PROCESSES} processes on one name ({} s; hold 1 ms, pause 1–3 ms): \
                 acquisitions/s; waits p50 / p99 / max; acquisitions per process min–max",
                CONTEND_FOR.as_secs()
            ),
        )
        .dblock(format!(
            "{}/s; {} / {} / {}; {min}–{max}",
            rate(total as f64 / elapsed.as_secs_f64()),
            ms(l.p50),
            ms(l.p99),
            ms(l.max),
        ))
        .target("no process starves (min ≥ 1)", min >= 1),
    );
    Ok(())
}

/// The backends of the cross-process rows: child kind, row label.
const KINDS: [(&str, &str); 5] = [
    ("advisory", "pg advisory"),
    ("pglease", "pg lease"),
    ("mysql", "mysql lease"),
    ("sqlite", "sqlite lease"),
    ("redis", "redis lease"),
];

/// The schema the lease backends need (the section may run alone).
async fn prepare(kind: &str, place: &str) -> Res<()> {
    match kind {
        "pglease" | "advisory" => {
            let pool = super::pg_pool(place, 1).await?;
            dblock::postgres::migrate(&pool).await?;
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS dblock_bench_leases (LIKE dblock_leases INCLUDING ALL)",
            )
            .execute(&pool)
            .await?;
            sqlx::raw_sql(super::PG_TABLE_UPGRADE)
                .execute(&pool)
                .await?;
            pool.close().await;
        }
        "mysql" => {
            let pool = super::my_pool(place, 1).await?;
            dblock::mysql::migrate(&pool).await?;
            sqlx::raw_sql("CREATE TABLE IF NOT EXISTS dblock_bench_leases LIKE dblock_leases")
                .execute(&pool)
                .await?;
            sqlx::raw_sql(super::my_table_upgrade())
                .execute(&pool)
                .await?;
            pool.close().await;
        }
        _ => {}
    }
    Ok(())
}

/// The section: every backend, or those named in `DBLOCK_BENCH_CROSS`
/// (`advisory,pglease,mysql,sqlite,redis`). The SQLite file lies in `dir`.
pub async fn section(pg: &str, my: &str, redis: &str, dir: &Path, rows: &mut Vec<Row>) {
    let places = Places {
        pg: pg.to_owned(),
        my: my.to_owned(),
        redis: redis.to_owned(),
        sqlite: dir.join("cross.db"),
    };
    let only = std::env::var("DBLOCK_BENCH_CROSS").unwrap_or_default();
    for (kind, b) in KINDS {
        if !only.is_empty() && !only.split(',').any(|s| s.trim() == kind) {
            continue;
        }
        eprintln!("  across processes: {b}");
        if let Err(e) = prepare(kind, &places.of(kind)).await {
            rows.push(Row::new(b, "across processes").dblock(format!("error: {e}")));
            continue;
        }
        self::rows(b, kind, &places, rows).await;
    }
}
