//! The event log each process writes, and CLOCK_MONOTONIC time.
//!
//! `std::time::Instant` cannot be compared across processes, so every
//! timestamp is read from `clock_gettime(CLOCK_MONOTONIC)` (one clock for
//! the whole machine) as nanoseconds.
//!
//! One line per event, written with a single `write` so that a SIGKILL can
//! cut at most the line being written (the parser skips a torn last line):
//!
//! ```text
//! <ns> <type> <op> <name> <token> <value> <text...>
//! ```
//!
//! `type` is `invoke`, `ok`, `fail` or `unknown`; `-` fills empty fields.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use nix::time::{clock_gettime, ClockId};

/// Nanoseconds on the machine-wide monotonic clock.
pub fn mono_ns() -> i64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() * 1_000_000_000 + t.tv_nsec()
}

/// What an event says about an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Invoke,
    Ok,
    Fail,
    Unknown,
}

impl Type {
    fn as_str(self) -> &'static str {
        match self {
            Type::Invoke => "invoke",
            Type::Ok => "ok",
            Type::Fail => "fail",
            Type::Unknown => "unknown",
        }
    }
    fn parse(s: &str) -> Option<Type> {
        Some(match s {
            "invoke" => Type::Invoke,
            "ok" => Type::Ok,
            "fail" => Type::Fail,
            "unknown" => Type::Unknown,
            _ => return None,
        })
    }
}

/// One parsed line.
#[derive(Debug, Clone)]
pub struct Event {
    pub ts: i64,
    pub ty: Type,
    pub op: String,
    pub name: String,
    pub token: Option<u64>,
    pub value: Option<i64>,
    pub text: String,
}

/// A process's log file.
#[derive(Debug)]
pub struct Log {
    file: File,
}

impl Log {
    pub fn create(path: &Path) -> Log {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        Log { file }
    }

    /// Appends one event; names never contain spaces in the harness.
    pub fn event(
        &mut self,
        ty: Type,
        op: &str,
        name: &str,
        token: Option<u64>,
        value: Option<i64>,
        text: &str,
    ) {
        let token = token.map_or("-".to_owned(), |t| t.to_string());
        let value = value.map_or("-".to_owned(), |v| v.to_string());
        let text = text.replace(['\n', '\r'], " ");
        let line = format!(
            "{} {} {op} {name} {token} {value} {text}\n",
            mono_ns(),
            ty.as_str()
        );
        // One write per line: a kill tears at most this line.
        self.file.write_all(line.as_bytes()).expect("write event");
    }
}

/// Reads a log, skipping a torn or unparsable line.
pub fn read(path: &Path) -> Vec<Event> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        let mut parts = line.splitn(7, ' ');
        let parsed = (|| {
            let ts = parts.next()?.parse().ok()?;
            let ty = Type::parse(parts.next()?)?;
            let op = parts.next()?.to_owned();
            let name = parts.next()?.to_owned();
            let token = parts.next()?;
            let token = if token == "-" {
                None
            } else {
                Some(token.parse().ok()?)
            };
            let value = parts.next()?;
            let value = if value == "-" {
                None
            } else {
                Some(value.parse().ok()?)
            };
            let text = parts.next().unwrap_or("").to_owned();
            Some(Event {
                ts,
                ty,
                op,
                name,
                token,
                value,
                text,
            })
        })();
        if let Some(e) = parsed {
            out.push(e);
        }
    }
    out
}
