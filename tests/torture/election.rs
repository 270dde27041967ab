//! Leader election under faults: four worker processes per backend campaign
//! for one election (ttl 1 s), lead for 15 to 75 ticks of 20 ms, each a
//! fenced write (the term as the fence), then resign, while the controller
//! SIGKILLs workers (starting a replacement) and SIGSTOPs them for 1.5 s
//! (past their lease), one fault at a time and mostly the current leader
//! (as the observer shows it), and follows the election with
//! `Election::observe` as a process that never campaigns. Then:
//!
//! - the terms of the accepted wins strictly increase in the order won;
//! - **at most one process believes it leads at any instant, beyond what
//!   fencing catches**: a belief (a win, or a tick that found the
//!   leadership not lost) of term T after a later term T' had won is only
//!   allowed from a process paused during its term, and its fenced write
//!   must have been refused;
//! - the observer's terms strictly increase, it saw every leader that led
//!   for longer than its bound (one renewal period plus a read), and once
//!   the workers are gone it converges on "nobody leads".
//!
//! Negative control, by hand: with `DBLOCK_TORTURE_ELECTION_IGNORE_LOSS=1`
//! the workers never look at their lost signal, and the run must fail.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dblock::Locks;
use nix::sys::signal::{kill, Signal};
use rand::Rng;
use tokio::process::Child;
use tokio::time::sleep;

use crate::events::mono_ns;
use crate::target::{Endpoint, Kind, Write};
use crate::{direct, pid, run_id, spawn_self};

const ENV: &str = "DBLOCK_TORTURE_ELECTION";
const TTL: Duration = Duration::from_secs(1);
const PAUSE: Duration = Duration::from_millis(1500);
const WORKERS: usize = 4;
/// How long after its pause ends a paused leader may still believe it
/// leads (its fenced writes refused): the wake-up of its renewal, which
/// finds the local deadline passed, and one tick.
const GRACE: Duration = Duration::from_millis(500);
/// What the observer's bound allows beyond one renewal period: its read.
const READ: Duration = Duration::from_secs(1);

/// Set (by hand) to make the workers ignore their lost signal: the checks
/// must then fail, which shows they can.
const IGNORE_LOSS: &str = "DBLOCK_TORTURE_ELECTION_IGNORE_LOSS";

/// A worker process, when this process is one: campaigns until the quit
/// file appears.
pub fn worker_from_env() {
    let Ok(spec) = std::env::var(ENV) else {
        return;
    };
    // KIND|URL|RUN|NAME|LOG|QUIT
    let parts: Vec<&str> = spec.split('|').collect();
    let [kind, url, run, name, log, quit] = parts[..] else {
        panic!("bad {ENV}: {spec}")
    };
    let endpoint = Endpoint {
        kind: Kind::parse(kind).expect("kind"),
        url: url.to_owned(),
        app: format!("dblock-torture-election-{}", std::process::id()),
    };
    let (run, name, quit) = (run.to_owned(), name.to_owned(), PathBuf::from(quit));
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let pid = std::process::id();
    let worker = format!("e{pid}");
    // One write per line: a SIGKILL cuts at most the last one.
    let mut line = move |event: &str, at: i64, term: u64, accepted: bool| {
        let text = format!("{at} {event} {term} {} {pid}\n", accepted as u8);
        log.write_all(text.as_bytes()).expect("log");
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let locks = endpoint.locks().await;
        let db = endpoint.pool(2).await;
        let election = locks
            .elect(&name, format!("worker-{pid}"))
            .unwrap()
            .ttl(TTL)
            .unwrap();
        let quitting = || quit.exists();
        // The checker's own negative control: a leader that never looks at
        // its lost signal must be caught.
        let heed_loss = std::env::var_os(IGNORE_LOSS).is_none();
        while !quitting() {
            let campaign = tokio::select! {
                r = election.campaign() => r,
                _ = async { while !quitting() { sleep(Duration::from_millis(50)).await } } => break,
            };
            let Ok(leader) = campaign else {
                sleep(Duration::from_millis(100)).await;
                continue;
            };
            let term = leader.term();
            // The win counts from the end of its first fenced write: from
            // then on every older leader's write is refused.
            let entry = db
                .fenced(&run, &name, term, Write::Entry, &worker, true, None)
                .await;
            line("won", mono_ns(), term, entry.unwrap_or(false));
            // The tenure counts ticks, not time: a leader paused mid-term
            // goes on ticking when it resumes, unless it sees its loss.
            let mut ticks = rand::rng().random_range(15..75);
            loop {
                if heed_loss && leader.is_lost() {
                    line("lost", mono_ns(), term, false);
                    break;
                }
                let believed = mono_ns();
                ticks -= 1;
                if ticks == 0 || quitting() {
                    line("resign", believed, term, false);
                    let _ = leader.resign().await;
                    break;
                }
                let accepted = db
                    .fenced(&run, &name, term, Write::Exit, &worker, true, None)
                    .await;
                line("tick", believed, term, accepted.unwrap_or(false));
                sleep(Duration::from_millis(20)).await;
            }
        }
    });
    std::process::exit(0);
}

fn spawn(kind: Kind, url: &str, run: &str, name: &str, log: &Path, quit: &Path) -> Child {
    let spec = format!(
        "{}|{url}|{run}|{name}|{}|{}",
        kind.label(),
        log.display(),
        quit.display()
    );
    spawn_self(ENV, &spec, "an election worker")
}

/// What the observer showed, and when: (monotonic ns, the leader's term).
type Observed = (i64, Option<u64>);

/// One logged belief or end of a worker.
#[derive(Debug, Clone)]
struct Line {
    at: i64,
    event: String,
    term: u64,
    accepted: bool,
    pid: i32,
}

fn parse(text: &str) -> Vec<Line> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let [at, event, term, accepted, pid] = f[..] else {
                return None; // a line cut by SIGKILL
            };
            Some(Line {
                at: at.parse().ok()?,
                event: event.to_owned(),
                term: term.parse().ok()?,
                accepted: accepted == "1",
                pid: pid.parse().ok()?,
            })
        })
        .collect()
}

/// One backend for `secs` seconds; true if the checks hold.
pub async fn run(kind: Kind, secs: u64) -> bool {
    let label = kind.label();
    let run = run_id();
    let dir = std::env::temp_dir().join(format!("dblock-torture-election-{run}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ctl = direct(kind, &dir, &format!("dblock-torture-ctl-{run}")).await;
    // First: `sqlite::Lease::open` creates the SQLite file.
    let locks: Locks = ctl.locks().await;
    let db = ctl.pool(2).await;
    db.migrate().await;
    let name = format!("torture-elect-{run}");
    db.setup_registers(&run, std::slice::from_ref(&name)).await;
    let observer = locks.elect(&name, "observer").unwrap().ttl(TTL).unwrap();
    let bound = observer.observe_every() + READ;
    let mut rx = observer.observe().await.expect("observe");
    let seen: Arc<Mutex<Vec<Observed>>> = Arc::default();
    let follow = {
        let (seen, mut rx) = (seen.clone(), rx.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let term = rx.borrow_and_update().as_ref().map(|l| l.term);
                seen.lock().unwrap().push((mono_ns(), term));
            }
        })
    };

    let log = dir.join("events.txt");
    let quit = dir.join("quit");
    let mut workers: Vec<Child> = (0..WORKERS)
        .map(|_| spawn(kind, &ctl.url, &run, &name, &log, &quit))
        .collect();
    let end_at = tokio::time::Instant::now() + Duration::from_secs(secs);
    // Pauses, by pid: (SIGSTOP, SIGCONT) on the machine's monotonic clock.
    let mut paused: Vec<(i32, i64, i64)> = Vec::new();
    let mut kills = 0;
    sleep(Duration::from_millis(1500)).await;
    while tokio::time::Instant::now() + Duration::from_secs(2) < end_at {
        // Mostly the current leader, as the observer sees it: the faults
        // that matter hit a leader.
        let leader = rx
            .borrow()
            .as_ref()
            .and_then(|l| l.identity.strip_prefix("worker-")?.parse::<i32>().ok());
        let victim = workers
            .iter()
            .position(|w| w.id().map(|id| id as i32) == leader)
            .filter(|_| rand::rng().random_bool(0.8))
            .unwrap_or_else(|| rand::rng().random_range(0..workers.len()));
        let p = pid(&workers[victim]);
        if rand::rng().random_bool(0.5) {
            let _ = kill(p, Signal::SIGKILL);
            let _ = workers[victim].wait().await;
            workers[victim] = spawn(kind, &ctl.url, &run, &name, &log, &quit);
            kills += 1;
        } else {
            let from = mono_ns();
            let _ = kill(p, Signal::SIGSTOP);
            sleep(PAUSE).await;
            let _ = kill(p, Signal::SIGCONT);
            paused.push((p.as_raw(), from, mono_ns()));
        }
        sleep(Duration::from_millis(rand::rng().random_range(400..1000))).await;
    }
    tokio::time::sleep_until(end_at).await;
    std::fs::write(&quit, b"").unwrap();
    for mut w in workers {
        if tokio::time::timeout(Duration::from_secs(15), w.wait())
            .await
            .is_err()
        {
            let _ = w.kill().await;
        }
    }
    // Everyone resigned or died: the observer must come to "nobody leads"
    // within a ttl (a killed leader's lease) plus its bound.
    let converged = tokio::time::timeout(TTL * 2 + bound, rx.wait_for(|l| l.is_none()))
        .await
        .is_ok();
    follow.abort();

    let lines = parse(&std::fs::read_to_string(&log).unwrap_or_default());
    let mut ok = true;
    let mut fail = |why: String| {
        println!("election {label}: {why}");
        ok = false;
    };
    // Accepted wins in the order won: terms strictly increase.
    let mut wins: Vec<&Line> = lines
        .iter()
        .filter(|l| l.event == "won" && l.accepted)
        .collect();
    wins.sort_by_key(|l| l.at);
    for w in wins.windows(2) {
        if w[1].term <= w[0].term {
            fail(format!("term {} won after term {}", w[1].term, w[0].term));
        }
    }
    // Beliefs after a newer term had won: only from a paused process, and
    // always fenced off.
    let (mut stale, mut stale_fenced, mut lag, mut unexplained) = (0, 0, 0i64, 0);
    let won_at: BTreeMap<u64, i64> = wins.iter().map(|l| (l.term, l.at)).collect();
    let first_belief: BTreeMap<u64, i64> = lines
        .iter()
        .filter(|l| l.event == "won")
        .map(|l| (l.term, l.at))
        .collect();
    for l in lines
        .iter()
        .filter(|l| l.event == "won" || l.event == "tick")
    {
        let newer = won_at.range(l.term + 1..).any(|(_, &at)| at < l.at);
        if !newer {
            continue;
        }
        stale += 1;
        let since = first_belief.get(&l.term).copied().unwrap_or(l.at);
        // Paused during its term (or just before its win was logged), and
        // this belief came within the grace after the pause: a resumed
        // leader's deadline has passed, so its renewal marks it lost as
        // soon as it runs.
        let ttl = TTL.as_nanos() as i64;
        // The latest such pause: a process paused twice near one term is
        // judged by the pause this belief followed, not the earlier one.
        let pause = paused
            .iter()
            .filter(|&&(p, from, to)| p == l.pid && from <= l.at && to >= since - ttl)
            .max_by_key(|&&(_, _, to)| to);
        let was_paused = match pause {
            Some(&(_, _, to)) => {
                lag = lag.max(l.at - to);
                l.at <= to + GRACE.as_nanos() as i64
            }
            None => false,
        };
        if l.accepted {
            fail(format!(
                "a stale leader's write was accepted: {} of term {} by pid {}",
                l.event, l.term, l.pid
            ));
        } else {
            stale_fenced += 1;
        }
        if !was_paused {
            unexplained += 1;
        }
        if !was_paused && unexplained <= 3 {
            fail(format!(
                "pid {} believed it led (term {}, {}) after a newer term had won, and not \
                 within {GRACE:?} after a pause",
                l.pid, l.term, l.event
            ));
        }
    }
    if unexplained > 3 {
        fail(format!("{unexplained} such beliefs in all"));
    }
    // The observer: increasing terms, every long enough leadership seen.
    let seen = seen.lock().unwrap().clone();
    let seen_terms: Vec<u64> = seen.iter().filter_map(|s| s.1).collect();
    for w in seen_terms.windows(2) {
        if w[1] <= w[0] {
            fail(format!("the observer saw term {} after {}", w[1], w[0]));
        }
    }
    let seen_set: BTreeSet<u64> = seen_terms.iter().copied().collect();
    let mut last: BTreeMap<u64, i64> = BTreeMap::new();
    for l in &lines {
        let e = last.entry(l.term).or_insert(l.at);
        *e = (*e).max(l.at);
    }
    let mut unseen_long = 0;
    for w in &wins {
        let tenure = last.get(&w.term).copied().unwrap_or(w.at) - w.at;
        if tenure > bound.as_nanos() as i64 && !seen_set.contains(&w.term) {
            unseen_long += 1;
            fail(format!(
                "the observer never saw term {} although it led for {} ms",
                w.term,
                tenure / 1_000_000
            ));
        }
    }
    if !converged {
        fail(format!(
            "the observer did not come to \"nobody leads\" after the run: {:?}",
            *rx.borrow()
        ));
    }
    if wins.len() < 3 {
        fail(format!("only {} accepted wins", wins.len()));
    }
    println!(
        "election {label}: {} wins ({} terms seen by the observer, {unseen_long} long ones unseen), \
         {stale} stale beliefs ({stale_fenced} fenced; the latest {} ms after its pause), {} pauses, {kills} kills, observer converged: {converged}",
        wins.len(),
        seen_set.len(),
        lag / 1_000_000,
        paused.len()
    );
    db.cleanup(&run).await;
    if ok {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("election {label}: logs kept in {}", dir.display());
    }
    ok
}
