//! Running a statement in the caller's task without losing its outcome to
//! a cancellation.
//!
//! A claim, a release or an extend is awaited by the caller directly: no
//! task is spawned for it and no reply crosses threads. If the caller's
//! future is dropped while the statement is in flight, [`Detached`] hands
//! the rest of it to a task of its own, which finishes it and deals with
//! the outcome (a claim that succeeded is released, a release or extend is
//! recorded in the renewal timetable), exactly as if it had been spawned
//! from the start.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// A boxed future whose remainder is spawned if it is dropped unfinished.
pub(crate) struct Detached<T: Send + 'static> {
    fut: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
    /// Set when the remainder is handed to a task of its own: the future
    /// then knows that nobody waits for its output.
    abandoned: Option<Arc<AtomicBool>>,
}

impl<T: Send + 'static> Detached<T> {
    /// Wraps `fut`, which finishes its work on its own once abandoned.
    pub(crate) fn new(fut: impl Future<Output = T> + Send + 'static) -> Self {
        Detached {
            fut: Some(Box::pin(fut)),
            abandoned: None,
        }
    }

    /// Wraps the future `make` builds from a flag that tells it whether its
    /// caller has gone away (set just before the remainder is spawned).
    pub(crate) fn with_flag<F>(make: impl FnOnce(Arc<AtomicBool>) -> F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        let flag = Arc::new(AtomicBool::new(false));
        Detached {
            fut: Some(Box::pin(make(flag.clone()))),
            abandoned: Some(flag),
        }
    }
}

/// Whether the caller behind a [`Detached::with_flag`] future has gone.
pub(crate) fn gone(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Acquire)
}

impl<T: Send + 'static> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let fut = self
            .fut
            .as_mut()
            .expect("a Detached future is not polled after it completed");
        let out = fut.as_mut().poll(cx);
        if out.is_ready() {
            self.fut = None;
        }
        out
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else {
            return;
        };
        if let Some(flag) = &self.abandoned {
            flag.store(true, Ordering::Release);
        }
        // Outside a runtime (the runtime shutting down) the remainder is
        // dropped: a claim then runs out by its ttl, a lease in the
        // timetable is forgotten by the future's own drop guards.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(async move {
                fut.await;
            }));
        }
    }
}
