//! The table every figure ends in, and the figures' formatting.

use super::*;

pub(super) struct Row {
    pub(super) backend: &'static str,
    pub(super) measure: String,
    pub(super) dblock: String,
    pub(super) raw: String,
    pub(super) ratio: Option<f64>,
    pub(super) target: String,
    pub(super) met: Option<bool>,
}

impl Row {
    pub(super) fn new(backend: &'static str, measure: impl Into<String>) -> Row {
        Row {
            backend,
            measure: measure.into(),
            dblock: String::new(),
            raw: "—".into(),
            ratio: None,
            target: "reported".into(),
            met: None,
        }
    }
    pub(super) fn dblock(mut self, s: impl Into<String>) -> Row {
        self.dblock = s.into();
        self
    }
    pub(super) fn raw(mut self, s: impl Into<String>) -> Row {
        self.raw = s.into();
        self
    }
    pub(super) fn ratio(mut self, r: f64) -> Row {
        self.ratio = Some(r);
        self
    }
    pub(super) fn target(mut self, t: impl Into<String>, met: bool) -> Row {
        self.target = t.into();
        self.met = Some(met);
        self
    }
    pub(super) fn note(mut self, t: impl Into<String>) -> Row {
        self.target = t.into();
        self
    }
}

pub(super) fn print_table(rows: &[Row]) -> String {
    let head = [
        "backend",
        "measure",
        "dblock",
        "raw SQL",
        "dblock/raw",
        "target",
        "met",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.backend.to_owned(),
                r.measure.clone(),
                r.dblock.clone(),
                r.raw.clone(),
                r.ratio.map(|x| format!("{x:.2}")).unwrap_or("—".into()),
                r.target.clone(),
                match r.met {
                    Some(true) => "yes".into(),
                    Some(false) => "**NO**".into(),
                    None => "—".into(),
                },
            ]
        })
        .collect();
    let mut widths = head.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::from("|");
        for (c, w) in cols.iter().zip(widths) {
            let pad = w - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s
    };
    let mut out = String::new();
    out.push_str(&line(&head.map(String::from)));
    out.push('\n');
    out.push('|');
    for w in widths {
        out.push_str(&"-".repeat(w + 2));
        out.push('|');
    }
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// Figures.

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of sorted samples.
pub(super) fn pct(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn rate(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub(super) fn ms(d: Duration) -> String {
    let x = d.as_secs_f64() * 1000.0;
    if x < 10.0 {
        format!("{x:.2} ms")
    } else {
        format!("{x:.0} ms")
    }
}

pub(super) struct Latency {
    pub(super) p50: Duration,
    pub(super) p99: Duration,
    pub(super) max: Duration,
    pub(super) n: usize,
    /// The samples, sorted (for [`Latency::join`]).
    samples: Vec<Duration>,
}

impl Latency {
    pub(super) fn of(mut v: Vec<Duration>) -> Latency {
        v.sort();
        Latency {
            p50: pct(&v, 50.0),
            p99: pct(&v, 99.0),
            max: *v.last().expect("samples"),
            n: v.len(),
            samples: v,
        }
    }
    /// The figures of several measurements' samples taken together.
    pub(super) fn join(parts: impl IntoIterator<Item = Latency>) -> Latency {
        Latency::of(parts.into_iter().flat_map(|l| l.samples).collect())
    }
    pub(super) fn show(&self) -> String {
        format!("{} / {} (n={})", ms(self.p50), ms(self.p99), self.n)
    }
}

pub(super) fn latency_row(backend: &'static str, what: &str, l: &Latency) -> Row {
    Row::new(backend, format!("{what}: p50 / p99 (max {})", ms(l.max))).dblock(l.show())
}

/// A waiter polling from another instance (no doorbell watch for its name:
/// the backend runs a few watches at once, and the bench more pairs). The
/// release can land while one of its claims is on its way (the claim read
/// the row before the release committed, and answers busy); the waiter
/// then sleeps at most `max_poll` and claims again. So a handoff takes at
/// most two attempts and `max_poll`, an attempt bounded here by `local`,
/// the p99 of a same-process handoff (one release and one claim).
pub(super) fn poll_row(backend: &'static str, what: &str, l: &Latency, local: &Latency) -> Row {
    let max_poll = LeaseOptions::default().max_poll;
    let bound = max_poll + local.p99 * 2;
    latency_row(backend, what, l).target(
        format!(
            "p99 ≤ max_poll {} + two attempts (2 × {}: the one under way at the release, the next)",
            ms(max_poll),
            ms(local.p99)
        ),
        l.p99 <= bound,
    )
}

/// An in-process waiter woken by a release.
pub(super) fn wake_row(backend: &'static str, what: &str, l: &Latency) -> Row {
    Row::new(
        backend,
        format!(
            "wake-up, {what}, same Locks: release done → waiter's next statement: p50 / p99 (max {})",
            ms(l.max)
        ),
    )
    .dblock(l.show())
    .target(format!("p99 ≤ {}", ms(WAKE_BOUND)), l.p99 <= WAKE_BOUND)
}

pub(super) fn machine() -> Vec<String> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = read("/proc/meminfo");
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    vec![format!("{cpus} CPUs ({model}), {mem} memory")]
}
