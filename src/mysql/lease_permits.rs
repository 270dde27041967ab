//! Permits of semaphores on the MySQL/MariaDB lease table (see
//! [`crate::lease::permits`]).
//!
//! Each live permit is a row of the holders table (`dblock_leases_holders`,
//! migration 3). While permits of a name are live, the name's lease row is
//! their marker: no owner, lasting as long as the latest permit, so a plain
//! claim leaves the name alone; its token is the name's latest, so tokens
//! go on increasing whoever takes the name next. A permit claim, renewal or
//! release is one short transaction that first locks the marker row (the
//! claim without waiting, like a plain claim), so permit claims of one name
//! run one at a time, count the live permits under a locking read, and
//! never grant more than `n`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::MySqlRow;
use sqlx::{MySqlConnection, Row};

use super::{
    batch_json, begin_sql, bind_lease, is_retryable, push_hex, q, quote_table, retry_pause, utc,
    Causal, MySqlStore, BATCH_ROWS, EPOCH, MAX_RETRIES,
};
use crate::lease::permits::{self, unless_no_holders, Decision, Found};
use crate::lease::{Claim, Claimed, LeaseId, NewExpiry, Renewal, Renewed, SWEEP_BATCH};
use crate::mysql::{code, error_number, is_lock_busy, map_err, micros, Conn};
use crate::{LockInfo, Result};

/// The statements of permits for one lease table and its holders table.
#[derive(Debug)]
pub(super) struct PermitSql {
    lock_marker: Arc<str>,
    count: Arc<str>,
    take: Arc<str>,
    mark: Arc<str>,
    extend_marker: Arc<str>,
    renew: Arc<str>,
    renew_read: Arc<str>,
    batch_lock_markers: Arc<str>,
    batch_now: Arc<str>,
    batch_renew: Arc<str>,
    batch_read: Arc<str>,
    batch_extend_markers: Arc<str>,
    release: Arc<str>,
    settle_marker: Arc<str>,
    force_read: Causal,
    force_release: Causal,
    force_marker: Causal,
    sweep: Arc<str>,
    inspect: Causal,
    list: Causal,
}

/// Whether the marker row is locked by waiting (renewals and releases,
/// which must not give up) or not at all (claims, which report busy).
const NOWAIT: &str = "NOWAIT";

impl PermitSql {
    /// `table`: the lease table as given; `holders`: its holders table.
    pub(super) fn new(table: &str, holders: &str) -> Self {
        let (t, h) = (quote_table(table), quote_table(holders));
        let s = |sql: String| -> Arc<str> { sql.into() };
        const AGGREGATE: &str =
            "SELECT name, COUNT(*) AS holders, MAX(max_holders) AS max_holders, \
                    MAX(token) AS token, GROUP_CONCAT(DISTINCT holder SEPARATOR ', ') AS holder, \
                    MIN(acquired_at) AS acquired_at, MAX(expires_at) AS expires_at";
        let inspect = format!(
            "{AGGREGATE} FROM {h} WHERE name = ? AND expires_at > UTC_TIMESTAMP(6) GROUP BY name"
        );
        let list =
            format!("{AGGREGATE} FROM {h} WHERE expires_at > UTC_TIMESTAMP(6) GROUP BY name");
        PermitSql {
            // The marker, locked; the server clock for a new permit in passing.
            // `live`: a plain lease (a row with a holder; a marker has none)
            // is live (see `Found::plain_live`).
            lock_marker: s(format!(
                "SELECT token, expires_at > UTC_TIMESTAMP(6) AND holder IS NOT NULL AS live, \
                        UTC_TIMESTAMP(6) AS now, \
                        UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND AS until, \
                        COALESCE(writer_waiting_until > UTC_TIMESTAMP(6), 0) AS writer_waiting \
                   FROM {t} WHERE name = ? FOR UPDATE"
            )),
            count: s(format!(
                "SELECT COUNT(*), MAX(max_holders) FROM {h} \
                  WHERE name = ? AND expires_at > ? LOCK IN SHARE MODE"
            )),
            take: s(format!(
                "INSERT INTO {h} (name, token, owner, holder, max_holders, acquired_at, expires_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)"
            )),
            mark: s(format!(
                "UPDATE {t} SET owner = NULL, holder = NULL, mode = ?, token = ?, \
                        acquired_at = ?, expires_at = GREATEST(expires_at, ?) \
                  WHERE name = ?"
            )),
            extend_marker: s(format!(
                "UPDATE {t} SET expires_at = GREATEST(expires_at, \
                        UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND) \
                  WHERE name = ? AND owner IS NULL"
            )),
            renew: s(format!(
                "UPDATE {h} SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                  WHERE name = ? AND owner = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)"
            )),
            renew_read: s(format!(
                "SELECT expires_at FROM {h} WHERE name = ? AND owner = ? AND token = ?"
            )),
            // A batch of holder rows, in one transaction: first the markers
            // of its names, locked in primary-key order (the document lists
            // them sorted, and drives the join), as every other permit
            // transaction takes a marker before a holder row; ...
            batch_lock_markers: s(format!(
                "SELECT 1 FROM JSON_TABLE(?, '$[*]' COLUMNS (name VARCHAR(510) PATH '$')) AS j \
                   STRAIGHT_JOIN {t} AS l FORCE INDEX (PRIMARY) ON l.name = UNHEX(j.name) \
                    FOR UPDATE"
            )),
            // ... the server clock once, in µs since 1970, ...
            batch_now: s(format!(
                "SELECT TIMESTAMPDIFF(MICROSECOND, {EPOCH}, UTC_TIMESTAMP(6))"
            )),
            // ... every holder row still ours and live renewed to that
            // clock plus its ttl, ...
            batch_renew: s(format!(
                "UPDATE JSON_TABLE(?, {BATCH_ROWS}) AS j \
                   STRAIGHT_JOIN {h} AS p FORCE INDEX (PRIMARY) \
                     ON p.name = UNHEX(j.name) AND p.token = j.token \
                    SET p.expires_at = {EPOCH} + INTERVAL (? + j.ttl) MICROSECOND \
                  WHERE p.owner = CAST(j.owner AS BINARY) AND p.expires_at > UTC_TIMESTAMP(6)"
            )),
            // ... read back: the rows at their new expiry are the renewed
            // ones (a row not renewed had run out before that clock) ...
            batch_read: s(format!(
                "SELECT CAST(j.i AS SIGNED) FROM JSON_TABLE(?, {BATCH_ROWS}) AS j \
                   STRAIGHT_JOIN {h} AS p FORCE INDEX (PRIMARY) \
                     ON p.name = UNHEX(j.name) AND p.token = j.token \
                  WHERE p.owner = CAST(j.owner AS BINARY) \
                    AND p.expires_at = {EPOCH} + INTERVAL (? + j.ttl) MICROSECOND"
            )),
            // ... and each marker made to last as long as its latest holder
            // (`[[name in hex, µs since 1970], ...]`).
            batch_extend_markers: s(format!(
                "UPDATE JSON_TABLE(?, '$[*]' COLUMNS (name VARCHAR(510) PATH '$[0]', \
                        until BIGINT PATH '$[1]')) AS m \
                   STRAIGHT_JOIN {t} AS l FORCE INDEX (PRIMARY) ON l.name = UNHEX(m.name) \
                    SET l.expires_at = GREATEST(l.expires_at, \
                        {EPOCH} + INTERVAL m.until MICROSECOND) \
                  WHERE l.owner IS NULL"
            )),
            release: s(format!(
                "UPDATE {h} SET owner = NULL, \
                        expires_at = GREATEST(UTC_TIMESTAMP(6), acquired_at + INTERVAL ? MICROSECOND) \
                  WHERE name = ? AND owner = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)"
            )),
            settle_marker: s(format!(
                "UPDATE {t} SET expires_at = COALESCE( \
                        (SELECT MAX(expires_at) FROM {h} \
                          WHERE name = ? AND expires_at > UTC_TIMESTAMP(6)), \
                        UTC_TIMESTAMP(6)) \
                  WHERE name = ? AND owner IS NULL"
            )),
            // A forced release (see `force_release_all`): the row's token,
            // then the permits up to it, then the row's lease if its token
            // is still that one.
            force_read: Causal::new(format!("SELECT token FROM {t} WHERE name = ?")),
            force_release: Causal::new(format!(
                "UPDATE {h} SET owner = NULL, expires_at = UTC_TIMESTAMP(6) \
                  WHERE name = ? AND token <= ? AND expires_at > UTC_TIMESTAMP(6)"
            )),
            force_marker: Causal::new(format!(
                "UPDATE {t} SET expires_at = UTC_TIMESTAMP(6), owner = NULL, \
                        token = LAST_INSERT_ID(token) \
                  WHERE name = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)"
            )),
            sweep: s(format!(
                "DELETE FROM {h} WHERE expires_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND \
                  LIMIT {SWEEP_BATCH}"
            )),
            inspect: Causal::new(inspect),
            list: Causal::new(list),
        }
    }
}

fn permit_info(row: &MySqlRow) -> Result<LockInfo> {
    let name: Vec<u8> = row.try_get("name")?;
    let name =
        String::from_utf8(name).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into());
    Ok(permits::info(
        name,
        row.try_get::<i64, _>("holders")? as u32,
        row.try_get::<u32, _>("max_holders")?,
        row.try_get::<u64, _>("token")?,
        row.try_get::<Option<String>, _>("holder")?
            .unwrap_or_default(),
        utc(row.try_get("acquired_at")?),
        utc(row.try_get("expires_at")?),
    ))
}

/// Whether `e` says the holders table does not exist (a database migrated
/// before semaphores, or a lease table of one's own without one).
fn no_table(e: &sqlx::Error) -> bool {
    error_number(e) == Some(code::NO_SUCH_TABLE)
}

/// What one permit transaction came to.
enum Step<T> {
    /// Commit, and answer this.
    Commit(T),
    /// Roll back, and answer this.
    Rollback(T),
    /// The marker row does not exist yet: create it and try again.
    NoMarker,
}

/// One permit transaction on a connection of `$store`'s pool (causal if
/// `$galera`: see [`Causal`]), retried as
/// [`MySqlStore::permit_retrying`] says: `$body`, a future of
/// `Result<Step<T>, sqlx::Error>`, runs in it on the connection `$c`.
macro_rules! permit_transaction {
    ($store:expr, $galera:expr, $name:expr, |$c:ident| $body:expr) => {
        $store.permit_retrying($name, false, || async {
            let mut conn = Conn::acquire(&$store.pool).await?;
            begin(conn.begin_use(), $galera).await?;
            let $c = conn.begin_use();
            let outcome = $body.await;
            end(conn, outcome).await
        })
    };
}

impl MySqlStore {
    fn permit_sql(&self) -> Result<&PermitSql> {
        self.permits
            .as_deref()
            .ok_or_else(|| permits::no_holders_table(&self.sql.table))
    }

    /// Runs a permit transaction again after deadlocks and certification
    /// conflicts (and, for claims, which lock the marker without waiting, a
    /// busy marker), a few times; `Ok(None)` when the marker kept
    /// disappearing, or a claim's stayed busy or contended.
    async fn permit_retrying<T, F, Fut>(
        &self,
        name: &str,
        nowait: bool,
        mut attempt: F,
    ) -> Result<Option<T>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Step<T>, sqlx::Error>>,
    {
        let mut retries = 0;
        let mut created = 0;
        loop {
            let e = match attempt().await {
                Ok(Step::Commit(v) | Step::Rollback(v)) => return Ok(Some(v)),
                Ok(Step::NoMarker) if created < MAX_RETRIES => {
                    created += 1;
                    match self.create_row(name).await {
                        Ok(()) => continue,
                        Err(e) => e,
                    }
                }
                Ok(Step::NoMarker) => return Ok(None),
                Err(e) => e,
            };
            let busy = nowait && is_lock_busy(&e);
            if !(busy || is_retryable(&e)) || retries >= MAX_RETRIES {
                // A claim still refused after its retries is busy, as a
                // plain lease's claim: one with a wait tries again later.
                if nowait && (busy || is_retryable(&e)) {
                    tracing::debug!(name, error = %e, "dblock: permit claim still contended after retries; reporting busy");
                    return Ok(None);
                }
                return Err(map_err(e));
            }
            retries += 1;
            retry_pause(retries).await;
        }
    }

    /// One permit claim.
    pub(super) async fn claim_permit(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
        let sql = self.permit_sql()?;
        let causal = self.checked().await?;
        let lock: Arc<str> = format!("{} {NOWAIT}", sql.lock_marker).into();
        let outcome = self
            .permit_retrying(claim.name, true, || async {
                let mut conn = Conn::acquire(&self.pool).await?;
                if (claim.abandoned)() {
                    return Ok(Step::Rollback(Ok(None)));
                }
                begin(conn.begin_use(), causal).await?;
                let outcome = claim_body(sql, &lock, conn.begin_use(), claim).await;
                end(conn, outcome).await
            })
            .await?;
        outcome.unwrap_or(Ok(None))
    }

    pub(super) async fn renew_holder(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        let sql = self.permit_sql()?;
        let galera = self.checked().await?;
        let at = permit_transaction!(self, galera, lease.name, |c| renew_body(sql, c, lease, ttl))
            .await?;
        Ok(at.flatten())
    }

    /// Renews the holder rows of `batch` in one transaction (see the
    /// `batch_*` statements).
    pub(super) async fn renew_holders_batch(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let sql = self.permit_sql()?;
        let json = batch_json(batch.iter());
        let mut names: Vec<&[u8]> = batch.iter().map(|r| r.name.as_bytes()).collect();
        names.sort_unstable();
        names.dedup();
        let mut markers = String::from("[");
        for (k, name) in names.iter().enumerate() {
            if k > 0 {
                markers.push(',');
            }
            markers.push('"');
            push_hex(&mut markers, name);
            markers.push('"');
        }
        markers.push(']');
        let galera = self.checked().await?;
        let answers = permit_transaction!(self, galera, "", |c| renew_many_body(
            sql, c, batch, &json, &markers
        ))
        .await?;
        Ok(answers.unwrap_or_else(|| vec![Renewed::Unknown; batch.len()]))
    }

    pub(super) async fn release_holder(
        &self,
        lease: LeaseId<'_>,
        hold: Option<Duration>,
    ) -> Result<bool> {
        let sql = self.permit_sql()?;
        let galera = self.checked().await?;
        let mine = permit_transaction!(self, galera, lease.name, |c| release_body(
            sql, c, lease, hold
        ))
        .await?;
        Ok(mine.unwrap_or(false))
    }

    /// Ends the lease of `name` or every permit of it and its marker,
    /// without a transaction: it reads the token of the name's row (a
    /// plain lease's, or the marker's, which is its newest permit's), ends
    /// the live permits up to that token, then the row's lease if its
    /// token is still that one. A permit claimed after the read has a
    /// greater token and moved the marker to it, so both stay. (Ended
    /// regardless of tokens, one after the other, a permit claimed in
    /// between was ended with its marker left live, for up to a ttl.)
    /// Between the two updates the marker is live without a permit for a
    /// moment; claims do not count such a marker as a lock
    /// ([`Found::plain_live`]). No transaction: on Galera one open on a
    /// node is aborted by every conflicting claim committed through
    /// another node, and a steady stream of them starved it. Whether
    /// anything was live; `None` without a holders table (the caller then
    /// ends a plain lease alone).
    pub(super) async fn force_release_all(&self, name: &str, galera: bool) -> Result<Option<bool>> {
        unless_no_holders(self.permits.as_ref(), |sql| async move {
            let mut conn = Conn::acquire(&self.pool).await?;
            let read = q(sql.force_read.on(galera)).bind(name.as_bytes());
            let outcome = read.fetch_optional(&mut *conn.begin_use()).await;
            conn.settle(&outcome);
            let Some(row) = outcome.map_err(map_err)? else {
                return Ok(Some(false));
            };
            let token: u64 = row.try_get(0).map_err(map_err)?;
            let permits = self
                .execute(|| {
                    q(sql.force_release.on(galera))
                        .bind(name.as_bytes())
                        .bind(token)
                })
                .await?;
            let lease = self
                .execute(|| {
                    q(sql.force_marker.on(galera))
                        .bind(name.as_bytes())
                        .bind(token)
                })
                .await?;
            let broken = permits.rows_affected() > 0
                || lease.last_insert_id() > 0
                || lease.rows_affected() > 0;
            Ok(Some(broken))
        })
        .await
    }

    async fn permit_rows(&self, sql: &Arc<str>, name: Option<&str>) -> Result<Vec<LockInfo>> {
        let mut conn = Conn::acquire(&self.pool).await?;
        let mut query = q(sql);
        if let Some(name) = name {
            query = query.bind(name.as_bytes().to_vec());
        }
        let outcome = query.fetch_all(&mut *conn.begin_use()).await;
        conn.settle(&outcome);
        match outcome {
            Ok(rows) => rows.iter().map(permit_info).collect(),
            Err(e) if no_table(&e) => Ok(Vec::new()),
            Err(e) => Err(map_err(e)),
        }
    }

    pub(super) async fn inspect_permits(&self, name: &str) -> Result<Option<LockInfo>> {
        let Some(sql) = self.permits.as_ref() else {
            return Ok(None);
        };
        let sql = sql.inspect.on(self.checked().await?);
        Ok(self.permit_rows(sql, Some(name)).await?.pop())
    }

    pub(super) async fn list_permits(&self) -> Result<Vec<LockInfo>> {
        let Some(sql) = self.permits.as_ref() else {
            return Ok(Vec::new());
        };
        let sql = sql.list.on(self.checked().await?);
        self.permit_rows(sql, None).await
    }

    pub(super) async fn sweep_permits(&self, grace: Duration) -> Result<u64> {
        unless_no_holders(self.permits.as_ref(), |sql| async move {
            let done = self.execute(|| q(&sql.sweep).bind(micros(grace))).await?;
            Ok(done.rows_affected())
        })
        .await
    }
}

async fn begin(c: &mut MySqlConnection, causal: bool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(begin_sql(causal)).execute(c).await.map(drop)
}

/// Ends the transaction as `outcome` says. If COMMIT or ROLLBACK fails, the
/// connection stays dirty and is closed on drop, which rolls back whatever
/// is still open.
async fn end<T>(
    mut conn: Conn,
    outcome: Result<Step<T>, sqlx::Error>,
) -> Result<Step<T>, sqlx::Error> {
    let end = match outcome {
        Ok(Step::Commit(_)) => "COMMIT",
        _ => "ROLLBACK",
    };
    sqlx::raw_sql(end).execute(&mut *conn.begin_use()).await?;
    conn.done();
    outcome
}

/// Under the marker's lock: counts the live permits, decides, takes one.
async fn claim_body(
    sql: &PermitSql,
    lock: &Arc<str>,
    c: &mut MySqlConnection,
    claim: &Claim<'_>,
) -> Result<Step<Result<Option<Claimed>>>, sqlx::Error> {
    let Some(row) = q(lock)
        .bind(micros(claim.ttl))
        .bind(claim.name.as_bytes())
        .fetch_optional(&mut *c)
        .await?
    else {
        return Ok(Step::NoMarker);
    };
    let last: u64 = row.try_get(0)?;
    let live: i64 = row.try_get(1)?;
    let now: NaiveDateTime = row.try_get(2)?;
    let until: NaiveDateTime = row.try_get(3)?;
    let writer_waiting: i64 = row.try_get(4)?;
    // Counted at the marker's instant: judged a moment later, a permit
    // that expires in between would leave the marker live with no permit
    // counted, which reads as a plain lock.
    let counted = q(&sql.count)
        .bind(claim.name.as_bytes())
        .bind(now)
        .fetch_one(&mut *c)
        .await?;
    let found = Found {
        plain_live: live != 0,
        permits: counted.try_get::<i64, _>(0)? as u32,
        capacity: counted.try_get::<Option<u32>, _>(1)?,
        writer_waiting: writer_waiting != 0,
    };
    match found.decide(claim.name, claim.max_holders, claim.mode) {
        Err(e) => return Ok(Step::Rollback(Err(e))),
        Ok(Decision::Full) => return Ok(Step::Rollback(Ok(None))),
        Ok(Decision::Take) => {}
    }
    let token = last + 1;
    q(&sql.take)
        .bind(claim.name.as_bytes())
        .bind(token)
        .bind(claim.owner.as_bytes())
        .bind(super::clip(claim.holder))
        .bind(claim.max_holders)
        .bind(now)
        .bind(until)
        .execute(&mut *c)
        .await?;
    q(&sql.mark)
        .bind(permits::marker_mode(claim))
        .bind(token)
        .bind(now)
        .bind(until)
        .bind(claim.name.as_bytes())
        .execute(&mut *c)
        .await?;
    Ok(Step::Commit(Ok(Some(Claimed {
        token,
        expires_at: utc(until),
    }))))
}

/// The marker first (as claims and releases take it), then the permit.
async fn renew_body(
    sql: &PermitSql,
    c: &mut MySqlConnection,
    lease: LeaseId<'_>,
    ttl: Duration,
) -> Result<Step<Option<DateTime<Utc>>>, sqlx::Error> {
    q(&sql.extend_marker)
        .bind(micros(ttl))
        .bind(lease.name.as_bytes())
        .execute(&mut *c)
        .await?;
    let done = bind_lease(q(&sql.renew).bind(micros(ttl)), lease)
        .execute(&mut *c)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(Step::Rollback(None));
    }
    let at: NaiveDateTime = bind_lease(q(&sql.renew_read), lease)
        .fetch_one(&mut *c)
        .await?
        .try_get(0)?;
    Ok(Step::Commit(Some(utc(at))))
}

/// Under the markers' locks: renews the holder rows of a batch and extends
/// their markers.
async fn renew_many_body(
    sql: &PermitSql,
    c: &mut MySqlConnection,
    batch: &[Renewal],
    json: &str,
    markers: &str,
) -> Result<Step<Vec<Renewed>>, sqlx::Error> {
    q(&sql.batch_lock_markers)
        .bind(markers)
        .fetch_all(&mut *c)
        .await?;
    let now: i64 = q(&sql.batch_now).fetch_one(&mut *c).await?.try_get(0)?;
    q(&sql.batch_renew)
        .bind(json)
        .bind(now)
        .execute(&mut *c)
        .await?;
    let renewed = q(&sql.batch_read)
        .bind(json)
        .bind(now)
        .fetch_all(&mut *c)
        .await?;
    let mut answers = vec![Renewed::Gone; batch.len()];
    let mut until: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
    for row in renewed {
        // JSON_TABLE's ordinality counts from 1.
        let i: i64 = row.try_get(0)?;
        let Some(r) = usize::try_from(i - 1).ok().and_then(|k| batch.get(k)) else {
            continue;
        };
        let at = now.saturating_add(micros(r.ttl));
        let Some(at_utc) = DateTime::from_timestamp_micros(at) else {
            continue;
        };
        answers[(i - 1) as usize] = Renewed::Until(at_utc);
        let latest = until.entry(&r.name).or_insert(at);
        *latest = (*latest).max(at);
    }
    if until.is_empty() {
        return Ok(Step::Rollback(answers));
    }
    let mut extend = String::from("[");
    for (k, (name, at)) in until.iter().enumerate() {
        if k > 0 {
            extend.push(',');
        }
        extend.push_str("[\"");
        push_hex(&mut extend, name.as_bytes());
        extend.push_str(&format!("\",{at}]"));
    }
    extend.push(']');
    q(&sql.batch_extend_markers)
        .bind(extend)
        .execute(&mut *c)
        .await?;
    Ok(Step::Commit(answers))
}

/// Under the marker's lock: ends the permit (or keeps it for `hold`) and
/// makes the marker last as long as the latest permit left.
async fn release_body(
    sql: &PermitSql,
    c: &mut MySqlConnection,
    lease: LeaseId<'_>,
    hold: Option<Duration>,
) -> Result<Step<bool>, sqlx::Error> {
    let name = lease.name;
    q(&sql.lock_marker)
        .bind(0i64)
        .bind(name.as_bytes())
        .fetch_optional(&mut *c)
        .await?;
    let done = bind_lease(q(&sql.release).bind(hold.map(micros).unwrap_or(0)), lease)
        .execute(&mut *c)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(Step::Rollback(false));
    }
    q(&sql.settle_marker)
        .bind(name.as_bytes())
        .bind(name.as_bytes())
        .execute(&mut *c)
        .await?;
    Ok(Step::Commit(true))
}
