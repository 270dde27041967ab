//! PostgreSQL advisory locks against raw `pg_try_advisory_lock`.

use super::*;

pub(super) const PG_TRY: &str = "SELECT pg_try_advisory_lock($1)";
pub(super) const PG_TRY_NEXTVAL: &str =
    "SELECT CASE WHEN pg_try_advisory_lock($1) THEN nextval('dblock_fencing_seq') END IS NOT NULL";

pub(super) const RAW_WAIT: &str = "SELECT pg_advisory_lock($1)";
/// Samples per turn of the interleaved handoff measurements.
const HANDOFF_TURN: usize = 10;

/// What a raw handoff's waiter runs.
#[derive(Clone, Copy)]
pub(super) enum Waiter {
    /// `pg_advisory_lock` alone.
    Bare,
    /// dblock's server-side wait, statement for statement: the timeouts
    /// lifted, then the waiting statement (marker, lock_timeout, token,
    /// the timeouts put back).
    Dblock,
}

pub(super) fn raw_advisory_op(pool: PgPool, names: Arc<Vec<String>>, sql: &'static str) -> Op {
    Arc::new(move |i| {
        let pool = pool.clone();
        let key = dblock::advisory_key(&names[i]);
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            let got: bool = sqlx::query_scalar(sql)
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
            if !got {
                return Err("raw: the advisory lock was busy".into());
            }
            let freed: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
            if !freed {
                return Err("raw: the advisory lock was not held".into());
            }
            Ok(())
        })
    })
}

pub(super) fn advisory_acquire(pool: PgPool, names: Arc<Vec<String>>) -> AcquireFn {
    Arc::new(move |i| {
        let pool = pool.clone();
        let key = dblock::advisory_key(&names[i]);
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            let got: bool = sqlx::query_scalar(PG_TRY_NEXTVAL)
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
            if !got {
                return Err("raw: the advisory lock was busy".into());
            }
            let release: Release = Box::new(move || {
                Box::pin(async move {
                    sqlx::query("SELECT pg_advisory_unlock($1)")
                        .bind(key)
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
            Ok(release)
        })
    })
}

pub(super) async fn advisory(env: &Env, rows: &mut Vec<Row>) -> Res<Latency> {
    const B: &str = "pg advisory";
    let pool = pg_pool(&env.pg, POOL).await?;
    dblock::postgres::migrate(&pool).await?;
    let locks = Locks::new(Advisory::new(pool.clone()));

    // Uncontended pairs.
    let n = names("adv", TASKS);
    let ops = [
        dblock_op(locks.clone(), n.clone()),
        raw_advisory_op(pool.clone(), n.clone(), PG_TRY),
        raw_advisory_op(pool.clone(), n.clone(), PG_TRY_NEXTVAL),
    ];
    throughput_rows(
        B,
        &ops,
        &[
            ("raw try_lock+unlock", Some(("≥ 0.95 × raw", 0.95))),
            ("raw try_lock+nextval+unlock (dblock's SQL)", None),
        ],
        if breakdown_wanted() {
            let quiet = PgPoolOptions::new()
                .max_connections(POOL)
                .test_before_acquire(false)
                .connect(&env.pg)
                .await?;
            vec![
                (
                    "raw SQL in dblock's task structure",
                    mimic_op(advisory_acquire(pool.clone(), n.clone())),
                ),
                (
                    "raw try_lock+unlock, pool without test_before_acquire",
                    raw_advisory_op(quiet, n.clone(), PG_TRY),
                ),
            ]
        } else {
            Vec::new()
        },
        rows,
    )
    .await?;

    // Handoff: the raw figure, dblock (another instance, then the same
    // Locks), and the raw handoff with dblock's waiter statements, then the
    // bare lock and dblock's statements on a waiter connection taken from a
    // pool for each sample, as dblock takes one; measured in turns of
    // HANDOFF_TURN samples each, so that the machine's drift over the
    // section weighs on all of them alike. The statement timeline (for the
    // breakdown's phases) is recorded only when a breakdown is asked for:
    // recording logs every statement through the tracing subscriber, on the
    // waiter's path too, which the raw rows do not pay.
    let probe = pg_pool(&env.pg, 1).await?;
    let timeline = breakdown_wanted().then_some("SELECT pg_advisory_unlock($1)");
    let other_pool = pg_pool(&env.pg, POOL).await?;
    let other = Locks::new(Advisory::new(other_pool.clone()));
    let (mut raws, mut others, mut locals, mut sqls) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut raws_pooled, mut sqls_pooled) = (Vec::new(), Vec::new());
    for _ in 0..SEQ_SAMPLES / HANDOFF_TURN {
        let blocked = Blocked::Probe(probe.clone());
        raws.push(raw_advisory_handoff(&pool, &probe, HANDOFF_TURN, Waiter::Bare, None).await?);
        let turn = HANDOFF_TURN;
        others.push(
            handoff(
                &locks,
                &other,
                "adv-hand",
                1,
                turn,
                blocked.clone(),
                timeline,
            )
            .await?,
        );
        locals.push(handoff(&locks, &locks, "adv-hand", 1, turn, blocked, timeline).await?);
        sqls.push(raw_advisory_handoff(&pool, &probe, turn, Waiter::Dblock, None).await?);
        let from = Some(&other_pool);
        raws_pooled.push(raw_advisory_handoff(&pool, &probe, turn, Waiter::Bare, from).await?);
        sqls_pooled.push(raw_advisory_handoff(&pool, &probe, turn, Waiter::Dblock, from).await?);
    }
    let raw = Latency::join(raws);
    let server_other = Handoff::join(others);
    server_other.explain("pg advisory, handoff, server wait, other instance");
    let ratio = server_other.call.p50.as_secs_f64() / raw.p50.as_secs_f64();
    rows.push(
        latency_row(
            B,
            "handoff, server wait, other instance",
            &server_other.call,
        )
        .raw(raw.show())
        .ratio(ratio)
        .target("p50 ≤ 1.25 × raw", ratio <= 1.25),
    );
    let server_local = Handoff::join(locals);
    server_local.explain("pg advisory, handoff, server wait, same Locks");
    let ratio = server_local.call.p50.as_secs_f64() / raw.p50.as_secs_f64();
    rows.push(
        latency_row(B, "handoff, server wait, same Locks", &server_local.call)
            .raw(raw.show())
            .ratio(ratio)
            .target("p50 ≤ 1.25 × raw", ratio <= 1.25),
    );
    // A reported handoff row: `what`'s p50 against `base`'s.
    let against = |what: &str, latency: &Latency, base: &Latency| {
        latency_row(B, what, latency)
            .raw(base.show())
            .ratio(latency.p50.as_secs_f64() / base.p50.as_secs_f64())
    };
    // The same raw handoff with the waiter running dblock's statements
    // (the session marked and its timeouts lifted; then lock_timeout, the
    // check of the marker, the lock, the token): what the SQL costs.
    rows.push(against(
        "handoff, server wait, raw with dblock's waiter SQL",
        &Latency::join(sqls),
        &raw,
    ));
    // The waiter's connection taken from a pool of 10 for each sample, as
    // dblock's waiter (another instance) takes one from its pool: the bare
    // lock, and dblock's statements; then dblock against the latter.
    rows.push(against(
        "handoff, server wait, raw bare waiter on a pooled connection",
        &Latency::join(raws_pooled),
        &raw,
    ));
    let sql_pooled = Latency::join(sqls_pooled);
    rows.push(against(
        "handoff, server wait, raw with dblock's waiter SQL on a pooled connection",
        &sql_pooled,
        &raw,
    ));
    rows.push(against(
        "handoff, server wait, other instance, vs raw with its SQL on a pooled connection",
        &server_other.call,
        &sql_pooled,
    ));

    let poll = AdvisoryOptions::default().wait(WaitStrategy::Poll {
        min: LeaseOptions::default().min_poll,
        max: LeaseOptions::default().max_poll,
    });
    let poll_holder = Locks::new(Advisory::new(pool.clone()).with_options(poll.clone())?);
    let poll_other = Locks::new(Advisory::new(other_pool.clone()).with_options(poll)?);
    let poll_cross = polling_handoff(&poll_holder, &poll_other, "adv-poll").await?;
    let poll_local =
        local_handoff(&poll_holder, "adv-poll", "SELECT pg_advisory_unlock($1)").await?;
    rows.push(poll_row(
        B,
        "handoff, polling 5–250 ms, other instance",
        &poll_cross.call,
        &poll_local.call,
    ));
    rows.push(
        latency_row(B, "handoff, polling, same Locks", &poll_local.call)
            .raw(raw.show())
            .ratio(poll_local.call.p50.as_secs_f64() / raw.p50.as_secs_f64()),
    );
    poll_local.explain("pg advisory, handoff, polling, same Locks");
    if let Some(wake) = &poll_local.wake {
        rows.push(wake_row(B, "polling", wake));
    }
    drop((locks, other, poll_holder, poll_other));
    other_pool.close().await;

    // Scale.
    let scale_pool = PgPoolOptions::new()
        .max_connections(POOL)
        .acquire_timeout(SCALE_ACQUIRE_TIMEOUT)
        .connect(&env.pg)
        .await?;
    let scale_locks = Locks::new(Advisory::new(scale_pool.clone()));
    let server = Server::Pg {
        pool: probe.clone(),
        statements: false,
    };
    let s = hold_many(
        &scale_locks,
        "adv-scale",
        None,
        AdvisoryOptions::default().heartbeat,
        &server,
    )
    .await?;
    drop(scale_locks);
    let raw_held = raw_advisory_scale(&pool).await?;
    scale_rows(B, &s, Some(raw_held), rows);
    if let Some(keep_alive) = rows.last_mut() {
        keep_alive.raw = "none needed (session locks)".into();
    }
    scale_pool.close().await;
    probe.close().await;
    pool.close().await;
    Ok(raw)
}

/// Raw session locks, all on one pooled connection, taken a level at a time
/// in one statement each.
///
/// Stops at 1,000: advisory locks live in the server's shared lock table
/// (`max_locks_per_transaction` × (`max_connections` +
/// `max_prepared_transactions`) slots for all sessions together), and
/// filling most of it makes other sessions' statements fail with "out of
/// shared memory" on a server that others use too.
pub(super) async fn raw_advisory_scale(pool: &PgPool) -> Res<String> {
    let mut conn = pool.acquire().await?;
    let slots: i64 = sqlx::query_scalar(
        "SELECT current_setting('max_locks_per_transaction')::bigint \
              * (current_setting('max_connections')::bigint \
                 + current_setting('max_prepared_transactions')::bigint)",
    )
    .fetch_one(&mut *conn)
    .await?;
    let base: i64 = rand::rng().random_range(0..i64::MAX / 2);
    let mut held = 0usize;
    let mut failure = None;
    for level in [100, 1_000] {
        let got: Result<i64, sqlx::Error> = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_try_advisory_lock(k)) \
               FROM generate_series($1::bigint, $2::bigint) k",
        )
        .bind(base + held as i64)
        .bind(base + level as i64 - 1)
        .fetch_one(&mut *conn)
        .await;
        match got {
            Ok(n) => {
                held += n as usize;
                if held < level {
                    failure = Some(format!("only {held} of {level}"));
                    break;
                }
            }
            Err(e) => {
                failure = Some(format!("{level}: {e}"));
                break;
            }
        }
    }
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut *conn)
        .await?;
    Ok(match failure {
        None => format!(
            "{} on 1 connection (not tried further; lock table: {} slots for all sessions)",
            rate(held as f64),
            rate(slots as f64)
        ),
        Some(f) => format!("{} on 1 connection; then {f}", rate(held as f64)),
    })
}

pub(super) async fn pg_stat_statements_usable(pool: &PgPool) -> bool {
    let Ok(mut tx) = pool.begin().await else {
        return false;
    };
    let usable = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&mut *tx)
        .await
        .is_ok()
        && sqlx::query("SELECT calls FROM pg_stat_statements LIMIT 1")
            .fetch_optional(&mut *tx)
            .await
            .is_ok();
    if usable {
        tx.commit().await.is_ok()
    } else {
        let _ = tx.rollback().await;
        false
    }
}
