//! Counting the statements this process sends.
//!
//! sqlx logs every statement it runs on the `sqlx::query` target when that is
//! enabled; this subscriber enables it only while counting, and counts. Pool
//! health pings are not statements and are not counted. dblock's own
//! warnings are printed (first few) and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{span, Event, Level, Metadata, Subscriber};

static ON: AtomicBool = AtomicBool::new(false);
static STATEMENTS: AtomicU64 = AtomicU64::new(0);
static WARNINGS: AtomicU64 = AtomicU64::new(0);
/// Per statement (its first words): how many, and their total time.
/// (op, statement's first words) → (count, total seconds).
type Tally = HashMap<(usize, String), (u64, f64)>;
static BREAKDOWN: Mutex<Option<Tally>> = Mutex::new(None);
/// Which op the statements logged now belong to, for the breakdown.
static OP: AtomicUsize = AtomicUsize::new(0);
/// Statements as (start, end, first words), while recording.
static TIMELINE: Mutex<Option<Vec<(Instant, Instant, String)>>> = Mutex::new(None);

pub struct Counter;

fn is_query(m: &Metadata<'_>) -> bool {
    m.target() == "sqlx::query"
}

fn is_warning(m: &Metadata<'_>) -> bool {
    *m.level() <= Level::WARN && m.target().starts_with("dblock")
}

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

/// The statement's summary and duration, as sqlx logs them.
#[derive(Default)]
struct Timing {
    summary: String,
    secs: f64,
}

impl Visit for Timing {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "summary" {
            self.summary = value.to_owned();
        }
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.secs = value;
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "summary" && self.summary.is_empty() {
            self.summary = format!("{value:?}");
        }
    }
}

impl Subscriber for Counter {
    fn register_callsite(&self, m: &'static Metadata<'static>) -> Interest {
        if is_query(m) {
            Interest::sometimes()
        } else if is_warning(m) {
            Interest::always()
        } else {
            Interest::never()
        }
    }
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        (is_query(m) && ON.load(Relaxed)) || is_warning(m)
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let m = event.metadata();
        if is_query(m) {
            STATEMENTS.fetch_add(1, Relaxed);
            let end = Instant::now();
            if let Some(timeline) = TIMELINE.lock().unwrap().as_mut() {
                let mut t = Timing::default();
                event.record(&mut t);
                let start = end - Duration::from_secs_f64(t.secs);
                timeline.push((start, end, t.summary));
            }
            let mut breakdown = BREAKDOWN.lock().unwrap();
            if let Some(map) = breakdown.as_mut() {
                let mut t = Timing::default();
                event.record(&mut t);
                let e = map.entry((OP.load(Relaxed), t.summary)).or_default();
                e.0 += 1;
                e.1 += t.secs;
            }
        } else if WARNINGS.fetch_add(1, Relaxed) < 5 {
            let mut text = String::new();
            event.record(&mut Text(&mut text));
            eprintln!("  [{} {}]{}", m.level(), m.target(), text);
        }
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

pub fn start() {
    STATEMENTS.store(0, Relaxed);
    ON.store(true, Relaxed);
}

pub fn stop() -> u64 {
    ON.store(false, Relaxed);
    STATEMENTS.load(Relaxed)
}

/// Starts counting and timing statements by their first words.
pub fn breakdown_start() {
    *BREAKDOWN.lock().unwrap() = Some(HashMap::new());
    start();
}

/// Attributes the statements logged from now on to op `i`.
pub fn set_op(i: usize) {
    OP.store(i, Relaxed);
}

/// Per op and statement: first words, count, total seconds.
pub fn breakdown_stop() -> Vec<(usize, String, u64, f64)> {
    stop();
    let map = BREAKDOWN.lock().unwrap().take().unwrap_or_default();
    let mut v: Vec<_> = map
        .into_iter()
        .map(|((op, k), (n, s))| (op, k, n, s))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0).then(b.3.total_cmp(&a.3)));
    v
}

/// Starts recording when each statement runs.
pub fn timeline_start() {
    *TIMELINE.lock().unwrap() = Some(Vec::new());
    start();
}

pub fn timeline_stop() -> Vec<(Instant, Instant, String)> {
    stop();
    TIMELINE.lock().unwrap().take().unwrap_or_default()
}

pub fn warnings() -> u64 {
    WARNINGS.load(Relaxed)
}
