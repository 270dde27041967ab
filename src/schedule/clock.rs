//! The database clock as the scheduler sees it between two round trips.
//!
//! Asking the database for the time before every decision would cost a
//! round trip per tick and per host. Instead the scheduler measures the
//! offset between this host's wall clock and the database's once (and again
//! every [`REFRESH`]), halfway through a round trip, and reads the database
//! time as "local wall clock + offset". The local wall clock is read once
//! and then advanced by tokio's monotonic clock, so a host whose clock is
//! stepped (NTP, an operator) or paused under `tokio::time::pause` keeps a
//! consistent view; sleeps are planned on the monotonic clock too. The
//! error of the estimate is about half a round trip plus the drift between
//! the two clocks since the last measurement.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::{Locks, Result};

/// How often the offset is measured again.
pub(crate) const REFRESH: Duration = Duration::from_secs(60);

/// This host's reading of the database clock.
#[derive(Debug, Clone)]
pub(crate) struct DbClock {
    /// The local wall clock at `base`, shifted by the test hook.
    base_wall: DateTime<Utc>,
    base: Instant,
    /// Database time minus local wall time.
    offset: chrono::Duration,
    measured: Instant,
    /// The last round trip's length, the bound on the estimate's error.
    round_trip: Duration,
}

impl DbClock {
    /// Reads the local wall clock (shifted by `skew`, a test hook that
    /// plays a host whose clock is wrong) and measures the offset.
    pub(crate) async fn new(locks: &Locks, skew: chrono::Duration) -> Result<DbClock> {
        let mut clock = DbClock {
            base_wall: Utc::now() + skew,
            base: Instant::now(),
            offset: chrono::Duration::zero(),
            measured: Instant::now(),
            round_trip: Duration::ZERO,
        };
        clock.measure(locks).await?;
        Ok(clock)
    }

    /// The local wall clock at `at`.
    fn local(&self, at: Instant) -> DateTime<Utc> {
        self.base_wall + crate::time::chrono_duration(at - self.base)
    }

    /// Measures the offset again, around one round trip.
    pub(crate) async fn measure(&mut self, locks: &Locks) -> Result<()> {
        let sent = Instant::now();
        let db = locks.now().await?;
        let back = Instant::now();
        let mid = sent + (back - sent) / 2;
        self.offset = db - self.local(mid);
        self.measured = back;
        self.round_trip = back - sent;
        let off = self.offset.num_milliseconds().abs();
        if off >= 1000 {
            tracing::info!(
                offset_ms = self.offset.num_milliseconds(),
                "dblock::schedule: this host's clock differs from the database's; slots follow the database"
            );
        }
        Ok(())
    }

    /// Whether the offset is due to be measured again.
    pub(crate) fn stale(&self) -> bool {
        self.measured.elapsed() >= REFRESH
    }

    /// The database time now, estimated.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.at(Instant::now())
    }

    /// The database time at a local instant, estimated.
    pub(crate) fn at(&self, at: Instant) -> DateTime<Utc> {
        self.local(at) + self.offset
    }

    /// The local instant at which the database clock reads `t`, estimated.
    pub(crate) fn instant_of(&self, t: DateTime<Utc>) -> Instant {
        let now = Instant::now();
        let ahead = t - self.at(now);
        match ahead.to_std() {
            Ok(d) => now + d,
            // In the past: now.
            Err(_) => now,
        }
    }

    /// The last round trip: how far off the estimate may be.
    pub(crate) fn uncertainty(&self) -> Duration {
        self.round_trip
    }
}
