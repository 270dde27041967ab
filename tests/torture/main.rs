//! Fault-injection torture test (issue 5). See docs/reliability.md.
//!
//! A `harness = false` test: `cargo test` runs this `main`, which is the
//! controller; it re-executes its own binary (`std::env::current_exe()`) as
//! the worker processes, told apart by the `DBLOCK_TORTURE_WORKER`
//! environment variable. Nothing else is built or installed.
//!
//! Per backend, the controller starts 16 worker processes contending for 3
//! names through a TCP proxy it runs (one port per worker), injects faults
//! at random (SIGKILL, SIGSTOP for 1.5 × ttl, session termination, a
//! black-holed connection for 1.5 × ttl, and with `DBLOCK_TORTURE_RESTART=1`
//! server restarts), then checks the workers' logs and the registers. Then
//! a negative control, a cancellation storm, bad input on every backend, and
//! the scheduler (`dblock::schedule`) with workers killed and paused
//! mid-slot on every lease backend, and leader election (`dblock::Election`)
//! with workers killed and paused while leading, on every backend.
//!
//! Environment:
//! - `DBLOCK_TORTURE_SECS` — fault phase per backend, default 20 (the soak: 600)
//! - `DBLOCK_TORTURE_RESTART=1` — also restart the database servers (never
//!   in CI: other engineers' tests share the servers)
//! - `DBLOCK_TORTURE_BACKENDS` — a comma list of labels to run (default all)
//! - `DBLOCK_TORTURE_PHASES` — a comma list of
//!   `torture,control,storm,input,schedule,election,semaphore,shared`
//!   (`semaphore`: permits of semaphores of 3 under the same faults, on
//!   every backend, Redis restarted as in the lock run; each permit's writes go
//!   through a fenced window of the 3 newest tokens; negative control, by
//!   hand: `DBLOCK_TORTURE_SEMAPHORE_IGNORE_LOSS=1` makes the holders ignore
//!   their loss, and the phase must fail; `shared`: readers beside writers
//!   under the same faults, on every backend)
//! - `DBLOCK_TORTURE_WORKERS` — processes per backend, default 16
//! - `DBLOCK_TEST_GALERA_URLS` — the Galera nodes of the `mysql-galera` run,
//!   where one node is also SIGKILLed and restarted mid-run
//! - `DBLOCK_TORTURE_KEEP=1` — keep the logs (they are kept anyway on failure)
#![forbid(unsafe_code)]

#[path = "../common/mod.rs"]
mod common;

mod badinput;
mod check;
mod election;
mod events;
mod proxy;
mod schedule;

pub use proxy::authority;
mod storm;
mod target;
mod torture;
mod worker;

use std::future::Future;
use std::time::{Duration, Instant};

use target::{Endpoint, Kind};

/// What the run was asked to do.
#[derive(Debug, Clone)]
pub struct Settings {
    pub secs: u64,
    pub restart: bool,
    pub backends: Vec<Kind>,
    pub phases: Vec<String>,
    pub workers: usize,
    pub keep: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let backends = match var("DBLOCK_TORTURE_BACKENDS") {
            Some(list) => list
                .split(',')
                .map(|s| Kind::parse(s.trim()).unwrap_or_else(|| panic!("unknown backend {s:?}")))
                .collect(),
            None => target::ALL.to_vec(),
        };
        Settings {
            secs: var("DBLOCK_TORTURE_SECS")
                .map_or(20, |s| s.parse().expect("DBLOCK_TORTURE_SECS")),
            restart: var("DBLOCK_TORTURE_RESTART").is_some_and(|v| v == "1"),
            backends,
            phases: var("DBLOCK_TORTURE_PHASES").map_or_else(
                || {
                    vec![
                        "torture".into(),
                        "control".into(),
                        "storm".into(),
                        "input".into(),
                        "schedule".into(),
                        "election".into(),
                        "semaphore".into(),
                        "shared".into(),
                    ]
                },
                |p| p.split(',').map(|s| s.trim().to_owned()).collect(),
            ),
            workers: var("DBLOCK_TORTURE_WORKERS").map_or(16, |s| s.parse().expect("workers")),
            keep: var("DBLOCK_TORTURE_KEEP").is_some_and(|v| v == "1"),
        }
    }

    fn phase(&self, p: &str) -> bool {
        self.phases.iter().any(|x| x == p)
    }
}

/// The direct (un-proxied) endpoint of a backend.
pub async fn direct(kind: Kind, dir: &std::path::Path, app: &str) -> Endpoint {
    let url = match kind {
        Kind::Advisory | Kind::PgLease => common::postgres_url().await,
        Kind::MyLease => common::mysql_url().await,
        Kind::Galera => common::galera_urls().swap_remove(0),
        Kind::LiteLease => dir.join("locks.db").display().to_string(),
        Kind::RedisLease => common::redis_url(),
    };
    Endpoint {
        kind,
        url,
        app: app.to_owned(),
    }
}

/// One named check's outcome, printed at the end.
struct Outcome {
    name: String,
    ok: bool,
}

fn main() {
    if let Some(cfg) = worker::Config::from_env() {
        worker::main(cfg);
    }
    schedule::worker_from_env();
    election::worker_from_env();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("torture: test");
        return;
    }
    // `cargo test NAME`: run only if the filter names this test.
    if let Some(filter) = args.iter().find(|a| !a.starts_with('-')) {
        if !"torture".contains(filter.as_str()) {
            println!("torture: skipped (filter {filter:?})");
            println!("0 passed, 0 failed");
            return;
        }
    }
    let settings = Settings::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let outcomes = rt.block_on(controller(settings));
    let passed = outcomes.iter().filter(|o| o.ok).count();
    let failed = outcomes.len() - passed;
    for o in outcomes.iter().filter(|o| !o.ok) {
        println!("FAILED: {}", o.name);
    }
    println!(
        "torture: finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    println!("torture: {passed} passed, {failed} failed");
    // Exit without waiting for the runtime's leftover tasks (proxies).
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

async fn controller(settings: Settings) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let kinds: Vec<Kind> = settings
        .backends
        .iter()
        .copied()
        .filter(|k| {
            let ok = k.available();
            if !ok {
                println!("{}: not in this build yet; skipped", k.label());
            }
            ok
        })
        .collect();
    if settings.phase("torture") {
        for &kind in &kinds {
            let ok = timed(kind.label(), torture::normal(kind, &settings)).await;
            outcomes.push(Outcome {
                name: format!("torture {}", kind.label()),
                ok,
            });
        }
    }
    if settings.phase("control") {
        let kind = if kinds.contains(&Kind::PgLease) {
            Kind::PgLease
        } else {
            Kind::LiteLease
        };
        let ok = timed("negative control", torture::control(kind, &settings)).await;
        outcomes.push(Outcome {
            name: "negative control".into(),
            ok,
        });
    }
    // Galera runs the same backend as mysql-lease: the storm and the bad
    // input have nothing to add there.
    let kinds: Vec<Kind> = kinds.into_iter().filter(|&k| k != Kind::Galera).collect();
    if settings.phase("storm") {
        let ok = timed("cancellation storm", storm::run(&kinds)).await;
        outcomes.push(Outcome {
            name: "cancellation storm".into(),
            ok,
        });
    }
    if settings.phase("input") {
        for &kind in &kinds {
            let ok = timed("bad input", badinput::run(kind)).await;
            outcomes.push(Outcome {
                name: format!("bad input {}", kind.label()),
                ok,
            });
        }
    }
    if settings.phase("semaphore") {
        for &kind in &kinds {
            let ok = timed("semaphore", torture::semaphore(kind, &settings)).await;
            outcomes.push(Outcome {
                name: format!("semaphore {}", kind.label()),
                ok,
            });
        }
    }
    if settings.phase("shared") {
        // Every backend has readers.
        for &kind in &kinds {
            let ok = timed("shared", torture::shared(kind, &settings)).await;
            outcomes.push(Outcome {
                name: format!("shared {}", kind.label()),
                ok,
            });
        }
    }
    // The schedule and election phases mostly wait (for slots, for terms
    // to run out): their backends run side by side, each on its own
    // database and names, and each reports under its own label.
    if settings.phase("schedule") {
        let secs = settings.secs.min(SCHEDULE_SECS);
        let runs = kinds.iter().filter(|k| k.lease()).map(|&kind| async move {
            let ok = timed(
                &format!("schedule {}", kind.label()),
                schedule::run(kind, secs),
            )
            .await;
            Outcome {
                name: format!("schedule {}", kind.label()),
                ok,
            }
        });
        outcomes.extend(timed_all("schedule", runs).await);
    }
    if settings.phase("election") {
        let secs = settings.secs.min(ELECTION_SECS);
        let runs = kinds.iter().map(|&kind| async move {
            let ok = timed(
                &format!("election {}", kind.label()),
                election::run(kind, secs),
            )
            .await;
            Outcome {
                name: format!("election {}", kind.label()),
                ok,
            }
        });
        outcomes.extend(timed_all("election", runs).await);
    }
    outcomes
}

/// The longest leader-election phase per backend.
const ELECTION_SECS: u64 = 12;

/// The longest schedule phase per backend (the soak's long runs are for
/// the lock phase).
const SCHEDULE_SECS: u64 = 16;

async fn timed(what: &str, f: impl Future<Output = bool>) -> bool {
    let t = Instant::now();
    let ok = f.await;
    eprintln!("torture: {what} took {:.1} s", t.elapsed().as_secs_f64());
    ok
}

/// Runs `runs` side by side and reports how long they took together.
async fn timed_all<F: Future<Output = Outcome>>(
    what: &str,
    runs: impl Iterator<Item = F>,
) -> Vec<Outcome> {
    let t = Instant::now();
    let outcomes = futures::future::join_all(runs).await;
    eprintln!(
        "torture: {what}, every backend side by side, took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    outcomes
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    common::poll_until(within, Duration::from_millis(50), check).await
}

/// This binary started again as a worker process (`env` set to `spec`,
/// no stdin or stdout), killed when its handle is dropped; `what` names it
/// in the panic if it cannot start.
pub fn spawn_self(env: &str, spec: &str, what: &str) -> tokio::process::Child {
    tokio::process::Command::new(std::env::current_exe().expect("current_exe"))
        .env(env, spec)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"))
}

/// The pid of a worker process started by [`spawn_self`] (still running).
pub fn pid(child: &tokio::process::Child) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(child.id().expect("running") as i32)
}

/// A fresh id for this run's names and rows.
pub fn run_id() -> String {
    format!(
        "{:x}{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    )
}
