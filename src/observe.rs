//! What dblock tells an observer, in one place: the outcome of an
//! acquisition, and the metrics (behind
//! the `metrics` feature; without it every recording here is an empty
//! function).
//!
//! The spans themselves are opened where the work happens (`locks.rs`,
//! `guard.rs`, `lease/renewal.rs`) so that their targets name the module;
//! loss is reported by [`LockStatus::mark_lost`](crate::LockStatus::mark_lost).
//!
//! Nothing here may be called while an internal lock is held: a tracing
//! subscriber or a metrics recorder may call back into dblock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::backend::Grant;
use crate::{Error, Result};

/// How an acquisition ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Granted,
    /// Held elsewhere, and the caller asked not to wait.
    Busy,
    Timeout,
    Error,
}

impl Outcome {
    pub(crate) fn of(result: &Result<Option<Grant>>) -> Self {
        match result {
            Ok(Some(_)) => Outcome::Granted,
            Ok(None) => Outcome::Busy,
            Err(Error::Timeout { .. }) => Outcome::Timeout,
            Err(_) => Outcome::Error,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Granted => "granted",
            Outcome::Busy => "busy",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
        }
    }
}

/// What the facade tells a lock's status about the guard that holds it,
/// so that a loss, reported by the backend, can be labelled and counted.
/// Lives in the status channel (`backend::State`): no allocation of its own.
#[derive(Debug, Default)]
pub(crate) struct Seen(OnceLock<Holder>);

/// The guard behind a status channel.
#[derive(Debug)]
pub(crate) struct Holder {
    pub(crate) backend: &'static str,
    pub(crate) token: u64,
    /// The lock's name, kept only when the loss warning would be logged.
    pub(crate) name: Option<Arc<str>>,
    /// Counted in `dblock_locks_held` and not yet taken off: whoever swaps
    /// it to false (loss or the guard's end, whichever comes first) takes
    /// it off, exactly once.
    counted: AtomicBool,
}

impl Clone for Seen {
    fn clone(&self) -> Self {
        // A copy of a status is never counted: the original is.
        let seen = Seen::default();
        if let Some(h) = self.0.get() {
            let _ = seen.0.set(Holder {
                backend: h.backend,
                token: h.token,
                name: h.name.clone(),
                counted: AtomicBool::new(false),
            });
        }
        seen
    }
}

impl Seen {
    /// Records the guard's backend and token (and name, if given); the
    /// first call wins. The holder is counted held.
    pub(crate) fn set(&self, backend: &'static str, token: u64, name: Option<&Arc<str>>) {
        let _ = self.0.set(Holder {
            backend,
            token,
            name: name.cloned(),
            counted: AtomicBool::new(true),
        });
    }

    pub(crate) fn holder(&self) -> Option<&Holder> {
        self.0.get()
    }

    /// Takes the holder off the held count if it still is on it; true
    /// exactly once.
    pub(crate) fn uncount(&self) -> bool {
        self.0
            .get()
            .is_some_and(|h| h.counted.swap(false, Ordering::AcqRel))
    }
}

/// `tracing::debug_span!`, or no span at all when `debug` is off for the
/// calling module. A disabled span is not free: with tracing's `log`
/// feature (which sqlx turns on) and no subscriber, creating, entering,
/// leaving, recording and dropping one each ask the `log` crate whether it
/// wants it. `Span::none()` costs nothing, and `enabled!` one check.
macro_rules! debug_span {
    ($($span:tt)*) => {
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!($($span)*)
        } else {
            tracing::Span::none()
        }
    };
}
pub(crate) use debug_span;

/// Whether a lost lock's status needs its holder recorded: for the
/// `dblock_locks_held` gauge, or to name the lock in the loss warning.
pub(crate) fn holder_wanted() -> bool {
    cfg!(feature = "metrics") || tracing::enabled!(target: "dblock::backend", tracing::Level::WARN)
}

/// Whether acquisitions must read the clock: a recorder may want wait and
/// hold times (with the `metrics` feature), or a span is on.
pub(crate) fn timing(span: &tracing::Span) -> bool {
    cfg!(feature = "metrics") || !span.is_disabled()
}

#[cfg(feature = "metrics")]
mod record {
    use std::sync::RwLock;
    use std::time::Duration;

    use ::metrics::{Key, Label, Level, Metadata};

    use crate::metrics::*;

    /// What every acquisition and release records, under its metrics'
    /// keys for one backend. Built once per backend kind and kept for the
    /// process (there are a handful of kinds): the macros' keys, labelled
    /// with a backend named at run time, would be built, hashed and
    /// allocated at every call, which cost as much as a lock's bookkeeping.
    struct Keys {
        /// One per [`Outcome`](super::Outcome), in `OUTCOMES` order.
        acquisitions: [Key; 4],
        wait: Key,
        held: Key,
        hold: Key,
    }

    const OUTCOMES: [super::Outcome; 4] = [
        super::Outcome::Granted,
        super::Outcome::Busy,
        super::Outcome::Timeout,
        super::Outcome::Error,
    ];

    /// The metadata the `metrics` macros give a metric of this module.
    static METADATA: Metadata<'static> =
        Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

    static KEYS: RwLock<Vec<(&'static str, &'static Keys)>> = RwLock::new(Vec::new());

    fn keys(backend: &'static str) -> &'static Keys {
        let found = |known: &[(&'static str, &'static Keys)]| {
            known
                .iter()
                .find(|(kind, _)| std::ptr::eq(*kind, backend) || *kind == backend)
                .map(|(_, keys)| *keys)
        };
        if let Some(keys) = found(&KEYS.read().unwrap_or_else(|e| e.into_inner())) {
            return keys;
        }
        let mut known = KEYS.write().unwrap_or_else(|e| e.into_inner());
        if let Some(keys) = found(&known) {
            return keys;
        }
        let labels = |extra: Option<&'static str>| -> &'static [Label] {
            let mut labels = vec![Label::from_static_parts("backend", backend)];
            if let Some(outcome) = extra {
                labels.push(Label::from_static_parts("outcome", outcome));
            }
            Vec::leak(labels)
        };
        let keys: &'static Keys = Box::leak(Box::new(Keys {
            acquisitions: OUTCOMES
                .map(|o| Key::from_static_parts(ACQUISITIONS, labels(Some(o.as_str())))),
            wait: Key::from_static_parts(WAIT_SECONDS, labels(None)),
            held: Key::from_static_parts(LOCKS_HELD, labels(None)),
            hold: Key::from_static_parts(HOLD_SECONDS, labels(None)),
        }));
        known.push((backend, keys));
        keys
    }

    pub(crate) fn acquisition(backend: &'static str, outcome: super::Outcome, waited: Duration) {
        let keys = keys(backend);
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0);
        ::metrics::with_recorder(|r| {
            r.register_counter(&keys.acquisitions[i], &METADATA)
                .increment(1);
            if outcome == super::Outcome::Granted {
                r.register_histogram(&keys.wait, &METADATA).record(waited);
                r.register_gauge(&keys.held, &METADATA).increment(1.0);
            }
        });
    }

    pub(crate) fn not_held(backend: &'static str) {
        let keys = keys(backend);
        ::metrics::with_recorder(|r| r.register_gauge(&keys.held, &METADATA).decrement(1.0));
    }

    pub(crate) fn hold(backend: &'static str, held: Duration) {
        let keys = keys(backend);
        ::metrics::with_recorder(|r| r.register_histogram(&keys.hold, &METADATA).record(held));
    }

    pub(crate) fn loss(backend: &'static str, cause: &'static str) {
        ::metrics::counter!(LOSSES, "backend" => backend, "reason" => cause).increment(1);
    }

    pub(crate) fn renewal_batch(backend: &'static str, size: usize, took: Duration) {
        ::metrics::histogram!(RENEWAL_BATCH_SIZE, "backend" => backend).record(size as f64);
        ::metrics::histogram!(RENEWAL_BATCH_SECONDS, "backend" => backend).record(took);
    }
}

#[cfg(not(feature = "metrics"))]
mod record {
    use std::time::Duration;

    #[inline(always)]
    pub(crate) fn acquisition(_: &'static str, _: super::Outcome, _: Duration) {}
    #[inline(always)]
    pub(crate) fn not_held(_: &'static str) {}
    #[inline(always)]
    pub(crate) fn hold(_: &'static str, _: Duration) {}
    #[inline(always)]
    pub(crate) fn loss(_: &'static str, _: &'static str) {}
    #[inline(always)]
    pub(crate) fn renewal_batch(_: &'static str, _: usize, _: Duration) {}
}

pub(crate) use record::{acquisition, hold, loss, not_held, renewal_batch};
