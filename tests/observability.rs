//! Spans and metrics, read back: a capturing `tracing` layer records the
//! spans and events an acquisition cycle emits, and a debugging `metrics`
//! recorder the counters, gauges and histograms (docs/observability.md).
//! Against SQLite, PostgreSQL (lease and advisory) and Memory.
#![cfg(all(feature = "metrics", feature = "sqlite", feature = "postgres"))]

mod common;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dblock::postgres::{Advisory, AdvisoryOptions};
use dblock::{Error, Locks};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sqlx::PgPool;
use tokio::time::{sleep, timeout};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

// ---- A capturing tracing layer. ----

/// A span as it closed, or an event: its name (the message for events),
/// target, level and fields as text.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    target: String,
    level: Level,
    fields: HashMap<String, String>,
}

impl Seen {
    fn field(&self, f: &str) -> Option<&str> {
        self.fields.get(f).map(String::as_str)
    }
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<Seen>>>,
    events: Arc<Mutex<Vec<Seen>>>,
}

impl Capture {
    fn spans(&self, name: &str) -> Vec<Seen> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    }
    fn events(&self, message: &str) -> Vec<Seen> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|s| s.name == message)
            .cloned()
            .collect()
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let meta = attrs.metadata();
        let mut seen = Seen {
            name: meta.name().into(),
            target: meta.target().into(),
            level: *meta.level(),
            fields: HashMap::new(),
        };
        attrs.record(&mut Fields(&mut seen.fields));
        ctx.span(id).unwrap().extensions_mut().insert(seen);
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut ext = span.extensions_mut();
        values.record(&mut Fields(&mut ext.get_mut::<Seen>().unwrap().fields));
    }
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        let name = fields.remove("message").unwrap_or_default();
        self.events.lock().unwrap().push(Seen {
            name,
            target: meta.target().into(),
            level: *meta.level(),
            fields,
        });
    }
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        let seen = span.extensions_mut().remove::<Seen>();
        self.spans.lock().unwrap().extend(seen);
    }
}

/// Runs `body` on a current-thread runtime (so every task it spawns runs
/// on this thread) with the capturing layer as the thread's subscriber.
fn traced<F: std::future::Future<Output = ()>>(body: impl FnOnce(Capture) -> F) -> Capture {
    // The span tests record metrics too: not while a metrics test reads.
    let _one = METRICS.blocking_lock();
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let _default = tracing::subscriber::set_default(subscriber);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(body(capture.clone()));
    capture
}

// ---- The metrics recorder, one per process. ----

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this test binary");
        snapshotter
    })
}

/// One test at a time records: each reads what its own acquisitions did.
static METRICS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the recorder has recorded since the binary started, by metric name
/// and labels (sorted `k=v`): counters and gauges as totals, histograms as
/// every value recorded.
#[derive(Debug, Default, Clone)]
struct Metrics(HashMap<(String, Vec<String>), Value>);

#[derive(Debug, Clone)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Vec<f64>),
}

impl From<DebugValue> for Value {
    fn from(v: DebugValue) -> Value {
        match v {
            DebugValue::Counter(n) => Value::Counter(n),
            DebugValue::Gauge(g) => Value::Gauge(g.into_inner()),
            DebugValue::Histogram(xs) => {
                Value::Histogram(xs.iter().map(|x| x.into_inner()).collect())
            }
        }
    }
}

fn key(name: &str, labels: &[(&str, &str)]) -> (String, Vec<String>) {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    (name.into(), labels)
}

impl Metrics {
    /// The totals now. The debugging recorder hands out what was recorded
    /// since its last snapshot (a gauge's net change, too): they add up.
    fn take() -> Metrics {
        static TOTALS: Mutex<Option<Metrics>> = Mutex::new(None);
        let snapshot = snapshotter().snapshot().into_vec();
        let mut totals = TOTALS.lock().unwrap();
        let totals = totals.get_or_insert_with(Metrics::default);
        for (k, _, _, v) in snapshot {
            let (_, key) = k.into_parts();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let total = totals.0.entry((key.name().to_owned(), labels));
            match (total, Value::from(v)) {
                (Entry::Vacant(e), v) => {
                    e.insert(v);
                }
                (Entry::Occupied(mut e), v) => match (e.get_mut(), v) {
                    (Value::Counter(n), Value::Counter(m)) => *n += m,
                    (Value::Gauge(g), Value::Gauge(h)) => *g += h,
                    (Value::Histogram(xs), Value::Histogram(ys)) => xs.extend(ys),
                    (a, b) => panic!("one metric of two kinds: {a:?}, {b:?}"),
                },
            }
        }
        totals.clone()
    }
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.0.get(&key(name, labels)) {
            Some(Value::Counter(n)) => *n,
            None => 0,
            Some(other) => panic!("{name} is not a counter: {other:?}"),
        }
    }
    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.0.get(&key(name, labels)) {
            Some(Value::Gauge(g)) => *g,
            None => 0.0,
            Some(other) => panic!("{name} is not a gauge: {other:?}"),
        }
    }
    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        match self.0.get(&key(name, labels)) {
            Some(Value::Histogram(v)) => v.clone(),
            None => Vec::new(),
            Some(other) => panic!("{name} is not a histogram: {other:?}"),
        }
    }
}

/// The histogram values recorded between two snapshots.
fn recorded(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    let seen = before.histogram(name, labels).len();
    after.histogram(name, labels)[seen..].to_vec()
}

/// Counter deltas between two snapshots.
fn delta(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    after.counter(name, labels) - before.counter(name, labels)
}

// ---- Backends. ----

async fn pg_pool(size: u32) -> PgPool {
    let pool = common::pg_pool(&common::postgres_url().await, size).await;
    dblock::postgres::migrate(&pool).await.expect("migrate");
    pool
}

async fn sqlite_locks(dir: &common::TempDir) -> Locks {
    Locks::new(dblock::sqlite::Lease::open(dir.db()).await.expect("open"))
}

/// Breaks a lock behind its holder's back by `breaking` it, and waits
/// until `guard` has reported the loss. The loss's own report (event,
/// metrics) runs in a task of its own, a moment later: waited for too.
async fn lose(guard: &dblock::LockGuard, breaking: impl std::future::Future<Output = ()>) {
    breaking.await;
    timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("the guard reports the loss");
    sleep(Duration::from_millis(50)).await;
}

/// Breaks `name` with `force_release`: the next renewal finds it gone.
async fn force_release(locks: &Locks, name: &str) {
    assert!(locks.force_release(name).await.unwrap());
}

/// With `name` held: a try finds it busy, and a 50 ms wait times out.
async fn busy_then_timeout(locks: &Locks, name: &str) {
    assert!(locks.try_acquire(name).await.unwrap().is_none());
    let late = locks
        .acquire(name)
        .wait(Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(late, Error::Timeout { .. }), "{late:?}");
}

// ---- Metrics. ----

/// Acquisitions counted between two snapshots, by outcome: granted, busy,
/// timeout, error.
fn assert_outcomes(before: &Metrics, after: &Metrics, backend: &str, expected: [u64; 4]) {
    let counted = ["granted", "busy", "timeout", "error"].map(|outcome| {
        let labels = [("backend", backend), ("outcome", outcome)];
        delta(before, after, dblock::metrics::ACQUISITIONS, &labels)
    });
    assert_eq!(counted, expected, "granted, busy, timeout, error");
}

/// A granted acquisition held across a renewal, a busy try, a timeout, a
/// release, then a lease broken behind its holder's back: every metric
/// moves as it should.
async fn lease_cycle_metrics(locks: Locks, backend: &str) {
    let _one = METRICS.lock().await;
    let b = [("backend", backend)];
    let before = Metrics::take();
    let name = common::unique("obs-metrics");

    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_millis(600))
        .await
        .unwrap();
    let held = Metrics::take();
    assert_eq!(held.gauge(dblock::metrics::LOCKS_HELD, &b), 1.0);
    busy_then_timeout(&locks, &name).await;
    // Past a renewal (every ttl/3).
    sleep(Duration::from_millis(450)).await;
    assert!(!guard.is_lost());
    guard.release().await.unwrap();

    let after = Metrics::take();
    assert_outcomes(&before, &after, backend, [1, 1, 1, 0]);
    assert_eq!(after.gauge(dblock::metrics::LOCKS_HELD, &b), 0.0);
    let waits = recorded(&before, &held, dblock::metrics::WAIT_SECONDS, &b);
    assert_eq!(waits.len(), 1, "one granted acquisition: {waits:?}");
    let holds = recorded(&before, &after, dblock::metrics::HOLD_SECONDS, &b);
    assert_eq!(holds.len(), 1, "{holds:?}");
    assert!(holds[0] >= 0.45, "held for {}s", holds[0]);
    let sizes = recorded(&before, &after, dblock::metrics::RENEWAL_BATCH_SIZE, &b);
    assert!(!sizes.is_empty(), "a renewal batch ran");
    assert!(sizes.iter().all(|&n| n >= 1.0), "{sizes:?}");
    let took = recorded(&before, &after, dblock::metrics::RENEWAL_BATCH_SECONDS, &b);
    assert_eq!(took.len(), sizes.len());

    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_millis(300))
        .await
        .unwrap();
    lose(&guard, force_release(&locks, &name)).await;
    let lost = Metrics::take();
    let reason = [("backend", backend), ("reason", "renewal_failed")];
    assert_eq!(delta(&after, &lost, dblock::metrics::LOSSES, &reason), 1);
    // A lost lock is no longer counted held, and its drop does not take
    // it off a second time.
    assert_eq!(lost.gauge(dblock::metrics::LOCKS_HELD, &b), 0.0);
    drop(guard);
    let dropped = Metrics::take();
    assert_eq!(dropped.gauge(dblock::metrics::LOCKS_HELD, &b), 0.0);
    assert_eq!(
        recorded(&lost, &dropped, dblock::metrics::HOLD_SECONDS, &b).len(),
        1,
        "the lost guard's hold time is recorded when it goes"
    );
}

#[tokio::test]
async fn sqlite_lease_metrics() {
    let dir = common::TempDir::new("obs");
    lease_cycle_metrics(sqlite_locks(&dir).await, "sqlite-lease").await;
}

#[tokio::test]
async fn postgres_lease_metrics() {
    let locks = Locks::new(dblock::postgres::Lease::new(pg_pool(4).await));
    lease_cycle_metrics(locks, "postgres-lease").await;
}

#[tokio::test]
async fn memory_metrics() {
    lease_cycle_metrics(Locks::new(dblock::memory::Memory::new()), "memory").await;
}

fn advisory(pool: PgPool) -> Locks {
    Locks::new(
        Advisory::new(pool)
            .with_options(AdvisoryOptions::default().heartbeat(Duration::from_millis(300)))
            .expect("valid options"),
    )
}

/// Advisory locks: outcomes, and `pg_terminate_backend` of the holder
/// counted as a loss with reason `terminated`; an error outcome too.
#[tokio::test]
async fn postgres_advisory_metrics() {
    let locks = advisory(pg_pool(3).await);
    let admin = pg_pool(1).await;
    let _one = METRICS.lock().await;
    let backend = "postgres-advisory";
    let b = [("backend", backend)];
    let before = Metrics::take();
    let name = common::unique("obs-advisory");

    let guard = locks.acquire(&name).await.unwrap();
    busy_then_timeout(&locks, &name).await;
    // An option advisory locks cannot honour: an error outcome.
    let refused = locks
        .acquire(common::unique("obs-refused"))
        .hold_at_least(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::Unsupported { .. }), "{refused:?}");
    let mid = Metrics::take();
    assert_eq!(mid.gauge(dblock::metrics::LOCKS_HELD, &b), 1.0);

    lose(&guard, common::terminate_advisory_holder(&admin, &name)).await;
    let after = Metrics::take();
    assert_outcomes(&before, &after, backend, [1, 1, 1, 1]);
    let losses: Vec<_> = after
        .0
        .iter()
        .filter(|((n, l), _)| {
            n == dblock::metrics::LOSSES && l.contains(&format!("backend={backend}"))
        })
        .map(|((_, l), v)| (l.clone(), v.clone()))
        .collect();
    let terminated = [("backend", backend), ("reason", "terminated")];
    assert_eq!(
        delta(&before, &after, dblock::metrics::LOSSES, &terminated),
        1,
        "losses: {losses:?}"
    );
    assert_eq!(after.gauge(dblock::metrics::LOCKS_HELD, &b), 0.0);
    let err = guard.release().await.unwrap_err();
    assert!(matches!(err, Error::Lost { .. }), "{err:?}");
    assert_eq!(
        Metrics::take().gauge(dblock::metrics::LOCKS_HELD, &b),
        0.0,
        "a lost guard released is not taken off twice"
    );
}

// ---- Spans. ----

/// The acquisition cycle on one backend, traced: spans for acquire (each
/// outcome), release and the renewal batch, and the loss event.
async fn lease_cycle_spans(locks: Locks) {
    let name = common::unique("obs-spans");
    let guard = locks
        .acquire(&name)
        .ttl(Duration::from_millis(300))
        .await
        .unwrap();
    busy_then_timeout(&locks, &name).await;
    sleep(Duration::from_millis(250)).await;
    guard.release().await.unwrap();

    let permit = locks
        .acquire(&name)
        .ttl(Duration::from_millis(300))
        .max_holders(3)
        .await
        .unwrap();
    lose(&permit, force_release(&locks, &name)).await;
    drop(permit);
}

fn check_spans(capture: &Capture, backend: &str) {
    let acquires = capture.spans("acquire");
    assert_eq!(acquires.len(), 4, "{acquires:#?}");
    for s in &acquires {
        assert_eq!(s.target, "dblock::locks");
        assert_eq!(s.level, Level::DEBUG);
        assert_eq!(s.field("backend"), Some(backend));
        assert_eq!(s.field("mode"), Some("exclusive"));
        assert!(s.field("name").is_some_and(|n| n.contains(":obs-spans:")));
        let waited: f64 = s.field("waited_s").expect("waited_s").parse().unwrap();
        assert!(waited >= 0.0);
    }
    let outcomes: Vec<_> = acquires
        .iter()
        .map(|s| s.field("outcome").unwrap())
        .collect();
    assert_eq!(outcomes, ["granted", "busy", "timeout", "granted"]);
    assert!(acquires[0].field("token").is_some());
    assert_eq!(acquires[1].field("token"), None);
    assert!(
        acquires[2]
            .field("waited_s")
            .unwrap()
            .parse::<f64>()
            .unwrap()
            >= 0.045
    );
    assert_eq!(acquires[0].field("max_holders"), None);
    assert_eq!(acquires[3].field("max_holders"), Some("3"));
    assert_eq!(acquires[2].field("wait"), Some("For(50ms)"));

    let releases = capture.spans("release");
    let outcomes: Vec<_> = releases
        .iter()
        .map(|s| s.field("outcome").unwrap())
        .collect();
    assert_eq!(outcomes, ["released", "dropped"], "{releases:#?}");
    assert_eq!(releases[0].field("token"), acquires[0].field("token"));
    assert_eq!(releases[0].target, "dblock::guard");
    assert!(releases[0].field("held_s").unwrap().parse::<f64>().unwrap() >= 0.25);

    let batches = capture.spans("renewal_batch");
    assert!(!batches.is_empty(), "a renewal batch ran");
    for s in &batches {
        assert_eq!(s.target, "dblock::lease::renewal");
        assert_eq!(s.level, Level::DEBUG);
        assert_eq!(s.field("backend"), Some(backend));
        assert!(s.field("leases").unwrap().parse::<u64>().unwrap() >= 1);
        assert!(s.field("took_s").is_some());
        assert!(s.field("statements").is_some());
    }

    let losses = capture.events("dblock: lock lost");
    assert_eq!(losses.len(), 1, "{losses:#?}");
    let loss = &losses[0];
    assert_eq!(loss.level, Level::WARN);
    assert_eq!(loss.target, "dblock::backend");
    assert_eq!(loss.field("cause"), Some("renewal_failed"));
    assert_eq!(loss.field("backend"), Some(backend));
    assert_eq!(loss.field("token"), acquires[3].field("token"));
    assert!(loss
        .field("name")
        .is_some_and(|n| n.contains(":obs-spans:")));
    assert!(loss
        .field("reason")
        .is_some_and(|r| r.contains("no longer ours")));

    // Nothing above debug but the loss (opening the file migrates its
    // schema, which is logged at info).
    let loud: Vec<_> = capture
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.target.starts_with("dblock") && e.level < Level::DEBUG)
        .filter(|e| e.name != "dblock: lock lost" && !e.target.ends_with("::migrate"))
        .cloned()
        .collect();
    assert!(loud.is_empty(), "{loud:#?}");
}

#[test]
fn sqlite_lease_spans() {
    let dir = common::TempDir::new("obs-spans");
    let capture = traced(|_| async {
        lease_cycle_spans(sqlite_locks(&dir).await).await;
    });
    check_spans(&capture, "sqlite-lease");
}

#[test]
fn postgres_lease_spans() {
    let capture = traced(|_| async move {
        let locks = Locks::new(dblock::postgres::Lease::new(pg_pool(4).await));
        lease_cycle_spans(locks).await;
    });
    check_spans(&capture, "postgres-lease");
}

/// An advisory holder terminated: the loss event says `terminated`.
#[test]
fn postgres_advisory_loss_event() {
    let capture = traced(|_| async move {
        let locks = advisory(pg_pool(2).await);
        let admin = pg_pool(1).await;
        let name = common::unique("obs-advisory-span");
        let guard = locks.acquire(&name).await.unwrap();
        lose(&guard, common::terminate_advisory_holder(&admin, &name)).await;
        drop(guard);
    });
    let acquires = capture.spans("acquire");
    assert_eq!(acquires.len(), 1);
    assert_eq!(acquires[0].field("backend"), Some("postgres-advisory"));
    assert_eq!(acquires[0].field("outcome"), Some("granted"));
    let losses = capture.events("dblock: lock lost");
    assert_eq!(losses.len(), 1, "{losses:#?}");
    assert_eq!(losses[0].field("cause"), Some("terminated"), "{losses:#?}");
    assert_eq!(losses[0].field("backend"), Some("postgres-advisory"));
}
