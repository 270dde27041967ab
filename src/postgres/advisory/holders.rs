//! Holder identities of advisory locks taken with one (a leader's, see
//! [`Election`](crate::Election)). PostgreSQL keeps only a session and a
//! key for an advisory lock, so the identity lives in a row of
//! `dblock_advisory_holders` per name, written right after the grant. A row
//! counts only while the server session that wrote it (pid and
//! `backend_start`) still holds the key exclusively: readers join it with
//! `pg_locks` in the same statement, so a row left behind by an ended
//! session or a released lock is never shown.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::split_key;
use crate::postgres::{advisory_key, map_err};
use crate::{Error, Result};

/// Records `holder` and `token` for `name`, whose exclusive lock this
/// backend was just granted. Fails with [`Error::Lost`] if the lock is no
/// longer held by then, and with [`Error::SchemaMissing`] without
/// migration 4.
pub(super) async fn record(pool: &PgPool, name: &str, holder: &str, token: u64) -> Result<()> {
    let (classid, objid) = split_key(advisory_key(name));
    let done = sqlx::query(
        "INSERT INTO dblock_advisory_holders AS h (name, holder, token, pid, backend_start, since)
         SELECT $1, $2, $3, l.pid, a.backend_start, clock_timestamp()
           FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
            AND l.mode = 'ExclusiveLock'
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND l.classid::bigint = $4 AND l.objid::bigint = $5
         ON CONFLICT (name) DO UPDATE
            SET holder = excluded.holder, token = excluded.token, pid = excluded.pid,
                backend_start = excluded.backend_start, since = excluded.since
          WHERE h.token < excluded.token",
    )
    .bind(name)
    .bind(holder)
    .bind(token as i64)
    .bind(classid)
    .bind(objid)
    .execute(pool)
    .await
    .map_err(map_err)?;
    if done.rows_affected() == 0 {
        return Err(Error::lost(
            name,
            crate::LostReason::RenewalFailed,
            "the advisory lock was no longer held when its holder identity was to be recorded",
        ));
    }
    Ok(())
}

/// PostgreSQL's SQLSTATE for a table the role may not read.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// The identity, token and start recorded for `name`, if the session that
/// recorded them holds its key exclusively now. `None` without migration 4
/// (nothing was recorded then), and for a role without `SELECT` on the
/// table.
pub(super) async fn recorded(
    pool: &PgPool,
    name: &str,
) -> Result<Option<(String, u64, DateTime<Utc>)>> {
    let (classid, objid) = split_key(advisory_key(name));
    let row: std::result::Result<Option<(String, i64, DateTime<Utc>)>, _> = sqlx::query_as(
        "SELECT h.holder, h.token, h.since
           FROM dblock_advisory_holders h
           JOIN pg_locks l ON l.pid = h.pid
           LEFT JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE h.name = $1
            AND l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
            AND l.mode = 'ExclusiveLock'
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND l.classid::bigint = $2 AND l.objid::bigint = $3
            AND a.backend_start IS NOT DISTINCT FROM h.backend_start",
    )
    .bind(name)
    .bind(classid)
    .bind(objid)
    .fetch_optional(pool)
    .await;
    match row.map_err(map_err) {
        Ok(row) => Ok(row.map(|(holder, token, since)| (holder, token as u64, since))),
        Err(Error::SchemaMissing { .. }) => Ok(None),
        // A role that may not read the table still inspects the lock itself
        // (as a session's); it sees no identity, so no leader either.
        Err(Error::Database(sqlx::Error::Database(db)))
            if db.code().as_deref() == Some(INSUFFICIENT_PRIVILEGE) =>
        {
            tracing::debug!(error = %db, "dblock: advisory holder identities are out of reach");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
