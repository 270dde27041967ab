//! The multi-process run: workers, faults, and the checks afterwards.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dblock::Locks;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::seq::IndexedRandom;
use rand::Rng;
use tokio::time::sleep;

use crate::check::{self, Fault, FaultKind, Report};
use crate::events::{self, mono_ns};
use crate::proxy::Proxy;
use crate::target::{Endpoint, Kind};
use crate::worker::{self, Config};
use crate::{authority, direct, eventually, run_id, Settings};

/// The lease length in the torture runs. Stops and cuts last 1.5 × this.
pub const TTL: Duration = Duration::from_secs(1);
const NAMES: usize = 3;

/// Options of one multi-process run.
#[derive(Debug, Clone)]
struct Plan {
    kind: Kind,
    workers: usize,
    secs: u64,
    fencing: bool,
    watch_lost: bool,
    faults: Vec<FaultKind>,
    restart: bool,
    /// Mean pause between two faults.
    every: Duration,
    /// Holders each name admits: 1, or `n` in the semaphore mode.
    permits: u32,
    /// The shared mode: readers beside the writers.
    shared: bool,
}

/// The torture run of one backend: every applicable fault, fencing on.
pub async fn normal(kind: Kind, s: &Settings) -> bool {
    let (report, dir) = run(&full_plan(kind, s, 1, false)).await;
    conclude(&report, dir, kind.label(), None, s.keep)
}

/// The semaphore mode: the workers take permits of semaphores of
/// [`SEMAPHORE_PERMITS`] under every applicable fault; at most that many
/// holders may believe they hold a name at any instant (unless a fault
/// explains it), and tokens increase as for a lock.
pub async fn semaphore(kind: Kind, s: &Settings) -> bool {
    let (report, dir) = run(&full_plan(kind, s, SEMAPHORE_PERMITS, false)).await;
    let label = format!("{} semaphore of {SEMAPHORE_PERMITS}", kind.label());
    let missing = (!report.permits_reached)
        .then(|| format!("no name ever had its {SEMAPHORE_PERMITS} permits taken at once"));
    conclude(&report, dir, &label, missing, s.keep)
}

/// The shared mode: two acquisitions in three are readers, the others
/// writers, under every applicable fault; a writer may overlap nobody (as
/// the holders believed it, unless a fault explains it), readers only each
/// other, tokens increase as for a lock, the writers' fenced writes stay in
/// order, and some readers must actually have shared a name.
pub async fn shared(kind: Kind, s: &Settings) -> bool {
    let (report, dir) = run(&full_plan(kind, s, 1, true)).await;
    let label = format!("{} readers and writers", kind.label());
    let missing =
        (!report.readers_shared).then(|| "no two readers ever held a name together".to_owned());
    conclude(&report, dir, &label, missing, s.keep)
}

/// Prints the report under `label`, and `missing` (what the run should
/// have shown and did not) as one more violation; keeps or removes the
/// logs. True if nothing was violated.
fn conclude(
    report: &Report,
    dir: PathBuf,
    label: &str,
    missing: Option<String>,
    keep: bool,
) -> bool {
    println!("{}", report.summary(label));
    if let Some(m) = &missing {
        println!("  VIOLATION {label}: {m}");
    }
    let ok = report.violations.is_empty() && missing.is_none();
    for v in &report.violations {
        println!("  VIOLATION {label}: {v}");
    }
    finish(dir, ok, keep);
    ok
}

/// The run of every mode (`permits` of each name, readers if `shared`):
/// every applicable fault, fencing on, the server restarted only when
/// asked, except Redis: it is restarted (without saving) in every run, as
/// it is ours alone on this machine and losing everything is its main
/// fault.
fn full_plan(kind: Kind, s: &Settings, permits: u32, shared: bool) -> Plan {
    let mut faults = vec![FaultKind::Kill, FaultKind::Stop];
    if kind.networked() {
        faults.extend([FaultKind::Terminate, FaultKind::Cut]);
    }
    Plan {
        kind,
        workers: s.workers,
        secs: s.secs,
        fencing: true,
        watch_lost: true,
        faults,
        restart: (s.restart && kind.networked()) || kind == Kind::RedisLease,
        every: Duration::from_millis(300),
        permits,
        shared,
    }
}

/// The permits of each name in the semaphore mode.
pub const SEMAPHORE_PERMITS: u32 = 3;

/// The negative control: the same run with fencing off and naive holders
/// (they do not watch `lost()`), under pauses. The checkers must report
/// stale writes accepted by the register and lost updates of the unguarded
/// register; the control fails if they do not.
pub async fn control(kind: Kind, s: &Settings) -> bool {
    for attempt in 1..=3 {
        let plan = Plan {
            kind,
            workers: 8,
            secs: 10,
            fencing: false,
            watch_lost: false,
            faults: vec![FaultKind::Stop],
            restart: false,
            every: Duration::from_millis(250),
            permits: 1,
            shared: false,
        };
        let (report, dir) = run(&plan).await;
        println!(
            "negative control ({}, fencing off, naive holders, attempt {attempt}): {}",
            kind.label(),
            report.summary("caught")
        );
        let caught =
            report.stale_accepted > 0 && report.unguarded_lost > 0 && !report.violations.is_empty();
        if let Some(v) = report.violations.first() {
            println!("  the checker reported, as it must: {v}");
        }
        finish(dir, true, s.keep);
        if caught {
            return true;
        }
    }
    println!("negative control: the checkers did not catch the broken run: they cannot fail");
    false
}

fn finish(dir: PathBuf, ok: bool, keep: bool) {
    if ok && !keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("  logs kept in {}", dir.display());
    }
}

/// A worker slot: its current process.
struct Slot {
    child: Child,
    gen: u32,
    wid: String,
    /// No new fault on this slot before this time (a stop or cut is on).
    busy_until: i64,
}

struct Fleet {
    plan: Plan,
    run: String,
    names: Vec<String>,
    dir: PathBuf,
    worker_endpoint: Box<dyn Fn(usize) -> Endpoint + Send + Sync>,
    end_ns: i64,
    slots: Vec<Slot>,
}

impl Fleet {
    fn app(&self, wid: &str) -> String {
        format!("dblock-torture-{}-{wid}", self.run)
    }

    fn spawn(&self, slot: usize, gen: u32) -> Slot {
        let wid = format!("s{slot}g{gen}");
        let mut endpoint = (self.worker_endpoint)(slot);
        endpoint.app = self.app(&wid);
        let cfg = Config {
            endpoint,
            run: self.run.clone(),
            names: self.names.clone(),
            ttl: TTL,
            end_ns: self.end_ns,
            log: self.dir.join(format!("{wid}.log")),
            fencing: self.plan.fencing,
            watch_lost: self.plan.watch_lost,
            permits: self.plan.permits,
            shared: self.plan.shared,
            wid: wid.clone(),
            done: self.dir.join(format!("{wid}.done")),
            quit: self.dir.join("quit"),
        };
        let child = Command::new(std::env::current_exe().expect("current_exe"))
            .envs(cfg.to_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn a worker");
        Slot {
            child,
            gen,
            wid,
            busy_until: 0,
        }
    }

    fn pid(&self, slot: usize) -> Pid {
        Pid::from_raw(self.slots[slot].child.id() as i32)
    }

    /// The slot whose process holds `name` now, by the database's account.
    async fn holder(&self, locks: &Locks, name: &str) -> Option<usize> {
        let info = locks.inspect(name).await.ok()??;
        self.slots.iter().position(|s| {
            info.holder.ends_with(&format!(":{}", s.child.id()))
                || info.holder.contains(&format!("{})", self.app(&s.wid)))
        })
    }
}

async fn run(plan: &Plan) -> (Report, PathBuf) {
    let kind = plan.kind;
    let run = run_id();
    let dir = std::env::temp_dir().join(format!("dblock-torture-{run}-{}", kind.label()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let names: Vec<String> = (0..NAMES)
        .map(|i| format!("torture:{run}:{}:{i}", kind.label()))
        .collect();
    let mut report = Report::default();

    // The controller's own, direct connections.
    let ctl = direct(kind, &dir, &format!("dblock-torture-ctl-{run}")).await;
    let db = ctl.pool(4).await;
    db.migrate().await;
    let locks = ctl.locks().await; // SQLite: creates the file and its table
    db.setup_registers(&run, &names).await;

    // The servers the workers are spread over: one, or every Galera node
    // (worker slot i on node i % n). The controller keeps a pool on each,
    // to end a worker's sessions where they are and to look for open
    // transactions everywhere.
    let node_urls = match kind {
        Kind::Galera => crate::common::galera_urls(),
        _ => vec![ctl.url.clone()],
    };
    let mut node_dbs = Vec::new();
    for url in &node_urls {
        let endpoint = Endpoint {
            url: url.clone(),
            ..ctl.clone()
        };
        node_dbs.push(endpoint.pool(2).await);
    }
    let proxy = if kind.networked() {
        let mut upstreams = Vec::new();
        for url in &node_urls {
            let (hostport, _) = authority(url);
            upstreams.push(
                tokio::net::lookup_host(hostport.as_str())
                    .await
                    .expect("resolve the server")
                    .find(|a| a.is_ipv4())
                    .expect("an IPv4 address"),
            );
        }
        Some(Proxy::start(plan.workers, &upstreams).await)
    } else {
        None
    };
    let worker_endpoint: Box<dyn Fn(usize) -> Endpoint + Send + Sync> = match &proxy {
        Some(p) => {
            let p = p.clone();
            let url = ctl.url.clone();
            Box::new(move |slot| {
                let (_, with_port) = authority(&url);
                Endpoint {
                    kind,
                    url: with_port(p.port(slot)),
                    app: String::new(),
                }
            })
        }
        None => {
            let url = ctl.url.clone();
            Box::new(move |_| Endpoint {
                kind,
                url: url.clone(),
                app: String::new(),
            })
        }
    };
    let start_ns = mono_ns();
    let end_ns = start_ns + plan.secs as i64 * 1_000_000_000;
    let mut fleet = Fleet {
        plan: plan.clone(),
        run: run.clone(),
        names: names.clone(),
        dir: dir.clone(),
        worker_endpoint,
        end_ns,
        slots: Vec::new(),
    };
    for slot in 0..plan.workers {
        let s = fleet.spawn(slot, 0);
        fleet.slots.push(s);
    }

    let faults: Arc<Mutex<Vec<Fault>>> = Arc::default();
    let mut lifts = Vec::new();
    let hold_fault = TTL.mul_f64(1.5);
    let mut next_restart = start_ns
        + if kind == Kind::RedisLease {
            plan.secs as i64 * 500_000_000
        } else {
            20_000_000_000
        };
    // Galera: one node SIGKILLed a third of the way in, restarted (it
    // rejoins by state transfer) while the faults go on.
    let mut node_kill = (kind == Kind::Galera).then(|| {
        let at = start_ns + (end_ns - start_ns) / 3;
        let node = rand::rng().random_range(2..=node_urls.len());
        (at, node)
    });
    let mut node_restart = None;
    while mono_ns() < end_ns - hold_fault.as_nanos() as i64 {
        let pause = plan.every.mul_f64(rand::rng().random_range(0.5..1.5));
        sleep(pause).await;
        let now = mono_ns();
        // A worker that exited by itself before the end failed.
        for i in 0..fleet.slots.len() {
            if let Ok(Some(status)) = fleet.slots[i].child.try_wait() {
                report.violation(format!(
                    "worker {} exited on its own during the run: {status}",
                    fleet.slots[i].wid
                ));
                let gen = fleet.slots[i].gen + 1;
                fleet.slots[i] = fleet.spawn(i, gen);
            }
        }
        if let Some((_, node)) = node_kill.filter(|&(at, _)| now >= at) {
            node_kill = None;
            let faults = faults.clone();
            node_restart = Some(tokio::spawn(async move {
                let start = mono_ns();
                galera(&["kill", &node.to_string()]).await;
                println!("  galera: node {node} killed");
                galera(&["restart", &node.to_string()]).await;
                let end = mono_ns();
                println!(
                    "  galera: node {node} back and synced after {:.1} s",
                    (end - start) as f64 / 1e9
                );
                faults.lock().unwrap().push(Fault {
                    kind: FaultKind::Restart,
                    wid: None,
                    start,
                    end,
                });
            }));
        }
        if plan.restart && now >= next_restart {
            next_restart = now + 60_000_000_000;
            let started = mono_ns();
            restart_server(kind).await;
            faults.lock().unwrap().push(Fault {
                kind: FaultKind::Restart,
                wid: None,
                start: started,
                end: mono_ns(),
            });
            continue;
        }
        let fault = *plan.faults.choose(&mut rand::rng()).unwrap();
        // Aim at a holder when there is one; otherwise at anyone.
        let name = names.choose(&mut rand::rng()).unwrap();
        let free = |f: &Fleet, i: usize| f.slots[i].busy_until <= now;
        let slot = match fleet.holder(&locks, name).await {
            Some(i) if free(&fleet, i) => i,
            _ => {
                let candidates: Vec<usize> = (0..fleet.slots.len())
                    .filter(|&i| free(&fleet, i))
                    .collect();
                match candidates.choose(&mut rand::rng()) {
                    Some(&i) => i,
                    None => continue,
                }
            }
        };
        let wid = fleet.slots[slot].wid.clone();
        let start = mono_ns();
        match fault {
            FaultKind::Kill => {
                let _ = kill(fleet.pid(slot), Signal::SIGKILL);
                let _ = fleet.slots[slot].child.wait();
                faults.lock().unwrap().push(Fault {
                    kind: fault,
                    wid: Some(wid),
                    start,
                    end: start,
                });
                let gen = fleet.slots[slot].gen + 1;
                fleet.slots[slot] = fleet.spawn(slot, gen);
            }
            FaultKind::Stop => {
                let pid = fleet.pid(slot);
                if kill(pid, Signal::SIGSTOP).is_err() {
                    continue;
                }
                fleet.slots[slot].busy_until = start + hold_fault.as_nanos() as i64 + 50_000_000;
                let faults = faults.clone();
                lifts.push(tokio::spawn(async move {
                    sleep(hold_fault).await;
                    let _ = kill(pid, Signal::SIGCONT);
                    faults.lock().unwrap().push(Fault {
                        kind: fault,
                        wid: Some(wid),
                        start,
                        end: mono_ns(),
                    });
                }));
            }
            FaultKind::Terminate => {
                let ports = proxy.as_ref().unwrap().upstream_ports(slot);
                let node = &node_dbs[slot % node_dbs.len()];
                if node.terminate_ports(&ports).await > 0 {
                    faults.lock().unwrap().push(Fault {
                        kind: fault,
                        wid: Some(wid),
                        start,
                        end: mono_ns(),
                    });
                }
            }
            FaultKind::Cut => {
                let proxy = proxy.clone().unwrap();
                proxy.pause(slot, true);
                fleet.slots[slot].busy_until = start + hold_fault.as_nanos() as i64 + 50_000_000;
                let faults = faults.clone();
                lifts.push(tokio::spawn(async move {
                    sleep(hold_fault).await;
                    proxy.pause(slot, false);
                    faults.lock().unwrap().push(Fault {
                        kind: fault,
                        wid: Some(wid),
                        start,
                        end: mono_ns(),
                    });
                }));
            }
            FaultKind::Restart => unreachable!("restarts are scheduled"),
        }
    }
    for l in lifts {
        l.await.expect("lift a fault");
    }
    if let Some(r) = node_restart {
        if r.await.is_err() {
            report.violation("the Galera node could not be killed and restarted");
        }
    } else if node_kill.is_some() {
        report.violation("the run ended before the Galera node was killed");
    }

    // The workers stop at end_ns, finish their section and report done.
    let all_done = eventually(Duration::from_secs(60), || {
        let done = fleet
            .slots
            .iter()
            .all(|s| dir.join(format!("{}.done", s.wid)).exists());
        async move { done }
    })
    .await;
    if !all_done {
        report.violation("a worker did not finish within 60 s of the end");
    }
    // With the workers idle but connected: no session inside a transaction.
    let app_prefix = format!("dblock-torture-{run}-");
    let ports: Vec<u16> = match &proxy {
        Some(p) => (0..plan.workers)
            .flat_map(|i| p.upstream_ports(i))
            .collect(),
        None => Vec::new(),
    };
    let mut open = 0;
    for node in &node_dbs {
        open += node.open_transactions(&app_prefix, &ports).await;
    }
    if open > 0 {
        report.leaks += 1;
        report.violation(format!("{open} worker sessions left inside a transaction"));
    }
    // Nothing held: released, or (killed holders' leases) expired.
    let keys: Vec<i64> = names.iter().map(|n| dblock::advisory_key(n)).collect();
    let clear = || async {
        let mut held = 0;
        for n in &names {
            if locks.inspect(n).await.expect("inspect").is_some() {
                held += 1;
            }
        }
        let listed = locks
            .list()
            .await
            .expect("list")
            .iter()
            .filter(|i| i.name.as_ref().is_some_and(|n| names.contains(n)))
            .count();
        held + listed + db.advisory_held(&keys).await as usize
    };
    if !eventually(TTL * 3, || async { clear().await == 0 }).await {
        report.leaks += 1;
        report.violation(
            "a lock is still held after every worker released and the leases' ttl passed",
        );
    }
    std::fs::write(dir.join("quit"), b"").expect("quit file");
    for s in &mut fleet.slots {
        let exited = eventually(Duration::from_secs(10), || {
            let r = matches!(s.child.try_wait(), Ok(Some(_)));
            async move { r }
        })
        .await;
        if !exited {
            report.violation(format!("worker {} did not exit", s.wid));
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
    if clear().await != 0 {
        report.leaks += 1;
        report.violation("a lock is held after every worker exited");
    }

    // The checks.
    let mut logs = HashMap::new();
    for entry in std::fs::read_dir(&dir).expect("log dir").flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let wid = path.file_stem().unwrap().to_string_lossy().into_owned();
            logs.insert(wid, events::read(&path));
        }
    }
    let mut registers = HashMap::new();
    for n in &names {
        let r = db.registers(&run, n).await.expect("read the registers");
        report.unguarded_lost += check::unguarded_lost(&logs, n, r.unguarded);
        registers.insert(n.clone(), r);
    }
    let faults = faults.lock().unwrap().clone();
    check::check(
        &check::Run {
            kind,
            logs: &logs,
            faults: &faults,
            registers: &registers,
            watch_lost: plan.watch_lost,
            permits: plan.permits,
        },
        &mut report,
    );
    db.cleanup(&run).await;
    let _ = worker::WAIT;
    (report, dir)
}

/// Runs `scripts/topology/galera.sh ARGS`; panics (failing the run) if it
/// fails, after its message.
async fn galera(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/topology/galera.sh");
    let status = tokio::process::Command::new("bash")
        .arg(script)
        .args(args)
        .status()
        .await
        .expect("run scripts/topology/galera.sh");
    assert!(status.success(), "galera.sh {args:?} failed: {status}");
}

/// Restarts the server behind `kind` (the opt-in soak only).
async fn restart_server(kind: Kind) {
    let script = match kind {
        Kind::Advisory | Kind::PgLease => {
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -n1) main restart"
        }
        Kind::MyLease => {
            "mariadb-admin -h 127.0.0.1 -u root shutdown; \
             for i in $(seq 100); do pgrep -x mariadbd >/dev/null || break; sleep 0.1; done; \
             start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd; \
             for i in $(seq 300); do mariadb-admin -h 127.0.0.1 -u root ping >/dev/null 2>&1 && break; sleep 0.1; done"
        }
        // A Galera node is killed and restarted in every run.
        Kind::LiteLease | Kind::Galera => return,
        Kind::RedisLease => {
            let url = crate::common::redis_url();
            let (hostport, _) = authority(&url);
            if hostport != "127.0.0.1:6379" && hostport != "localhost:6379" {
                println!("  redis-lease: {hostport} is not the local Redis; not restarted");
                return;
            }
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
            let cmd = format!(
                "redis-cli -h 127.0.0.1 -p 6379 shutdown nosave; \
                 for i in $(seq 100); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || break; sleep 0.1; done; \
                 . '{script}' && start_redis >/dev/null"
            );
            let status = tokio::process::Command::new("bash")
                .arg("-c")
                .arg(cmd)
                .status()
                .await
                .expect("run the restart command");
            assert!(status.success(), "restarting Redis failed: {status}");
            return;
        }
    };
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .status()
        .await
        .expect("run the restart command");
    assert!(status.success(), "restarting the server failed: {status}");
}
