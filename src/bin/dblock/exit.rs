//! Exit statuses and the error type of the command-line tool.

use std::fmt;

/// The command line was wrong (sysexits `EX_USAGE`).
pub const USAGE: u8 = 64;
/// A lock name or a duration was invalid (sysexits `EX_DATAERR`).
pub const DATA: u8 = 65;
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
  64       usage error
  65       invalid lock name or duration
  69       database unreachable (or a database error)
  75       lock not acquired: held elsewhere with --no-wait, or --wait elapsed
  76       lock lost while the command ran; the command was stopped
  126/127  the command could not be executed / was not found";

/// Why dblock stopped, and the exit status that says so.
#[derive(Debug)]
pub struct Failure {
    /// The process exit status.
    pub code: u8,
    /// What to tell the user (redacted before printing); nothing if empty.
    pub message: String,
}

impl Failure {
    /// A failure with an explicit exit status.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// A usage error (64).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(USAGE, message)
    }

    /// An invalid name or duration (65).
    pub fn data(message: impl Into<String>) -> Self {
        Self::new(DATA, message)
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
            dblock::Error::InvalidName(_) | dblock::Error::InvalidOption(_) => DATA,
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
        Failure { code, message }
    }
}

/// Shorthand for the tool's results.
pub type CliResult<T> = Result<T, Failure>;
