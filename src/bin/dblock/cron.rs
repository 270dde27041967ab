//! `dblock cron`: run a command once per slot across the fleet.
//!
//! The schedule is the library's ([`dblock::schedule::Job`]); each slot this
//! host wins runs its command through [`run::under_guard`], the code
//! `dblock run` runs its command with (the supervisor that kills the command
//! if dblock dies, and the loss grace bounded by the lease's margin).

use std::ffi::OsString;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dblock::schedule::{Job, Missed, Overlap, Schedule, Slot, MAX_JOB_NAME_LEN};
use dblock::LockGuard;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::args::CronArgs;
use crate::connect::{self, Target};
use crate::exit::Exit;
use crate::exit::{CliResult, Failure};
use crate::guarded;
use crate::run;
use crate::{parse_duration, parse_name};

/// What `dblock cron` was asked to do, checked.
#[derive(Debug)]
struct Plan {
    name: String,
    schedule: Schedule,
    ttl: Option<Duration>,
    kill_after: Duration,
    overlap: Overlap,
    missed: Missed,
    skew: chrono::Duration,
    command: Vec<OsString>,
}

impl Plan {
    /// Checks everything before the database is touched: a bad schedule,
    /// name, duration or number is a usage error (64).
    fn new(args: CronArgs) -> CliResult<Plan> {
        let schedule = match (&args.every, &args.cron) {
            (Some(every), None) => {
                let d = humantime::parse_duration(every.trim()).map_err(|e| {
                    Failure::usage(format!(
                        "invalid --every {every:?}: {e} (write e.g. 30s, 15m, 1h)"
                    ))
                })?;
                Schedule::every(d)
                    .map_err(|e| Failure::usage(format!("invalid --every {every:?}: {e}")))?
            }
            (None, Some(expr)) => {
                Schedule::cron(expr).map_err(|e| Failure::usage(e.to_string()))?
            }
            _ => return Err(Failure::usage("give one of --every DUR or --cron EXPR")),
        };
        let name = parse_name(args.name)?;
        if name.len() > MAX_JOB_NAME_LEN {
            return Err(Failure::usage(format!(
                "invalid job name: at most {MAX_JOB_NAME_LEN} bytes of UTF-8; this one has {}",
                name.len()
            )));
        }
        let ttl = args
            .ttl
            .as_deref()
            .map(|t| parse_duration("--ttl", t, Duration::ZERO, crate::MAX_DURATION))
            .transpose()?;
        if let Some(ttl) = ttl {
            dblock::AcquireRequest::new(name.as_str())?.with_ttl(ttl)?;
        }
        let kill_after = parse_duration(
            "--kill-after",
            &args.kill_after,
            Duration::ZERO,
            run::MAX_KILL_AFTER,
        )?;
        let skew = match args.clock_skew.as_deref() {
            None => chrono::Duration::zero(),
            Some(text) => {
                let (sign, abs) = match text.strip_prefix('-') {
                    Some(rest) => (-1, rest),
                    None => (1, text),
                };
                let d = parse_duration("--clock-skew", abs, Duration::ZERO, crate::MAX_DURATION)?;
                chrono::Duration::from_std(d).map_err(|e| Failure::usage(e.to_string()))? * sign
            }
        };
        Ok(Plan {
            name,
            schedule,
            ttl,
            kill_after,
            overlap: if args.allow_overlap {
                Overlap::Allow
            } else {
                Overlap::Skip
            },
            missed: if args.catch_up {
                Missed::CatchUpOnce
            } else {
                Missed::Skip
            },
            skew,
            command: args.command,
        })
    }
}

/// Commands started for slots, so that dblock waits for them before it
/// exits (a run the scheduler cancelled, on loss, is still being stopped
/// by its supervisor).
type Started = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// `dblock cron`.
pub async fn cron(target: Target, connect_timeout: Duration, args: CronArgs) -> CliResult<u8> {
    let plan = Arc::new(Plan::new(args)?);
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Failure::new(1, format!("cannot handle SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Failure::new(1, format!("cannot handle SIGINT: {e}")))?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    tokio::pin!(stop);

    let app = format!("dblock cron: {}", plan.name);
    let connecting = async {
        let session = connect::open(target, &app, connect_timeout).await?;
        let locks = session.locks()?;
        // The schema on first use: reading a lease finds it missing.
        let probe = format!("schedule:{}:running", plan.name);
        session.with_schema(|| locks.inspect(&probe)).await?;
        Ok::<_, Failure>((session, locks))
    };
    let (session, locks) = tokio::select! {
        r = connecting => r?,
        _ = &mut stop => return Ok(0),
    };

    let started: Started = Arc::default();
    let job = {
        let (plan, started) = (plan.clone(), started.clone());
        Job::new(
            plan.name.clone(),
            plan.schedule.clone(),
            move |slot, guard| run_slot(plan.clone(), started.clone(), slot, guard),
        )
    }
    .overlap(plan.overlap)
    .missed(plan.missed)
    .clock_skew(plan.skew)
    .on_outcome(|outcome| eprintln!("{}", crate::message(&outcome.to_string())));
    let job = match plan.ttl {
        Some(ttl) => job.ttl(ttl),
        None => job,
    };
    eprintln!(
        "{}",
        crate::message(&format!(
            "cron {}: {} on {}",
            plan.name, plan.schedule, session.target.shown
        ))
    );
    let outcome = job.run_until(&locks, stop).await;
    let handles: Vec<_> = std::mem::take(&mut *started.lock().unwrap());
    for handle in handles {
        let _ = handle.await;
    }
    drop(session);
    outcome.map_err(Failure::from)?;
    Ok(0)
}

/// One slot won by this host: its command runs in a task of its own, so
/// that if the scheduler cancels the slot (the lease was lost) the command
/// is still stopped the way `dblock run` stops it rather than orphaned.
async fn run_slot(
    plan: Arc<Plan>,
    started: Started,
    slot: Slot,
    guard: LockGuard,
) -> Result<(), String> {
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(async move {
        let job = guarded::Job {
            name: guard.name().to_owned(),
            command: plan.command.clone(),
            env: vec![
                ("DBLOCK_NAME".to_owned(), guard.name().to_owned()),
                ("DBLOCK_TOKEN".to_owned(), guard.token().to_string()),
                ("DBLOCK_SLOT".to_owned(), slot.rfc3339()),
                ("DBLOCK_JOB".to_owned(), plan.name.clone()),
            ],
            ttl: plan.ttl.unwrap_or(dblock::DEFAULT_TTL),
            kill_after: plan.kill_after,
        };
        let _ = tx.send(run::under_guard(&job, guard).await);
    });
    {
        let mut started = started.lock().unwrap();
        started.retain(|h| !h.is_finished());
        started.push(handle);
    }
    match rx.await {
        Ok(Ok(Exit::Code(0))) => Ok(()),
        Ok(Ok(Exit::Code(code))) => Err(format!("the command exited with status {code}")),
        Ok(Ok(Exit::Signal(sig) | Exit::GroupSignal(sig))) => {
            Err(format!("the command was killed by {sig}"))
        }
        Ok(Err(failure)) => Err(failure.message),
        Err(_) => Err("the command's supervisor ended unexpectedly".into()),
    }
}
