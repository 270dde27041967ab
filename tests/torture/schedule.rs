//! The scheduler under faults: three worker processes per lease backend run
//! the same `dblock::schedule` job on 2-second slots while the controller
//! SIGKILLs workers (starting a replacement) and SIGSTOPs them for 3 s (past
//! their 2 s lease), one fault at a time. Then: no slot ran twice, and the
//! slots that did not run are few and each within reach of a fault (a
//! worker killed or paused between claiming a slot and starting its job
//! keeps the slot: at most once, never twice).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dblock::schedule::{Job, Overlap, Schedule, Slot};
use dblock::LockGuard;
use nix::sys::signal::{kill, Signal};
use rand::Rng;
use tokio::process::Child;
use tokio::time::sleep;

use crate::target::{Endpoint, Kind};
use crate::{direct, pid, run_id, spawn_self};

const ENV: &str = "DBLOCK_TORTURE_SCHEDULE";
const SLOT: Duration = Duration::from_secs(2);
const WORKERS: usize = 3;

/// A worker process, when this process is one: runs the job until the
/// quit file appears.
pub fn worker_from_env() {
    let Ok(spec) = std::env::var(ENV) else {
        return;
    };
    // KIND|URL|JOB|LOG|QUIT
    let parts: Vec<&str> = spec.split('|').collect();
    let [kind, url, job, log, quit] = parts[..] else {
        panic!("bad {ENV}: {spec}")
    };
    let endpoint = Endpoint {
        kind: Kind::parse(kind).expect("kind"),
        url: url.to_owned(),
        app: format!("dblock-torture-schedule-{}", std::process::id()),
    };
    let (job, log, quit) = (job.to_owned(), PathBuf::from(log), PathBuf::from(quit));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let locks = endpoint.locks().await;
        let job = Job::new(
            job,
            Schedule::every(SLOT).unwrap(),
            move |slot: Slot, guard: LockGuard| {
                let log = log.clone();
                async move {
                    let line = format!(
                        "{} {} {}\n",
                        slot.rfc3339(),
                        guard.token(),
                        std::process::id()
                    );
                    // One append per run: lines of several processes never
                    // interleave.
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .and_then(|mut f| f.write_all(line.as_bytes()))?;
                    sleep(Duration::from_millis(600)).await;
                    drop(guard);
                    Ok::<_, std::io::Error>(())
                }
            },
        )
        // Faults target the slot claims; with Overlap::Skip a killed run
        // would also (rightly) hold the next slot off for its lease.
        .overlap(Overlap::Allow)
        .ttl(SLOT);
        let stop = async {
            while !quit.exists() {
                sleep(Duration::from_millis(50)).await;
            }
        };
        job.run_until(&locks, stop)
            .await
            .expect("the scheduler ran");
    });
    std::process::exit(0);
}

fn spawn(kind: Kind, url: &str, job: &str, log: &Path, quit: &Path) -> Child {
    let spec = format!(
        "{}|{url}|{job}|{}|{}",
        kind.label(),
        log.display(),
        quit.display()
    );
    spawn_self(ENV, &spec, "a schedule worker")
}

/// One backend for `secs` seconds; true if the checks hold.
pub async fn run(kind: Kind, secs: u64) -> bool {
    let run = run_id();
    let dir = std::env::temp_dir().join(format!("dblock-torture-schedule-{run}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ctl = direct(kind, &dir, &format!("dblock-torture-ctl-{run}")).await;
    ctl.pool(2).await.migrate().await;
    let ctl_locks = ctl.locks().await;
    let job = format!("torture:{run}");
    let log = dir.join("runs.txt");
    let quit = dir.join("quit");
    let mut workers: Vec<Child> = (0..WORKERS)
        .map(|_| spawn(kind, &ctl.url, &job, &log, &quit))
        .collect();
    let begin = ctl_locks.now().await.expect("database clock");
    let end_at = tokio::time::Instant::now() + Duration::from_secs(secs);
    // Faults, one at a time, by the database clock.
    let mut faults: Vec<(DateTime<Utc>, DateTime<Utc>, &str)> = Vec::new();
    sleep(Duration::from_millis(2500)).await;
    while tokio::time::Instant::now() + Duration::from_secs(4) < end_at {
        let victim = rand::rng().random_range(0..workers.len());
        let at = ctl_locks.now().await.expect("database clock");
        if rand::rng().random_bool(0.5) {
            let _ = kill(pid(&workers[victim]), Signal::SIGKILL);
            let _ = workers[victim].wait().await;
            workers[victim] = spawn(kind, &ctl.url, &job, &log, &quit);
            faults.push((at, at + chrono::Duration::seconds(1), "SIGKILL"));
        } else {
            let _ = kill(pid(&workers[victim]), Signal::SIGSTOP);
            sleep(Duration::from_secs(3)).await;
            let _ = kill(pid(&workers[victim]), Signal::SIGCONT);
            faults.push((at, at + chrono::Duration::seconds(3), "SIGSTOP 3 s"));
        }
        sleep(Duration::from_millis(rand::rng().random_range(700..1500))).await;
    }
    tokio::time::sleep_until(end_at).await;
    let stop = ctl_locks.now().await.expect("database clock");
    std::fs::write(&quit, b"").unwrap();
    for mut w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(15), w.wait()).await;
    }

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut by_slot: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for line in text.lines() {
        by_slot
            .entry(line.split(' ').next().unwrap().to_owned())
            .or_default()
            .push(line);
    }
    let mut ok = true;
    for (slot, lines) in &by_slot {
        if lines.len() > 1 {
            println!(
                "schedule {}: slot {slot} ran twice: {lines:?}",
                kind.label()
            );
            ok = false;
        }
    }
    // Slots wholly inside the run (the first after workers had 1.5 s to start).
    let two = chrono::Duration::seconds(2);
    let mut slot = DateTime::from_timestamp((begin.timestamp().div_euclid(2) + 1) * 2, 0).unwrap();
    if slot - begin < chrono::Duration::milliseconds(1500) {
        slot += two;
    }
    let (mut total, mut not_run) = (0, 0);
    while slot + two <= stop {
        let s = slot.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        total += 1;
        if !by_slot.contains_key(&s) {
            not_run += 1;
            // A fault whose effect overlaps the slot's start window.
            let near = faults
                .iter()
                .any(|(from, to, _)| *from <= slot + two && *to + two >= slot);
            if !near {
                println!(
                    "schedule {}: slot {s} did not run and no fault was near it (faults {faults:?})",
                    kind.label()
                );
                ok = false;
            }
        }
        slot += two;
    }
    if not_run > faults.len() {
        println!(
            "schedule {}: {not_run} slots did not run, more than the {} faults",
            kind.label(),
            faults.len()
        );
        ok = false;
    }
    println!(
        "schedule {}: {total} slots, {} runs, {not_run} not run, {} faults ({} SIGKILL), never twice: {}",
        kind.label(),
        by_slot.len(),
        faults.len(),
        faults.iter().filter(|f| f.2 == "SIGKILL").count(),
        by_slot.values().all(|l| l.len() == 1)
    );
    if ok {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("schedule {}: logs kept in {}", kind.label(), dir.display());
    }
    ok
}
