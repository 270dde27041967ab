//! Handoff: a waiter is blocked, the holder releases; the time until the
//! waiter has the lock.

use super::*;

#[derive(Clone)]
pub(super) enum Blocked {
    /// Wait until `pg_locks` shows the waiter blocked on the advisory key.
    Probe(PgPool),
    /// Hold for a random time in this range (ms).
    Hold(u64, u64),
}

/// How long a handoff's holder waits, once `pg_locks` shows the waiter
/// blocked, before it releases. The probe polls every millisecond, and a
/// waiter that sends one statement before it blocks (a bare
/// `pg_advisory_lock`) was often seen on the first poll, while one that
/// sends several (dblock's) never was: released within microseconds of
/// blocking, on a machine still busy from the waiter's statements, the
/// first kind was handed the lock faster than a waiter settled in its wait,
/// which the others always were (docs/performance.md, issue 14, tenth
/// pass). Every probed handoff lets its waiter settle this long first.
const SETTLE: Duration = Duration::from_millis(2);

impl Blocked {
    pub(super) async fn wait(&self, key: i64) -> Res<()> {
        match self {
            Blocked::Probe(pool) => {
                wait_for_advisory_waiter(pool, key).await?;
                tokio::time::sleep(SETTLE).await;
                Ok(())
            }
            Blocked::Hold(lo, hi) => {
                let ms = rand::rng().random_range(*lo..=*hi);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
        }
    }
}

pub(super) fn split_key(key: i64) -> (i64, i64) {
    let k = key as u64;
    ((k >> 32) as i64, (k & 0xffff_ffff) as i64)
}

pub(super) async fn wait_for_advisory_waiter(pool: &PgPool, key: i64) -> Res<()> {
    let (classid, objid) = split_key(key);
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
               AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2)",
        )
        .bind(classid)
        .bind(objid)
        .fetch_one(pool)
        .await?;
        if waiting {
            return Ok(());
        }
        if Instant::now() > give_up {
            return Err("the waiter never showed up in pg_locks".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub(super) struct Handoff {
    /// Holder calls release → waiter's acquire returns.
    pub(super) call: Latency,
    /// Holder's release statement done → the waiter's next statement starts:
    /// how soon a waiter is woken (an upper bound: it includes the waiter's
    /// pool checkout). Only for waiters in the same process, one pair.
    pub(super) wake: Option<Latency>,
    /// Medians of: release called → release statement sent; the release
    /// statement; release statement done → waiter granted.
    pub(super) phases: Option<[Duration; 3]>,
}

impl Handoff {
    /// Several measurements taken together (interleaved with others'); the
    /// phases are the median of theirs.
    pub(super) fn join(parts: Vec<Handoff>) -> Handoff {
        let mut phases: Vec<[Duration; 3]> = parts.iter().filter_map(|h| h.phases).collect();
        let phase = |v: &mut Vec<[Duration; 3]>, k: usize| {
            v.sort_by_key(|p| p[k]);
            v[v.len() / 2][k]
        };
        let joined_phases = (!phases.is_empty()).then(|| {
            [
                phase(&mut phases, 0),
                phase(&mut phases, 1),
                phase(&mut phases, 2),
            ]
        });
        let mut calls = Vec::new();
        let mut wakes = Vec::new();
        for h in parts {
            calls.push(h.call);
            wakes.extend(h.wake);
        }
        Handoff {
            call: Latency::join(calls),
            wake: (!wakes.is_empty()).then(|| Latency::join(wakes)),
            phases: joined_phases,
        }
    }

    /// For the breakdown: where a handoff's time goes.
    pub(super) fn explain(&self, what: &str) {
        if !breakdown_wanted() {
            return;
        }
        if let Some([a, b, c]) = self.phases {
            BREAKDOWNS.lock().unwrap().push(format!(
                "{what}: release called → release statement sent {:.0} µs; release statement \
                 {:.0} µs; statement done → waiter granted {:.0} µs (medians)",
                a.as_secs_f64() * 1e6,
                b.as_secs_f64() * 1e6,
                c.as_secs_f64() * 1e6
            ));
        }
    }
}

/// Handoffs from `holder` to `waiter` on `pairs` names side by side. With
/// `release_sql` (the first words of the backend's release statement, as
/// sqlx logs them), also times the wake-up from the statement timeline.
pub(super) async fn handoff(
    holder: &Locks,
    waiter: &Locks,
    kind: &str,
    pairs: usize,
    per_pair: usize,
    blocked: Blocked,
    release_sql: Option<&'static str>,
) -> Res<Handoff> {
    let mut set = JoinSet::new();
    for pair in 0..pairs {
        let (holder, waiter, blocked) = (holder.clone(), waiter.clone(), blocked.clone());
        let name = name(kind, pair);
        set.spawn(async move {
            let key = dblock::advisory_key(&name);
            let mut out = Vec::new();
            for _ in 0..=per_pair {
                let guard = holder.acquire(&name).await?;
                let (tx, rx) = oneshot::channel();
                let (w, n) = (waiter.clone(), name.clone());
                let task = tokio::spawn(async move {
                    let g = w.acquire(&n).wait(Duration::from_secs(30)).await?;
                    let _ = tx.send(Instant::now());
                    g.release().await?;
                    Ok::<(), E>(())
                });
                blocked.wait(key).await?;
                if release_sql.is_some() {
                    count::timeline_start();
                }
                let t0 = Instant::now();
                guard.release().await?;
                let granted = rx.await;
                let timeline = count::timeline_stop();
                task.await??;
                let granted = granted?;
                if granted < t0 {
                    return Err("the waiter was granted before the holder released".into());
                }
                let release = release_sql.and_then(|marker| {
                    timeline
                        .iter()
                        .filter(|(start, _, sql)| *start >= t0 && sql.starts_with(marker))
                        .map(|(start, end, _)| (*start, *end))
                        .min()
                });
                let wake = release.and_then(|(_, released)| {
                    let next = timeline
                        .iter()
                        .map(|(start, _, _)| *start)
                        .filter(|start| *start >= released)
                        .min()?;
                    Some(next - released)
                });
                let phases = release.map(|(start, end)| {
                    [
                        start.saturating_duration_since(t0),
                        end - start,
                        granted.saturating_duration_since(end),
                    ]
                });
                out.push((granted - t0, wake, phases));
            }
            // The first handoff warms up connections and listeners.
            out.remove(0);
            Ok::<_, E>(out)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = set.join_next().await {
        all.extend(done??);
    }
    let wakes: Vec<Duration> = all.iter().filter_map(|x| x.1).collect();
    let phases: Vec<[Duration; 3]> = all.iter().filter_map(|x| x.2).collect();
    let phase = |k: usize| {
        let mut v: Vec<Duration> = phases.iter().map(|p| p[k]).collect();
        v.sort();
        v[v.len() / 2]
    };
    Ok(Handoff {
        call: Latency::of(all.iter().map(|x| x.0).collect()),
        wake: (!wakes.is_empty()).then(|| Latency::of(wakes)),
        phases: (!phases.is_empty()).then(|| [phase(0), phase(1), phase(2)]),
    })
}

/// The raw figure: a session blocked in `pg_advisory_lock`, woken by another
/// session's `pg_advisory_unlock`; clock from the unlock call to the grant.
/// `waiter` is `pg_advisory_lock` alone, or what dblock's waiter runs. The
/// waiter's connection is one kept for the turn (`from`: `None`, the
/// physical limit), or taken from the pool `from` for each sample and
/// given back after it, as dblock's waiter takes one.
pub(super) async fn raw_advisory_handoff(
    pool: &PgPool,
    probe: &PgPool,
    samples: usize,
    waiter_sql: advisory::Waiter,
    from: Option<&PgPool>,
) -> Res<Latency> {
    type Conn = sqlx::pool::PoolConnection<sqlx::Postgres>;
    // Lets go of the lock, and of the holder session's marker a dblock
    // wait set (the holder's connection carries none).
    async fn unlock(mut conn: Conn, key: i64) -> Res<Conn> {
        sqlx::query("SELECT pg_advisory_unlock($1), set_config('dblock.session', '', false)")
            .bind(key)
            .execute(&mut *conn)
            .await?;
        Ok(conn)
    }
    async fn lock(mut conn: Conn, key: i64, waiter: advisory::Waiter) -> Res<Conn> {
        match waiter {
            advisory::Waiter::Bare => {
                sqlx::query(advisory::RAW_WAIT)
                    .bind(key)
                    .execute(&mut *conn)
                    .await?;
            }
            advisory::Waiter::Dblock => {
                let (lift, wait) = dblock::postgres::bench_wait_exclusive_sql();
                const MARKER: &str = "dblock-bench-waiter";
                let row = sqlx::query(lift).bind(MARKER).fetch_one(&mut *conn).await?;
                let (free, pid): (bool, i32) = (row.try_get(0)?, row.try_get(1)?);
                if !free {
                    return Err("the mimicked wait found another holder's marker".into());
                }
                let (ours, token): (bool, Option<i64>) = sqlx::query_as(wait)
                    .bind(key)
                    .bind("30000ms")
                    .bind(MARKER)
                    .bind(pid)
                    .fetch_one(&mut *conn)
                    .await?;
                if !ours || token.is_none() {
                    return Err("the mimicked wait found another holder's marker".into());
                }
            }
        }
        Ok(conn)
    }
    let key: i64 = rand::rng().random();
    let mut holder = Some(pool.acquire().await?);
    let mut kept = match from {
        None => Some(pool.acquire().await?),
        Some(_) => None,
    };
    let mut out = Vec::new();
    for _ in 0..=samples {
        let mut h = holder.take().expect("holder connection");
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut *h)
            .await?;
        let w = match (kept.take(), from) {
            (Some(w), _) => w,
            (None, Some(from)) => from.acquire().await?,
            (None, None) => return Err("no waiter connection".into()),
        };
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let locked = lock(w, key, waiter_sql).await;
            let _ = tx.send(Instant::now());
            unlock(locked?, key).await
        });
        Blocked::Probe(probe.clone()).wait(key).await?;
        let t0 = Instant::now();
        holder = Some(unlock(h, key).await?);
        let granted = rx.await?;
        let w = task.await??;
        if from.is_none() {
            kept = Some(w);
        }
        out.push(granted.saturating_duration_since(t0));
    }
    out.remove(0);
    Ok(Latency::of(out))
}

/// A handoff to a polling waiter on `waiter` (another instance): 8 pairs
/// side by side, the holder keeping each waiter 200–500 ms.
pub(super) async fn polling_handoff(holder: &Locks, waiter: &Locks, kind: &str) -> Res<Handoff> {
    handoff(
        holder,
        waiter,
        kind,
        POLL_PAIRS,
        POLL_PER_PAIR,
        Blocked::Hold(POLL_HOLD_MS.0, POLL_HOLD_MS.1),
        None,
    )
    .await
}

/// Handoffs one at a time between tasks of the same `locks`, the holder
/// keeping the waiter 5–15 ms; `release_sql` starts the holder's release
/// statement in the statement log (for the wake-up).
pub(super) async fn local_handoff(
    locks: &Locks,
    kind: &str,
    release_sql: &'static str,
) -> Res<Handoff> {
    handoff(
        locks,
        locks,
        kind,
        1,
        SEQ_SAMPLES,
        Blocked::Hold(LOCAL_HOLD_MS.0, LOCAL_HOLD_MS.1),
        Some(release_sql),
    )
    .await
}

/// The rows of a lease backend's handoffs within the same `Locks`: the
/// latency, its phases (with `DBLOCK_BENCH_BREAKDOWN`) and the wake-up.
pub(super) fn same_locks_rows(backend: &'static str, local: &Handoff, rows: &mut Vec<Row>) {
    rows.push(latency_row(backend, "handoff, same Locks", &local.call));
    local.explain(&format!("{backend}, handoff, same Locks"));
    if let Some(wake) = &local.wake {
        rows.push(wake_row(backend, "lease", wake));
    }
}
