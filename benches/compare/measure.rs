//! The shared measurement: names, pairs per window, interleaved rounds,
//! statement counts, the breakdown and the throughput rows.

use super::*;

pub(super) fn owner() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

pub(super) fn name(kind: &str, i: usize) -> String {
    format!("dblock-bench:{}:{kind}:{i}", std::process::id())
}

pub(super) fn names(kind: &str, n: usize) -> Arc<Vec<String>> {
    Arc::new((0..n).map(|i| name(kind, i)).collect())
}

pub(super) async fn run_window(op: &Op, tasks: usize, window: Duration) -> Res<f64> {
    let start = Instant::now();
    let end = start + window;
    let mut set = JoinSet::new();
    for i in 0..tasks {
        let op = op.clone();
        set.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                op(i).await?;
                n += 1;
            }
            Ok::<u64, E>(n)
        });
    }
    let mut total = 0;
    while let Some(done) = set.join_next().await {
        total += done??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Median pairs/s of each op, the ops taking turns round by round.
/// Pairs/s of each op, per round. With one task the ops take turns call by
/// call (rotating which goes first), and a round is a block of such turns;
/// with several tasks each round runs each op's tasks for a window, the
/// ops taking turns. Either way load from elsewhere falls on all of them
/// alike, and the ratio of a round's figures is a fair comparison.
pub(super) async fn compare(ops: &[Op], tasks: usize) -> Res<Vec<Vec<f64>>> {
    for op in ops {
        run_window(op, tasks, WARMUP).await?;
    }
    let mut results = vec![Vec::new(); ops.len()];
    if tasks == 1 {
        let mut turn = 0;
        for _ in 0..ROUNDS {
            let mut spent = vec![Duration::ZERO; ops.len()];
            let mut calls = vec![0u32; ops.len()];
            let end = Instant::now() + WINDOW * ops.len() as u32;
            while Instant::now() < end {
                for k in 0..ops.len() {
                    let i = (turn + k) % ops.len();
                    let t = Instant::now();
                    ops[i](0).await?;
                    spent[i] += t.elapsed();
                    calls[i] += 1;
                }
                turn += 1;
            }
            for (i, r) in results.iter_mut().enumerate() {
                r.push(calls[i] as f64 / spent[i].as_secs_f64());
            }
        }
        return Ok(results);
    }
    for round in 0..ROUNDS {
        for k in 0..ops.len() {
            let i = (round + k) % ops.len();
            results[i].push(run_window(&ops[i], tasks, WINDOW).await?);
        }
    }
    Ok(results)
}

/// Statements sent per call of `op`, over `n` calls one after another.
pub(super) async fn statements_per_call(op: &Op, n: usize) -> Res<f64> {
    op(0).await?;
    count::start();
    for _ in 0..n {
        op(0).await?;
    }
    Ok(count::stop() as f64 / n as f64)
}

/// With `DBLOCK_BENCH_BREAKDOWN=1`: where the time of one call of each op
/// goes, by statement (sqlx's own timing, from sending the statement to the
/// last row), against the wall time per call. The rest is pool checkouts
/// (with their health-check pings) and task scheduling.
pub(super) fn breakdown_wanted() -> bool {
    std::env::var_os("DBLOCK_BENCH_BREAKDOWN").is_some()
}

/// `DBLOCK_BENCH_QUICK=1`: the throughput rows only (no handoff or scale
/// rows in the mysql and advisory-limit sections), for repeated runs.
pub(super) fn quick() -> bool {
    std::env::var_os("DBLOCK_BENCH_QUICK").is_some()
}

pub(super) async fn breakdown(backend: &str, labels: &[&str], ops: &[Op]) -> Res<()> {
    if !breakdown_wanted() {
        return Ok(());
    }
    const CYCLES: usize = 300;
    for op in ops {
        op(0).await?;
    }
    // The ops take turns call by call, as in the 1-task comparison.
    let mut wall = vec![Duration::ZERO; ops.len()];
    count::breakdown_start();
    for c in 0..CYCLES {
        for k in 0..ops.len() {
            let i = (c + k) % ops.len();
            count::set_op(i);
            let t = Instant::now();
            ops[i](0).await?;
            wall[i] += t.elapsed();
        }
    }
    let parts = count::breakdown_stop();
    for (i, label) in labels.iter().enumerate() {
        let mine: Vec<_> = parts.iter().filter(|p| p.0 == i).collect();
        let wall = wall[i].as_secs_f64() * 1e6 / CYCLES as f64;
        let in_statements = mine.iter().map(|p| p.3).sum::<f64>() * 1e6 / CYCLES as f64;
        let mut line = format!(
            "{backend}, {label}: {wall:.0} µs per pair, {in_statements:.0} µs in statements, \
             {:.0} µs elsewhere:",
            wall - in_statements
        );
        for (_, summary, n, secs) in mine {
            let _ = write!(
                line,
                "\n    {:>5.2} × {:>6.0} µs  {summary}",
                *n as f64 / CYCLES as f64,
                secs * 1e6 / *n as f64
            );
        }
        BREAKDOWNS.lock().unwrap().push(line);
    }
    Ok(())
}

pub(super) static BREAKDOWNS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Releases what an acquisition took.
pub(super) type Release = Box<dyn FnOnce() -> BoxFut + Send>;
pub(super) type AcquireFn =
    Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = Res<Release>> + Send>> + Send + Sync>;

/// Raw SQL run the way dblock runs it (for the breakdown): the attempt in
/// a spawned task that answers on a oneshot, the release sent over an mpsc
/// to a keeper task (which also arms a timer, as the renewal or heartbeat
/// does) that answers on a oneshot. What the task hand-offs cost.
pub(super) fn mimic_op(acquire: AcquireFn) -> Op {
    Arc::new(move |i| {
        let acquire = acquire.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let (ctx, mut crx) = tokio::sync::mpsc::channel::<oneshot::Sender<Res<()>>>(4);
            tokio::spawn(async move {
                match acquire(i).await {
                    Ok(release) => {
                        tokio::spawn(async move {
                            tokio::select! {
                                biased;
                                reply = crx.recv() => if let Some(reply) = reply {
                                    let _ = reply.send(release().await);
                                },
                                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                            }
                        });
                        let _ = tx.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
            rx.await??;
            let (rtx, rrx) = oneshot::channel();
            ctx.send(rtx).await?;
            rrx.await?
        })
    })
}

pub(super) fn dblock_op(locks: Locks, names: Arc<Vec<String>>) -> Op {
    Arc::new(move |i| {
        let locks = locks.clone();
        let name = names[i].clone();
        Box::pin(async move {
            locks.acquire(name).await?.release().await?;
            Ok(())
        })
    })
}

/// Throughput rows for dblock (`ops[0]`) against each raw op, and where
/// the time of one pair goes.
pub(super) async fn throughput_rows(
    backend: &'static str,
    ops: &[Op],
    raws: &[(&str, Option<(&str, f64)>)],
    extra: Vec<(&'static str, Op)>,
    rows: &mut Vec<Row>,
) -> Res<Vec<(usize, Vec<Vec<f64>>)>> {
    let results = ratio_rows(backend, ops, raws, rows).await?;
    let mut labels = vec!["dblock"];
    labels.extend(raws.iter().map(|r| r.0));
    let mut all = ops.to_vec();
    for (label, op) in extra {
        labels.push(label);
        all.push(op);
    }
    breakdown(backend, &labels, &all).await?;
    let mut d = Vec::new();
    for op in ops {
        d.push(statements_per_call(op, 100).await?);
    }
    let raw: Vec<String> = d[1..].iter().map(|x| format!("{x:.1}")).collect();
    rows.push(
        Row::new(backend, "statements per pair (client count)")
            .dblock(format!("{:.1}", d[0]))
            .raw(raw.join(" / ")),
    );
    Ok(results)
}

/// The pairs/s rows: dblock (`ops[0]`) against each raw op, with 1 and with
/// 8 tasks.
pub(super) async fn ratio_rows(
    backend: &'static str,
    ops: &[Op],
    raws: &[(&str, Option<(&str, f64)>)],
    rows: &mut Vec<Row>,
) -> Res<Vec<(usize, Vec<Vec<f64>>)>> {
    let mut all = Vec::new();
    for tasks in [1, TASKS] {
        let r = compare(ops, tasks).await?;
        let unit = if tasks == 1 { "1 task" } else { "8 tasks" };
        for (k, (label, target)) in raws.iter().enumerate() {
            // The median of the per-round ratios: each round's pair ran
            // back to back, under much the same load.
            let ratio = median(r[0].iter().zip(&r[k + 1]).map(|(d, x)| d / x).collect());
            let mut row = Row::new(backend, format!("pairs/s, {unit}, vs {label}"))
                .dblock(rate(median(r[0].clone())))
                .raw(rate(median(r[k + 1].clone())))
                .ratio(ratio);
            if let Some((text, min)) = target {
                row = row.target(*text, ratio >= *min);
            }
            rows.push(row);
        }
        all.push((tasks, r));
    }
    Ok(all)
}

/// A row comparing two raw ops of one `compare` run (`a` against `b`),
/// per round, median of rounds: what some work costs the database itself.
pub(super) fn raw_ratio_row(
    backend: &'static str,
    measure: String,
    r: &[Vec<f64>],
    a: usize,
    b: usize,
    note: &str,
) -> Row {
    let ratio = median(r[a].iter().zip(&r[b]).map(|(x, y)| x / y).collect());
    Row::new(backend, measure)
        .dblock("—")
        .raw(format!(
            "{} vs {}",
            rate(median(r[a].clone())),
            rate(median(r[b].clone()))
        ))
        .ratio(ratio)
        .note(note)
}

/// The 10th and 90th percentiles of the per-round ratios of op `a` to op
/// `b`: how far single rounds of this run strayed from their median.
pub(super) fn spread(r: &[Vec<f64>], a: usize, b: usize) -> String {
    let mut x: Vec<f64> = r[a].iter().zip(&r[b]).map(|(x, y)| x / y).collect();
    x.sort_by(f64::total_cmp);
    let at = |q: f64| x[((x.len() - 1) as f64 * q).round() as usize];
    format!("rounds p10–p90 {:.2}–{:.2}", at(0.1), at(0.9))
}

/// The run's noise: op `again` is op `same` (raw, same work) on connections
/// of its own, so their ratio would be 1.00 on a quiet machine; how far it
/// strays (its median, and its rounds' spread) is how far this run's other
/// ratios may move by chance (which server process each op's connection
/// has, where the scheduler puts it, the host's other load).
/// `measure` opens the row's label ("pairs/s, 1 task").
pub(super) fn noise_row(
    backend: &'static str,
    measure: &str,
    r: &[Vec<f64>],
    again: usize,
    same: usize,
) -> Row {
    raw_ratio_row(
        backend,
        format!(
            "{measure}: raw same work vs itself on other dedicated connections (this run's noise)"
        ),
        r,
        again,
        same,
        "reported: 1.00 on a quiet machine; how far this run's ratios move by chance",
    )
    .raw(format!(
        "{} vs {} ({})",
        rate(median(r[again].clone())),
        rate(median(r[same].clone())),
        spread(r, again, same)
    ))
}

/// Runs `pairs` calls of `op` one after another (after one to warm up) and
/// prints their time (`DBLOCK_BENCH_PAIRS`, for `strace` / `perf`).
pub(super) async fn timed_pairs(op: &Op, which: &str, pairs: usize) -> Res<()> {
    op(0).await?;
    eprintln!("pairs: {pairs} of {which} start");
    let t = Instant::now();
    for _ in 0..pairs {
        op(0).await?;
    }
    let took = t.elapsed();
    eprintln!(
        "pairs: {pairs} of {which}, 1 task, in {:.3} s ({:.1} µs each)",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / pairs as f64
    );
    Ok(())
}

/// Runs only pairs of `op` (`DBLOCK_BENCH_PAIRS`): 20,000 with 1 task,
/// then 2 s with 8 tasks, and prints their rates.
pub(super) async fn pairs_only(op: &Op, which: &str) -> Res<()> {
    timed_pairs(op, which, 20_000).await?;
    let rate8 = run_window(op, TASKS, Duration::from_secs(2)).await?;
    eprintln!("pairs: {which}, {TASKS} tasks: {} /s", rate(rate8));
    Ok(())
}
