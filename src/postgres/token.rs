//! Failover-safe fencing tokens: the one place where PostgreSQL tokens are
//! made, for the advisory locks, `lock_in_transaction` and the lease table alike.
//!
//! A token is computed in SQL, in the statement that takes the lock, from a
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expression_names_raw_once() {
        let sql = token_sql("nextval('dblock_fencing_seq')");
        assert_eq!(sql.matches("nextval").count(), 1, "{sql}");
    }
}
