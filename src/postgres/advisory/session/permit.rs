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
//! A plain lock and a permit also exclude each other on the server (the
//! name's key, exclusive against shared); a reader sees a permit by its
//! semaphore marker (see `super::super::semaphore`).

use std::sync::{Arc, LazyLock};

use sqlx::postgres::PgConnection;

use super::{bounded, Failure, LockReply, Session, OURS};
use crate::error::Loss;
use crate::lease::permits::disagreement;
use crate::postgres::advisory::registry::{LockId, Permit};
use crate::postgres::advisory::{lock_table_full, semaphore};
use crate::postgres::engine::is_statement_clash;
use crate::postgres::key::PermitKeys;
use crate::postgres::map_err;
use crate::postgres::token::sequence_token;
use crate::{LockMode, LostReason};

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

/// Gives back a permit's slot and the first `got` of its markers.
pub(super) fn unlock<'c>(
    conn: &'c mut PgConnection,
    permit: &Permit,
    got: i32,
) -> impl std::future::Future<Output = Result<bool, sqlx::Error>> + Send + 'c {
    let keys = &permit.keys;
    sqlx::query_scalar::<_, bool>(UNLOCK)
        .bind(permit.slot)
        .bind(keys.name)
        .bind(keys.semaphore)
        .bind(keys.capacity)
        .bind(got)
        .fetch_one(conn)
}

/// What the check after a take found.
enum Verdict {
    /// Take or wait.
    Agree,
    /// A lock or readers hold the name.
    Lock,
    /// Permits of another `n` hold it.
    OtherCapacity,
}

impl Session {
    /// Tries to take a permit of the semaphore `keys` for the pending hold
    /// `lock` that the registry routed here (never waits on the server).
    pub(in crate::postgres::advisory) async fn lock_permit(
        self: Arc<Self>,
        lock: LockId,
        keys: Arc<PermitKeys>,
        name: String,
    ) -> LockReply {
        let key = keys.name;
        let mut c = match self.conn_for(key, lock).await {
            Ok(c) => c,
            Err(gone) => return gone,
        };
        let limit = self.inner.answer_within();
        // The slots our permits hold are not tried: on their own session
        // PostgreSQL would grant them again (locks stack), and elsewhere
        // they are known to be taken.
        let (stacked, slots) = {
            let registry = self.inner.registry();
            let held = registry.slots_held(key);
            let slots: Vec<i64> = keys
                .slots
                .iter()
                .filter(|s| !held.contains(s))
                .copied()
                .collect();
            (
                registry.stacked(self.id, key, LockMode::Shared, lock),
                slots,
            )
        };
        if slots.is_empty() {
            self.inner.registry().not_granted(self.id, key, lock);
            return LockReply::Busy;
        }
        c.in_doubt = true;
        let taken = bounded(
            limit,
            sqlx::query_as::<_, (bool, i32, Option<i64>, Option<i64>, bool, bool)>(TAKE.as_str())
                .bind(key)
                .bind(c.marker.clone())
                .bind(c.pid)
                .bind(&slots)
                .bind(keys.capacity)
                .bind(keys.semaphore)
                .fetch_one(c.pg()),
        )
        .await;
        let (got, slot, token, verdict) = match taken {
            Ok((true, got, slot, token, lock_beside, other_capacity)) => {
                let verdict = match (lock_beside, other_capacity) {
                    (true, _) => Verdict::Lock,
                    (false, true) => Verdict::OtherCapacity,
                    (false, false) => Verdict::Agree,
                };
                (got, slot, token, verdict)
            }
            Ok((false, ..)) => return self.not_ours(&mut c, key, lock),
            Err(Failure::Server(e)) if is_statement_clash(&e) => {
                return self.not_ours(&mut c, key, lock)
            }
            Err(Failure::Server(e)) => {
                return self.undo_permit(&mut c, lock, &keys, stacked, e).await
            }
            Err(Failure::Broken(reason)) => {
                self.die(&mut c, &reason);
                return LockReply::Gone(reason);
            }
        };
        self.alive();
        let permit = Permit {
            keys: keys.clone(),
            slot,
        };
        if let (Verdict::Agree, ALL, Some(_), Some(token)) = (&verdict, got, slot, token) {
            c.in_doubt = false;
            return self.granted(
                key,
                lock,
                LockMode::Shared,
                Some(permit),
                token as u64,
                name,
            );
        }
        // Nothing to keep: give back what was taken.
        let undone = bounded(limit, unlock(c.pg(), &permit, got)).await;
        c.in_doubt = false;
        if let Err(Failure::Server(e)) = undone {
            let loss = Loss::new(
                LostReason::Other,
                format!("giving back an untaken permit failed: {e}"),
            );
            self.die(&mut c, &loss);
            return LockReply::Gone(loss);
        }
        if let Err(Failure::Broken(reason)) = undone {
            self.die(&mut c, &reason);
            return LockReply::Gone(reason);
        }
        self.alive();
        self.inner.registry().not_granted(self.id, key, lock);
        let n = keys.slots.len() as u32;
        match verdict {
            Verdict::Agree => LockReply::Busy,
            Verdict::Lock => LockReply::Failed(disagreement(&name, n, 1)),
            Verdict::OtherCapacity => {
                // On this session: the pool may have no connection to spare.
                match semaphore::capacity_held(c.pg(), &name).await {
                    Ok(Some(found)) if found != n => {
                        LockReply::Failed(disagreement(&name, n, found))
                    }
                    // Gone meanwhile: try again.
                    Ok(_) => LockReply::Busy,
                    Err(e) => LockReply::Failed(e),
                }
            }
        }
    }

    /// A permit's statement failed after it may have taken some of its
    /// locks (the lock table fills up in a lock call). Alone on its session
    /// the permit's locks are given back as `pg_locks` shows them; beside
    /// another permit of the name, whose locks stack with them, the session
    /// is uncertain and closed.
    async fn undo_permit(
        &self,
        c: &mut super::Conn,
        lock: LockId,
        keys: &PermitKeys,
        stacked: bool,
        e: sqlx::Error,
    ) -> LockReply {
        self.alive();
        let full = super::is_lock_table_full(&e);
        let error = || {
            if full {
                lock_table_full("")
            } else {
                map_err(e)
            }
        };
        if stacked {
            self.die(
                c,
                &Loss::new(
                    LostReason::Other,
                    "a permit's statement failed beside another permit of its name: the \
                     session's locks are uncertain",
                ),
            );
            return LockReply::Failed(error());
        }
        let mut all = vec![keys.name, keys.semaphore, keys.capacity];
        all.extend(&keys.slots);
        let limit = self.inner.answer_within();
        let undone = bounded(limit, sqlx::query(UNDO).bind(&all).execute(c.pg())).await;
        c.in_doubt = false;
        match undone {
            Ok(_) => {
                self.alive();
                self.inner.registry().not_granted(self.id, keys.name, lock);
            }
            Err(Failure::Server(e)) => self.die(
                c,
                &Loss::new(
                    LostReason::Other,
                    format!("undoing a failed permit failed: {e}"),
                ),
            ),
            Err(Failure::Broken(reason)) => self.die(c, &reason),
        }
        LockReply::Failed(error())
    }
}
