//! A permit of a semaphore on a holder session: the statements that take
//! one and give it back.
//!
//! A permit of `n` holds, in this order, the capacity marker of `n`, the
//! semaphore marker and the name's key (all shared), then one free slot
//! (exclusive); see [`PermitKeys`]. The order makes every session's locks
//! tell what it holds at any instant, which the check after the take reads
//! in `pg_locks`:
//!
//! - a session holding the name's key without the semaphore marker holds a
//!   lock or a reader lock of the name: a disagreement (a permit takes the
//!   name's key only after the marker, and gives it back before it);
//! - a session holding the semaphore marker without the capacity marker of
//!   `n` holds a permit of another `n`: a disagreement.
//!
//! Both sides take before they look, so of two disagreeing acquisitions
//! racing, at least one sees the other (and both may, and both give up).
//! A holder session that ends gives its locks back one lock-table
//! partition at a time, so the look can catch a permit's session holding
//! the name's key but no longer its marker: a lock's verdict is looked at
//! again before it is reported (`semaphore::lock_beside`).
//! A plain lock and a permit also exclude each other on the server (the
//! name's key, exclusive against shared); a reader sees a permit by its
//! semaphore marker (see `super::super::semaphore`).

use std::sync::{Arc, LazyLock};

use sqlx::postgres::{PgConnection, PgRow};

use super::{bounded, decoded, first_row, run, scalar, Conn, Failure, Session, OURS};
use crate::backend::BoxFuture;
use crate::error::Loss;
use crate::postgres::advisory::registry::Permit;
use crate::postgres::engine::is_statement_clash;
use crate::postgres::key::PermitKeys;
use crate::postgres::token::sequence_token;

/// `got` of a permit that took all three markers.
pub(crate) const ALL: i32 = 3;

// $1 the name's key, $2 and $3 the session's marker and pid (see OURS), $4
// the slots to try, in order, $5 the capacity marker, $6 the semaphore
// marker. CASE takes the markers in order and stops at the first it cannot
// take (`got` counts those taken); the slots are tried one by one, stopping
// at the first taken (LIMIT 1 stops the scan of the filtered unnest, which
// calls the lock function row by row: no ORDER BY, which would call it for
// every row first). The OFFSET 0 layers keep the planner from merging them,
// so each runs after the one it reads.
//
// Then, once both markers are held (the lateral join runs after the row it
// joins), the check, in one pass over `pg_locks`: whether another session
// holds the name's key without the semaphore marker (a lock or readers),
// and whether another holds the semaphore marker without the capacity
// marker (permits of another n). Our own session passes both.
static TAKE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT t.ours, t.got, t.slot, t.token, c.lock_beside, c.other_capacity
           FROM (SELECT ours, got, slot, CASE WHEN slot IS NOT NULL THEN {} END AS token
                   FROM (SELECT ours, got,
                                CASE WHEN got = 3 THEN
                                    (SELECT k FROM unnest($4::bigint[]) AS u(k)
                                      WHERE CASE WHEN got = 3 THEN pg_try_advisory_lock(k)
                                                 ELSE false END
                                      LIMIT 1)
                                END AS slot
                           FROM (SELECT ours, CASE WHEN NOT ours THEN 0
                                                   WHEN NOT pg_try_advisory_lock_shared($5) THEN 0
                                                   WHEN NOT pg_try_advisory_lock_shared($6) THEN 1
                                                   WHEN NOT pg_try_advisory_lock_shared($1) THEN 2
                                                   ELSE 3 END AS got
                                   FROM {OURS} OFFSET 0) a
                         OFFSET 0) b
                 OFFSET 0) t
           LEFT JOIN LATERAL (
               SELECT coalesce(bool_or(has_name AND NOT has_semaphore), false) AS lock_beside,
                      coalesce(bool_or(has_semaphore AND NOT has_capacity), false)
                          AS other_capacity
                 FROM (SELECT pid, bool_or(key = $1) AS has_name,
                              bool_or(key = $6) AS has_semaphore, bool_or(key = $5) AS has_capacity
                         FROM (SELECT pid, ((classid::bigint << 32) | objid::bigint) AS key
                                 FROM pg_locks
                                WHERE t.got >= 2 AND locktype = 'advisory' AND objsubid = 1
                                  AND granted
                                  AND database = (SELECT oid FROM pg_database
                                                   WHERE datname = current_database())) l
                        WHERE key IN ($1, $5, $6)
                        GROUP BY pid) s
           ) c ON true",
        sequence_token()
    )
});

// Gives back the slot ($1, if any) and the first $5 markers taken (see
// TAKE), in the reverse order: whether the slot was held (true without one).
const UNLOCK: &str =
    "SELECT coalesce(CASE WHEN $1::bigint IS NOT NULL THEN pg_advisory_unlock($1) END, true)
            AND coalesce(CASE WHEN $5 >= 3 THEN pg_advisory_unlock_shared($2) END, true),
            CASE WHEN $5 >= 2 THEN pg_advisory_unlock_shared($3) END,
            CASE WHEN $5 >= 1 THEN pg_advisory_unlock_shared($4) END";

// After a statement failed: gives back whichever of the keys $1 this
// session holds, as `pg_locks` shows them (exact only when no other permit
// of the name shares the session, since a stacked lock shows once).
const UNDO: &str = "SELECT count(CASE WHEN mode = 'ExclusiveLock' THEN pg_advisory_unlock(key)
                         ELSE pg_advisory_unlock_shared(key) END)
  FROM (SELECT ((classid::bigint << 32) | objid::bigint) AS key, mode
          FROM pg_locks
         WHERE locktype = 'advisory' AND objsubid = 1 AND granted AND pid = pg_backend_pid()
           AND ((classid::bigint << 32) | objid::bigint) = ANY($1)
        OFFSET 0) l";

/// Gives back a permit's slot and the first `got` of its markers; its
/// one row says whether the slot was held (decode it with `scalar`).
pub(super) fn unlock<'c>(
    conn: &'c mut PgConnection,
    permit: &Permit,
    got: i32,
) -> BoxFuture<'c, sqlx::Result<Option<PgRow>>> {
    let keys = &permit.keys;
    let query = sqlx::query(UNLOCK)
        .bind(permit.slot)
        .bind(keys.name)
        .bind(keys.semaphore)
        .bind(keys.capacity)
        .bind(got);
    first_row(conn, query)
}

/// What a permit's statement answered (see [`Session::try_permit`]).
pub(in crate::postgres::advisory) enum PermitTried {
    /// Granted: the slot it holds, and its fencing token.
    Granted { slot: i64, token: u64 },
    /// Not granted (what the statement took was given back): why.
    Missed(Verdict),
    /// The statement ran on another server session than this session's
    /// own (a transaction-pooling proxy): nothing of it was taken.
    NotOurs,
    /// The server refused the statement, maybe after it took some of the
    /// permit's locks.
    Refused(sqlx::Error),
    /// The session failed and was closed (why): nothing is held on it.
    Closed(Loss),
}

/// What the check after a take found.
pub(in crate::postgres::advisory) enum Verdict {
    /// Take or wait.
    Agree,
    /// A lock or readers hold the name.
    Lock,
    /// Permits of another `n` hold it.
    OtherCapacity,
}

impl Session {
    /// Sends a permit's statement for the semaphore `keys` on this
    /// session's connection `c`, trying `slots` in turn (it never waits on
    /// the server), and gives back what it took unless it keeps the
    /// permit; the registry is left to the caller.
    pub(in crate::postgres::advisory) async fn try_permit(
        &self,
        c: &mut Conn,
        keys: &Arc<PermitKeys>,
        slots: &[i64],
    ) -> PermitTried {
        let limit = self.inner.answer_within();
        c.in_doubt = true;
        let taken = {
            let (pg, marker, pid, timer) = c.checked();
            let query = sqlx::query(TAKE.as_str())
                .bind(keys.name)
                .bind(marker)
                .bind(pid)
                .bind(slots)
                .bind(keys.capacity)
                .bind(keys.semaphore);
            decoded::<(bool, i32, Option<i64>, Option<i64>, bool, bool)>(
                bounded(timer, limit, first_row(pg, query)).await,
            )
        };
        let (got, slot, token, verdict) = match taken {
            Ok((true, got, slot, token, lock_beside, other_capacity)) => {
                let verdict = match (lock_beside, other_capacity) {
                    (true, _) => Verdict::Lock,
                    (false, true) => Verdict::OtherCapacity,
                    (false, false) => Verdict::Agree,
                };
                (got, slot, token, verdict)
            }
            Ok((false, ..)) => {
                c.in_doubt = false;
                return PermitTried::NotOurs;
            }
            Err(Failure::Server(e)) if is_statement_clash(&e) => {
                c.in_doubt = false;
                return PermitTried::NotOurs;
            }
            Err(Failure::Server(e)) => {
                // The server answered: the session is alive.
                self.alive();
                c.in_doubt = false;
                return PermitTried::Refused(e);
            }
            Err(Failure::Broken(reason)) => {
                self.die(c, &reason);
                return PermitTried::Closed(reason);
            }
        };
        self.alive();
        if let (Verdict::Agree, ALL, Some(slot), Some(token)) = (&verdict, got, slot, token) {
            c.in_doubt = false;
            return PermitTried::Granted {
                slot,
                token: token as u64,
            };
        }
        // Nothing to keep: give back what was taken.
        let permit = Permit {
            keys: keys.clone(),
            slot,
        };
        let (pg, timer) = c.split();
        let undone = scalar::<bool>(bounded(timer, limit, unlock(pg, &permit, got)).await);
        c.in_doubt = false;
        match self.settle(c, undone, "giving back an untaken permit") {
            Ok(_) => PermitTried::Missed(verdict),
            Err(loss) => PermitTried::Closed(loss),
        }
    }

    /// Undoes a permit's statement that failed (see
    /// [`PermitTried::Refused`]): gives back whichever of the semaphore's
    /// keys this session holds, as `pg_locks` shows them (exact only when
    /// no other permit of the name shares the session). `Err`: the session
    /// was closed (why).
    pub(in crate::postgres::advisory) async fn undo_permit(
        &self,
        c: &mut Conn,
        keys: &PermitKeys,
    ) -> Result<(), Loss> {
        let mut all = vec![keys.name, keys.semaphore, keys.capacity];
        all.extend(&keys.slots);
        let limit = self.inner.answer_within();
        c.in_doubt = true;
        let (pg, timer) = c.split();
        let undone = bounded(timer, limit, run(pg, sqlx::query(UNDO).bind(&all))).await;
        c.in_doubt = false;
        self.settle(c, undone, "undoing a failed permit").map(drop)
    }
}
