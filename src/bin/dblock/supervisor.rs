//! The supervisor: a hidden helper mode of the `dblock` binary that is the
//! command's parent.
//!
//! `dblock run` does not start the command itself. It starts this binary
//! again (`dblock __supervise`) as the leader of a new process group, and
//! the supervisor starts the command inside that group. The supervisor
//! inherits the read end of a pipe whose only write end dblock holds. When
//! dblock ends, however it ends (SIGKILL, the OOM killer, a panic), the
//! kernel closes that write end, the supervisor reads end-of-file and kills
//! its whole process group (the command, whatever the command started in
//! it, and itself) with SIGKILL. Because the supervisor is in place before
//! the command exists, there is no moment at which dblock could die with a
//! command running that nothing watches.
//!
//! The supervisor ends the way the command ended: with its exit status, or
//! killed by the same signal, so dblock sees the command's outcome. If the
//! supervisor itself is killed, dblock sees that and kills the group.
//!
//! Signals dblock forwards go to the whole group; the supervisor catches
//! them (so they do not end it) and the command gets them. When the command
//! stops (^Z, SIGTTIN), the supervisor stops dblock with SIGTSTP so that the
//! calling shell sees the job stopped; dblock resumes the group on SIGCONT.

use std::ffi::OsString;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::process::{Command, ExitCode};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, killpg, pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpgrp, getppid, tcsetpgrp, Pid};

use crate::args::SuperviseArgs;
use crate::exit;

/// The name of the hidden subcommand.
pub const SUBCOMMAND: &str = "__supervise";

/// Signals the supervisor catches (and so survives) because dblock forwards
/// them to the whole group, or the terminal sends them to it. A caught
/// signal is reset to its default in the command when it is executed.
const CAUGHT: [i32; 9] = [
    nix::libc::SIGINT,
    nix::libc::SIGTERM,
    nix::libc::SIGHUP,
    nix::libc::SIGQUIT,
    nix::libc::SIGUSR1,
    nix::libc::SIGUSR2,
    nix::libc::SIGTSTP,
    nix::libc::SIGTTIN,
    nix::libc::SIGTTOU,
];

fn say(text: &str) {
    eprintln!("{}", crate::message(text));
}

/// Kills the supervisor's process group: the command, all it started in
/// the group, and the supervisor.
fn kill_group() -> ! {
    let _ = killpg(getpgrp(), Signal::SIGKILL);
    // Not reached: SIGKILL reached this process too.
    std::process::exit(i32::from(exit::LOST));
}

/// Runs the supervisor. Returns only the exit status for a command that
/// exited; for one killed by a signal, it dies by the same signal.
pub fn main(args: SuperviseArgs) -> ExitCode {
    // dblock, while it lives (if it is already gone, the watch below kills
    // everything at once).
    let dblock = getppid();
    // 1. Watch dblock before anything else exists. The inherited pipe end
    //    is opened anew through /proc (which needs no unsafe code), and
    //    the inherited descriptor is kept from the command.
    let watch = File::open(format!("/proc/self/fd/{}", args.watch_fd));
    let _ = fcntl(args.watch_fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    let mut watch = match watch {
        Ok(file) => file,
        Err(e) => {
            say(&format!("supervisor: cannot watch dblock: {e}"));
            kill_group();
        }
    };
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        loop {
            match watch.read(&mut byte) {
                // dblock writes nothing: any return means it is gone.
                Ok(_) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        kill_group();
    });

    // 2. Survive the signals meant for the command.
    let flag = Arc::new(AtomicBool::new(false));
    for sig in CAUGHT {
        if let Err(e) = signal_hook::flag::register(sig, flag.clone()) {
            say(&format!("supervisor: cannot handle signal {sig}: {e}"));
            kill_group();
        }
    }

    // 3. The terminal, for an interactive command.
    if args.foreground {
        foreground();
    }

    // 4. The command, in this process group.
    let Some((program, rest)) = args.command.split_first() else {
        say("supervisor: no command");
        return ExitCode::from(exit::USAGE);
    };
    let child = match Command::new(program).args(rest).spawn() {
        Ok(child) => child,
        Err(e) => return cannot_run(program, &e),
    };
    let pid = Pid::from_raw(child.id() as i32);

    // 5. Wait, reporting stops to dblock, and end as the command ended.
    loop {
        match waitpid(pid, Some(WaitPidFlag::WUNTRACED)) {
            Ok(WaitStatus::Exited(_, code)) => return ExitCode::from(code as u8),
            Ok(WaitStatus::Signaled(_, sig, _)) => die_by(sig),
            // A job-control stop (^Z, or reading the terminal from the
            // background) stops dblock too, so that its shell sees the job
            // stopped. A SIGSTOP from elsewhere does not: dblock goes on
            // renewing the lock meanwhile.
            Ok(WaitStatus::Stopped(_, Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU)) => {
                let _ = kill(dblock, Signal::SIGTSTP);
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                say(&format!("supervisor: waiting for the command failed: {e}"));
                kill_group();
            }
        }
    }
}

/// Puts this process group in the terminal's foreground. The supervisor is
/// in a background group when it does so, which would stop it with
/// SIGTTOU: that signal is blocked meanwhile.
fn foreground() {
    let Ok(tty) = File::options().read(true).write(true).open("/dev/tty") else {
        return;
    };
    let mut ttou = SigSet::empty();
    ttou.add(Signal::SIGTTOU);
    let mut old = SigSet::empty();
    if pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&ttou), Some(&mut old)).is_ok() {
        let _ = tcsetpgrp(&tty, getpgrp());
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
}

fn cannot_run(program: &OsString, e: &std::io::Error) -> ExitCode {
    let code = match e.kind() {
        ErrorKind::NotFound => exit::NOT_FOUND,
        _ => exit::CANNOT_EXECUTE,
    };
    say(&format!("cannot run {:?}: {e}", program.to_string_lossy()));
    ExitCode::from(code)
}

/// Ends the supervisor by `sig`, as the command ended, without a core dump
/// of its own.
fn die_by(sig: Signal) -> ! {
    let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
    let _ = signal_hook::low_level::emulate_default_handler(sig as i32);
    // A signal whose default is not to terminate cannot have killed the
    // command; the shell's convention, should it happen anyway.
    std::process::exit(128 + sig as i32);
}
