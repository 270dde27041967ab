//! Running a command under a held lock, with every safety `dblock run`
//! promises; reusable by any subcommand that runs a command under a guard.
//!
//! - The command runs under the supervisor (see [`crate::supervisor`]) in
//!   a process group of its own, which dies with dblock.
//! - Signals sent to dblock are forwarded to the group.
//! - When the lock is lost, the group gets SIGTERM, then SIGKILL within
//!   what is left of the lease's safety margin (at once for advisory locks).
//! - When the command ends, whatever it left in its group is killed, so
//!   nothing of it runs after the lock is released.
//! - In the foreground of a terminal, the command gets the terminal, and a
//!   stop (^Z) of the command stops dblock, for the shell's job control.

use std::ffi::OsString;
use std::future::{poll_fn, Future};
use std::io::IsTerminal;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::ExitStatus;
use std::task::Poll;
use std::time::Duration;

use dblock::LockGuard;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::{killpg, pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::unistd::{getpgrp, pipe2, tcgetpgrp, tcsetpgrp, Pid};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{sleep_until, Instant};

use crate::exit::{self, CliResult, Failure};
use crate::supervisor;

/// The signals dblock forwards to the command's group. All but the last
/// two also end a wait for the lock (see [`Signals::ending`]).
const FORWARDED: [Signal; 8] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
];

/// The signals dblock handles, as streams.
pub struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Installs dblock's handlers for the forwarded signals.
    pub fn install() -> CliResult<Signals> {
        let mut streams = Vec::with_capacity(FORWARDED.len());
        for sig in FORWARDED {
            let stream = signal(SignalKind::from_raw(sig as i32))
                .map_err(|e| Failure::new(1, format!("cannot handle {sig}: {e}")))?;
            streams.push((sig, stream));
        }
        Ok(Signals { streams })
    }

    /// The next signal received.
    ///
    /// # Cancel safety
    /// Cancel safe: a signal is taken from its stream only when returned.
    pub async fn recv(&mut self) -> Signal {
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

    /// The next signal that ends dblock when no command runs yet: all but
    /// SIGWINCH and SIGCONT, which are dropped meanwhile (they end nothing
    /// by default).
    ///
    /// # Cancel safety
    /// Cancel safe, as [`Signals::recv`].
    pub async fn ending(&mut self) -> Signal {
        loop {
            let sig = self.recv().await;
            if !matches!(sig, Signal::SIGWINCH | Signal::SIGCONT) {
                return sig;
            }
        }
    }
}

/// Whether `sig` ends a process by default and is one dblock passes on by
/// ending the same way.
fn ends(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGINT | Signal::SIGTERM | Signal::SIGHUP | Signal::SIGQUIT
    )
}

/// What to run under the guard.
#[derive(Debug)]
pub struct Job {
    /// The lock's name, for messages.
    pub name: String,
    /// The program and its arguments.
    pub command: Vec<OsString>,
    /// Added to the command's environment.
    pub env: Vec<(String, String)>,
    /// The lease length the guard renews with (ignored for advisory locks).
    pub ttl: Duration,
    /// The most time between SIGTERM and SIGKILL after a loss.
    pub kill_after: Duration,
}

impl Job {
    /// How long the command gets between SIGTERM and SIGKILL once the lock
    /// is lost: `kill_after`, cut to half of the lease's safety margin (a
    /// fifth of the ttl), which is what is left of the lease when its loss
    /// is declared at the local deadline; nothing for a lock that lives as
    /// long as its connection (it is free as soon as its loss is seen).
    pub fn grace(&self, guard: &LockGuard) -> Duration {
        if guard.expires_at().is_none() {
            return Duration::ZERO;
        }
        self.kill_after.min(self.ttl / 10)
    }
}

/// How the command's run ended.
#[derive(Debug)]
pub enum Ended {
    /// It ended while the lock was held (the supervisor mirrors its exit
    /// status or the signal that killed it); `true` if it had the
    /// terminal's foreground.
    Exited(ExitStatus, bool),
    /// The lock was lost and the command was stopped.
    Lost(ExitStatus),
    /// It could not be started, or waiting for it failed (the group was
    /// killed).
    Failed(String),
}

impl Ended {
    /// The exit for a command that ended while the lock was held: its
    /// status, or its signal re-raised (for the signals that end dblock),
    /// on dblock's whole group for a keyboard signal that the terminal sent
    /// to the command's group only (`foreground`).
    pub fn exit(status: ExitStatus, foreground: bool) -> exit::Exit {
        match (status.code(), status.signal()) {
            (Some(code), _) => exit::Exit::Code(code as u8),
            (None, Some(n)) => match Signal::try_from(n) {
                Ok(sig @ (Signal::SIGINT | Signal::SIGQUIT)) if foreground => {
                    exit::Exit::GroupSignal(sig)
                }
                Ok(sig) if ends(sig) => exit::Exit::Signal(sig),
                _ => exit::Exit::Code(128u8.saturating_add(n as u8)),
            },
            _ => exit::Exit::Code(1),
        }
    }
}

/// The supervisor and the process group it leads.
struct Supervised {
    child: Child,
    group: Pid,
    /// The write end of the pipe the supervisor watches: dropping it (or
    /// dblock's death) kills the group.
    _watch: OwnedFd,
}

impl Supervised {
    fn signal(&self, sig: Signal) {
        // ESRCH: everything in the group has exited already.
        let _ = killpg(self.group, sig);
    }
}

/// The terminal dblock runs in the foreground of, if any: stdin's.
fn foreground_terminal() -> Option<std::io::Stdin> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return None;
    }
    match tcgetpgrp(&stdin) {
        Ok(pgrp) if pgrp == getpgrp() => Some(stdin),
        _ => None,
    }
}

/// Gives the terminal's foreground to `pgrp`; SIGTTOU, which a background
/// process doing so would get, is blocked meanwhile.
fn give_terminal(tty: &std::io::Stdin, pgrp: Pid) {
    let mut ttou = SigSet::empty();
    ttou.add(Signal::SIGTTOU);
    let mut old = SigSet::empty();
    if pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&ttou), Some(&mut old)).is_ok() {
        let _ = tcsetpgrp(tty, pgrp);
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
}

/// Starts the supervisor, which starts the command.
fn spawn(job: &Job, foreground: bool) -> std::io::Result<Supervised> {
    // The write end stays close-on-exec: only dblock holds it. The read end
    // is inherited by the supervisor, which reopens it and closes it to the
    // command.
    let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
    fcntl(read.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    let mut command = Command::new("/proc/self/exe");
    command
        .arg(supervisor::SUBCOMMAND)
        .arg("--watch-fd")
        .arg(read.as_raw_fd().to_string());
    if foreground {
        command.arg("--foreground");
    }
    command
        .arg("--")
        .args(&job.command)
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .process_group(0);
    let child = command.spawn()?;
    drop(read);
    let id = child.id().expect("a child just spawned has an id");
    Ok(Supervised {
        child,
        group: Pid::from_raw(id as i32),
        _watch: write,
    })
}

/// Runs the job while `guard` holds its lock, forwarding `signals`, and
/// stops it if the lock is lost. When this returns, nothing of the job's
/// process group runs any more.
///
/// # Cancel safety
/// Not cancel safe in the sense that dropping it ends the job: the pipe the
/// supervisor watches is closed and the command's group is killed.
pub async fn run(guard: &LockGuard, job: &Job, signals: &mut Signals) -> Ended {
    let tty = foreground_terminal();
    let mut sup = match spawn(job, tty.is_some()) {
        Ok(sup) => sup,
        Err(e) => return Ended::Failed(format!("cannot start dblock's supervisor: {e}")),
    };
    let grace = job.grace(guard);
    let mut lost = false;
    let mut kill_at: Option<Instant> = None;
    type Check<'a> = Pin<Box<dyn Future<Output = dblock::Result<()>> + Send + 'a>>;
    let mut resuming: Option<Check<'_>> = None;
    let status = loop {
        tokio::select! {
            status = sup.child.wait() => break status,
            _ = guard.lost(), if !lost => {
                lost = true;
                resuming = None;
                let reason = guard.lost_detail().unwrap_or_else(|| "unknown reason".into());
                eprintln!(
                    "{}",
                    crate::message(&format!(
                        "lock {:?} was lost ({reason}); stopping the command (SIGTERM, SIGKILL after {})",
                        job.name,
                        humantime::format_duration(grace),
                    ))
                );
                sup.signal(Signal::SIGTERM);
                // A stopped command must run to see SIGTERM.
                sup.signal(Signal::SIGCONT);
                kill_at = Some(Instant::now() + grace);
            }
            _ = sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                kill_at = None;
                if !grace.is_zero() {
                    eprintln!("{}", crate::message("the command did not stop after SIGTERM; sending SIGKILL"));
                }
                sup.signal(Signal::SIGKILL);
            }
            r = async { resuming.as_mut().expect("checked").await }, if resuming.is_some() => {
                resuming = None;
                // Continue the command only if the lock is still held; on
                // a loss, the branch above stops it.
                if !matches!(r, Err(dblock::Error::Lost { .. })) && !guard.is_lost() {
                    if let Some(tty) = &tty {
                        give_terminal(tty, sup.group);
                    }
                    sup.signal(Signal::SIGCONT);
                }
            }
            sig = signals.recv() => match sig {
                // dblock was resumed (the shell's fg/bg after a stop):
                // check the lock before the command goes on.
                Signal::SIGCONT if !lost => {
                    resuming = Some(Box::pin(async {
                        guard.extend(job.ttl).await.map(drop)
                    }));
                }
                sig => sup.signal(sig),
            },
        }
    };
    // Nothing the command started in its group outlives it.
    sup.signal(Signal::SIGKILL);
    if let Some(tty) = &tty {
        give_terminal(tty, getpgrp());
    }
    match status {
        Ok(status) if lost => Ended::Lost(status),
        Ok(status) => Ended::Exited(status, tty.is_some()),
        Err(e) => Ended::Failed(format!("waiting for the command failed: {e}")),
    }
}

/// Describes how the command ended, for messages.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "ended".to_owned(),
    }
}
