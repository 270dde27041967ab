//! Permits of semaphores on the SQLite lease table (see
//! [`crate::lease::permits`]).
//!
//! Each live permit is a row of the holders table (`dblock_leases_holders`,
//! migration 3). While permits of a name are live, the name's lease row is
//! their marker: no owner, lasting as long as the latest permit, so a
//! plain claim leaves the name alone; its token is the name's latest, so
//! tokens go on increasing whoever takes the name next. Every permit
//! statement runs in a `BEGIN IMMEDIATE` transaction: SQLite's one writer
//! orders them, and a claim counts the permits and takes one atomically.

use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row};

use super::{micros, time, SqliteStore, NOW};
use crate::lease::permits::{self, unless_no_holders, Decision, Found};
use crate::lease::{push_json_str, Claim, Claimed, LeaseId, NewExpiry, Renewal};
use crate::sqlite::retry_busy;
use crate::{LockInfo, Result};

/// The statements of permits for one lease table and its holders table.
#[derive(Debug)]
pub(super) struct PermitSql {
    create_marker: Arc<str>,
    read_marker: Arc<str>,
    count: Arc<str>,
    take: Arc<str>,
    mark: Arc<str>,
    renew: Arc<str>,
    renew_many: Arc<str>,
    extend_marker: Arc<str>,
    extend_markers: Arc<str>,
    release: Arc<str>,
    settle_marker: Arc<str>,
    force_release: Arc<str>,
    sweep: Arc<str>,
    inspect: Arc<str>,
    list: Arc<str>,
}

impl PermitSql {
    /// `t` and `h`: the quoted lease and holders tables.
    pub(super) fn new(t: &str, h: &str) -> Self {
        const FLOOR: &str = "dblock_token_floor";
        const AGGREGATE: &str = "SELECT name, count(*) AS holders, max(max_holders) AS max_holders,
                    max(token) AS token, group_concat(DISTINCT holder) AS holder,
                    min(acquired_at) AS acquired_at, max(expires_at) AS expires_at";
        PermitSql {
            // A new name's marker starts at the table's floor: the next
            // token is above every token swept.
            create_marker: format!(
                "INSERT INTO {t} (name, owner, holder, mode, token, acquired_at, expires_at)
                 VALUES (?1, NULL, NULL, 'x',
                         coalesce((SELECT floor FROM {FLOOR} WHERE lease_table = ?2), 0),
                         {NOW}, {NOW})
                 ON CONFLICT (name) DO NOTHING"
            )
            .into(),
            read_marker: format!(
                "SELECT token, expires_at > {NOW} AND holder IS NOT NULL,
                        coalesce(writer_waiting_until > {NOW}, 0)
                   FROM {t} WHERE name = ?1"
            )
            .into(),
            count: format!(
                "SELECT count(*), max(max_holders) FROM {h} WHERE name = ?1 AND expires_at > {NOW}"
            )
            .into(),
            take: format!(
                "INSERT INTO {h} (name, token, owner, holder, max_holders, acquired_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, {NOW}, {NOW} + ?6)
                 RETURNING expires_at"
            )
            .into(),
            mark: format!(
                "UPDATE {t} SET owner = NULL, holder = NULL, mode = ?4, token = ?2,
                        acquired_at = {NOW}, expires_at = max(expires_at, ?3)
                  WHERE name = ?1"
            )
            .into(),
            renew: super::renew_one(h),
            // Every holder row of a batch, as the plain leases' `renew_many`
            // (?1 the same JSON document), and then their markers.
            renew_many: super::renew_batch(h),
            // ?1: `[[name, latest expiry], ...]`.
            extend_markers: format!(
                "UPDATE {t} AS l SET expires_at = max(l.expires_at, m.until)
                   FROM (SELECT json_extract(value, '$[0]') AS name,
                                max(json_extract(value, '$[1]')) AS until
                           FROM json_each(?1) GROUP BY 1) AS m
                  WHERE l.name = m.name AND l.owner IS NULL"
            )
            .into(),
            extend_marker: format!(
                "UPDATE {t} SET expires_at = max(expires_at, ?2) WHERE name = ?1 AND owner IS NULL"
            )
            .into(),
            release: format!(
                "UPDATE {h} SET owner = NULL, expires_at = max({NOW}, acquired_at + ?4)
                  WHERE name = ?1 AND owner = ?2 AND token = ?3 AND expires_at > {NOW}"
            )
            .into(),
            settle_marker: format!(
                "UPDATE {t} SET expires_at = coalesce(
                        (SELECT max(expires_at) FROM {h} WHERE name = ?1 AND expires_at > {NOW}),
                        {NOW})
                  WHERE name = ?1 AND owner IS NULL"
            )
            .into(),
            force_release: format!(
                "UPDATE {h} SET owner = NULL, expires_at = {NOW}
                  WHERE name = ?1 AND expires_at > {NOW}"
            )
            .into(),
            sweep: format!("DELETE FROM {h} WHERE expires_at < {NOW} - ?1").into(),
            inspect: format!(
                "{AGGREGATE} FROM {h} WHERE name = ?1 AND expires_at > {NOW} GROUP BY name"
            )
            .into(),
            list: format!("{AGGREGATE} FROM {h} WHERE expires_at > {NOW} GROUP BY name").into(),
        }
    }
}

fn permit_info(row: &SqliteRow) -> Result<LockInfo> {
    Ok(permits::info(
        row.try_get("name")?,
        row.try_get::<i64, _>("holders")? as u32,
        row.try_get::<i64, _>("max_holders")? as u32,
        row.try_get::<i64, _>("token")? as u64,
        row.try_get::<Option<String>, _>("holder")?
            .unwrap_or_default(),
        time(row.try_get("acquired_at")?)?,
        time(row.try_get("expires_at")?)?,
    ))
}

impl SqliteStore {
    fn permit_sql(&self) -> Result<&PermitSql> {
        self.permits
            .as_ref()
            .ok_or_else(|| permits::no_holders_table(&self.table))
    }

    /// One permit claim: one write transaction.
    pub(super) async fn claim_permit(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
        let sql = self.permit_sql()?;
        let n = claim.max_holders;
        retry_busy(|| async {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            if (claim.abandoned)() {
                return Ok(Ok(None));
            }
            sqlx::query(AssertSqlSafe(sql.create_marker.clone()))
                .bind(claim.name)
                .bind(self.table.as_str())
                .execute(&mut *tx)
                .await?;
            let (last, live, writer_waiting): (i64, bool, bool) =
                sqlx::query_as(AssertSqlSafe(sql.read_marker.clone()))
                    .bind(claim.name)
                    .fetch_one(&mut *tx)
                    .await?;
            let (count, capacity): (i64, Option<i64>) =
                sqlx::query_as(AssertSqlSafe(sql.count.clone()))
                    .bind(claim.name)
                    .fetch_one(&mut *tx)
                    .await?;
            let found = Found {
                plain_live: live,
                permits: count as u32,
                capacity: capacity.map(|n| n as u32),
                writer_waiting,
            };
            match found.decide(claim.name, n, claim.mode) {
                Err(e) => return Ok(Err(e)),
                Ok(Decision::Full) => return Ok(Ok(None)),
                Ok(Decision::Take) => {}
            }
            let token = last + 1;
            let expires_at: i64 = sqlx::query_scalar(AssertSqlSafe(sql.take.clone()))
                .bind(claim.name)
                .bind(token)
                .bind(claim.owner)
                .bind(claim.holder)
                .bind(n as i64)
                .bind(micros(claim.ttl))
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query(AssertSqlSafe(sql.mark.clone()))
                .bind(claim.name)
                .bind(token)
                .bind(expires_at)
                .bind(permits::marker_mode(claim))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(time(expires_at).map(|expires_at| {
                Some(Claimed {
                    token: token as u64,
                    expires_at,
                })
            }))
        })
        .await?
    }

    pub(super) async fn renew_holder(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        let sql = self.permit_sql()?;
        let LeaseId { name, owner, token } = lease;
        let at: Option<i64> = retry_busy(|| async {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let at: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql.renew.clone()))
                .bind(name)
                .bind(owner)
                .bind(token as i64)
                .bind(micros(ttl))
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(at) = at {
                sqlx::query(AssertSqlSafe(sql.extend_marker.clone()))
                    .bind(name)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Ok(at)
        })
        .await?;
        at.map(time).transpose()
    }

    /// Renews the holder rows of `batch` and their markers in one write
    /// transaction: the renewed rows as `(name, token, new expiry)`.
    pub(super) async fn renew_holders_batch(
        &self,
        batch: &[Renewal],
    ) -> Result<Vec<(String, i64, i64)>> {
        let sql = self.permit_sql()?;
        let json = super::batch_json(batch);
        retry_busy(|| async {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let rows: Vec<(String, i64, i64)> =
                sqlx::query_as(AssertSqlSafe(sql.renew_many.clone()))
                    .bind(json.as_str())
                    .fetch_all(&mut *tx)
                    .await?;
            if !rows.is_empty() {
                let mut until = String::from("[");
                for (k, (name, _, at)) in rows.iter().enumerate() {
                    if k > 0 {
                        until.push(',');
                    }
                    until.push('[');
                    push_json_str(&mut until, name);
                    until.push_str(&format!(",{at}]"));
                }
                until.push(']');
                sqlx::query(AssertSqlSafe(sql.extend_markers.clone()))
                    .bind(until)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Ok(rows)
        })
        .await
    }

    pub(super) async fn release_holder(
        &self,
        lease: LeaseId<'_>,
        hold: Option<Duration>,
    ) -> Result<bool> {
        let sql = self.permit_sql()?;
        let LeaseId { name, owner, token } = lease;
        retry_busy(|| async {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let done = sqlx::query(AssertSqlSafe(sql.release.clone()))
                .bind(name)
                .bind(owner)
                .bind(token as i64)
                .bind(micros(hold.unwrap_or_default()))
                .execute(&mut *tx)
                .await?;
            let mine = done.rows_affected() > 0;
            if mine {
                sqlx::query(AssertSqlSafe(sql.settle_marker.clone()))
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Ok(mine)
        })
        .await
    }

    /// Ends the lease of `name` or every permit of it, and its marker, in
    /// one write transaction, so that no claim runs between the two.
    /// (Ended one after the other, a permit claimed in between was ended
    /// with its marker left live: that reads as a plain lock, which refuses
    /// every claim of the semaphore until it runs out.) Whether anything
    /// was live; `None` without a holders table (the caller then ends a
    /// plain lease alone).
    pub(super) async fn force_release_all(&self, name: &str) -> Result<Option<bool>> {
        unless_no_holders(self.permits.as_ref(), |sql| {
            retry_busy(|| async {
                let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
                let permits = sqlx::query(AssertSqlSafe(sql.force_release.clone()))
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                let plain = sqlx::query(AssertSqlSafe(self.sql.force_release.clone()))
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Some(permits.rows_affected() + plain.rows_affected() > 0))
            })
        })
        .await
    }

    pub(super) async fn inspect_permits(&self, name: &str) -> Result<Option<LockInfo>> {
        let row = unless_no_holders(self.permits.as_ref(), |sql| {
            retry_busy(|| {
                sqlx::query(AssertSqlSafe(sql.inspect.clone()))
                    .bind(name)
                    .fetch_optional(&self.pool)
            })
        })
        .await?;
        row.as_ref().map(permit_info).transpose()
    }

    pub(super) async fn list_permits(&self) -> Result<Vec<LockInfo>> {
        let rows = unless_no_holders(self.permits.as_ref(), |sql| {
            retry_busy(|| sqlx::query(AssertSqlSafe(sql.list.clone())).fetch_all(&self.pool))
        })
        .await?;
        rows.iter().map(permit_info).collect()
    }

    pub(super) async fn sweep_permits(&self, grace: Duration) -> Result<u64> {
        unless_no_holders(self.permits.as_ref(), |sql| async move {
            let done = retry_busy(|| {
                sqlx::query(AssertSqlSafe(sql.sweep.clone()))
                    .bind(micros(grace))
                    .execute(&self.pool)
            })
            .await?;
            Ok(done.rows_affected())
        })
        .await
    }
}
