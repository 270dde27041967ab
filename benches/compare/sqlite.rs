//! SQLite lease against raw SQL doing the same work.

use super::*;

pub(super) const SQ_CLAIM: &str = "INSERT INTO dblock_leases AS l \
        (name, owner, holder, mode, token, acquired_at, expires_at) \
     VALUES (?1, ?2, ?3, 'x', 1, \
        (CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000), \
        (CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000) + ?4) \
     ON CONFLICT (name) DO UPDATE \
        SET owner = excluded.owner, holder = excluded.holder, token = l.token + 1, \
            acquired_at = excluded.acquired_at, expires_at = excluded.expires_at \
      WHERE l.expires_at <= excluded.acquired_at \
     RETURNING token";
pub(super) const SQ_RELEASE: &str = "UPDATE dblock_leases SET owner = NULL, \
        expires_at = (CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000) \
      WHERE name = ?1 AND owner = ?2 AND token = ?3 \
        AND expires_at > (CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)";

pub(super) async fn sqlite_claim(pool: &SqlitePool, name: &str, owner: &str) -> Res<Option<i64>> {
    Ok(sqlx::query_scalar(SQ_CLAIM)
        .bind(name)
        .bind(owner)
        .bind("bench")
        .bind(30_000_000i64)
        .fetch_optional(pool)
        .await?)
}

pub(super) async fn sqlite_release(
    pool: SqlitePool,
    name: String,
    owner: String,
    token: i64,
) -> Res<()> {
    let done = sqlx::query(SQ_RELEASE)
        .bind(&name)
        .bind(&owner)
        .bind(token)
        .execute(&pool)
        .await?;
    if done.rows_affected() != 1 {
        return Err("raw: the lease was not ours at release".into());
    }
    Ok(())
}

pub(super) fn raw_sqlite_op(pool: SqlitePool, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let pool = pool.clone();
        let name = names[i].clone();
        Box::pin(async move {
            let owner = owner();
            let token = sqlite_claim(&pool, &name, &owner)
                .await?
                .ok_or("raw: the lease was busy")?;
            sqlite_release(pool, name, owner, token).await
        })
    })
}

pub(super) async fn sqlite(
    dir: &std::path::Path,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Res<()> {
    const B: &str = "sqlite lease";
    let file = dir.join("locks.db");
    let lease = dblock::sqlite::Lease::open(&file).await?;
    let version: String = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(lease.pool())
        .await?;
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(lease.pool())
        .await?;
    notes.push(format!(
        "SQLite {version} (bundled), file in {}, WAL, synchronous = {sync} (2 = FULL)",
        dir.display()
    ));
    let locks = Locks::new(lease);
    // Another pool on the same file, like another process's.
    let raw_pool = SqlitePoolOptions::new()
        .max_connections(SQLITE_POOL)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&file)
                .busy_timeout(Duration::from_secs(5)),
        )
        .await?;

    let n = names("sq", TASKS);
    let ops = [
        dblock_op(locks.clone(), n.clone()),
        raw_sqlite_op(raw_pool.clone(), n.clone()),
        limit::sqlite_op(&file, n.clone()).await?,
    ];
    let acquire: AcquireFn = {
        let (pool, n) = (raw_pool.clone(), n.clone());
        Arc::new(move |i| {
            let (pool, name) = (pool.clone(), n[i].clone());
            Box::pin(async move {
                let owner = owner();
                let token = sqlite_claim(&pool, &name, &owner)
                    .await?
                    .ok_or("raw: the lease was busy")?;
                let release: Release =
                    Box::new(move || Box::pin(sqlite_release(pool, name, owner, token)));
                Ok(release)
            })
        })
    };
    throughput_rows(
        B,
        &ops,
        &[
            ("raw upsert + release", None),
            ("raw upsert + release, dedicated connection", None),
        ],
        vec![("raw SQL in dblock's task structure", mimic_op(acquire))],
        rows,
    )
    .await?;

    let other = Locks::new(dblock::sqlite::Lease::new(raw_pool.clone()));
    let cross = polling_handoff(&locks, &other, "sq-hand").await?;
    let local = local_handoff(&locks, "sq-local", "UPDATE \"dblock_leases\" SET owner").await?;
    rows.push(poll_row(
        B,
        "handoff, polling, other pool (another process's view)",
        &cross.call,
        &local.call,
    ));
    same_locks_rows(B, &local, rows);
    drop(other);

    let s = hold_many(
        &locks,
        "sq-scale",
        Some(SCALE_TTL),
        SCALE_TTL / 3,
        &Server::None,
    )
    .await?;
    scale_rows(B, &s, None, rows);
    drop(locks);
    raw_pool.close().await;
    Ok(())
}
