//! Futures that finish even when their caller stops waiting.
//!
//! A statement whose outcome creates state (a lock taken, a lock released)
//! must be seen through to its answer even if the caller's future is
//! dropped half-way: otherwise nobody learns whether the lock is held.
//! Spawning a task per statement would do that, at the price of two
//! cross-thread hand-offs per call. [`Detached`] runs the work in the
//! caller's own task instead, and only if it is dropped before it is done
//! hands the rest to a task of its own, which runs it to the end and drops
//! its output (a grant dropped there releases its lock).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::backend::BoxFuture;

/// Runs a future in place; if dropped unfinished, finishes it in a task.
pub(crate) struct Detached<T: Send + 'static> {
    work: Option<BoxFuture<'static, T>>,
}

impl<T: Send + 'static> Detached<T> {
    pub(crate) fn new(work: impl Future<Output = T> + Send + 'static) -> Self {
        Self::boxed(Box::pin(work))
    }

    /// Runs a future that is boxed already, without boxing it again.
    pub(crate) fn boxed(work: BoxFuture<'static, T>) -> Self {
        Detached { work: Some(work) }
    }
}

impl<T: Send + 'static> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let work = self
            .work
            .as_mut()
            .expect("Detached polled after completion");
        match work.as_mut().poll(cx) {
            Poll::Ready(out) => {
                self.work = None;
                Poll::Ready(out)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        // Without a runtime (it is shutting down) the work is dropped with
        // the rest; what it holds must then clean up after itself (the
        // advisory holder session closes a connection whose last statement
        // was abandoned).
        if let Some(work) = self.work.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    drop(work.await);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn finishes_in_place_without_a_task() {
        let here = std::thread::current().id();
        let ran_on = Detached::new(async move { std::thread::current().id() }).await;
        assert_eq!(ran_on, here);
    }

    #[tokio::test]
    async fn dropped_unfinished_work_still_runs_to_the_end() {
        let done = Arc::new(AtomicBool::new(false));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let flag = done.clone();
        let work = Detached::new(async move {
            let _ = wait.await;
            flag.store(true, Ordering::SeqCst);
        });
        // Polled once (it waits), then abandoned.
        let _ = tokio::time::timeout(Duration::from_millis(10), work).await;
        assert!(!done.load(Ordering::SeqCst));
        go.send(()).unwrap();
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the abandoned work was not finished");
    }
}
