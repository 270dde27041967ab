//! PostgreSQL lease against raw SQL doing the same work.

use super::*;

pub(super) const PG_CLAIM: &str = "INSERT INTO dblock_bench_leases AS l \
        (name, owner, holder, mode, token, acquired_at, expires_at) \
     VALUES ($1, $2, $3, 'x', 1, clock_timestamp(), \
             clock_timestamp() + $4::bigint * interval '1 microsecond') \
     ON CONFLICT (name) DO UPDATE \
        SET owner = excluded.owner, holder = excluded.holder, token = l.token + 1, \
            acquired_at = excluded.acquired_at, expires_at = excluded.expires_at \
      WHERE l.expires_at <= clock_timestamp() \
     RETURNING token";
pub(super) const PG_RELEASE: &str =
    "UPDATE dblock_bench_leases SET owner = NULL, expires_at = clock_timestamp() \
      WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp()";
pub(super) const PG_RELEASE_NOTIFY: &str = "WITH released AS ( \
        UPDATE dblock_bench_leases SET owner = NULL, expires_at = clock_timestamp() \
         WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp() \
        RETURNING name) \
     SELECT pg_notify('dblock_bench_raw', name) FROM released";
pub(super) const PG_RELEASE_NOTIFY_ASYNC: &str = "WITH released AS ( \
        UPDATE dblock_bench_leases SET owner = NULL, expires_at = clock_timestamp() \
         WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp() \
        RETURNING name) \
     SELECT pg_notify('dblock_bench_raw', name), \
            set_config('synchronous_commit', 'off', true) \
       FROM released";

/// How a raw PostgreSQL release ends the lease.
#[derive(Clone, Copy)]
pub(super) enum PgRelease {
    Plain,
    /// With `pg_notify`, as dblock's release does.
    Notify,
    /// With `pg_notify`, committing without waiting for the WAL flush.
    NotifyAsync,
}

pub(super) async fn raw_pg_claim(pool: &PgPool, name: &str, owner: &str) -> Res<Option<i64>> {
    Ok(sqlx::query_scalar(PG_CLAIM)
        .bind(name)
        .bind(owner)
        .bind("bench")
        .bind(30_000_000i64)
        .fetch_optional(pool)
        .await?)
}

pub(super) async fn raw_pg_release(
    pool: &PgPool,
    name: &str,
    owner: &str,
    token: i64,
    how: PgRelease,
) -> Res<()> {
    let sql = match how {
        PgRelease::Plain => {
            let done = sqlx::query(PG_RELEASE)
                .bind(name)
                .bind(owner)
                .bind(token)
                .execute(pool)
                .await?;
            return if done.rows_affected() == 1 {
                Ok(())
            } else {
                Err("raw: the lease was not ours at release".into())
            };
        }
        PgRelease::Notify => PG_RELEASE_NOTIFY,
        PgRelease::NotifyAsync => PG_RELEASE_NOTIFY_ASYNC,
    };
    let row = sqlx::query(sql)
        .bind(name)
        .bind(owner)
        .bind(token)
        .fetch_optional(pool)
        .await?;
    row.map(drop)
        .ok_or_else(|| "raw: the lease was not ours at release".into())
}

pub(super) fn raw_pg_lease_op(pool: PgPool, names: Arc<Vec<String>>, how: PgRelease) -> Op {
    Arc::new(move |i| {
        let pool = pool.clone();
        let name = names[i].clone();
        Box::pin(async move {
            let owner = owner();
            let token = raw_pg_claim(&pool, &name, &owner)
                .await?
                .ok_or("raw: the lease was busy")?;
            raw_pg_release(&pool, &name, &owner, token, how).await
        })
    })
}

/// The raw LISTEN/NOTIFY handoff: the waiter LISTENs on its own connection
/// and claims with the upsert on each notification for its name; the
/// holder releases with `pg_notify`. Clock from the release call to the
/// waiter's successful claim.
pub(super) async fn raw_notify_handoff(
    pool: &PgPool,
    pairs: usize,
    per_pair: usize,
) -> Res<Latency> {
    let mut set = JoinSet::new();
    for pair in 0..pairs {
        let pool = pool.clone();
        set.spawn(async move {
            let name = name("raw-notify", pair);
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen("dblock_bench_raw").await?;
            let mut listener = Some(listener);
            let mut out = Vec::new();
            for _ in 0..=per_pair {
                let mine = owner();
                let token = raw_pg_claim(&pool, &name, &mine)
                    .await?
                    .ok_or("raw: the lease was busy")?;
                let mut l = listener.take().expect("listener");
                let (tx, rx) = oneshot::channel();
                let (p, n) = (pool.clone(), name.clone());
                let task = tokio::spawn(async move {
                    let me = owner();
                    loop {
                        if let Some(t) = raw_pg_claim(&p, &n, &me).await? {
                            let _ = tx.send(Instant::now());
                            raw_pg_release(&p, &n, &me, t, PgRelease::Plain).await?;
                            return Ok::<_, E>(l);
                        }
                        while l.recv().await?.payload() != n {}
                    }
                });
                let hold = rand::rng().random_range(POLL_HOLD_MS.0..=POLL_HOLD_MS.1);
                tokio::time::sleep(Duration::from_millis(hold)).await;
                let t0 = Instant::now();
                raw_pg_release(&pool, &name, &mine, token, PgRelease::Notify).await?;
                let granted = rx.await;
                listener = Some(task.await??);
                out.push(granted?.saturating_duration_since(t0));
            }
            out.remove(0);
            Ok::<_, E>(out)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = set.join_next().await {
        all.extend(done??);
    }
    Ok(Latency::of(all))
}

pub(super) async fn pg_lease(
    env: &Env,
    raw_handoff: Option<&Latency>,
    rows: &mut Vec<Row>,
) -> Res<()> {
    const B: &str = "pg lease";
    let pool = pg_pool(&env.pg, POOL).await?;
    pg_bench_table(&pool).await?;
    let lease = |pool: &PgPool| -> Res<Locks> {
        Ok(Locks::new(
            dblock::postgres::Lease::new(pool.clone()).with_table(TABLE)?,
        ))
    };
    let locks = lease(&pool)?;

    let n = names("pgl", TASKS);
    let ops = [
        dblock_op(locks.clone(), n.clone()),
        raw_pg_lease_op(pool.clone(), n.clone(), PgRelease::Plain),
        raw_pg_lease_op(pool.clone(), n.clone(), PgRelease::Notify),
        raw_pg_lease_op(pool.clone(), n.clone(), PgRelease::NotifyAsync),
        limit::pg_lease_op(&env.pg, n.clone(), false).await?,
        limit::pg_lease_op(&env.pg, n.clone(), true).await?,
    ];
    throughput_rows(
        B,
        &ops,
        &[
            ("raw upsert + release", None),
            ("raw upsert + release with NOTIFY (dblock's SQL)", None),
            (
                "raw upsert + release with NOTIFY, synchronous_commit off",
                None,
            ),
            ("raw upsert + release, dedicated connection", None),
            (
                "raw upsert + release with NOTIFY (dblock's SQL), dedicated connection",
                None,
            ),
        ],
        Vec::new(),
        rows,
    )
    .await?;

    let other_pool = pg_pool(&env.pg, POOL).await?;
    let other = lease(&other_pool)?;
    let cross = polling_handoff(&locks, &other, "pgl-hand").await?;
    let raw_notify = raw_notify_handoff(&pool, POLL_PAIRS, POLL_PER_PAIR).await?;
    let mut row = latency_row(B, "handoff, LISTEN/NOTIFY, other instance", &cross.call);
    if let Some(raw) = raw_handoff {
        let ratio = cross.call.p50.as_secs_f64() / raw.p50.as_secs_f64();
        row = row
            .raw(format!("{} (advisory)", raw.show()))
            .ratio(ratio)
            .target("p50 ≤ 2 × raw", ratio <= 2.0);
    }
    rows.push(row);
    rows.push(
        latency_row(
            B,
            "handoff, LISTEN/NOTIFY, other instance, vs raw lease LISTEN/NOTIFY",
            &cross.call,
        )
        .raw(raw_notify.show())
        .ratio(cross.call.p50.as_secs_f64() / raw_notify.p50.as_secs_f64()),
    );
    let local = local_handoff(&locks, "pgl-local", "WITH released AS").await?;
    same_locks_rows(B, &local, rows);
    drop(other);
    other_pool.close().await;

    let statements = pg_stat_statements_usable(&pool).await;
    let server = Server::Pg {
        pool: pg_pool(&env.pg, 1).await?,
        statements,
    };
    let s = hold_many(&locks, "pgl-scale", Some(SCALE_TTL), SCALE_TTL / 3, &server).await?;
    scale_rows(B, &s, None, rows);
    drop(locks);
    pool.close().await;
    Ok(())
}
