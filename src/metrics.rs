//! The metrics dblock records (the `metrics` cargo feature), through the
//! [`metrics`](https://docs.rs/metrics) crate's facade: install any
//! recorder (Prometheus, OpenTelemetry, StatsD exporters) and they appear.
//! Without a recorder, recording costs a few atomic loads; without the
//! feature, nothing is recorded and the `metrics` crate is not a dependency.
//!
//! Every metric has a `backend` label: [`Backend::kind`](crate::Backend::kind)
//! (`postgres-advisory`, `postgres-lease`, `mysql-lease`, `sqlite-lease`,
//! `redis-lease`, `memory`).
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `dblock_acquisitions_total` | counter | `backend`, `outcome` | acquisitions by outcome: `granted`, `busy` (held, and the caller would not wait), `timeout`, `error` |
//! | `dblock_wait_seconds` | histogram | `backend` | how long a granted acquisition took, waiting included |
//! | `dblock_hold_seconds` | histogram | `backend` | how long a guard lived, from the grant to its release or drop |
//! | `dblock_locks_held` | gauge | `backend` | guards alive now and not known lost |
//! | `dblock_losses_total` | counter | `backend`, `reason` | locks lost, by cause (below) |
//! | `dblock_renewal_batch_size` | histogram | `backend` | leases renewed together in one background renewal batch |
//! | `dblock_renewal_batch_seconds` | histogram | `backend` | how long a renewal batch took, all its statements together |
//!
//! Loss causes (`reason`), a fixed set: [`LostReason::as_str`](crate::LostReason::as_str)
//! of the cause the backend recorded.
//!
//! | reason | the lock was lost because |
//! |---|---|
//! | `expired` | the lease ran out before a renewal was confirmed (local deadline passed, or a release found it expired) |
//! | `renewal_failed` | a renewal or heartbeat found the lock no longer ours: taken over after it ran out, or broken elsewhere |
//! | `force_released` | it was broken by [`Locks::force_release`](crate::Locks::force_release) through the same advisory backend |
//! | `terminated` | its advisory session was terminated (`pg_terminate_backend`) |
//! | `connection_lost` | the connection that held it failed or stopped answering |
//! | `runtime_shutdown` | the Tokio runtime that renewed it shut down |
//! | `other` | any other cause (the warning logged with the loss says which) |
//!
//! A lock lost before [`Locks`](crate::Locks) has wrapped its grant in a
//! guard (a few instructions' window) is counted with `backend="unknown"`.
//!
//! ```
//! # #[cfg(feature = "metrics")] {
//! // Once, after installing the application's recorder: HELP texts.
//! dblock::metrics::describe();
//! # }
//! ```

/// Counter of acquisitions, by `backend` and `outcome`.
pub const ACQUISITIONS: &str = "dblock_acquisitions_total";
/// Histogram of how long granted acquisitions took, in seconds.
pub const WAIT_SECONDS: &str = "dblock_wait_seconds";
/// Histogram of how long guards lived, in seconds.
pub const HOLD_SECONDS: &str = "dblock_hold_seconds";
/// Gauge of the guards alive now and not known lost.
pub const LOCKS_HELD: &str = "dblock_locks_held";
/// Counter of losses, by `backend` and `reason`.
pub const LOSSES: &str = "dblock_losses_total";
/// Histogram of the number of leases in a background renewal batch.
pub const RENEWAL_BATCH_SIZE: &str = "dblock_renewal_batch_size";
/// Histogram of how long background renewal batches took, in seconds.
pub const RENEWAL_BATCH_SECONDS: &str = "dblock_renewal_batch_seconds";

/// Describes every metric (unit and help text) to the recorder installed
/// now. Optional: recorders record undescribed metrics too; call it once
/// after installing yours to get `# HELP` lines and units.
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        ACQUISITIONS,
        Unit::Count,
        "dblock acquisitions by outcome (granted, busy, timeout, error)"
    );
    describe_histogram!(
        WAIT_SECONDS,
        Unit::Seconds,
        "How long granted dblock acquisitions took, waiting included"
    );
    describe_histogram!(
        HOLD_SECONDS,
        Unit::Seconds,
        "How long dblock guards lived, from grant to release or drop"
    );
    describe_gauge!(
        LOCKS_HELD,
        Unit::Count,
        "dblock guards alive now and not known lost"
    );
    describe_counter!(LOSSES, Unit::Count, "dblock locks lost, by cause");
    describe_histogram!(
        RENEWAL_BATCH_SIZE,
        Unit::Count,
        "Leases renewed together in one dblock renewal batch"
    );
    describe_histogram!(
        RENEWAL_BATCH_SECONDS,
        Unit::Seconds,
        "How long dblock renewal batches took"
    );
}
