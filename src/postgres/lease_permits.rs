//! Permits of semaphores on the PostgreSQL lease table (see
//! [`crate::lease::permits`]).
//!
//! Each live permit is a row of the holders table (`dblock_leases_holders`
//! beside `dblock_leases`, migration 3), keyed by name and token. The
//! name's row in the lease table is the semaphore's marker while permits
//! are live: no owner, its expiry the latest of theirs, so a plain claim
//! (which takes a row only once it has expired) never takes a name held by
//! permits. A permit claim, a permit release and the recomputation of the
//! marker's expiry all run in a transaction that first locks the marker
//! row, so permit claims of one name run one at a time and never grant
//! more than `n`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};

use super::{bind_lease, micros, retrying, PgStore, Query};
use crate::lease::permits::{self, unless_no_holders, Decision, Found};
use crate::lease::{Claim, Claimed, LeaseId, NewExpiry, Renewal, Renewed, SWEEP_BATCH};
use crate::postgres::map_err;
use crate::postgres::notify::CHANNEL;
use crate::postgres::token::sequence_token;
use crate::{LockInfo, Result};

/// The statements of permits for one lease table and its holders table.
#[derive(Debug)]
pub(super) struct PermitSql {
    lock_marker: Arc<str>,
    lock_row: Arc<str>,
    count: Arc<str>,
    take: Arc<str>,
    renew: Arc<str>,
    renew_many: Arc<str>,
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
        const MICROS: &str = "$4::bigint * interval '1 microsecond'";
        let token = sequence_token();
        const AGGREGATE: &str = "SELECT name, count(*) AS holders, max(max_holders) AS max_holders,
                    max(token) AS token, string_agg(DISTINCT holder, ', ') AS holder,
                    min(acquired_at) AS acquired_at, max(expires_at) AS expires_at";
        PermitSql {
            // Creates the name's marker row (free) or locks the existing
            // one; either way the row stays locked to the end of the
            // transaction. `live` says whether a plain lease (a row with a
            // holder; a marker has none) holds it (see `Found::plain_live`).
            lock_marker: format!(
                "INSERT INTO {t} AS l (name, owner, holder, mode, token, acquired_at, expires_at)
                 VALUES ($1, NULL, NULL, 'x', 0, clock_timestamp(), clock_timestamp())
                 ON CONFLICT (name) DO UPDATE SET name = excluded.name
                 RETURNING l.expires_at > clock_timestamp() AND l.holder IS NOT NULL AS live,
                           coalesce(l.writer_waiting_until > clock_timestamp(), false)
                               AS writer_waiting"
            )
            .into(),
            // The name's row (marker or plain lease), locked, if it exists.
            lock_row: format!("SELECT 1 FROM {t} WHERE name = $1 FOR UPDATE").into(),
            count: format!(
                "SELECT count(*), max(max_holders) FROM {h}
                  WHERE name = $1 AND expires_at > clock_timestamp()"
            )
            .into(),
            // The permit, and the marker made to last as long as it.
            take: format!(
                "WITH p AS (
                    INSERT INTO {h} (name, token, owner, holder, max_holders, acquired_at, expires_at)
                    VALUES ($1, {token}, $2, $3, $5, clock_timestamp(), clock_timestamp() + {MICROS})
                    RETURNING name, token, expires_at)
                 UPDATE {t} AS l
                    SET owner = NULL, holder = NULL, mode = $6, token = p.token,
                        acquired_at = clock_timestamp(),
                        expires_at = greatest(l.expires_at, p.expires_at)
                   FROM p WHERE l.name = p.name
                 RETURNING p.token, p.expires_at"
            )
            .into(),
            renew: format!(
                "WITH r AS (
                    UPDATE {h} SET expires_at = clock_timestamp() + {MICROS}
                     WHERE name = $1 AND owner = $2 AND token = $3
                       AND expires_at > clock_timestamp()
                    RETURNING name, expires_at),
                 m AS (
                    UPDATE {t} AS l SET expires_at = greatest(l.expires_at, r.expires_at)
                      FROM r WHERE l.name = r.name)
                 SELECT expires_at FROM r"
            )
            .into(),
            // Every holder row of a batch in one statement, as the plain
            // leases' `renew_many`; each name's marker then lasts as long
            // as its latest holder.
            renew_many: format!(
                "WITH r AS (
                    UPDATE {h} AS p
                       SET expires_at = clock_timestamp() + x.ttl * interval '1 microsecond'
                      FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                           WITH ORDINALITY AS x(name, owner, token, ttl, i)
                     WHERE p.name = x.name AND p.owner = x.owner AND p.token = x.token
                       AND p.expires_at > clock_timestamp()
                    RETURNING x.i, p.name, p.expires_at),
                 m AS (
                    UPDATE {t} AS l SET expires_at = greatest(l.expires_at, e.expires_at)
                      FROM (SELECT name, max(expires_at) AS expires_at FROM r GROUP BY name) AS e
                     WHERE l.name = e.name)
                 SELECT i, expires_at FROM r"
            )
            .into(),
            release: format!(
                "UPDATE {h}
                    SET owner = NULL, expires_at = greatest(clock_timestamp(), acquired_at + {MICROS})
                  WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp()
                 RETURNING 1"
            )
            .into(),
            // The marker lasts as long as the latest live permit, and ends
            // now without one; waiters are told a permit is free.
            settle_marker: format!(
                "WITH m AS (
                    UPDATE {t} SET expires_at = coalesce(
                        (SELECT max(expires_at) FROM {h}
                          WHERE name = $1 AND expires_at > clock_timestamp()),
                        clock_timestamp())
                     WHERE name = $1 AND owner IS NULL)
                 SELECT pg_notify('{CHANNEL}', $1)"
            )
            .into(),
            force_release: format!(
                "UPDATE {h} SET owner = NULL, expires_at = clock_timestamp()
                  WHERE name = $1 AND expires_at > clock_timestamp()"
            )
            .into(),
            sweep: format!(
                "DELETE FROM {h} WHERE (name, token) IN (
                    SELECT name, token FROM {h}
                     WHERE expires_at < clock_timestamp() - $1::bigint * interval '1 microsecond'
                     LIMIT {SWEEP_BATCH} FOR UPDATE SKIP LOCKED)"
            )
            .into(),
            inspect: format!(
                "{AGGREGATE} FROM {h} WHERE name = $1 AND expires_at > clock_timestamp()
                  GROUP BY name"
            )
            .into(),
            list: format!(
                "{AGGREGATE} FROM {h} WHERE expires_at > clock_timestamp() GROUP BY name"
            )
            .into(),
        }
    }
}

fn permit_info(row: &PgRow) -> sqlx::Result<LockInfo> {
    Ok(permits::info(
        row.try_get("name")?,
        row.try_get::<i64, _>("holders")? as u32,
        row.try_get::<i32, _>("max_holders")? as u32,
        row.try_get::<i64, _>("token")? as u64,
        row.try_get::<Option<String>, _>("holder")?
            .unwrap_or_default(),
        row.try_get::<DateTime<Utc>, _>("acquired_at")?,
        row.try_get::<DateTime<Utc>, _>("expires_at")?,
    ))
}

impl PgStore {
    fn permit_sql(&self) -> Result<&PermitSql> {
        self.permits
            .as_ref()
            .ok_or_else(|| permits::no_holders_table(&self.table))
    }

    fn q(&self, sql: &Arc<str>) -> Query {
        sqlx::query(AssertSqlSafe(sql.clone())).persistent(!self.pooled)
    }

    /// One permit (or reader) claim: one transaction under the marker
    /// row's lock.
    pub(super) async fn claim_permit(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
        let sql = self.permit_sql()?;
        self.check_engine().await?;
        let n = claim.max_holders;
        let outcome = retrying(|| async {
            let mut tx = self.pool.begin().await?;
            if (claim.abandoned)() {
                return Ok(Ok(None));
            }
            let marker = self
                .q(&sql.lock_marker)
                .bind(claim.name)
                .fetch_one(&mut *tx)
                .await?;
            let row = self
                .q(&sql.count)
                .bind(claim.name)
                .fetch_one(&mut *tx)
                .await?;
            let found = Found {
                plain_live: marker.try_get(0)?,
                permits: row.try_get::<i64, _>(0)? as u32,
                capacity: row.try_get::<Option<i32>, _>(1)?.map(|n| n as u32),
                writer_waiting: marker.try_get(1)?,
            };
            match found.decide(claim.name, n, claim.mode) {
                Err(e) => return Ok(Err(e)),
                Ok(Decision::Full) => return Ok(Ok(None)),
                Ok(Decision::Take) => {}
            }
            let row = self
                .q(&sql.take)
                .bind(claim.name)
                .bind(claim.owner)
                .bind(claim.holder)
                .bind(micros(claim.ttl))
                .bind(n as i32)
                .bind(permits::marker_mode(claim))
                .fetch_one(&mut *tx)
                .await?;
            let claimed = Claimed {
                token: row.try_get::<i64, _>(0)? as u64,
                expires_at: row.try_get(1)?,
            };
            tx.commit().await?;
            Ok(Ok(Some(claimed)))
        })
        .await?;
        outcome
    }

    pub(super) async fn renew_holder(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        self.renew_one(&self.permit_sql()?.renew, lease, ttl).await
    }

    /// Renews the holder rows of `batch` in one statement.
    pub(super) async fn renew_holders_batch(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let sql = self.permit_sql()?;
        let rows = retrying(|| {
            self.fetch_all(|| {
                self.q(&sql.renew_many)
                    .bind(batch.iter().map(|r| &*r.name).collect::<Vec<_>>())
                    .bind(batch.iter().map(|r| &*r.owner).collect::<Vec<_>>())
                    .bind(batch.iter().map(|r| r.token as i64).collect::<Vec<_>>())
                    .bind(batch.iter().map(|r| micros(r.ttl)).collect::<Vec<_>>())
            })
        })
        .await?;
        super::ordinal_answers(batch.len(), &rows)
    }

    /// Ends a permit (or keeps it to `acquired_at + hold`) and settles the
    /// marker, under the marker's lock: a claim of the same name waits for
    /// it and then sees the permit gone.
    pub(super) async fn release_holder(
        &self,
        lease: LeaseId<'_>,
        hold: Option<Duration>,
    ) -> Result<bool> {
        let sql = self.permit_sql()?;
        let name = lease.name;
        retrying(|| async {
            let mut tx = self.pool.begin().await?;
            self.q(&sql.lock_marker)
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            let mine = bind_lease(self.q(&sql.release), lease)
                .bind(micros(hold.unwrap_or_default()))
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if mine {
                self.q(&sql.settle_marker)
                    .bind(name)
                    .fetch_all(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Ok(mine)
        })
        .await
    }

    /// Ends the lease of `name` or every permit of it, and its marker, in
    /// one transaction under the row's lock, which every permit claim and
    /// release takes first: a claim runs wholly before or wholly after it.
    /// (Ended one after the other, a permit claimed in between was ended
    /// with its marker left live: that reads as a plain lock, which refuses
    /// every claim of the semaphore until it runs out.) Whether anything
    /// was live; `None` without a holders table (the caller then ends a
    /// plain lease alone).
    pub(super) async fn force_release_all(&self, name: &str) -> Result<Option<bool>> {
        unless_no_holders(self.permits.as_ref(), |sql| {
            retrying(|| async {
                let mut tx = self.pool.begin().await?;
                let row = self.q(&sql.lock_row).bind(name);
                if row.fetch_optional(&mut *tx).await?.is_none() {
                    return Ok(Some(false));
                }
                let permits = self.q(&sql.force_release).bind(name);
                let permits = permits.execute(&mut *tx).await?.rows_affected() > 0;
                // Its notification goes out at the commit.
                let plain = self.q(&self.sql.force_release).bind(name);
                let plain = plain.fetch_optional(&mut *tx).await?.is_some();
                tx.commit().await?;
                Ok(Some(permits || plain))
            })
        })
        .await
    }

    pub(super) async fn inspect_permits(&self, name: &str) -> Result<Option<LockInfo>> {
        let row = unless_no_holders(self.permits.as_ref(), |sql| async move {
            self.fetch_optional(|| self.q(&sql.inspect).bind(name.to_owned()))
                .await
                .map_err(map_err)
        })
        .await?;
        row.as_ref().map(permit_info).transpose().map_err(map_err)
    }

    pub(super) async fn list_permits(&self) -> Result<Vec<LockInfo>> {
        let rows = unless_no_holders(self.permits.as_ref(), |sql| async move {
            self.fetch_all(|| self.q(&sql.list)).await.map_err(map_err)
        })
        .await?;
        rows.iter()
            .map(permit_info)
            .collect::<sqlx::Result<_>>()
            .map_err(map_err)
    }

    pub(super) async fn sweep_permits(&self, grace: Duration) -> Result<u64> {
        unless_no_holders(self.permits.as_ref(), |sql| async move {
            let done = retrying(|| self.execute(|| self.q(&sql.sweep).bind(micros(grace)))).await?;
            Ok(done.rows_affected())
        })
        .await
    }
}
