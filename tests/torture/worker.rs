//! A worker process: contends for the run's names until its deadline, doing
//! a read-modify-write on both registers inside each critical section, and
//! logs every step.

use std::path::PathBuf;
use std::time::Duration;

use dblock::{Error, LockGuard};
use rand::seq::IndexedRandom;
use rand::Rng;
use tokio::time::{sleep, timeout};

use crate::events::{mono_ns, Log, Type};
use crate::target::{Db, Endpoint, Kind, Write};

/// Everything a worker is told, through environment variables.
#[derive(Debug, Clone)]
pub struct Config {
    pub endpoint: Endpoint,
    pub run: String,
    pub names: Vec<String>,
    pub ttl: Duration,
    /// CLOCK_MONOTONIC nanoseconds at which to stop taking locks.
    pub end_ns: i64,
    pub log: PathBuf,
    /// Fenced writes are conditional on the token (off: the negative control).
    pub fencing: bool,
    /// The critical section is abandoned as soon as `lost()` fires (off: a
    /// naive holder, the negative control).
    pub watch_lost: bool,
    /// Above 1: the semaphore mode, where each name admits this many
    /// holders (`max_holders`) and the critical section is
    /// [`permit_section`]: fenced writes through the name's window of this
    /// many tokens (the unguarded register, made for one holder at a time,
    /// is left alone).
    pub permits: u32,
    /// The shared mode: two acquisitions in three are readers
    /// (`.shared()`), which only hold the name; the others are writers, which
    /// run the critical section with its registers.
    pub shared: bool,
    /// This process's id in the logs, `s<slot>g<generation>`.
    pub wid: String,
    /// Created when the worker is done; the worker then waits for `quit`.
    pub done: PathBuf,
    pub quit: PathBuf,
}

/// The note of a reader's `acquire` in the logs.
pub const SHARED: &str = "shared";

/// How long a worker waits for a lock before it gives up on that attempt.
pub const WAIT: Duration = Duration::from_secs(3);

const ENV: &str = "DBLOCK_TORTURE_WORKER";

/// Set (by hand, for the semaphore phase) to make the permit holders ignore
/// their lost signal and the fence's refusals, as naive holders: the
/// semaphore checks must then fail, which shows they can.
pub const IGNORE_LOSS: &str = "DBLOCK_TORTURE_SEMAPHORE_IGNORE_LOSS";

fn ignore_loss() -> bool {
    std::env::var_os(IGNORE_LOSS).is_some_and(|v| v == "1")
}

/// Ticks of a permit's section: each a fenced write, [`TICK`] apart.
const PERMIT_TICKS: std::ops::Range<u32> = 5..60;
const TICK: Duration = Duration::from_millis(20);

impl Config {
    pub fn to_env(&self) -> Vec<(String, String)> {
        let v = |k: &str, v: String| (format!("{ENV}_{k}"), v);
        vec![
            (ENV.to_owned(), "1".to_owned()),
            v("KIND", self.endpoint.kind.label().to_owned()),
            v("URL", self.endpoint.url.clone()),
            v("APP", self.endpoint.app.clone()),
            v("RUN", self.run.clone()),
            v("NAMES", self.names.join(",")),
            v("TTL_MS", self.ttl.as_millis().to_string()),
            v("END_NS", self.end_ns.to_string()),
            v("LOG", self.log.display().to_string()),
            v("FENCING", u8::from(self.fencing).to_string()),
            v("WATCH", u8::from(self.watch_lost).to_string()),
            v("PERMITS", self.permits.to_string()),
            v("SHARED", u8::from(self.shared).to_string()),
            v("WID", self.wid.clone()),
            v("DONE", self.done.display().to_string()),
            v("QUIT", self.quit.display().to_string()),
        ]
    }

    /// The worker's configuration, if this process is a worker.
    pub fn from_env() -> Option<Config> {
        std::env::var_os(ENV)?;
        let get = |k: &str| std::env::var(format!("{ENV}_{k}")).expect(k);
        Some(Config {
            endpoint: Endpoint {
                kind: Kind::parse(&get("KIND")).expect("kind"),
                url: get("URL"),
                app: get("APP"),
            },
            run: get("RUN"),
            names: get("NAMES").split(',').map(str::to_owned).collect(),
            ttl: Duration::from_millis(get("TTL_MS").parse().unwrap()),
            end_ns: get("END_NS").parse().unwrap(),
            log: get("LOG").into(),
            fencing: get("FENCING") == "1",
            watch_lost: get("WATCH") == "1",
            permits: get("PERMITS").parse().unwrap(),
            shared: get("SHARED") == "1",
            wid: get("WID"),
            done: get("DONE").into(),
            quit: get("QUIT").into(),
        })
    }
}

/// The worker's main: runs, then waits to be told to quit (so the
/// controller can inspect its idle sessions), then exits.
pub fn main(cfg: Config) -> ! {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(&cfg));
    std::process::exit(0)
}

enum Section {
    Done,
    /// The fence refused the entry write: someone newer holds the name.
    Fenced,
    Lost,
    Error,
}

async fn run(cfg: &Config) {
    let mut log = Log::create(&cfg.log);
    log.event(
        Type::Ok,
        "start",
        "-",
        None,
        Some(std::process::id() as i64),
        &cfg.wid,
    );
    let locks = cfg.endpoint.locks().await;
    let db = cfg.endpoint.pool(2).await;
    while mono_ns() < cfg.end_ns {
        let name = cfg.names.choose(&mut rand::rng()).unwrap().clone();
        log.event(Type::Invoke, "acquire", &name, None, None, "");
        let reader = cfg.shared && rand::rng().random_range(0..3) > 0;
        let mut acquire = locks.acquire(&name).wait(WAIT).max_holders(cfg.permits);
        if cfg.endpoint.kind.lease() {
            // Advisory locks have no lease length (and refuse one).
            acquire = acquire.ttl(cfg.ttl);
        }
        if reader {
            acquire = acquire.shared();
        }
        let attempt = timeout(WAIT + Duration::from_secs(10), acquire).await;
        let guard = match attempt {
            Ok(Ok(g)) => g,
            Ok(Err(Error::Timeout { .. })) => {
                log.event(Type::Fail, "acquire", &name, None, None, "timeout");
                continue;
            }
            Ok(Err(e)) => {
                log.event(Type::Unknown, "acquire", &name, None, None, &e.to_string());
                sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(_) => {
                log.event(Type::Unknown, "acquire", &name, None, None, "hung");
                continue;
            }
        };
        let token = guard.token();
        let mode = if reader { SHARED } else { "" };
        log.event(Type::Ok, "acquire", &name, Some(token), None, mode);
        let heed = cfg.watch_lost && !(cfg.permits > 1 && ignore_loss());
        let outcome = if reader {
            // Readers make no fenced writes: they hold the name a moment,
            // watching their loss.
            let hold = Duration::from_millis(rand::rng().random_range(0..60));
            tokio::select! {
                biased;
                _ = guard.lost() => Section::Lost,
                _ = sleep(hold) => Section::Done,
            }
        } else if cfg.permits > 1 && heed {
            tokio::select! {
                biased;
                _ = guard.lost() => Section::Lost,
                s = permit_section(cfg, &db, &mut log, &name, token, true) => s,
            }
        } else if cfg.permits > 1 {
            permit_section(cfg, &db, &mut log, &name, token, false).await
        } else if cfg.watch_lost {
            tokio::select! {
                biased;
                _ = guard.lost() => Section::Lost,
                s = critical(cfg, &db, &mut log, &name, token) => s,
            }
        } else {
            critical(cfg, &db, &mut log, &name, token).await
        };
        if heed && (matches!(outcome, Section::Lost) || guard.is_lost()) {
            let reason = guard.lost_detail().unwrap_or_default();
            log.event(Type::Ok, "lost", &name, Some(token), None, &reason);
        }
        if matches!(outcome, Section::Fenced | Section::Error) {
            // Nothing to add: the writes' outcomes are logged.
        }
        release(cfg, &mut log, guard).await;
        sleep(Duration::from_millis(rand::rng().random_range(0..15))).await;
    }
    log.event(Type::Ok, "done", "-", None, None, "");
    drop(locks);
    let _ = std::fs::write(&cfg.done, b"");
    // Sessions stay open until the controller has checked them.
    let give_up = mono_ns() + 300_000_000_000;
    while !cfg.quit.exists() && mono_ns() < give_up {
        sleep(Duration::from_millis(50)).await;
    }
}

async fn release(cfg: &Config, log: &mut Log, guard: LockGuard) {
    let name = guard.name().to_owned();
    let token = guard.token();
    log.event(Type::Invoke, "release", &name, Some(token), None, "");
    let bound = (cfg.ttl * 10).max(Duration::from_secs(5));
    match timeout(bound, guard.release()).await {
        Ok(Ok(())) => log.event(Type::Ok, "release", &name, Some(token), None, ""),
        Ok(Err(Error::Lost { detail, .. })) => log.event(
            Type::Fail,
            "release",
            &name,
            Some(token),
            None,
            &format!("lost: {detail}"),
        ),
        Ok(Err(e)) => log.event(
            Type::Unknown,
            "release",
            &name,
            Some(token),
            None,
            &e.to_string(),
        ),
        Err(_) => log.event(Type::Unknown, "release", &name, Some(token), None, "hung"),
    }
}

/// A permit's section: an entry write through the name's window, then
/// ticks, each a write that the window admits only while this permit is
/// among the `n` newest (see `target::Window`). The ticks are counted, not
/// timed: a holder paused mid-section goes on ticking when it resumes,
/// unless it `heed`s its loss (the caller drops this future when `lost()`
/// fires) and the fence's refusals.
async fn permit_section(
    cfg: &Config,
    db: &Db,
    log: &mut Log,
    name: &str,
    token: u64,
    heed: bool,
) -> Section {
    match fenced(cfg, db, log, name, token, Write::Entry).await {
        Some(true) => {}
        Some(false) if heed => return Section::Fenced,
        Some(false) => {}
        None => return Section::Error,
    }
    for _ in 0..rand::rng().random_range(PERMIT_TICKS) {
        sleep(TICK).await;
        match fenced(cfg, db, log, name, token, Write::Exit).await {
            Some(true) => {}
            Some(false) if heed => return Section::Fenced,
            Some(false) => {}
            None => return Section::Error,
        }
    }
    Section::Done
}

/// The critical section: a fenced write, an unguarded read-sleep-write, a
/// pause, and a second fenced write.
async fn critical(cfg: &Config, db: &Db, log: &mut Log, name: &str, token: u64) -> Section {
    match fenced(cfg, db, log, name, token, Write::Entry).await {
        Some(true) => {}
        Some(false) => return Section::Fenced,
        None => return Section::Error,
    }
    log.event(Type::Invoke, "uread", name, Some(token), None, "");
    let v = match db.uread(&cfg.run, name).await {
        Ok(v) => v,
        Err(e) => {
            log.event(
                Type::Unknown,
                "uread",
                name,
                Some(token),
                None,
                &e.to_string(),
            );
            return Section::Error;
        }
    };
    log.event(Type::Ok, "uread", name, Some(token), Some(v), "");
    sleep(Duration::from_millis(rand::rng().random_range(0..25))).await;
    log.event(Type::Invoke, "uwrite", name, Some(token), Some(v + 1), "");
    match db.uwrite(&cfg.run, name, v + 1).await {
        Ok(()) => log.event(Type::Ok, "uwrite", name, Some(token), Some(v + 1), ""),
        Err(e) => {
            log.event(
                Type::Unknown,
                "uwrite",
                name,
                Some(token),
                Some(v + 1),
                &e.to_string(),
            );
            return Section::Error;
        }
    }
    sleep(Duration::from_millis(rand::rng().random_range(0..25))).await;
    match fenced(cfg, db, log, name, token, Write::Exit).await {
        Some(true) => Section::Done,
        Some(false) => Section::Fenced,
        None => Section::Error,
    }
}

async fn fenced(
    cfg: &Config,
    db: &Db,
    log: &mut Log,
    name: &str,
    token: u64,
    write: Write,
) -> Option<bool> {
    let op = format!("fenced-{}", write.as_str());
    log.event(Type::Invoke, &op, name, Some(token), None, "");
    let window = (cfg.permits > 1).then_some(cfg.permits);
    match db
        .fenced(&cfg.run, name, token, write, &cfg.wid, cfg.fencing, window)
        .await
    {
        Ok(true) => {
            log.event(Type::Ok, &op, name, Some(token), None, "accepted");
            Some(true)
        }
        Ok(false) => {
            log.event(Type::Fail, &op, name, Some(token), None, "rejected");
            Some(false)
        }
        Err(e) => {
            log.event(Type::Unknown, &op, name, Some(token), None, &e.to_string());
            None
        }
    }
}
