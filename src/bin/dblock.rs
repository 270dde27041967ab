//! `dblock`: run commands under a distributed lock kept in your database.
//!
//! ```text
//! dblock [--url URL] run NAME [--ttl DUR] [-w DUR | -n] [-E N] [-s] [-q]
//!        [--backend advisory|lease] [--kill-after DUR] (-c STRING | -- CMD [ARGS...])
//! dblock [--url URL] cron (--every DUR | --cron EXPR) NAME [--ttl DUR]
//!        [--kill-after DUR] [--allow-overlap] [--catch-up] -- CMD [ARGS...]
//! dblock migrate
//! dblock list [--json]
//! dblock status NAME [--json]
//! dblock leader NAME [--json] [--watch [--every DUR]]
//! dblock release NAME --force
//! ```
//!
//! See `dblock --help` and `docs/cli.md`.
#![forbid(unsafe_code)]

#[path = "dblock/args.rs"]
mod args;
#[path = "dblock/connect.rs"]
mod connect;
#[path = "dblock/cron.rs"]
mod cron;
#[path = "dblock/exit.rs"]
mod exit;
#[path = "dblock/guarded.rs"]
mod guarded;
#[path = "dblock/leader.rs"]
mod leader;
#[path = "dblock/lease.rs"]
mod lease;
#[path = "dblock/redact.rs"]
mod redact;
#[path = "dblock/report.rs"]
mod report;
#[path = "dblock/run.rs"]
mod run;
#[path = "dblock/supervisor.rs"]
mod supervisor;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::exit::{CliResult, Exit, Failure};

/// The longest duration any option takes: 366 days, as the library.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A line for stderr: prefixed, passwords masked.
pub fn message(text: &str) -> String {
    redact::scrub(&format!("dblock: {text}"))
}

/// Parses a human duration (`30s`, `5m`, `1h30m`, `250ms`) that must lie in
/// `min..=max`; 64 if it is invalid or out of range.
pub fn parse_duration(
    option: &str,
    text: &str,
    min: Duration,
    max: Duration,
) -> CliResult<Duration> {
    let range = || {
        format!(
            "{} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        )
    };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        Failure::usage(format!(
            "invalid duration {text:?} for {option}: {e} (write e.g. 30s, 5m, 1h30m, 250ms; \
             {} allowed)",
            range()
        ))
    })?;
    if d < min || d > max {
        return Err(Failure::usage(format!(
            "duration {text:?} for {option} is out of range: {} allowed",
            range()
        )));
    }
    Ok(d)
}

/// Checks a lock name given on the command line; 64 if invalid.
pub fn parse_name(name: OsString) -> CliResult<String> {
    let name = name
        .into_string()
        .map_err(|_| Failure::usage("invalid lock name: it is not valid UTF-8"))?;
    dblock::validate_name(&name)?;
    Ok(name)
}

async fn dispatch(cli: Cli) -> CliResult<Exit> {
    let mut target = connect::resolve(cli.global.url.as_deref(), cli.global.backend)?;
    let timeout = parse_duration(
        "--connect-timeout",
        &cli.global.connect_timeout,
        Duration::from_millis(100),
        Duration::from_secs(3600),
    )?;
    let code = match cli.command {
        Command::Run(args) => return run::run(target, timeout, args).await,
        Command::Cron(args) => {
            // A slot's claim must outlive dblock: on PostgreSQL, cron uses
            // the lease table unless advisory locks are asked for (which
            // the scheduler then refuses, naming the alternative).
            if cli.global.backend.is_none() && target.kind == connect::Kind::PgAdvisory {
                target.kind = connect::Kind::PgLease;
            }
            cron::cron(target, timeout, args).await
        }
        Command::Migrate => report::migrate(target, timeout).await,
        Command::List { json } => report::list(target, timeout, json).await,
        Command::Status { name, json } => report::status(target, timeout, name, json).await,
        Command::Leader {
            name,
            json,
            watch,
            every,
        } => leader::leader(target, timeout, name, json, watch.then_some(every)).await,
        Command::Release { name, force } => report::release(target, timeout, name, force).await,
        Command::Supervise(_) => unreachable!("handled before the runtime starts"),
    };
    code.map(Exit::Code)
}

/// Ends the process by `sig` (its default action), or with `128+sig` if
/// that fails.
fn die_by(sig: nix::sys::signal::Signal) -> ExitCode {
    let _ = signal_hook::low_level::emulate_default_handler(sig as i32);
    ExitCode::from(128u8.saturating_add(sig as i32 as u8))
}

fn main() -> ExitCode {
    // Remember every password in sight before anything can be printed,
    // clap's own messages included.
    for var in ["DBLOCK_URL", "DATABASE_URL"] {
        if let Ok(url) = std::env::var(var) {
            redact::remember(&url);
        }
    }
    for arg in std::env::args_os() {
        redact::remember(&arg.to_string_lossy());
    }

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let text = redact::scrub(&e.render().to_string());
            if e.use_stderr() {
                eprint!("{text}");
                return ExitCode::from(exit::USAGE);
            }
            print!("{text}");
            return ExitCode::SUCCESS;
        }
    };

    let mut cli = cli;
    if let Command::Supervise(args) = cli.command {
        return supervisor::main(args);
    }
    // $DATABASE_URL when neither --url nor $DBLOCK_URL gave one.
    if cli.global.url.is_none() {
        cli.global.url = std::env::var("DATABASE_URL").ok();
    }

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}", message(&format!("cannot start the runtime: {e}")));
            return ExitCode::from(1);
        }
    };
    let exit = match runtime.block_on(dispatch(cli)) {
        Ok(exit) => exit,
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("{}", message(&failure.message));
            }
            match failure.signal {
                Some(sig) => Exit::Signal(sig),
                None => Exit::Code(failure.code),
            }
        }
    };
    // Everything is released and closed before a signal is re-raised.
    drop(runtime);
    match exit {
        Exit::Code(code) => ExitCode::from(code),
        Exit::Signal(sig) => die_by(sig),
        Exit::GroupSignal(sig) => {
            // dblock's own handler is still in place: this reaches the
            // others in the group (a calling script), then dblock ends.
            let _ = nix::sys::signal::killpg(nix::unistd::getpgrp(), sig);
            die_by(sig)
        }
    }
}
