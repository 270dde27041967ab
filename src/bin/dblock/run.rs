//! `dblock run`: hold a lock while a command runs.

use std::ffi::OsString;
use std::future::poll_fn;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::task::Poll;
use std::time::Duration;

use dblock::{AcquireRequest, LockGuard, Locks, Wait};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{sleep_until, Instant};

use crate::args::RunArgs;
use crate::connect::{self, Session, Target};
use crate::exit::{self, CliResult, Failure};
use crate::{parse_duration, parse_name};

/// What `dblock run` was asked to do, checked.
#[derive(Debug)]
struct Plan {
    name: String,
    ttl: Option<Duration>,
    wait: Wait,
    shared: bool,
    quiet: bool,
    kill_after: Duration,
    command: Vec<OsString>,
}

impl Plan {
    /// Checks names and durations before anything touches the database (65).
    fn new(args: RunArgs) -> CliResult<Plan> {
        let name = parse_name(args.name)?;
        let ttl = args
            .ttl
            .as_deref()
            .map(|t| parse_duration("--ttl", t))
            .transpose()?;
        let wait = match (&args.wait, args.no_wait) {
            (_, true) => Wait::No,
            (Some(w), false) => Wait::For(parse_duration("--wait", w)?),
            (None, false) => Wait::Forever,
        };
        let kill_after = parse_duration("--kill-after", &args.kill_after)?;
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
            kill_after,
            command: args.command,
        })
    }
}

/// A command to run under a held lock: what `supervise` and `finish` need.
pub struct Guarded<'a> {
    /// The lock's name (`DBLOCK_NAME`, and messages).
    pub name: &'a str,
    /// The command and its arguments.
    pub command: &'a [OsString],
    /// More environment for the command, besides `DBLOCK_NAME` and
    /// `DBLOCK_TOKEN`.
    pub env: &'a [(&'a str, String)],
    /// After the lock is lost, how long the command has between SIGTERM and
    /// SIGKILL.
    pub kill_after: Duration,
}

impl Plan {
    fn guarded(&self) -> Guarded<'_> {
        Guarded {
            name: &self.name,
            command: &self.command,
            env: &[],
            kill_after: self.kill_after,
        }
    }
}

/// Runs a command while `guard` is held, with everything `dblock run` does
/// around it (its own process group, signals forwarded, stopped if the lock
/// is lost), then releases the lock. Returns the command's exit status, or
/// the failure `dblock run` would exit with. `dblock cron` runs each slot's
/// command through this.
pub async fn under_guard(what: &Guarded<'_>, guard: LockGuard) -> CliResult<u8> {
    let mut signals = Signals::install()?;
    let status = supervise(what, &guard, &mut signals).await;
    finish(what, guard, status).await
}

/// The signals forwarded to the command (and that end a wait for the lock).
struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> CliResult<Signals> {
        let kinds = [
            (Signal::SIGINT, SignalKind::interrupt()),
            (Signal::SIGTERM, SignalKind::terminate()),
            (Signal::SIGHUP, SignalKind::hangup()),
            (Signal::SIGQUIT, SignalKind::quit()),
            (Signal::SIGUSR1, SignalKind::user_defined1()),
            (Signal::SIGUSR2, SignalKind::user_defined2()),
        ];
        let mut streams = Vec::with_capacity(kinds.len());
        for (sig, kind) in kinds {
            let stream =
                signal(kind).map_err(|e| Failure::new(1, format!("cannot handle {sig}: {e}")))?;
            streams.push((sig, stream));
        }
        Ok(Signals { streams })
    }

    /// The next signal received.
    async fn recv(&mut self) -> Signal {
        poll_fn(|cx| {
            for (sig, stream) in &mut self.streams {
                if stream.poll_recv(cx).is_ready() {
                    return Poll::Ready(*sig);
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// The exit status for a process ended by `sig`.
fn signal_status(sig: Signal) -> u8 {
    128u8.saturating_add(sig as i32 as u8)
}

/// `dblock run`.
pub async fn run(target: Target, connect_timeout: Duration, args: RunArgs) -> CliResult<u8> {
    let plan = Plan::new(args)?;
    let quiet = plan.quiet;
    run_plan(target, connect_timeout, plan)
        .await
        .map_err(|mut f| {
            if quiet && f.code == exit::NOT_ACQUIRED {
                f.message.clear();
            }
            f
        })
}

async fn run_plan(target: Target, connect_timeout: Duration, plan: Plan) -> CliResult<u8> {
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
        sig = signals.recv() => {
            return Err(Failure::new(
                signal_status(sig),
                format!("{sig} received while waiting for lock {:?}; not running the command", plan.name),
            ));
        }
    };
    let Some(guard) = guard else {
        return Err(Failure::new(
            exit::NOT_ACQUIRED,
            format!("lock {:?} is held elsewhere (--no-wait)", plan.name),
        ));
    };

    let status = supervise(&plan.guarded(), &guard, &mut signals).await;
    let outcome = finish(&plan.guarded(), guard, status).await;
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

/// How the command's run ended.
enum Ended {
    /// It exited on its own (or of a forwarded signal).
    Exited(ExitStatus),
    /// The lock was lost and the command was stopped.
    Lost(ExitStatus),
    /// It could not be started.
    NotStarted(u8, String),
    /// Waiting for it failed.
    WaitFailed(String),
}

/// Runs the command under the lock, forwarding signals and stopping it if
/// the lock is lost.
async fn supervise(plan: &Guarded<'_>, guard: &LockGuard, signals: &mut Signals) -> Ended {
    let (program, args) = plan.command.split_first().expect("clap requires CMD");
    let mut command = Command::new(program);
    command
        .args(args)
        .env("DBLOCK_NAME", plan.name)
        .env("DBLOCK_TOKEN", guard.token().to_string())
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        // Its own process group: forwarded signals and the stop on loss
        // reach everything it started, and a terminal's ^C reaches dblock
        // only (which forwards it once).
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => exit::NOT_FOUND,
                _ => exit::CANNOT_EXECUTE,
            };
            let shown = program.to_string_lossy();
            return Ended::NotStarted(code, format!("cannot run {shown:?}: {e}"));
        }
    };
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let send = |sig: Signal| {
        if let Some(group) = group {
            // ESRCH: everything in the group has exited already.
            let _ = killpg(group, sig);
        }
    };

    let mut lost = false;
    let mut kill_at: Option<Instant> = None;
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(status) if lost => Ended::Lost(status),
                    Ok(status) => Ended::Exited(status),
                    Err(e) => Ended::WaitFailed(format!("waiting for the command failed: {e}")),
                };
            }
            _ = guard.lost(), if !lost => {
                lost = true;
                let reason = guard.lost_reason().unwrap_or_else(|| "unknown reason".into());
                eprintln!(
                    "{}",
                    crate::message(&format!(
                        "lock {:?} was lost ({reason}); stopping the command (SIGTERM, SIGKILL after {})",
                        plan.name,
                        humantime::format_duration(plan.kill_after),
                    ))
                );
                send(Signal::SIGTERM);
                kill_at = Some(Instant::now() + plan.kill_after);
            }
            _ = sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                kill_at = None;
                eprintln!("{}", crate::message("the command did not stop after SIGTERM; sending SIGKILL"));
                send(Signal::SIGKILL);
            }
            sig = signals.recv() => send(sig),
        }
    }
}

/// The exit status of a command that ran.
fn status_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        _ => 1,
    }
}

/// Releases the lock and works out dblock's exit status.
async fn finish(plan: &Guarded<'_>, guard: LockGuard, ended: Ended) -> CliResult<u8> {
    match ended {
        Ended::Lost(status) => {
            drop(guard);
            Err(Failure::new(
                exit::LOST,
                format!(
                    "lock {:?} was lost while the command ran; the command was stopped ({})",
                    plan.name,
                    describe(status)
                ),
            ))
        }
        Ended::NotStarted(code, message) => {
            release(plan, guard).await.ok();
            Err(Failure::new(code, message))
        }
        Ended::WaitFailed(message) => {
            drop(guard);
            Err(Failure::new(1, message))
        }
        Ended::Exited(status) => match release(plan, guard).await {
            Ok(()) => Ok(status_code(status)),
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
                Ok(status_code(status))
            }
        },
    }
}

async fn release(plan: &Guarded<'_>, guard: LockGuard) -> CliResult<()> {
    guard
        .release()
        .await
        .map_err(|e| Failure::from(e).context(format_args!("releasing lock {:?}", plan.name)))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "ended".to_owned(),
    }
}
