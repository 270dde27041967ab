//! `dblock`: run commands under a distributed lock kept in your database.
//!
//! ```text
//! dblock [--url URL] run NAME [--ttl DUR] [--wait DUR | --no-wait] [--shared]
//!        [--backend advisory|lease] [--kill-after DUR] -- CMD [ARGS...]
//! dblock [--url URL] cron (--every DUR | --cron EXPR) NAME [--ttl DUR]
//!        [--kill-after DUR] [--allow-overlap] [--catch-up] -- CMD [ARGS...]
//! dblock migrate
//! dblock list [--json]
//! dblock status NAME [--json]
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
#[path = "dblock/lease.rs"]
mod lease;
#[path = "dblock/redact.rs"]
mod redact;
#[path = "dblock/report.rs"]
mod report;
#[path = "dblock/run.rs"]
mod run;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::exit::{CliResult, Failure};

/// A line for stderr: prefixed, passwords masked.
pub fn message(text: &str) -> String {
    redact::scrub(&format!("dblock: {text}"))
}

/// Parses a human duration (`30s`, `5m`, `1h30m`, `250ms`); 65 if invalid.
pub fn parse_duration(option: &str, text: &str) -> CliResult<Duration> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        Failure::data(format!(
            "invalid duration {text:?} for {option}: {e} (write e.g. 30s, 5m, 1h30m, 250ms)"
        ))
    })
}

/// Checks a lock name given on the command line; 65 if invalid.
pub fn parse_name(name: OsString) -> CliResult<String> {
    let name = name
        .into_string()
        .map_err(|_| Failure::data("invalid lock name: it is not valid UTF-8"))?;
    dblock::validate_name(&name)?;
    Ok(name)
}

async fn dispatch(cli: Cli) -> CliResult<u8> {
    let mut target = connect::resolve(cli.global.url.as_deref(), cli.global.backend)?;
    let timeout = parse_duration("--connect-timeout", &cli.global.connect_timeout)?;
    match cli.command {
        Command::Run(args) => run::run(target, timeout, args).await,
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
        Command::Release { name, force } => report::release(target, timeout, name, force).await,
    }
}

fn main() -> ExitCode {
    // Remember every password in sight before anything can be printed,
    // clap's own messages included.
    if let Ok(url) = std::env::var("DATABASE_URL") {
        redact::remember(&url);
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
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("{}", message(&failure.message));
            }
            failure.code
        }
    };
    ExitCode::from(code)
}
