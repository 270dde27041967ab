//! Exit statuses and the error type of the command-line tool.

use std::fmt;

use nix::sys::signal::Signal;

/// The command line was wrong: an unknown option, a missing argument, or a
/// lock name, duration or number that is invalid or out of range (sysexits
/// `EX_USAGE`).
pub const USAGE: u8 = 64;
/// The database could not be reached or failed (sysexits `EX_UNAVAILABLE`).
pub const UNAVAILABLE: u8 = 69;
/// The lock was not acquired: held elsewhere with `--no-wait`, or `--wait`
/// elapsed (sysexits `EX_TEMPFAIL`: try again later).
pub const NOT_ACQUIRED: u8 = 75;
/// The lock was lost while the command ran; the command was stopped.
pub const LOST: u8 = 76;
/// The command was found but could not be executed (as in shells).
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found (as in shells).
pub const NOT_FOUND: u8 = 127;

/// The exit status table, shown by `--help` and in the documentation.
pub const TABLE: &str = "\
Exit status of `dblock run`:
  N        the command's own exit status when it ran
  128+N    the command was killed by signal N (e.g. 143 after SIGTERM)
  64       usage error: a bad option, or a lock name, duration or number
           that is invalid or out of range (nothing was run or written)
  69       database unreachable (or a database error)
  75       lock not acquired: held elsewhere with --nonblock, or --timeout
           elapsed (another status with -E/--conflict-exit-code)
  76       lock lost while the command ran; the command was stopped
  126/127  the command could not be executed / was not found
When the command is killed by SIGINT, SIGTERM, SIGHUP or SIGQUIT (or dblock
gets one of those while waiting for the lock), dblock releases the lock and
then ends by that same signal, so that a calling shell or loop stops too.";

/// Why dblock stopped, and the exit status that says so.
#[derive(Debug)]
pub struct Failure {
    /// The process exit status.
    pub code: u8,
    /// What to tell the user (redacted before printing); nothing if empty.
    pub message: String,
    /// End by this signal rather than with `code` (after the message).
    pub signal: Option<Signal>,
}

/// How dblock ends when it did what it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// With this exit status.
    Code(u8),
    /// Killed by this signal, re-raised after cleanup.
    Signal(Signal),
    /// Killed by this signal, which is first sent to dblock's whole process
    /// group: a keyboard signal (^C, ^\\) that the terminal sent to the
    /// command's group only, because dblock had given it the terminal, and
    /// that would otherwise have reached dblock's group (and a calling
    /// script in it) too.
    GroupSignal(Signal),
}

impl Failure {
    /// A failure with an explicit exit status.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            signal: None,
        }
    }

    /// Ends by `sig` (the status `128+sig` if it cannot be re-raised).
    pub fn by_signal(sig: Signal, message: impl Into<String>) -> Self {
        let mut f = Self::new(128u8.saturating_add(sig as i32 as u8), message);
        f.signal = Some(sig);
        f
    }

    /// A usage error (64).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(USAGE, message)
    }

    /// The database is unreachable or failed (69).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(UNAVAILABLE, message)
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, doing: impl fmt::Display) -> Self {
        self.message = format!("{doing}: {}", self.message);
        self
    }
}

impl From<dblock::Error> for Failure {
    fn from(e: dblock::Error) -> Self {
        let code = match &e {
            dblock::Error::Timeout { .. } => NOT_ACQUIRED,
            dblock::Error::Lost { .. } => LOST,
            dblock::Error::InvalidName(_) | dblock::Error::InvalidOption(_) => USAGE,
            dblock::Error::Unsupported { .. } => USAGE,
            dblock::Error::Database(sqlx::Error::Configuration(_)) => USAGE,
            _ => UNAVAILABLE,
        };
        let message = match &e {
            dblock::Error::Database(sqlx::Error::PoolTimedOut) => {
                "no database connection could be opened in time (is the server running and reachable?)"
                    .to_owned()
            }
            dblock::Error::Database(db) => format!("database error: {db}"),
            other => other.to_string(),
        };
        Failure::new(code, message)
    }
}

/// Shorthand for the tool's results.
pub type CliResult<T> = Result<T, Failure>;
