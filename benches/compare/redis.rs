//! Redis against raw `SET NX PX` and against dblock's own scripts sent by hand.

use super::*;

/// The naive lock's release: delete the key if it still holds our value.
pub(super) const RAW_REDIS_RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Raw `SET key owner NX PX 30000` + the Lua owner `DEL`, on one
/// multiplexed connection.
pub(super) fn raw_redis_op(conn: redis::aio::MultiplexedConnection, names: Arc<Vec<String>>) -> Op {
    let release = Arc::new(redis::Script::new(RAW_REDIS_RELEASE));
    Arc::new(move |i| {
        let (mut conn, release) = (conn.clone(), release.clone());
        let key = format!("dblock-bench-raw:{}", names[i]);
        Box::pin(async move {
            let owner = owner();
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&owner)
                .arg("NX")
                .arg("PX")
                .arg(30_000)
                .query_async(&mut conn)
                .await?;
            set.ok_or("raw: the key was busy")?;
            let deleted: i64 = release
                .key(&key)
                .arg(&owner)
                .invoke_async(&mut conn)
                .await?;
            if deleted != 1 {
                return Err("raw: the key was not ours on release".into());
            }
            Ok(())
        })
    })
}

pub(super) async fn redis_section(
    url: &str,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Res<()> {
    const B: &str = "redis lease";
    let lease = dblock::redis::Lease::open(url)
        .await?
        .with_prefix("dblock-bench:")?;
    let conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn.clone())
        .await?;
    if let Some(v) = info.lines().find_map(|l| l.strip_prefix("redis_version:")) {
        notes.push(format!(
            "Redis server {}; raw: SET NX PX + a Lua owner DEL (EVALSHA) on one multiplexed \
             connection, dblock: redis::Lease on its own (also one multiplexed connection)",
            v.trim()
        ));
    }
    let n = names("rd", TASKS);
    let manager = redis::Client::open(url)?.get_connection_manager().await?;
    // dblock's connection settings (a response timeout on every request),
    // for profiling only (DBLOCK_BENCH_PAIRS=same-timeout).
    let timed = redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(3))),
        )
        .await?;
    let ops = [
        dblock_op(Locks::new(lease), n.clone()),
        raw_redis_op(conn.clone(), n.clone()),
        raw_redis_same_op(conn, n.clone()),
        raw_redis_same_op(manager, n.clone()),
        raw_redis_same_op(timed, n),
    ];
    // DBLOCK_BENCH_PAIRS=dblock|raw|same|same-manager|same-timeout: only pairs of one of
    // them, for profiling (`perf record`, `strace -c`).
    if let Ok(which) = std::env::var("DBLOCK_BENCH_PAIRS") {
        let k = ["dblock", "raw", "same", "same-manager", "same-timeout"]
            .iter()
            .position(|w| *w == which)
            .ok_or_else(|| format!("DBLOCK_BENCH_PAIRS: unknown {which:?}"))?;
        return pairs_only(&ops[k], &which).await;
    }
    let results = ratio_rows(
        B,
        &ops[..4],
        &[
            (
                "raw SET NX PX + Lua DEL, one dedicated connection",
                Some(("≥ 0.9 ×", 0.9)),
            ),
            (
                "raw, same work (dblock's claim + release scripts, EVALSHA), one multiplexed connection",
                Some(("≥ 0.9 × same work", 0.9)),
            ),
            (
                "raw, same work, on a ConnectionManager (the redis crate's reconnecting connection)",
                None,
            ),
        ],
        rows,
    )
    .await?;
    for (tasks, r) in &results {
        rows.push(raw_ratio_row(
            B,
            format!("pairs/s, {tasks} task(s): raw same work vs raw SET NX PX + Lua DEL"),
            r,
            2,
            1,
            "reported: the price of the work (token draw, owner-checked release)",
        ));
    }
    Ok(())
}

/// dblock's own lease pair sent by hand: its claim and release scripts
/// (EVALSHA, loading them if needed), with the keys and arguments
/// `redis::Lease` gives them, on `conn` ("raw, same work"). Keys under
/// `dblock-bench-same:`.
pub(super) fn raw_redis_same_op<C>(conn: C, names: Arc<Vec<String>>) -> Op
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    const PREFIX: &str = "dblock-bench-same:";
    let [claim, release] = dblock::redis::bench_scripts();
    let holder = Arc::new(format!("bench-host:{}", std::process::id()));
    Arc::new(move |i| {
        let (mut conn, holder) = (conn.clone(), holder.clone());
        let name = names[i].clone();
        Box::pin(async move {
            let owner = owner();
            let key = format!("{PREFIX}lock:{name}");
            let claimed: Option<(i64, i64)> = claim
                .prepare_invoke()
                .key(&key)
                .key(format!("{PREFIX}token"))
                .key(format!("{PREFIX}writer:{name}"))
                .arg(&owner)
                .arg(&*holder)
                .arg(30_000u64)
                .arg(0u64)
                .arg("0")
                .invoke_async(&mut conn)
                .await?;
            let (token, _expires) = claimed.ok_or("raw (same work): the key was busy")?;
            let released: i64 = release
                .prepare_invoke()
                .key(&key)
                .arg(&owner)
                .arg(token as u64)
                .arg(0u64)
                .arg(format!("{PREFIX}released:{name}"))
                .arg(&name)
                .invoke_async(&mut conn)
                .await?;
            if released != 1 {
                return Err("raw (same work): the key was not ours on release".into());
            }
            Ok(())
        })
    })
}
