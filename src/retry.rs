//! Jittered pauses and retries, in one place: the waits between polls of a
//! busy lock, and the backoff before running a statement again after a
//! transient failure.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

/// `d` scaled by a random factor between `low` and 1 (inclusive), so that
/// processes that started together do not keep trying together.
pub(crate) fn jitter(d: Duration, low: f64) -> Duration {
    d.mul_f64(rand::rng().random_range(low..=1.0))
}

/// Exponential backoff: each pause is 10-100 % of a cap that starts at
/// `first` and doubles after every pause, up to `max`.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    cap: Duration,
    max: Duration,
}

#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
impl Backoff {
    pub(crate) const fn new(first: Duration, max: Duration) -> Self {
        Backoff { cap: first, max }
    }

    /// The next pause, jittered; doubles the cap.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let pause = jitter(self.cap, 0.1);
        self.cap = (self.cap * 2).min(self.max);
        pause
    }
}

/// Runs `op` until it succeeds or fails with an error that `again` (given
/// the error and the number of the attempt that failed, from 1) does not
/// want retried; sleeps `backoff`'s next pause between attempts. Each `op`
/// must be safe to run again (one statement, or one whole transaction).
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) async fn retrying<T, E, F, Fut>(
    mut backoff: Backoff,
    mut again: impl FnMut(&E, u32) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if again(&e, attempt) => {
                tokio::time::sleep(backoff.next_pause()).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(4), Duration::from_millis(20));
        for cap in [4, 8, 16, 20, 20] {
            let p = b.next_pause();
            let cap = Duration::from_millis(cap);
            assert!(
                p >= cap.mul_f64(0.1) && p <= cap,
                "{p:?} for a cap of {cap:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retrying_stops_on_success_or_a_refused_error() {
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(4));
        let mut calls = 0;
        let got: Result<u32, &str> = retrying(
            backoff,
            |_, _| true,
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err("busy")
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(got, Ok(3));

        let mut calls = 0;
        let got: Result<u32, &str> = retrying(
            backoff,
            |_, attempt| attempt < 4,
            || {
                calls += 1;
                async { Err("busy") }
            },
        )
        .await;
        assert_eq!(got, Err("busy"));
        assert_eq!(calls, 4);
    }
}
