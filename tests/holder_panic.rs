//! A holder session that ends abnormally closes its connection (issue 11,
//! item 5): a panic inside dblock's code while it holds advisory locks must
//! not hand the connection back to the pool with the locks still on it.
//!
//! The panic is injected through the application's own `tracing`
//! subscriber, which sees every statement sqlx runs. This test has a binary
//! of its own because that subscriber is process-wide: a thread-local one
//! misses statements whose log call sites another test thread registered
//! first.
//!
//! Against the real PostgreSQL (`DBLOCK_TEST_POSTGRES_URL`, see `tests/common`).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dblock::postgres::Advisory;
use dblock::Locks;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::time::{sleep, Instant};

/// The thread whose statements the subscriber may make panic.
const HOLDER_THREAD: &str = "dblock-test-panicking-holder";

/// Panics on the first statement logged on [`HOLDER_THREAD`] after it is
/// armed: the holder session's next statement then panics inside
/// dblock's code, wherever that code runs on that thread.
struct PanicAfterArmed(Arc<AtomicBool>);

impl tracing::Subscriber for PanicAfterArmed {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        m.target().starts_with("sqlx::query")
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {
        if std::thread::current().name() == Some(HOLDER_THREAD)
            && self.0.swap(false, Ordering::SeqCst)
        {
            panic!("injected panic in a statement of the holder session");
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

async fn pool(max: u32) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(20))
        .connect(&common::postgres_url().await)
        .await
        .expect("connect to PostgreSQL (DBLOCK_TEST_POSTGRES_URL)");
    dblock::postgres::migrate(&pool).await.expect("migrate");
    pool
}

/// Whether the advisory lock `key` is free: taken and given back at once.
async fn advisory_free(pool: &PgPool, key: i64) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1) AND pg_advisory_unlock($1)")
        .bind(key)
        .fetch_one(pool)
        .await
        .expect("probe the advisory lock")
}

/// A holder session whose code panics mid-way (in its next statement)
/// closes its connection: the server ends the session and its locks with
/// it, the guard reports lost, and no connection goes back to the pool
/// still holding the lock. The holder's pool, backend and guard all stay
/// alive until the check is done, so only the session's own handling of
/// the panic can have freed the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_session_that_panics_closes_its_connection() {
    let armed = Arc::new(AtomicBool::new(false));
    tracing::subscriber::set_global_default(PanicAfterArmed(armed.clone()))
        .expect("the only subscriber of this test binary");
    let checker = pool(2).await;
    let name = common::unique("panic");
    let key = dblock::advisory_key(&name);
    let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<bool>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::Builder::new()
        .name(HOLDER_THREAD.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let pool = pool(2).await;
                let locks = Locks::new(Advisory::new(pool.clone()));
                let guard = Arc::new(locks.acquire(&name).await.unwrap());
                armed.store(true, Ordering::SeqCst);
                // The next statement on this thread is the holder
                // session's check: it panics, in the session's own task or
                // in the caller's, whichever runs it.
                let extending = guard.clone();
                let extended =
                    tokio::spawn(async move { extending.extend(Duration::from_secs(1)).await })
                        .await;
                assert!(
                    !armed.load(Ordering::SeqCst),
                    "the check ran no statement on the holder's thread ({extended:?})"
                );
                held_tx.send(()).unwrap();
                let lost = tokio::time::timeout(Duration::from_secs(10), guard.lost())
                    .await
                    .is_ok();
                lost_tx.send(lost).unwrap();
                while done_rx.try_recv().is_err() {
                    sleep(Duration::from_millis(20)).await;
                }
                drop((guard, locks, pool));
            });
        })
        .expect("spawn the holder thread");
    held_rx
        .await
        .expect("the holder thread got as far as the panic");
    let started = Instant::now();
    let mut free = advisory_free(&checker, key).await;
    while !free && started.elapsed() < Duration::from_secs(10) {
        sleep(Duration::from_millis(50)).await;
        free = advisory_free(&checker, key).await;
    }
    let lost = lost_rx.await.expect("the holder thread reported");
    done_tx.send(()).unwrap();
    holder.join().expect("the holder thread");
    assert!(
        free,
        "the lock is still held 10 s after its session panicked: its connection went back \
         to the pool (or stayed open) still holding it"
    );
    assert!(
        lost,
        "the guard of a session that panicked did not report lost"
    );
}
