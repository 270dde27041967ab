//! `dblock cron`, run as separate processes: three hosts on each lease
//! backend run a 2-second schedule, one is SIGKILLed mid-slot, and every
//! slot in the window runs exactly once; shifted clocks agree; bad
//! schedules exit 64; SIGTERM ends cleanly.
//!
//! Needs `DBLOCK_TEST_POSTGRES_URL` and `DBLOCK_TEST_MYSQL_URL` (see
//! `tests/common`); the SQLite cases need nothing.
#![cfg(feature = "cli")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_dblock");
/// An upper bound for any one dblock invocation in these tests.
const LIMIT: Duration = Duration::from_secs(60);

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dblock-cron-{}",
        common::unique("d").replace(':', "-")
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// `dblock --url URL cron ARGS...`, its output piped.
fn dblock(dir: &Path, url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("DATABASE_URL")
        .current_dir(dir)
        .arg("--url")
        .arg(url)
        .arg("cron")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn signal(child: &Child, sig: Signal) {
    let pid = child.id().expect("still running") as i32;
    kill(Pid::from_raw(pid), sig).expect("signal dblock");
}

async fn finish(child: Child) -> Output {
    tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("dblock finished in time")
        .expect("dblock ran")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The start of the 2-second slot after `t`'s.
fn next_slot(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp((t.timestamp().div_euclid(2) + 1) * 2, 0).unwrap()
}

fn slot_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Waits until the local clock is `ms` milliseconds into a 2-second slot
/// (the database's clock is this machine's).
async fn into_slot(ms: i64) {
    let now = Utc::now();
    let target = next_slot(now) + chrono::Duration::milliseconds(ms);
    tokio::time::sleep((target - now).to_std().unwrap()).await;
}

/// Three hosts run `dblock cron --every 2s`; host 0 is SIGKILLed 0.5 s into
/// a slot, the others get SIGTERM later. Every slot from the first full
/// one to the last before the SIGTERM ran once, never twice, and each
/// surviving host logged one line per slot.
async fn three_hosts(url: &str, skews: [&str; 3]) {
    let dir = scratch_dir();
    let runs = dir.join("runs.txt");
    let name = common::unique("cron");
    // Each run records its slot, token and host, then works for 0.8 s.
    let script = format!(
        "echo \"$DBLOCK_SLOT $DBLOCK_TOKEN $1\" >> '{}'; sleep 0.8",
        runs.display()
    );
    into_slot(300).await;
    let begin = Utc::now();
    let mut hosts = Vec::new();
    for (i, skew) in skews.iter().enumerate() {
        let host = i.to_string();
        let skew_arg = format!("--clock-skew={skew}");
        // A 2 s lease: a host killed mid-run keeps the next slots from
        // starting (Overlap::Skip: its run might still be going) for at
        // most that long.
        let args = [
            "--ttl", "2s", "--every", "2s", &skew_arg, &name, "--", "sh", "-c", &script, "sh",
            &host,
        ];
        hosts.push(dblock(&dir, url, &args).spawn().expect("start dblock"));
    }
    // Mid-slot, while host 0 may be running its command.
    tokio::time::sleep(Duration::from_millis(4200)).await;
    let killed = hosts.remove(0);
    signal(&killed, Signal::SIGKILL);
    let killed_at = Utc::now();
    finish(killed).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let stop = Utc::now();
    for h in &hosts {
        signal(h, Signal::SIGTERM);
    }
    let mut logs = Vec::new();
    for h in hosts {
        let out = finish(h).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "clean exit on SIGTERM: {}",
            stderr(&out)
        );
        logs.push(stderr(&out));
    }

    let text = std::fs::read_to_string(&runs).unwrap_or_default();
    let mut by_slot: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let slot = line.split(' ').next().unwrap().to_owned();
        by_slot.entry(slot).or_default().push(line.to_owned());
    }
    for (slot, lines) in &by_slot {
        assert_eq!(lines.len(), 1, "slot {slot} ran more than once: {lines:?}");
    }
    // Slots wholly inside the window (the first starts ~1.7 s after the
    // hosts did, leaving time to connect).
    // Each survivor logs the slots from the one current when it came up
    // (connecting may take seconds on a loaded machine); the window starts
    // after the first survivor is up.
    let first_logged = |log: &str| {
        log.lines()
            .filter_map(|l| l.split(" slot ").nth(1)?.get(..24))
            .filter_map(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .min()
    };
    let firsts: Vec<Option<DateTime<Utc>>> = logs.iter().map(|l| first_logged(l)).collect();
    let first_up = firsts
        .iter()
        .flatten()
        .min()
        .copied()
        .expect("a host logged a slot");
    let mut slot = next_slot(begin).max(first_up + chrono::Duration::seconds(2));
    let mut checked = 0;
    let mut skipped = 0;
    while slot + chrono::Duration::seconds(2) <= stop {
        let s = slot_text(slot);
        let ran = by_slot.contains_key(&s);
        // The survivors each logged the slot once: run here, taken
        // elsewhere, or skipped while the killed host's run might still be
        // going.
        for (log, first) in logs.iter().zip(&firsts) {
            if first.is_none_or(|f| f >= slot) {
                continue;
            }
            // The outcome lines ("NAME slot S: ..."), not other messages
            // that name the slot's lease.
            let needle = format!("slot {s}:");
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(&needle)).collect();
            assert_eq!(
                lines.len(),
                1,
                "slot {s} logged {} times:\n{log}",
                lines.len()
            );
            let line = lines[0];
            if ran {
                assert!(
                    line.contains("ran here") || line.contains("taken by another host"),
                    "{line}"
                );
            } else {
                assert!(
                    line.contains("skipped") || line.contains("taken by another host"),
                    "{line}"
                );
            }
        }
        if !ran {
            // Only a slot that started while the killed host's 2 s lease
            // on its run could still be live.
            assert!(
                slot >= killed_at - chrono::Duration::seconds(2)
                    && slot <= killed_at + chrono::Duration::seconds(2),
                "slot {s} never ran (host 0 was killed at {killed_at})\nruns:\n{text}\nlogs: {logs:#?}"
            );
            skipped += 1;
        }
        checked += 1;
        slot += chrono::Duration::seconds(2);
    }
    assert!(checked >= 3, "only {checked} slots in the window");
    // At most two: the slot host 0 claimed and was killed in before its
    // command wrote (a claim stands: at most once, never twice), and one
    // skipped while its run's lease ran out.
    assert!(
        skipped <= 2,
        "{skipped} slots did not run around the kill at {killed_at}\nruns:\n{text}\n{logs:#?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_sqlite_lease() {
    let dir = scratch_dir();
    let url = format!("sqlite:{}", dir.join("locks.db").display());
    three_hosts(&url, ["0s", "0s", "0s"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_postgres_lease() {
    // A postgres:// URL: cron uses the lease table by default.
    three_hosts(&common::postgres_url().await, ["0s", "0s", "0s"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_mysql_lease() {
    three_hosts(&common::mysql_url().await, ["0s", "0s", "0s"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_redis_lease() {
    three_hosts(&common::redis_url(), ["0s", "0s", "0s"]).await;
}

/// Hosts whose clocks are 7 s behind and 5 s ahead agree with the third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifted_clocks_agree_sqlite_lease() {
    let dir = scratch_dir();
    let url = format!("sqlite:{}", dir.join("locks.db").display());
    three_hosts(&url, ["-7s", "0s", "5s"]).await;
}

/// A bad --every or --cron is a usage error (64), found before the
/// database is touched: the SQLite file is not even created.
#[tokio::test]
async fn bad_schedules_exit_64() {
    let dir = scratch_dir();
    let db = dir.join("never.db");
    let url = format!("sqlite:{}", db.display());
    let cases: &[&[&str]] = &[
        &["--cron", "61 * * * *", "j", "--", "true"],
        &["--cron", "* * *", "j", "--", "true"],
        &["--cron", "", "j", "--", "true"],
        &["--cron", "0 0 30 2 *", "j", "--", "true"],
        &["--every", "500ms", "j", "--", "true"],
        &["--every", "soon", "j", "--", "true"],
        &["--every", "2s", "--cron", "* * * * *", "j", "--", "true"],
        &["j", "--", "true"],
    ];
    for args in cases {
        let out = tokio::time::timeout(LIMIT, dblock(&dir, &url, args).output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).trim().is_empty(), "{args:?} says why");
    }
    assert!(!db.exists(), "nothing was written");
    // A bad name is a usage error (64), as for `dblock run`.
    let out = dblock(&dir, &url, &["--every", "2s", "", "--", "true"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
}

/// Advisory locks cannot keep a slot past their holder: refused with 64
/// and a message naming the lease table.
#[tokio::test]
async fn advisory_backend_is_refused() {
    let url = common::postgres_url().await;
    let dir = scratch_dir();
    let mut cmd = Command::new(BIN);
    cmd.env_remove("DATABASE_URL")
        .current_dir(&dir)
        .args([
            "--url",
            &url,
            "--backend",
            "advisory",
            "cron",
            "--every",
            "2s",
        ])
        .arg(common::unique("adv"))
        .args(["--", "true"])
        .stdin(Stdio::null());
    let out = tokio::time::timeout(LIMIT, cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("postgres::Lease"), "{}", stderr(&out));
}

/// SIGTERM while a slot's command runs: the command gets it too (as with
/// `dblock run`), dblock waits for it, and exits 0.
#[tokio::test]
async fn sigterm_reaches_the_command_and_exits_cleanly() {
    let dir = scratch_dir();
    let url = format!("sqlite:{}", dir.join("locks.db").display());
    let log = dir.join("log.txt");
    let script = format!(
        "trap 'echo term >> \"{log}\"; exit 0' TERM; echo start >> \"{log}\"; \
         sleep 30 & wait",
        log = log.display()
    );
    let name = common::unique("term");
    let child = dblock(
        &dir,
        &url,
        &[
            "--every",
            "2s",
            "--catch-up",
            &name,
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .spawn()
    .unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("start")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the command never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, Signal::SIGTERM);
    let out = finish(child).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("term"), "the command got SIGTERM: {text}");
    assert!(stderr(&out).contains("ran here"), "{}", stderr(&out));
}
