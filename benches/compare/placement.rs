//! Where the bench and the server run, for the 1-task rows at the limit.
//!
//! With the bench and the server on the same machine, one round trip costs
//! what waking the other side costs: about 20 µs when the bench's thread and
//! the server backend share a core, several times that when each must be
//! woken on another core (on the 2-core VM of docs/performance.md, a 1-task
//! advisory pair took about 37 µs on one core and about 190 µs across
//! cores). Which core a backend runs on is the scheduler's choice, made at
//! connect time, and it sticks: unpinned, a 1-task comparison of two
//! connections compares two placements drawn at random as much as two
//! clients, and its ratio swung from 0.2 to 4 between runs.
//!
//! So the 1-task rows are measured again with the placement fixed for every
//! implementation alike: the bench's threads on one core and the server on
//! the same core, then on another one. For PostgreSQL that is every server
//! process (the postmaster, so that new backends follow, its auxiliary
//! processes and every backend); for MariaDB / MySQL every thread of its
//! one process. That needs the server on this machine and the right to
//! move its processes (as root, or as its owner); otherwise the rows say
//! why they are missing. `taskset` (util-linux) does the moving, and
//! everything is put back on every core at the end.
//!
//! The CPU rows ([`cpu_row`]) split a pair's cost between the bench's
//! threads and the server's processes, unpinned and in each placement, from
//! the kernel's own accounting (`/proc/<pid>/schedstat`): where the server
//! does the same SQL for dblock and for the raw statements, what is left is
//! dblock's client work. On one core, where a pair's time is all CPU time,
//! that split accounts for the throughput ratio.

use std::process::Command;

use super::*;

/// The bench's threads and the server's processes, pinned; put back on
/// every core when dropped.
pub(super) struct Pinned {
    server: Server,
    all: String,
}

/// The server's processes to move.
pub(super) struct Server {
    /// The processes; with `threads`, each with every thread of it.
    pids: Vec<u32>,
    threads: bool,
    /// PostgreSQL's postmaster, whose children (backends opened while
    /// pinned) are put back too.
    parent: Option<u32>,
}

/// One placement: the bench's core and the server's.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placement {
    pub(super) client: usize,
    pub(super) server: usize,
}

impl Placement {
    pub(super) fn label(self) -> &'static str {
        if self.client == self.server {
            "bench and server on one core"
        } else {
            "bench and server on two cores"
        }
    }
}

/// Moves `pid` (with `threads`, every thread of it) to `cpus`.
fn taskset(pid: u32, cpus: &str, threads: bool) -> Res<()> {
    let mut cmd = Command::new("taskset");
    if threads {
        cmd.arg("-a");
    }
    let out = cmd
        .args(["-p", "-c", cpus, &pid.to_string()])
        .output()
        .map_err(|e| format!("taskset: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "taskset -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// A PostgreSQL server's processes, if they run on this machine: every
/// process `pg_stat_activity` shows, and their parent, the postmaster.
pub(super) async fn postgres_server(pool: &PgPool) -> Res<Server> {
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity")
        .fetch_all(pool)
        .await?;
    let mut out = Vec::new();
    for pid in pids {
        let pid = pid as u32;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "postgres" {
            return Err(format!(
                "server process {pid} is not a postgres process here: the server is not on this machine"
            )
            .into());
        }
        if out.is_empty() {
            // The fourth field of /proc/<pid>/stat is the parent's pid; the
            // second, the command, is in parentheses and has no spaces here.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            let parent: u32 = stat
                .split_whitespace()
                .nth(3)
                .ok_or("no parent in /proc/<pid>/stat")?
                .parse()?;
            out.push(parent);
        }
        out.push(pid);
    }
    Ok(Server {
        parent: out.first().copied(),
        pids: out,
        threads: false,
    })
}

/// A MariaDB / MySQL server's process, if it runs on this machine (its
/// pid file, as the server names it, is readable here).
pub(super) async fn mysql_server(pool: &MySqlPool) -> Res<Server> {
    let file: String = sqlx::query_scalar("SELECT @@pid_file")
        .fetch_one(pool)
        .await?;
    let pid: u32 = std::fs::read_to_string(&file)
        .map_err(|e| {
            format!("the server's pid file {file}: {e}: the server is not on this machine")
        })?
        .trim()
        .parse()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !matches!(comm.trim(), "mariadbd" | "mysqld") {
        return Err(format!("process {pid} is not the MariaDB / MySQL server here").into());
    }
    Ok(Server {
        pids: vec![pid],
        threads: true,
        parent: None,
    })
}

/// CPU time, in nanoseconds, that the task whose `/proc` folder is `dir` (a
/// process, or a thread under `/proc/<pid>/task/`) has run: the first field
/// of its `schedstat` (user and kernel time alike); 0 if it is gone.
fn ran_ns(dir: &str) -> u64 {
    std::fs::read_to_string(format!("{dir}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time this process's threads have run, in nanoseconds.
pub(super) fn bench_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .map(|t| ran_ns(&t.path().display().to_string()))
        .sum()
}

impl Server {
    /// CPU time the server has run, in nanoseconds: for PostgreSQL every
    /// process the postmaster has now (backends, auxiliary processes) and
    /// the postmaster; for MariaDB / MySQL every thread of its process.
    pub(super) fn cpu_ns(&self) -> u64 {
        let mut pids = self.pids.clone();
        if let Some(postmaster) = self.parent {
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children"))
            {
                pids = std::iter::once(postmaster)
                    .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
                    .collect();
            }
        }
        pids.iter()
            .map(|pid| {
                if self.threads {
                    std::fs::read_dir(format!("/proc/{pid}/task"))
                        .map(|tasks| {
                            tasks
                                .filter_map(|t| t.ok())
                                .map(|t| ran_ns(&t.path().display().to_string()))
                                .sum()
                        })
                        .unwrap_or(0)
                } else {
                    ran_ns(&format!("/proc/{pid}"))
                }
            })
            .sum()
    }
}

/// Blocks of each op in the CPU rows.
const CPU_BLOCKS: usize = 10;

/// CPU time per pair, in µs, of the bench's threads and of `server`, for
/// each of `ops` (1 task): blocks of `block` pairs, one of each op per
/// turn in a random order, so that drift falls on all alike. The bench's
/// threads are counted whole (nothing else runs meanwhile), the server's
/// processes too (its other clients, if any, count against every op).
async fn cpu_per_pair<const N: usize>(
    ops: &[Op; N],
    server: &Server,
    block: usize,
) -> Res<[(f64, f64); N]> {
    use rand::seq::SliceRandom;
    for op in ops {
        run_window(op, 1, WARMUP).await?;
    }
    let mut bench = [0u64; N];
    let mut served = [0u64; N];
    let mut order: Vec<usize> = (0..N).collect();
    for _ in 0..CPU_BLOCKS {
        order.shuffle(&mut rand::rng());
        for &i in &order {
            let (b0, s0) = (bench_cpu_ns(), server.cpu_ns());
            for _ in 0..block {
                ops[i](0).await?;
            }
            bench[i] += bench_cpu_ns().saturating_sub(b0);
            served[i] += server.cpu_ns().saturating_sub(s0);
        }
    }
    let pairs = (block * CPU_BLOCKS) as f64;
    Ok(std::array::from_fn(|i| {
        (
            bench[i] as f64 / 1e3 / pairs,
            served[i] as f64 / 1e3 / pairs,
        )
    }))
}

/// The row of [`cpu_per_pair`] for `backend`: dblock (`ops[0]`) and its
/// own SQL sent raw (`ops[1]`), in the placement `label` names; if the
/// server's processes could not be found (`server` is `Err`), a row that
/// says why.
pub(super) async fn cpu_row(
    backend: &'static str,
    ops: &[Op; 2],
    server: Res<Server>,
    label: &str,
    block: usize,
) -> Res<Row> {
    let server = match server {
        Ok(server) => server,
        Err(why) => {
            return Ok(Row::new(backend, format!("CPU per pair, 1 task, {label}"))
                .dblock("—")
                .note(format!("not measured: {why}")))
        }
    };
    let [(dc, ds), (rc, rs)] = cpu_per_pair(ops, &server, block).await?;
    Ok(Row::new(
        backend,
        format!("CPU per pair, 1 task, {label}: try_acquire+release vs raw, same work, dedicated (bench's threads; server's processes)"),
    )
    .dblock(format!("bench {dc:.1} µs, server {ds:.1} µs"))
    .raw(format!("bench {rc:.1} µs, server {rs:.1} µs"))
    .ratio((rc + rs) / (dc + ds))
    .note(format!(
        "reported: dblock's extra CPU a pair: bench {:+.1} µs (dblock's client work, its background tasks included), server {:+.1} µs (the same SQL)",
        dc - rc,
        ds - rs
    )))
}

/// Pins the bench to `at.client` and `server` to `at.server`.
pub(super) fn pin(server: Server, at: Placement) -> Res<Pinned> {
    let cores = std::thread::available_parallelism()?.get();
    if cores < 2 {
        return Err("one core: nothing to place".into());
    }
    let pinned = Pinned {
        server,
        all: format!("0-{}", cores - 1),
    };
    // From here on, dropping `pinned` puts everything back.
    taskset(std::process::id(), &at.client.to_string(), true)?;
    for &pid in &pinned.server.pids {
        // A backend that ended meanwhile is no error.
        if let Err(e) = taskset(pid, &at.server.to_string(), pinned.server.threads) {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(e);
            }
        }
    }
    Ok(pinned)
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = taskset(std::process::id(), &self.all, true);
        // Backends opened while pinned followed the postmaster; put back
        // every process the server has now, as far as it can be read.
        for &pid in &self.server.pids {
            let _ = taskset(pid, &self.all, self.server.threads);
        }
        if let Some(postmaster) = self.server.parent {
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children"))
            {
                for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
                    let _ = taskset(pid, &self.all, false);
                }
            }
        }
    }
}
