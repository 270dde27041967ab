//! Conversions between the time types dblock uses, in one place: a
//! `std::time::Duration` as the microseconds the SQL stores bind, or as a
//! `chrono` duration to add to a database timestamp. Both saturate rather
//! than fail: the durations they get are validated (at most 366 days)
//! before they get here, or are bounds where "for ever" is the right answer.

use std::time::Duration;

/// `d` in whole microseconds (`i64::MAX` if it does not fit).
#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "mysql")),
    allow(dead_code)
)]
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// `d` as a `chrono` duration (`chrono::Duration::MAX` if it does not fit).
pub(crate) fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_exact_or_saturate() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::MAX), i64::MAX);
        assert_eq!(
            chrono_duration(Duration::from_micros(2_000_001)),
            chrono::Duration::microseconds(2_000_001)
        );
        assert_eq!(chrono_duration(Duration::MAX), chrono::Duration::MAX);
    }
}
