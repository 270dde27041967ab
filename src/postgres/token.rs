//! Failover-safe fencing tokens: the one place where PostgreSQL tokens are
//! made, for the advisory locks, `lock_in_transaction` and the lease table alike.
//!
//! A token is computed from a
//! *raw* value (the next value of `dblock_fencing_seq`, which advisory locks,
//! `lock_in_transaction` and leases all draw from, so the tokens of a name increase
//! whichever kind of holder came before, and a lease row can be deleted
//! without its name's tokens starting over) and the server's current
//! **timeline**:
//!
//! ```text
//! token = greatest(raw, timeline << 48 + (raw & (2^48 - 1)))
//! ```
//!
//! Why: when an asynchronous standby is promoted, the commits the old
//! primary made and never shipped are gone, so the sequence (or the row)
//! can hand out a raw value that was already handed out. The promotion also
//! starts a new timeline, one higher than every timeline before it, so every
//! token taken after it is above `timeline << 48`, which is above every token
//! taken on an earlier timeline (their low 48 bits never carry into the
//! timeline's bits). Within a timeline the tokens follow `raw`, which only
//! grows.
//!
//! The timeline is read from the WAL file name of `pg_current_wal_lsn()`
//! (its first 8 hex digits are the insert timeline): it needs no privilege,
//! costs no round trip, and changes at the moment of promotion, whereas
//! `pg_control_checkpoint()` lags it until the end-of-recovery checkpoint.
//!
//! Most statements compute it in SQL, in the statement that takes the lock
//! ([`token_sql`]). The advisory exclusive try-lock, the hot path, draws the
//! raw value alone and computes the same formula in Rust ([`fence`]) with
//! the timeline its holder session read once: the timeline read made that
//! statement measurably slower, and a server session's timeline never
//! changes while it can draw tokens (see [`fence`]). So does the advisory
//! server-side wait, with the timeline read by the statement just before
//! it (if that statement found the server in recovery, the wait computes
//! the token in SQL instead: the server may be promoted while it waits).
//!
//! Tokens of an earlier release (raw values on timeline 1, well below 2^48)
//! stay below the new ones: an upgrade keeps tokens increasing. Timelines up
//! to 32767 fit in a positive `bigint`; a higher one fails the statement
//! (nothing is taken) rather than wrap.

/// The server's insert timeline, as a `bigint`.
const TIMELINE: &str =
    "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint";

/// The SQL expression of a fencing token made from `raw`, an SQL expression
/// evaluated exactly once (it may be `nextval(..)`).
pub(crate) fn token_sql(raw: &str) -> String {
    // OFFSET 0 keeps the planner from inlining `raw` into both of its uses.
    format!(
        "(SELECT CASE WHEN tl < 32768 THEN greatest(r, (tl << 48) + (r & 281474976710655))
                 ELSE ('dblock: the server''s timeline ' || tl || ' is above 32767, the most fencing tokens can carry')::bigint END
            FROM (SELECT {raw} AS r, {TIMELINE} AS tl OFFSET 0) dblock_token)"
    )
}

/// The token of the shared fencing sequence (advisory locks and `lock_in_transaction`).
pub(crate) fn sequence_token() -> String {
    token_sql("nextval('dblock_fencing_seq')")
}

/// The SQL expression of the server's timeline, or `NULL` on a standby
/// (where the WAL position cannot be read, and no token can be drawn
/// either).
pub(crate) static TIMELINE_OR_NULL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("CASE WHEN pg_is_in_recovery() THEN NULL ELSE {TIMELINE} END")
});

/// [`TIMELINE_OR_NULL`] as a statement.
pub(crate) static TIMELINE_NOW: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {}", *TIMELINE_OR_NULL));

/// The highest timeline a token can carry (see the module's docs).
const MAX_TIMELINE: i64 = 32767;

/// [`token_sql`]'s formula in Rust, for a statement that returns the raw
/// value alone: an advisory holder session reads its server session's
/// timeline once and computes its tokens here. The timeline of a server
/// session never changes while it draws tokens: it changes only when a
/// standby ends its recovery, and no token can be drawn during recovery,
/// so every server session that can draw one is on its final timeline
/// (a server that goes back to recovery restarts, ending its sessions).
/// `None` for a timeline no token can carry (the SQL fails the statement
/// there instead).
pub(crate) fn fence(raw: i64, timeline: i64) -> Option<u64> {
    if !(0..=MAX_TIMELINE).contains(&timeline) {
        return None;
    }
    let token = raw.max((timeline << 48) + (raw & 0xFFFF_FFFF_FFFF));
    u64::try_from(token).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_follows_the_formula() {
        // Timeline 1: every raw value below 2^48 moves above 2^48.
        assert_eq!(fence(1, 1), Some((1 << 48) + 1));
        assert_eq!(fence(5, 1), Some((1 << 48) + 5));
        // A raw value already above the timeline's floor (tokens of a
        // later timeline drawn on an earlier one) is kept.
        assert_eq!(fence((3 << 48) + 7, 2), Some((3 << 48) + 7));
        // The low 48 bits never carry into the timeline's.
        assert_eq!(fence((1 << 48) - 1, 2), Some((2 << 48) + (1 << 48) - 1));
        assert_eq!(fence((1 << 48) + 9, 2), Some((2 << 48) + 9));
        assert_eq!(
            fence(1, MAX_TIMELINE),
            Some((MAX_TIMELINE as u64) << 48 | 1)
        );
        assert_eq!(fence(1, MAX_TIMELINE + 1), None);
        assert_eq!(fence(1, -1), None);
    }

    #[test]
    fn the_expression_names_raw_once() {
        let sql = token_sql("nextval('dblock_fencing_seq')");
        assert_eq!(sql.matches("nextval").count(), 1, "{sql}");
    }
}
