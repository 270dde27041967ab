//! Scale: how many locks one process holds with a pool of at most
//! 10 connections, and the statements per second keeping them costs.

use super::*;

pub(super) enum Server {
    Pg { pool: PgPool, statements: bool },
    My(MySqlPool),
    None,
}

impl Server {
    pub(super) async fn counters(&self) -> Res<Vec<(&'static str, i64)>> {
        Ok(match self {
            Server::Pg { pool, statements } => {
                let mut v = Vec::new();
                if *statements {
                    let calls: i64 = sqlx::query_scalar(
                        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
                          WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    )
                    .fetch_one(pool)
                    .await?;
                    v.push(("pg_stat_statements calls (database)", calls));
                }
                let commits: i64 = sqlx::query_scalar(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                )
                .fetch_one(pool)
                .await?;
                v.push(("xact_commit (database)", commits));
                let updates: Option<i64> = sqlx::query_scalar(
                    "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'dblock_bench_leases'",
                )
                .fetch_optional(pool)
                .await?;
                v.push(("n_tup_upd (bench table)", updates.unwrap_or(0)));
                v
            }
            Server::My(pool) => {
                let rows = sqlx::query(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Com_update')",
                )
                .fetch_all(pool)
                .await?;
                let mut v = Vec::new();
                for row in rows {
                    let key: String = row.try_get(0)?;
                    let value: String = row.try_get(1)?;
                    let key = if key.eq_ignore_ascii_case("Questions") {
                        "Questions (server)"
                    } else {
                        "Com_update (server)"
                    };
                    v.push((key, value.parse()?));
                }
                v
            }
            Server::None => Vec::new(),
        })
    }
}

pub(super) struct Scale {
    pub(super) held: usize,
    pub(super) failure: Option<String>,
    pub(super) stmts_per_s: f64,
    pub(super) window: Duration,
    pub(super) server: String,
    pub(super) lost: usize,
}

/// Takes locks level by level until one fails, then counts the statements
/// that keeping them costs over `window`.
pub(super) async fn hold_many(
    locks: &Locks,
    kind: &str,
    ttl: Option<Duration>,
    window: Duration,
    server: &Server,
) -> Res<Scale> {
    let mut guards: Vec<LockGuard> = Vec::new();
    let mut failure = None;
    for level in LEVELS {
        let start = guards.len();
        let mut pending = stream::iter(start..level)
            .map(|i| {
                let name = name(kind, i);
                async move {
                    let acquire = locks.acquire(name).wait(Duration::from_secs(5));
                    match ttl {
                        Some(ttl) => acquire.ttl(ttl).await,
                        None => acquire.await,
                    }
                }
            })
            .buffer_unordered(8);
        while let Some(outcome) = pending.next().await {
            match outcome {
                Ok(g) => guards.push(g),
                Err(e) => {
                    failure = Some(format!("lock #{} of {level}: {e}", guards.len() + 1));
                    break;
                }
            }
        }
        drop(pending);
        let lost = guards.iter().filter(|g| g.is_lost()).count();
        if failure.is_none() && lost > 0 {
            failure = Some(format!("{lost} of {level} reported lost"));
        }
        if failure.is_some() {
            break;
        }
    }
    let held = guards.iter().filter(|g| !g.is_lost()).count();
    let before = server.counters().await?;
    count::start();
    tokio::time::sleep(window).await;
    let n = count::stop();
    let after = server.counters().await?;
    let lost = guards.iter().filter(|g| g.is_lost()).count();
    let secs = window.as_secs_f64();
    let server = before
        .iter()
        .zip(&after)
        .map(|((k, a), (_, b))| format!("{k} {}/s", rate((b - a) as f64 / secs)))
        .collect::<Vec<_>>()
        .join("; ");
    // Release in the background; the pool is closed by the caller.
    drop(guards);
    Ok(Scale {
        held,
        failure,
        stmts_per_s: n as f64 / secs,
        window,
        server,
        lost,
    })
}

pub(super) fn scale_rows(
    backend: &'static str,
    s: &Scale,
    raw_held: Option<String>,
    rows: &mut Vec<Row>,
) {
    let held = match &s.failure {
        None => format!("{} (all levels)", rate(s.held as f64)),
        Some(f) => format!("{}; then {f}", rate(s.held as f64)),
    };
    let mut row = Row::new(backend, "locks held at once, pool ≤ 10").dblock(held);
    if let Some(raw) = raw_held {
        row = row.raw(raw);
    }
    rows.push(row);
    // The window is one renewal (or heartbeat) period: one statement per
    // lock is what keeping them all alive needs.
    let needed = s.held as f64 / s.window.as_secs_f64();
    let mut note = format!(
        "one per lock per {} s = {}/s needed{}; server-side: {}",
        s.window.as_secs(),
        rate(needed),
        if s.stmts_per_s < 0.9 * needed {
            " (falling behind)"
        } else {
            ""
        },
        if s.server.is_empty() {
            "n/a".into()
        } else {
            s.server.clone()
        }
    );
    if s.lost > 0 {
        let _ = write!(note, "; {} lost during the window", s.lost);
    }
    rows.push(
        Row::new(
            backend,
            format!("keep-alive statements/s for {} held", rate(s.held as f64)),
        )
        .dblock(format!("{:.1}/s", s.stmts_per_s))
        .note(note),
    );
}
