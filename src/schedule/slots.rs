//! When a job's slots start and end: a fixed interval or a cron expression.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::{Error, Result};

/// The shortest interval [`Schedule::every`] accepts.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// When a job runs: one slot per interval, or one per cron match.
///
/// Slots are computed from the database clock (see
/// [`Backend::now`](crate::Backend::now)), in UTC.
///
/// - [`Schedule::every`]: slots of a fixed length aligned to the Unix epoch,
///   so that every host derives the same boundaries (every 15 minutes means
///   :00, :15, :30, :45).
/// - [`Schedule::cron`]: a slot starts at each time the expression matches
///   and lasts until the next match.
#[derive(Clone)]
pub struct Schedule {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Every(chrono::Duration),
    Cron(Box<croner::Cron>, String),
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Every(d) => write!(f, "Schedule::every({d})"),
            Kind::Cron(_, expr) => write!(f, "Schedule::cron({expr:?})"),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Every(d) => {
                let d = d.to_std().unwrap_or_default();
                write!(f, "every {}", humanize(d))
            }
            Kind::Cron(_, expr) => write!(f, "cron {expr:?} (UTC)"),
        }
    }
}

fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// One slot's bounds: `[start, end)` by the database clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Bounds {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Schedule {
    /// One slot every `interval`, aligned to the Unix epoch. The interval
    /// must be at least 1 s, at most 366 days, and a whole number of
    /// milliseconds; [`Error::InvalidOption`] otherwise.
    pub fn every(interval: Duration) -> Result<Schedule> {
        if interval < MIN_INTERVAL || interval > crate::request::MAX_DURATION {
            return Err(Error::InvalidOption(format!(
                "a schedule's interval must lie between 1 s and 366 days (got {interval:?})"
            )));
        }
        if !interval.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(Error::InvalidOption(format!(
                "a schedule's interval must be a whole number of milliseconds (got {interval:?})"
            )));
        }
        let d = chrono::Duration::from_std(interval).expect("at most 366 days");
        Ok(Schedule {
            kind: Kind::Every(d),
        })
    }

    /// One slot per match of a cron expression, evaluated in UTC: five
    /// fields (`minute hour day-of-month month day-of-week`), or six with
    /// seconds first; `L`, `W`, `#`, names (`MON`, `JAN`) and the nicknames
    /// `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly` are understood
    /// (the [`croner`] dialect, with day-of-month and day-of-week combined
    /// by OR as in Vixie cron). A malformed expression, or one that never
    /// matches, is [`Error::InvalidOption`].
    pub fn cron(expr: &str) -> Result<Schedule> {
        let bad =
            |why: String| Error::InvalidOption(format!("invalid cron expression {expr:?}: {why}"));
        let cron = croner::parser::CronParser::new()
            .parse(expr)
            .map_err(|e| bad(e.to_string()))?;
        let schedule = Schedule {
            kind: Kind::Cron(Box::new(cron), expr.trim().to_owned()),
        };
        // An expression that parses but never matches (30 February) would
        // only fail at the first slot: refuse it now.
        let now = Utc::now();
        schedule
            .bounds_at(now)
            .map_err(|_| bad("it never matches".into()))?;
        Ok(schedule)
    }

    /// The slot that contains `t`: `start <= t < end`.
    pub(crate) fn bounds_at(&self, t: DateTime<Utc>) -> Result<Bounds> {
        match &self.kind {
            Kind::Every(d) => {
                let len = d.num_milliseconds();
                let ms = t.timestamp_millis();
                let start_ms = ms.div_euclid(len) * len;
                let start = DateTime::from_timestamp_millis(start_ms).ok_or_else(out_of_range)?;
                Ok(Bounds {
                    start,
                    end: start + *d,
                })
            }
            Kind::Cron(cron, _) => {
                let start = cron
                    .find_previous_occurrence(&t, true)
                    .map_err(|e| Error::InvalidOption(format!("cron expression: {e}")))?;
                let end = cron
                    .find_next_occurrence(&t, false)
                    .map_err(|e| Error::InvalidOption(format!("cron expression: {e}")))?;
                Ok(Bounds { start, end })
            }
        }
    }

    /// The slot just before the one that starts at `start`.
    pub(crate) fn before(&self, start: DateTime<Utc>) -> Result<Bounds> {
        self.bounds_at(start - chrono::Duration::milliseconds(1))
    }

    /// The slot just after `b`.
    pub(crate) fn after(&self, b: Bounds) -> Result<Bounds> {
        self.bounds_at(b.end)
    }
}

fn out_of_range() -> Error {
    Error::InvalidOption("the slot lies outside the representable time range".into())
}

/// A slot's start as it appears in lock names, logs and `DBLOCK_SLOT`:
/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-27T06:30:00.000Z`.
pub(crate) fn format_start(start: DateTime<Utc>) -> String {
    start.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn intervals_align_to_the_epoch() {
        let s = Schedule::every(Duration::from_secs(15 * 60)).unwrap();
        let b = s.bounds_at(t("2026-11-27T06:37:12.5Z")).unwrap();
        assert_eq!(b.start, t("2026-11-27T06:30:00Z"));
        assert_eq!(b.end, t("2026-11-27T06:45:00Z"));
        // A boundary belongs to the slot it starts.
        let b = s.bounds_at(t("2026-11-27T06:45:00Z")).unwrap();
        assert_eq!(b.start, t("2026-11-27T06:45:00Z"));
        assert_eq!(s.before(b.start).unwrap().start, t("2026-11-27T06:30:00Z"));
        assert_eq!(s.after(b).unwrap().start, t("2026-11-27T07:00:00Z"));
        let two = Schedule::every(Duration::from_secs(2)).unwrap();
        assert_eq!(
            two.bounds_at(t("2026-11-27T06:37:13.999Z")).unwrap().start,
            t("2026-11-27T06:37:12Z")
        );
    }

    #[test]
    fn bad_intervals_are_refused() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(999),
            Duration::from_micros(1_000_500),
            Duration::from_secs(367 * 24 * 3600),
        ] {
            assert!(
                matches!(Schedule::every(d), Err(Error::InvalidOption(_))),
                "{d:?}"
            );
        }
    }

    #[test]
    fn cron_slots_run_from_match_to_match() {
        let s = Schedule::cron("0 3 * * *").unwrap();
        let b = s.bounds_at(t("2026-11-27T15:00:00Z")).unwrap();
        assert_eq!(b.start, t("2026-11-27T03:00:00Z"));
        assert_eq!(b.end, t("2026-11-28T03:00:00Z"));
        let b = s.bounds_at(t("2026-11-27T03:00:00Z")).unwrap();
        assert_eq!(b.start, t("2026-11-27T03:00:00Z"));
        assert_eq!(s.before(b.start).unwrap().start, t("2026-11-26T03:00:00Z"));
        let secs = Schedule::cron("*/2 * * * * *").unwrap();
        let b = secs.bounds_at(t("2026-11-27T06:37:13.5Z")).unwrap();
        assert_eq!(b.start, t("2026-11-27T06:37:12Z"));
        assert_eq!(b.end, t("2026-11-27T06:37:14Z"));
        assert!(Schedule::cron("@hourly").is_ok());
        assert!(Schedule::cron("0 9 * * MON-FRI").is_ok());
    }

    #[test]
    fn bad_cron_expressions_are_refused() {
        for expr in [
            "",
            "* * *",
            "61 * * * *",
            "* 24 * * *",
            "0 0 30 2 *",
            "every day",
            "* * * * * * * *",
        ] {
            match Schedule::cron(expr) {
                Err(Error::InvalidOption(msg)) => assert!(msg.contains("cron"), "{msg}"),
                other => panic!("{expr:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn starts_are_formatted_in_utc_with_millis() {
        assert_eq!(
            format_start(t("2026-11-27T07:30:00+01:00")),
            "2026-11-27T06:30:00.000Z"
        );
    }
}
