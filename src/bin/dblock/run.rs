//! `dblock run`: hold a lock while a command runs.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::time::Duration;

use dblock::{AcquireRequest, LockGuard, Locks, Wait};
use tokio::time::Instant;

use crate::args::RunArgs;
use crate::connect::{self, Session, Target};
use crate::exit::{self, CliResult, Exit, Failure};
use crate::guarded::{self, describe, Ended, Job, Signals};
use crate::{parse_duration, parse_name};

/// The longest `--kill-after`.
pub const MAX_KILL_AFTER: Duration = Duration::from_secs(3600);

/// What `dblock run` was asked to do, checked.
#[derive(Debug)]
struct Plan {
    name: String,
    ttl: Option<Duration>,
    wait: Wait,
    shared: bool,
    quiet: bool,
    /// The exit status when the lock is not acquired.
    conflict: u8,
    kill_after: Duration,
    command: Vec<OsString>,
}

impl Plan {
    /// Checks names, durations and numbers before anything touches the
    /// database (64).
    fn new(args: RunArgs) -> CliResult<Plan> {
        let name = parse_name(args.name)?;
        let ttl = args
            .ttl
            .as_deref()
            .map(|t| parse_duration("--ttl", t, Duration::ZERO, crate::MAX_DURATION))
            .transpose()?;
        let wait = match (&args.timeout, args.nonblock) {
            (_, true) => Wait::No,
            (Some(w), false) => Wait::For(parse_duration(
                "--timeout",
                w,
                Duration::ZERO,
                crate::MAX_DURATION,
            )?),
            (None, false) => Wait::Forever,
        };
        let kill_after = parse_duration(
            "--kill-after",
            &args.kill_after,
            Duration::ZERO,
            MAX_KILL_AFTER,
        )?;
        let conflict = match args.conflict_exit_code.as_deref() {
            None => exit::NOT_ACQUIRED,
            Some(text) => text.trim().parse::<u8>().map_err(|_| {
                Failure::usage(format!(
                    "invalid exit status {text:?} for --conflict-exit-code: give a whole \
                     number from 0 to 255"
                ))
            })?,
        };
        let command = match args.shell {
            Some(line) => vec!["sh".into(), "-c".into(), line],
            None => args.cmd,
        };
        // The library's own checks (ttl range, wait range), run up front.
        let mut request = AcquireRequest::new(name.as_str())?.with_wait(wait)?;
        if let Some(ttl) = ttl {
            request = request.with_ttl(ttl)?;
        }
        drop(request);
        Ok(Plan {
            name,
            ttl,
            wait,
            shared: args.shared,
            quiet: args.quiet,
            conflict,
            kill_after,
            command,
        })
    }
}

/// `dblock run`.
pub async fn run(target: Target, connect_timeout: Duration, args: RunArgs) -> CliResult<Exit> {
    let plan = Plan::new(args)?;
    if target.is_default() && std::io::stdin().is_terminal() {
        eprintln!(
            "{}",
            crate::message(&format!(
                "no --url: the lock lives in {}, which excludes only on this machine",
                target.shown
            ))
        );
    }
    let (quiet, conflict) = (plan.quiet, plan.conflict);
    run_plan(target, connect_timeout, plan)
        .await
        .map_err(|mut f| {
            if f.code == exit::NOT_ACQUIRED && f.signal.is_none() {
                f.code = conflict;
                if quiet {
                    f.message.clear();
                }
            }
            f
        })
}

async fn run_plan(target: Target, connect_timeout: Duration, plan: Plan) -> CliResult<Exit> {
    let mut signals = Signals::install()?;

    // Connecting and waiting for the lock both give way to a signal: there
    // is no command to forward it to yet, so dblock stops as if killed.
    let app = format!("dblock: {}", plan.name);
    let acquiring = async {
        let session = connect::open(target, &app, connect_timeout).await?;
        let locks = session.locks()?;
        let guard = acquire(&session, &locks, &plan).await?;
        Ok::<_, Failure>((session, locks, guard))
    };
    let (session, _locks, guard) = tokio::select! {
        r = acquiring => r?,
        sig = signals.ending() => {
            return Err(Failure::by_signal(
                sig,
                format!("{sig} received while waiting for lock {:?}; not running the command", plan.name),
            ));
        }
    };
    let Some(guard) = guard else {
        return Err(Failure::new(
            exit::NOT_ACQUIRED,
            format!("lock {:?} is held elsewhere (--nonblock)", plan.name),
        ));
    };

    let job = Job {
        name: plan.name.clone(),
        command: plan.command.clone(),
        env: vec![
            ("DBLOCK_NAME".to_owned(), plan.name.clone()),
            ("DBLOCK_TOKEN".to_owned(), guard.token().to_string()),
        ],
        ttl: plan.ttl.unwrap_or(dblock::DEFAULT_TTL),
        kill_after: plan.kill_after,
    };
    let status = guarded::run(&guard, &job, &mut signals).await;
    let outcome = finish(&plan.name, guard, status).await;
    drop(session);
    outcome
}

/// Takes the lock as the plan says; `None` if it is held and `--no-wait`.
async fn acquire(session: &Session, locks: &Locks, plan: &Plan) -> CliResult<Option<LockGuard>> {
    let deadline = match plan.wait {
        Wait::For(d) => Some(Instant::now() + d),
        _ => None,
    };
    session
        .with_schema(|| {
            let mut acquire = locks.acquire(plan.name.as_str());
            if let Some(ttl) = plan.ttl {
                acquire = acquire.ttl(ttl);
            }
            if plan.shared {
                acquire = acquire.shared();
            }
            // A retry after creating the schema waits only what is left.
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let wait = plan.wait;
            async move {
                match (wait, left) {
                    (Wait::No, _) => {
                        acquire
                            .wait(Duration::ZERO)
                            .await
                            .map(Some)
                            .or_else(|e| match e {
                                dblock::Error::Timeout { .. } => Ok(None),
                                e => Err(e),
                            })
                    }
                    (_, Some(left)) => acquire.wait(left).await.map(Some),
                    _ => acquire.await.map(Some),
                }
            }
        })
        .await
        .map_err(|f| {
            if f.code == exit::NOT_ACQUIRED {
                Failure::new(
                    exit::NOT_ACQUIRED,
                    format!("lock {:?} not acquired: {}", plan.name, f.message),
                )
            } else {
                f
            }
        })
}

/// Runs `job` while `guard` is held, with everything `dblock run` does
/// around it (the supervisor, forwarded signals, the loss grace), then
/// releases the lock and works out the exit status. `dblock cron` runs each
/// slot's command through this.
pub async fn under_guard(job: &Job, guard: LockGuard) -> CliResult<Exit> {
    let mut signals = Signals::install()?;
    let ended = guarded::run(&guard, job, &mut signals).await;
    finish(&job.name, guard, ended).await
}

/// Releases the lock `name` and works out dblock's exit status.
async fn finish(name: &str, guard: LockGuard, ended: Ended) -> CliResult<Exit> {
    match ended {
        Ended::Lost(status) => {
            drop(guard);
            Err(Failure::new(
                exit::LOST,
                format!(
                    "lock {:?} was lost while the command ran; the command was stopped ({})",
                    name,
                    describe(status)
                ),
            ))
        }
        Ended::Failed(message) => {
            release(name, guard).await.ok();
            Err(Failure::new(1, message))
        }
        Ended::Exited(status, foreground) => match release(name, guard).await {
            Ok(()) => Ok(Ended::exit(status, foreground)),
            Err(f) if f.code == exit::LOST => Err(Failure::new(
                exit::LOST,
                format!(
                    "{}; the command had finished ({}) but may have run without the lock",
                    f.message,
                    describe(status)
                ),
            )),
            Err(f) => {
                // The command ran under the lock; the lock ends with the
                // connection or its lease anyway. Report, keep its status.
                eprintln!("{}", crate::message(&f.message));
                Ok(Ended::exit(status, foreground))
            }
        },
    }
}

async fn release(name: &str, guard: LockGuard) -> CliResult<()> {
    guard
        .release()
        .await
        .map_err(|e| Failure::from(e).context(format_args!("releasing lock {name:?}")))
}
