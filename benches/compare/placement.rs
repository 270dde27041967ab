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
