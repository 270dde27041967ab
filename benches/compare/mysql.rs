//! MySQL / MariaDB lease against raw SQL doing the same work.

use super::placement::{self, Placement};
use super::*;

pub(super) const MY_LOCK: &str =
    "SELECT token, expires_at > UTC_TIMESTAMP(6) FROM dblock_bench_leases \
      WHERE name = ? FOR UPDATE";
pub(super) const MY_TAKE: &str =
    "UPDATE dblock_bench_leases SET owner = ?, holder = ?, token = token + 1, \
        acquired_at = UTC_TIMESTAMP(6), expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
      WHERE name = ?";
pub(super) const MY_CREATE: &str = "INSERT IGNORE INTO dblock_bench_leases \
        (name, owner, holder, mode, token, acquired_at, expires_at) \
     VALUES (?, NULL, NULL, 'x', 0, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))";
// The token comes back through LAST_INSERT_ID: 1 for a new row, the next
// token for a lease taken over, 0 when the lease is live (busy). Every
// condition reads the old expires_at, which is assigned last.
pub(super) const MY_UPSERT: &str = "INSERT INTO dblock_bench_leases \
        (name, owner, holder, mode, token, acquired_at, expires_at) \
     VALUES (?, ?, ?, 'x', LAST_INSERT_ID(1), UTC_TIMESTAMP(6), \
             UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND) \
     ON DUPLICATE KEY UPDATE \
        owner = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(owner), owner), \
        holder = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(holder), holder), \
        token = IF(expires_at <= UTC_TIMESTAMP(6), LAST_INSERT_ID(token + 1), \
                   token + LAST_INSERT_ID(0)), \
        acquired_at = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(acquired_at), acquired_at), \
        expires_at = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(expires_at), expires_at)";
pub(super) const MY_RELEASE: &str =
    "UPDATE dblock_bench_leases SET expires_at = UTC_TIMESTAMP(6), owner = NULL \
      WHERE name = ? AND owner = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)";

pub(super) async fn my_release(pool: &MySqlPool, name: &str, owner: &str, token: u64) -> Res<()> {
    let done = sqlx::query(MY_RELEASE)
        .bind(name.as_bytes())
        .bind(owner.as_bytes())
        .bind(token)
        .execute(pool)
        .await?;
    if done.rows_affected() != 1 {
        return Err("raw: the lease was not ours at release".into());
    }
    Ok(())
}

pub(super) fn raw_my_tx_op(pool: MySqlPool, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let pool = pool.clone();
        let name = names[i].clone();
        Box::pin(async move {
            let owner = owner();
            let token = loop {
                let mut tx = pool.begin().await?;
                let row = sqlx::query(MY_LOCK)
                    .bind(name.as_bytes())
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(row) = row else {
                    tx.rollback().await?;
                    sqlx::query(MY_CREATE)
                        .bind(name.as_bytes())
                        .execute(&pool)
                        .await?;
                    continue;
                };
                let token: u64 = row.try_get(0)?;
                let live: i64 = row.try_get(1)?;
                if live != 0 {
                    return Err("raw: the lease was busy".into());
                }
                sqlx::query(MY_TAKE)
                    .bind(owner.as_bytes())
                    .bind("bench")
                    .bind(30_000_000i64)
                    .bind(name.as_bytes())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                break token + 1;
            };
            my_release(&pool, &name, &owner, token).await
        })
    })
}

pub(super) fn raw_my_upsert_op(pool: MySqlPool, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let pool = pool.clone();
        let name = names[i].clone();
        Box::pin(async move {
            let owner = owner();
            let done = sqlx::query(MY_UPSERT)
                .bind(name.as_bytes())
                .bind(owner.as_bytes())
                .bind("bench")
                .bind(30_000_000i64)
                .execute(&pool)
                .await?;
            let token = done.last_insert_id();
            if token == 0 {
                return Err("raw: the lease was busy".into());
            }
            my_release(&pool, &name, &owner, token).await
        })
    })
}

pub(super) async fn mysql(env: &Env, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Res<()> {
    const B: &str = "mysql lease";
    let pool = my_pool(&env.my, POOL).await?;
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&pool)
        .await?;
    notes.push(format!("MySQL/MariaDB server {version}"));
    my_bench_table(&pool).await?;
    let lease = |pool: &MySqlPool| -> Res<Locks> {
        Ok(Locks::new(
            dblock::mysql::Lease::new(pool.clone()).with_table(TABLE)?,
        ))
    };
    let locks = lease(&pool)?;

    let n = names("my", TASKS);
    let dedicated = limit::my_conns(&env.my).await?;
    let bells = limit::my_conns(&env.my).await?;
    // The same work again on connections of its own: this run's noise.
    let again = limit::my_conns(&env.my).await?;
    let ops = [
        dblock_op(locks.clone(), n.clone()),
        raw_my_tx_op(pool.clone(), n.clone()),
        raw_my_upsert_op(pool.clone(), n.clone()),
        limit::my_upsert_op(dedicated.clone(), n.clone()),
        limit::my_same_work_op(dedicated.clone(), None, TABLE, n.clone())?,
        limit::my_same_work_op(dedicated, Some(bells), TABLE, n.clone())?,
        limit::my_same_work_op(again, None, TABLE, n.clone())?,
    ];
    // DBLOCK_BENCH_PAIRS=dblock|same: only 3 s of pairs of one of them with
    // 8 tasks, for counting system calls (`strace -f -c`).
    if let Ok(which) = std::env::var("DBLOCK_BENCH_PAIRS") {
        let k = match which.as_str() {
            "dblock" => 0,
            "same" => 4,
            other => return Err(format!("DBLOCK_BENCH_PAIRS: unknown {other:?}").into()),
        };
        run_window(&ops[k], TASKS, WARMUP).await?;
        let pairs = run_window(&ops[k], TASKS, Duration::from_secs(3)).await?;
        eprintln!("pairs: {which}, {TASKS} tasks: {} /s", rate(pairs));
        return Ok(());
    }
    let results = throughput_rows(
        B,
        &ops,
        &[
            (
                "raw FOR UPDATE transaction + release",
                Some(("≥ 0.9 × raw", 0.9)),
            ),
            ("raw upsert + release", Some(("≥ 0.9 × raw", 0.9))),
            (
                "raw upsert + release, dedicated connection",
                Some(("≥ 0.9 × raw", 0.9)),
            ),
            (
                "raw, same work (dblock's claim + release SQL), dedicated connection",
                Some(("≥ 0.9 × same work", 0.9)),
            ),
            (
                "raw, same work + a doorbell GET_LOCK/RELEASE_LOCK per pair, dedicated",
                None,
            ),
            ("raw, same work again, on other dedicated connections", None),
        ],
        Vec::new(),
        rows,
    )
    .await?;
    for (tasks, r) in &results {
        rows.push(raw_ratio_row(
            B,
            format!("pairs/s, {tasks} task(s): raw same work vs raw upsert + release, dedicated"),
            r,
            4,
            3,
            "reported: the price of dblock's SQL (one-statement claim with NOWAIT)",
        ));
        rows.push(raw_ratio_row(
            B,
            format!(
                "pairs/s, {tasks} task(s): raw same work + doorbell vs raw same work, dedicated"
            ),
            r,
            5,
            4,
            "reported: the price of a doorbell taken and let go per pair",
        ));
        rows.push(noise_row(B, &format!("pairs/s, {tasks} task(s)"), r, 6, 4));
    }
    // Where the 1-task gap goes: CPU time per pair, the bench's and the
    // server's, for dblock and its own SQL (unpinned here, and again in
    // each placement below).
    const CPU_BLOCK: usize = 100;
    let cpu_ops = [ops[0].clone(), ops[4].clone()];
    let server = placement::mysql_server(&pool).await;
    rows.push(placement::cpu_row(B, &cpu_ops, server, "unpinned", CPU_BLOCK).await?);
    // The 1-task rows again with the placement fixed (see `placement`):
    // dblock, its own SQL and the upsert, on dedicated connections.
    let placed = [ops[0].clone(), ops[4].clone(), ops[3].clone()];
    for at in [
        Placement {
            client: 0,
            server: 0,
        },
        Placement {
            client: 0,
            server: 1,
        },
    ] {
        let label = at.label();
        let pinned = match placement::mysql_server(&pool).await {
            Ok(server) => placement::pin(server, at),
            Err(why) => Err(why),
        };
        let measured = match pinned {
            Ok(pinned) => {
                let r = compare(&placed, 1).await;
                let server = placement::mysql_server(&pool).await;
                let cpu = placement::cpu_row(B, &cpu_ops, server, label, CPU_BLOCK).await;
                drop(pinned);
                rows.push(cpu?);
                r?
            }
            Err(why) => {
                rows.push(
                    Row::new(B, format!("pairs/s, 1 task, {label}"))
                        .dblock("—")
                        .note(format!("not measured: {why}")),
                );
                continue;
            }
        };
        let ratio = |a: usize, k: usize| {
            median(
                measured[a]
                    .iter()
                    .zip(&measured[k])
                    .map(|(d, x)| d / x)
                    .collect(),
            )
        };
        let figure = |k: usize| rate(median(measured[k].clone()));
        rows.push(
            Row::new(
                B,
                format!("pairs/s, 1 task, {label}: vs raw, same work, dedicated"),
            )
            .dblock(figure(0))
            .raw(figure(1))
            .ratio(ratio(0, 1))
            .target("≥ 0.9 × same work", ratio(0, 1) >= 0.9),
        );
        rows.push(
            Row::new(
                B,
                format!("pairs/s, 1 task, {label}: vs raw upsert + release, dedicated"),
            )
            .dblock(figure(0))
            .raw(format!(
                "{} (same work {}: {:.2} ×)",
                figure(2),
                figure(1),
                ratio(1, 2)
            ))
            .ratio(ratio(0, 2))
            .target("≥ 0.9 × raw", ratio(0, 2) >= 0.9),
        );
    }
    if quick() {
        return Ok(());
    }

    let other_pool = my_pool(&env.my, POOL).await?;
    let other = lease(&other_pool)?;
    let cross = polling_handoff(&locks, &other, "my-hand").await?;
    let local = local_handoff(
        &locks,
        "my-local",
        "UPDATE `dblock_bench_leases` SET expires_at",
    )
    .await?;
    rows.push(poll_row(
        B,
        "handoff, polling, other instance",
        &cross.call,
        &local.call,
    ));
    same_locks_rows(B, &local, rows);
    drop(other);
    other_pool.close().await;

    let server = Server::My(my_pool(&env.my, 1).await?);
    let s = hold_many(&locks, "my-scale", Some(SCALE_TTL), SCALE_TTL / 3, &server).await?;
    scale_rows(B, &s, None, rows);
    drop(locks);
    pool.close().await;
    Ok(())
}
