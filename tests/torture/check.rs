//! The checkers: what the logs and the registers must show after a run.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::events::{Event, Type};
use crate::target::{Kind, Registers, Window, Write};

/// A fault the controller injected, in CLOCK_MONOTONIC nanoseconds.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    /// The worker it hit (`s<slot>g<gen>`); `None` for a server restart,
    /// which hits everyone.
    pub wid: Option<String>,
    pub start: i64,
    /// When it was lifted (SIGCONT, the proxy restored, the server back).
    pub end: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    Kill,
    Stop,
    Terminate,
    Cut,
    Restart,
}

impl FaultKind {
    pub fn label(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Stop => "stop",
            FaultKind::Terminate => "terminate",
            FaultKind::Cut => "cut",
            FaultKind::Restart => "restart",
        }
    }

    /// Faults that may legitimately let a later holder in while an earlier
    /// one still believes it holds the lock: the earlier one was paused or
    /// cut off, so it cannot know yet. Leases expire under a paused or
    /// black-holed holder (which notices when it runs again); an advisory
    /// lock ends with its session, which only a terminate or a server
    /// restart ends at once. Anything else overlapping is a violation.
    fn excuses(self, kind: Kind) -> bool {
        match kind {
            Kind::Advisory => matches!(self, FaultKind::Terminate | FaultKind::Restart),
            // A restart without saving loses every lease at once; the
            // tokens, which go on increasing, fence the old holders off.
            Kind::RedisLease => {
                matches!(self, FaultKind::Stop | FaultKind::Cut | FaultKind::Restart)
            }
            _ => matches!(self, FaultKind::Stop | FaultKind::Cut),
        }
    }
}

/// How a holder's interval of belief ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Lost,
    Release,
    Killed,
    LogEnds,
}

#[derive(Debug, Clone)]
struct FencedWrite {
    write: Write,
    invoked: i64,
    /// Some(accepted) when the worker learned the outcome.
    outcome: Option<bool>,
}

/// One grant, from acquire ok to the end of the holder's belief.
#[derive(Debug, Clone)]
struct Holder {
    wid: String,
    name: String,
    token: u64,
    invoked: i64,
    ok: i64,
    end: i64,
    how: End,
    /// `lost()` fired (or `is_lost()`), or `release` reported `Error::Lost`.
    told_lost: bool,
    /// A reader (the shared mode).
    shared: bool,
    writes: Vec<FencedWrite>,
}

/// What a run showed.
#[derive(Debug, Default)]
pub struct Report {
    pub acquisitions: usize,
    pub acquire_timeouts: usize,
    pub acquire_errors: usize,
    pub faults: BTreeMap<FaultKind, usize>,
    /// Overlaps of belief intervals that a fault explains.
    pub excused_overlaps: usize,
    /// Overlaps that no fault explains: mutual exclusion broken.
    pub overlaps: usize,
    /// The semaphore mode: some name had all its permits taken at once
    /// without a fault to explain it (checked one permit short).
    pub permits_reached: bool,
    /// The shared mode: two readers believed they held a name together.
    pub readers_shared: bool,
    /// Fenced writes the register accepted out of token order.
    pub stale_accepted: usize,
    /// Fenced writes of a superseded holder that the fence refused.
    pub stale_rejected: usize,
    pub accepted_writes: usize,
    /// Acknowledged unguarded writes that the register lost.
    pub unguarded_lost: i64,
    pub leaks: usize,
    pub losses_seen: usize,
    pub violations: Vec<String>,
}

impl Report {
    pub fn violation(&mut self, v: impl Into<String>) {
        let v = v.into();
        if self.violations.len() < 50 {
            self.violations.push(v);
        }
    }

    pub fn summary(&self, label: &str) -> String {
        let total: usize = self.faults.values().sum();
        let kinds = self
            .faults
            .iter()
            .map(|(k, n)| format!("{} {}", k.label(), thousands(*n)))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{label}: {} acquisitions, {} faults ({kinds}), {} overlaps ({} excused by pauses/cuts, fenced off), \
             {} stale writes accepted ({} refused), {} unguarded updates lost, {} losses reported, {} leaks",
            thousands(self.acquisitions),
            thousands(total),
            self.overlaps,
            self.excused_overlaps,
            self.stale_accepted,
            self.stale_rejected,
            self.unguarded_lost,
            self.losses_seen,
            self.leaks
        )
    }
}

pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The inputs of one run's check.
pub struct Run<'a> {
    pub kind: Kind,
    /// Each worker's events, by wid.
    pub logs: &'a HashMap<String, Vec<Event>>,
    pub faults: &'a [Fault],
    pub registers: &'a HashMap<String, Registers>,
    /// Whether the holders watched `lost()` (off in the negative control).
    pub watch_lost: bool,
    /// Holders each name admits: 1, or `n` in the semaphore mode.
    pub permits: u32,
}

pub fn check(run: &Run<'_>, report: &mut Report) {
    for f in run.faults {
        *report.faults.entry(f.kind).or_default() += 1;
    }
    let killed: HashMap<&str, i64> = run
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::Kill)
        .filter_map(|f| Some((f.wid.as_deref()?, f.start)))
        .collect();
    let mut holders = Vec::new();
    for (wid, events) in run.logs {
        holders.extend(parse_holders(
            wid,
            events,
            killed.get(wid.as_str()).copied(),
            report,
        ));
    }
    report.acquisitions = holders.len();

    let mut by_name: HashMap<&str, Vec<&Holder>> = HashMap::new();
    for h in &holders {
        by_name.entry(&h.name).or_default().push(h);
    }
    for list in by_name.values_mut() {
        list.sort_by_key(|h| h.ok);
        check_tokens(run, list, report);
        if run.permits > 1 {
            check_permits(run, list, run.permits, report);
            // The same check one permit short must fail where the
            // semaphore was full: n was reached, and the check can fail.
            let mut short = Report::default();
            check_permits(run, list, run.permits - 1, &mut short);
            report.permits_reached |= short.overlaps > 0;
        } else {
            check_overlaps(run, list, report);
        }
    }
    for (name, regs) in run.registers {
        let list = by_name.get(name.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        if run.permits > 1 {
            check_window(name, regs, run.permits, report);
            report.stale_rejected += list
                .iter()
                .flat_map(|h| &h.writes)
                .filter(|w| w.outcome == Some(false))
                .count();
        } else {
            check_registers(name, regs, report);
        }
        check_history(name, regs, list, report);
    }
    if report.unguarded_lost > 0 && report.excused_overlaps == 0 && report.overlaps == 0 {
        report.violation(format!(
            "the unguarded register lost {} updates although no two holders ever overlapped: \
             the logs miss a holder",
            report.unguarded_lost
        ));
    }
}

fn parse_holders(
    wid: &str,
    events: &[Event],
    killed_at: Option<i64>,
    report: &mut Report,
) -> Vec<Holder> {
    let mut out: Vec<Holder> = Vec::new();
    let mut cur: Option<Holder> = None;
    let mut invoked = 0;
    for e in events {
        match (e.op.as_str(), e.ty) {
            ("acquire", Type::Invoke) => invoked = e.ts,
            ("acquire", Type::Fail) => report.acquire_timeouts += 1,
            ("acquire", Type::Unknown) => {
                report.acquire_errors += 1;
                if e.text == "hung" {
                    report.violation(format!("{wid}: acquire of {} overran its wait", e.name));
                }
            }
            ("acquire", Type::Ok) => {
                if let Some(h) = cur.take() {
                    report.violation(format!(
                        "{wid}: acquired {} while holding {}",
                        e.name, h.name
                    ));
                    out.push(h);
                }
                cur = Some(Holder {
                    wid: wid.to_owned(),
                    name: e.name.clone(),
                    token: e.token.expect("token"),
                    invoked,
                    ok: e.ts,
                    end: i64::MAX,
                    how: End::LogEnds,
                    told_lost: false,
                    shared: e.text == crate::worker::SHARED,
                    writes: Vec::new(),
                });
            }
            (op, ty) if op.starts_with("fenced-") => {
                let Some(h) = cur.as_mut() else { continue };
                let write = Write::parse(&op["fenced-".len()..]).expect("write kind");
                match ty {
                    Type::Invoke => h.writes.push(FencedWrite {
                        write,
                        invoked: e.ts,
                        outcome: None,
                    }),
                    Type::Ok | Type::Fail => {
                        if let Some(w) = h.writes.last_mut() {
                            w.outcome = Some(ty == Type::Ok);
                        }
                    }
                    _ => {}
                }
            }
            ("lost", _) => {
                if let Some(h) = cur.as_mut() {
                    h.told_lost = true;
                    if h.end == i64::MAX {
                        h.end = e.ts;
                        h.how = End::Lost;
                    }
                }
            }
            ("release", Type::Invoke) => {
                if let Some(h) = cur.as_mut() {
                    if h.end == i64::MAX {
                        h.end = e.ts;
                        h.how = End::Release;
                    }
                }
            }
            ("release", ty) => {
                if let Some(mut h) = cur.take() {
                    if ty == Type::Fail && e.text.starts_with("lost") {
                        h.told_lost = true;
                    }
                    if ty == Type::Unknown && e.text == "hung" {
                        report.violation(format!(
                            "{wid}: release of {} token {} did not return in bounded time",
                            h.name, h.token
                        ));
                    }
                    out.push(h);
                }
            }
            _ => {}
        }
    }
    if let Some(mut h) = cur.take() {
        match killed_at {
            Some(t) => {
                h.end = h.end.min(t);
                if h.how == End::LogEnds {
                    h.how = End::Killed;
                }
            }
            None => {
                let last = events.last().map_or(h.ok, |e| e.ts);
                if h.end == i64::MAX {
                    h.end = last;
                }
                report.violation(format!(
                    "{wid}: log ends while holding {} token {} and the process was not killed",
                    h.name, h.token
                ));
            }
        }
        out.push(h);
    }
    out
}

/// Fencing: a grant made after another was already granted has a greater
/// token; no token is handed out twice for a name.
fn check_tokens(run: &Run<'_>, list: &[&Holder], report: &mut Report) {
    let mut seen = HashSet::new();
    for h in list {
        if !seen.insert(h.token) {
            report.violation(format!("{}: token {} granted twice", h.name, h.token));
        }
    }
    let _ = run;
    // For each holder B, every A granted before B even asked has tA < tB.
    let mut by_invoke: Vec<&&Holder> = list.iter().collect();
    by_invoke.sort_by_key(|h| h.invoked);
    let mut i = 0;
    let mut max_before: Option<(u64, &Holder)> = None;
    for b in by_invoke {
        while i < list.len() && list[i].ok < b.invoked {
            if max_before.is_none_or(|(t, _)| list[i].token > t) {
                max_before = Some((list[i].token, list[i]));
            }
            i += 1;
        }
        if let Some((t, a)) = max_before {
            if b.token <= t {
                report.violation(format!(
                    "{}: token {} granted to {} after token {} had been granted to {}",
                    b.name, b.token, b.wid, t, a.wid
                ));
            }
        }
    }
}

/// Mutual exclusion as the holders believed it.
fn check_overlaps(run: &Run<'_>, list: &[&Holder], report: &mut Report) {
    for (j, later) in list.iter().enumerate() {
        for earlier in &list[..j] {
            if earlier.end <= later.ok || earlier.wid == later.wid {
                continue;
            }
            if earlier.shared && later.shared {
                // Readers share (the shared mode).
                report.readers_shared = true;
                continue;
            }
            // The superseded holder is the one with the older token: usually
            // the earlier grant; but a grant whose answer was held up (its
            // holder cut off while the claim was in flight) arrives after a
            // newer one, already superseded.
            let (a, b) = if earlier.token < later.token {
                (earlier, later)
            } else {
                (later, earlier)
            };
            let until = a.ok.max(b.ok);
            let excuse = run.faults.iter().find(|f| {
                f.kind.excuses(run.kind)
                    && f.wid.as_deref().is_none_or(|w| w == a.wid)
                    && f.start <= until
                    && f.end >= a.invoked
            });
            let Some(fault) = excuse else {
                report.overlaps += 1;
                report.violation(format!(
                    "{}: {} (token {}) and {} (token {}) both believed they held the lock for {:.1} ms, \
                     and no pause or cut of the superseded {} explains it",
                    a.name,
                    a.wid,
                    a.token,
                    b.wid,
                    b.token,
                    (earlier.end - later.ok) as f64 / 1e6,
                    a.wid
                ));
                continue;
            };
            report.excused_overlaps += 1;
            // The superseded holder's writes after the new grant: the fence
            // must refuse them (counted from the register's history below);
            // here, count what the holder saw.
            for w in &a.writes {
                if w.invoked > b.ok && w.outcome == Some(false) {
                    report.stale_rejected += 1;
                }
            }
            if a.how != End::Killed && !a.told_lost && run.watch_lost {
                report.violation(format!(
                    "{}: {} (token {}) lost its lock to {} (token {}) after a {} but never saw lost() fire",
                    a.name,
                    a.wid,
                    a.token,
                    b.wid,
                    b.token,
                    fault.kind.label()
                ));
            }
        }
    }
    report.losses_seen += list.iter().filter(|h| h.told_lost).count();
}

/// The semaphore mode: at no instant do more than `permits` holders
/// believe they hold a name, unless a fault of one of them explains it.
fn check_permits(run: &Run<'_>, list: &[&Holder], permits: u32, report: &mut Report) {
    // Holders found not to heed their loss, each reported once.
    let mut unheeded = HashSet::new();
    for later in list {
        // Holders believing they held the name when `later` was granted.
        let beside: Vec<&&Holder> = list
            .iter()
            .filter(|h| h.ok <= later.ok && h.end > later.ok && h.wid != later.wid)
            .collect();
        if beside.len() < permits as usize {
            continue;
        }
        let excuse = run.faults.iter().find(|f| {
            f.kind.excuses(run.kind)
                && f.start <= later.ok
                && beside
                    .iter()
                    .any(|h| f.wid.as_deref().is_none_or(|w| w == h.wid) && f.end >= h.invoked)
        });
        match excuse {
            Some(_) => {
                report.excused_overlaps += 1;
                if run.watch_lost {
                    check_heeded(run, &beside, later, &mut unheeded, report);
                }
            }
            None => {
                report.overlaps += 1;
                report.violation(format!(
                    "{}: {} (token {}) was granted while {} others believed they held a permit \
                     of at most {}, and no fault of theirs explains it",
                    later.name,
                    later.wid,
                    later.token,
                    beside.len(),
                    permits
                ));
            }
        }
    }
    report.losses_seen += list.iter().filter(|h| h.told_lost).count();
}

/// How long after the fault that cost it its permit a holder may go on
/// believing it holds one: the wake-up of its renewal (a lease's local
/// deadline has passed by then) or its heartbeat (an advisory session
/// terminated), and the worker's next look at `lost()`, on a loaded
/// machine.
const GRACE_NS: i64 = 1_000_000_000;

/// The semaphore mode: the holders beside `later` whose own fault (a pause
/// or cut, a terminated session, begun while they held their permit)
/// explains the overflow must stop believing within [`GRACE_NS`] of its
/// end, unless killed: they heed `lost()`. A holder that ignores its loss
/// goes on past it (the negative control, `IGNORE_LOSS` in `worker`).
fn check_heeded(
    run: &Run<'_>,
    beside: &[&&Holder],
    later: &Holder,
    unheeded: &mut HashSet<(String, u64)>,
    report: &mut Report,
) {
    for h in beside {
        if h.how == End::Killed || unheeded.contains(&(h.wid.clone(), h.token)) {
            continue;
        }
        let fault = run
            .faults
            .iter()
            .filter(|f| {
                f.kind.excuses(run.kind)
                    && f.wid.as_deref() == Some(h.wid.as_str())
                    && f.start >= h.ok
                    && f.start <= later.ok
            })
            .max_by_key(|f| f.end);
        let Some(f) = fault else { continue };
        if h.end > f.end + GRACE_NS {
            unheeded.insert((h.wid.clone(), h.token));
            report.violation(format!(
                "{}: {} (token {}) went on believing it held a permit {:.0} ms after its {} \
                 ended, while {} (token {}) held one: it did not heed lost()",
                h.name,
                h.wid,
                h.token,
                (h.end - f.end) as f64 / 1e6,
                f.kind.label(),
                later.wid,
                later.token
            ));
        }
    }
}

/// The semaphore mode's fenced register (a [`Window`] of `n` tokens):
/// replayed in the order it accepted them, every accepted write was one
/// the window admitted then. With the fence on, a write it accepted out of
/// turn is a stale write accepted.
fn check_window(name: &str, regs: &Registers, n: u32, report: &mut Report) {
    report.accepted_writes += regs.accepted.len();
    let mut window = Window::new(n);
    for (i, a) in regs.accepted.iter().enumerate() {
        if !window.admits(a.token, a.write) {
            report.stale_accepted += 1;
            report.violation(format!(
                "{name}: the fenced window accepted {} write #{i} with token {} from {} while \
                 it held {:?}",
                a.write.as_str(),
                a.token,
                a.worker,
                window.tokens
            ));
        }
        window.accept(a.token, a.write);
    }
}

/// The fenced register: accepted tokens in strictly increasing order (an
/// exit write carries the token of the latest entry), its value the number
/// of accepted writes.
fn check_registers(name: &str, regs: &Registers, report: &mut Report) {
    report.accepted_writes += regs.accepted.len();
    let mut highest: Option<u64> = None;
    for (i, a) in regs.accepted.iter().enumerate() {
        let in_order = match (a.write, highest) {
            (_, None) => true,
            (Write::Entry, Some(h)) => a.token > h,
            (Write::Exit, Some(h)) => a.token == h,
        };
        if !in_order {
            report.stale_accepted += 1;
            report.violation(format!(
                "{name}: the fenced register accepted {} write #{i} with token {} from {} after token {}",
                a.write.as_str(),
                a.token,
                a.worker,
                highest.unwrap_or(0)
            ));
        }
        highest = Some(highest.map_or(a.token, |h| h.max(a.token)));
    }
    if regs.value != regs.accepted.len() as i64 {
        report.violation(format!(
            "{name}: fenced value {} but {} accepted writes",
            regs.value,
            regs.accepted.len()
        ));
    }
    if regs.fence != highest.unwrap_or(0) as i64 {
        report.violation(format!(
            "{name}: fence {} but the highest accepted token is {:?}",
            regs.fence, highest
        ));
    }
}

/// The fenced register holds every acknowledged write, and none that no
/// holder made.
fn check_history(name: &str, regs: &Registers, holders: &[&Holder], report: &mut Report) {
    let history: HashSet<(u64, Write, &str)> = regs
        .accepted
        .iter()
        .map(|a| (a.token, a.write, a.worker.as_str()))
        .collect();
    let mut invoked = HashSet::new();
    for h in holders {
        for w in &h.writes {
            invoked.insert((h.token, w.write, h.wid.as_str()));
            if w.outcome == Some(true) && !history.contains(&(h.token, w.write, h.wid.as_str())) {
                report.violation(format!(
                    "{name}: {} write of token {} by {} was acknowledged but is not in the register",
                    w.write.as_str(),
                    h.token,
                    h.wid
                ));
            }
        }
    }
    for a in &regs.accepted {
        if !invoked.contains(&(a.token, a.write, a.worker.as_str())) {
            report.violation(format!(
                "{name}: the register holds a {} write of token {} by {} that no holder made",
                a.write.as_str(),
                a.token,
                a.worker
            ));
        }
    }
}

/// Unguarded updates lost, a lower bound: acknowledged writes that the
/// final value does not reflect, or acknowledged writes of a value another
/// acknowledged write had already written (both read the same value).
pub fn unguarded_lost(logs: &HashMap<String, Vec<Event>>, name: &str, final_value: i64) -> i64 {
    let written: Vec<i64> = logs
        .values()
        .flatten()
        .filter(|e| e.op == "uwrite" && e.ty == Type::Ok && e.name == name)
        .filter_map(|e| e.value)
        .collect();
    let acked = written.len() as i64;
    let distinct = written.iter().collect::<HashSet<_>>().len() as i64;
    (acked - final_value).max(acked - distinct).max(0)
}
