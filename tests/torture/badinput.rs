//! Bad input on every backend: each case gets a clear error in bounded
//! time, and the lease table is intact afterwards.

use std::future::Future;
use std::time::{Duration, Instant};

use dblock::{Error, Locks};
use tokio::time::timeout;

use crate::proxy::Proxy;
use crate::target::{lease_ttl, Db, Endpoint, Kind, HEARTBEAT};
use crate::{authority, direct, run_id};

/// The longest any single case may take.
const BOUND: Duration = Duration::from_secs(15);

struct Cases {
    label: &'static str,
    passed: usize,
    problems: Vec<String>,
}

impl Cases {
    /// Runs one case: `f` must finish within `bound` and return `Ok`.
    async fn case<F, Fut>(&mut self, what: &str, bound: Duration, f: F)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let t = Instant::now();
        match timeout(bound, f()).await {
            Ok(Ok(())) => self.passed += 1,
            Ok(Err(e)) => self.problems.push(format!("{what}: {e}")),
            Err(_) => self
                .problems
                .push(format!("{what}: no answer within {bound:?}")),
        }
        let took = t.elapsed();
        if took > Duration::from_secs(5) {
            println!("  note {}: {what} took {took:.1?}", self.label);
        }
    }
}

fn expect_err<T: std::fmt::Debug>(
    r: dblock::Result<T>,
    ok: impl Fn(&Error) -> bool,
    what: &str,
) -> Result<(), String> {
    match r {
        Err(e) if ok(&e) => Ok(()),
        other => Err(format!("expected {what}, got {other:?}")),
    }
}

pub async fn run(kind: Kind) -> bool {
    let run = run_id();
    let dir = std::env::temp_dir().join(format!("dblock-input-{run}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ctl = direct(kind, &dir, &format!("dblock-torture-input-{run}")).await;
    let db = ctl.pool(2).await;
    db.migrate().await;
    let locks = ctl.locks().await;
    let mut c = Cases {
        label: kind.label(),
        passed: 0,
        problems: Vec::new(),
    };

    // A known lease, held through everything below.
    let sentinel = format!("input:{run}:sentinel");
    let held = lease_ttl(locks.acquire(&sentinel), kind, Duration::from_secs(120))
        .await
        .expect("take the sentinel");
    let rows_before = lease_rows(&db, &run).await;

    // Names dblock refuses, before anything reaches the database.
    let refused: [(&str, String); 4] = [
        ("an empty name", String::new()),
        ("a 256-byte name", "n".repeat(256)),
        (
            "a name of 64 four-byte characters (256 bytes)",
            "🔒".repeat(64),
        ),
        ("a name with NUL", "input\0name".to_owned()),
    ];
    for (what, name) in refused {
        c.case(what, Duration::from_secs(1), || async {
            expect_err(
                locks.acquire(name.as_str()).await,
                |e| matches!(e, Error::InvalidName(_)),
                "InvalidName",
            )?;
            expect_err(
                locks.try_acquire(name.as_str()).await,
                |e| matches!(e, Error::InvalidName(_)),
                "InvalidName from try_acquire",
            )?;
            expect_err(
                locks.inspect(&name).await,
                |e| matches!(e, Error::InvalidName(_)),
                "InvalidName from inspect",
            )
        })
        .await;
    }

    // Names that are data: taken, seen back byte for byte, released.
    let accepted = [
        (
            "a name that tries SQL injection",
            format!("'; DROP TABLE dblock_leases; -- {run}"),
        ),
        (
            "emoji and other 4-byte UTF-8",
            format!("🔒🦀𝄞😀 名前 {run}"),
        ),
        ("a 255-byte name of 4-byte characters", {
            let mut s = "🔒".repeat(60);
            s.push_str(&run);
            while s.len() < 255 {
                s.push('x');
            }
            s.truncate(255);
            s
        }),
        (
            "quotes, backslashes and percent signs",
            format!("a'b\"c\\d%e_f`g {run}"),
        ),
    ];
    for (what, name) in &accepted {
        c.case(what, BOUND, || async {
            let g = lease_ttl(locks.acquire(name.as_str()), kind, Duration::from_secs(10))
                .wait(Duration::from_secs(5))
                .await
                .map_err(|e| format!("acquire: {e}"))?;
            let info = locks
                .inspect(name)
                .await
                .map_err(|e| format!("inspect: {e}"))?
                .ok_or("not held after acquire")?;
            if info.name.as_deref() != Some(name.as_str()) {
                return Err(format!("inspect gave the name back as {:?}", info.name));
            }
            let listed = locks.list().await.map_err(|e| format!("list: {e}"))?;
            if !listed
                .iter()
                .any(|i| i.name.as_deref() == Some(name.as_str()))
            {
                return Err("list does not show it under its name".into());
            }
            if locks
                .try_acquire(name.as_str())
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                return Err("a second holder got in".into());
            }
            g.release().await.map_err(|e| format!("release: {e}"))?;
            if locks
                .inspect(name)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                return Err("still held after release".into());
            }
            Ok(())
        })
        .await;
    }

    // Durations out of range, and the edges that are allowed.
    let name = format!("input:{run}:durations");
    c.case("ttl of zero", Duration::from_secs(1), || async {
        expect_err(
            locks.acquire(name.as_str()).ttl(Duration::ZERO).await,
            |e| matches!(e, Error::InvalidOption(_)),
            "InvalidOption",
        )
    })
    .await;
    c.case("an absurd ttl", Duration::from_secs(1), || async {
        expect_err(
            locks.acquire(name.as_str()).ttl(Duration::MAX).await,
            |e| matches!(e, Error::InvalidOption(_)),
            "InvalidOption",
        )
    })
    .await;
    c.case("an absurd wait", Duration::from_secs(1), || async {
        expect_err(
            locks
                .acquire(name.as_str())
                .wait(Duration::from_secs(u64::MAX))
                .await,
            |e| matches!(e, Error::InvalidOption(_)),
            "InvalidOption",
        )
    })
    .await;
    c.case(
        "an absurd hold_at_least",
        Duration::from_secs(1),
        || async {
            expect_err(
                locks
                    .acquire(name.as_str())
                    .hold_at_least(Duration::MAX)
                    .await,
                |e| matches!(e, Error::InvalidOption(_)),
                "InvalidOption",
            )
        },
    )
    .await;
    c.case("an absurd extend", BOUND, || async {
        let g = locks
            .acquire(name.as_str())
            .wait(Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let r = g.extend(Duration::MAX).await;
        g.release().await.map_err(|e| e.to_string())?;
        expect_err(r, |e| matches!(e, Error::InvalidOption(_)), "InvalidOption")
    })
    .await;
    c.case("a wait of zero on a held name", BOUND, || async {
        let t = Instant::now();
        let r = locks.acquire(sentinel.as_str()).wait(Duration::ZERO).await;
        expect_err(r, |e| matches!(e, Error::Timeout { .. }), "Timeout")?;
        if t.elapsed() > Duration::from_secs(2) {
            return Err(format!("a zero wait took {:?}", t.elapsed()));
        }
        Ok(())
    })
    .await;
    c.case(
        "a wait of zero on a free name, and the longest ttl",
        BOUND,
        || async {
            let longest = locks
                .acquire(name.as_str())
                .wait(Duration::ZERO)
                .ttl(Duration::from_secs(366 * 24 * 3600))
                .await;
            let g = if kind.lease() {
                longest.map_err(|e| e.to_string())?
            } else {
                // No lease length on an advisory lock: refused, and the
                // same acquisition without it is granted.
                match longest {
                    Err(dblock::Error::Unsupported { .. }) => {}
                    other => return Err(format!("a ttl on an advisory lock answered {other:?}")),
                }
                locks
                    .acquire(name.as_str())
                    .wait(Duration::ZERO)
                    .await
                    .map_err(|e| e.to_string())?
            };
            if kind.lease() {
                let left = g.expires_at().ok_or("no expiry")? - chrono::Utc::now();
                if left < chrono::Duration::days(365) {
                    return Err(format!("a 366-day lease expires in {left}"));
                }
            }
            g.release().await.map_err(|e| e.to_string())
        },
    )
    .await;

    // A table name that carries SQL.
    if kind.lease() {
        for bad in [
            "dblock_leases; DROP TABLE dblock_leases; --",
            "dblock_leases\" (x) --",
            "x.y.z",
            "",
        ] {
            c.case(
                &format!("with_table({bad:?})"),
                Duration::from_secs(5),
                || async {
                    let r = match kind {
                        Kind::PgLease => {
                            let Db::Pg(p) = &db else { unreachable!() };
                            dblock::postgres::Lease::new(p.clone())
                                .with_table(bad)
                                .map(|_| ())
                        }
                        Kind::MyLease => {
                            let Db::My(p) = &db else { unreachable!() };
                            dblock::mysql::Lease::new(p.clone())
                                .with_table(bad)
                                .map(|_| ())
                        }
                        Kind::LiteLease => dblock::sqlite::Lease::open(&ctl.url)
                            .await
                            .map_err(|e| Error::InvalidOption(format!("open failed: {e}")))
                            .and_then(|l| l.with_table(bad).map(|_| ())),
                        _ => return Ok(()),
                    };
                    expect_err(
                        r,
                        |e| matches!(e, Error::InvalidOption(m) if !m.starts_with("open failed")),
                        "InvalidOption",
                    )
                },
            )
            .await;
        }
    }

    // A database that is down at start.
    c.case(
        "a database that is down at start",
        Duration::from_secs(40),
        || async {
            let t = Instant::now();
            let r = match kind {
                Kind::LiteLease => dblock::sqlite::Lease::open(dir.join("no/such/folder/locks.db"))
                    .await
                    .map(|_| ()),
                _ => {
                    let port = closed_port().await;
                    let (_, with_port) = authority(&ctl.url);
                    let down = Endpoint {
                        kind,
                        url: with_port(port),
                        app: "dblock-torture-down".into(),
                    }
                    .locks()
                    .await;
                    down.acquire(format!("input:{run}:down"))
                        .wait(Duration::from_secs(2))
                        .await
                        .map(|_| ())
                }
            };
            expect_err(
                r,
                |e| {
                    matches!(
                        e,
                        Error::Database(_) | Error::Redis(_) | Error::Unavailable(_)
                    )
                },
                "a Database (or Unavailable) error",
            )?;
            println!(
                "  {}: a database down at start: error after {:.1?}",
                kind.label(),
                t.elapsed()
            );
            Ok(())
        },
    )
    .await;

    // A database that goes away while a lock is held.
    if kind.networked() {
        for black_hole in [false, true] {
            let what = if black_hole {
                "the connection black-holed mid-hold"
            } else {
                "the server gone mid-hold (connections closed, new ones refused)"
            };
            c.case(what, Duration::from_secs(30), || async {
                mid_hold(&ctl, kind, &run, black_hole).await
            })
            .await;
        }
    } else {
        c.case(
            "the file locked by another writer mid-hold",
            Duration::from_secs(30),
            || async { sqlite_locked_mid_hold(&locks, &db, &run).await },
        )
        .await;
    }

    // The table is intact: the sentinel still held with its token, and the
    // rows are exactly those the accepted cases made.
    c.case("the lease table is intact", BOUND, || async {
        let info = locks
            .inspect(&sentinel)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the sentinel lease is gone")?;
        if kind.lease() && info.token != Some(held.token()) {
            return Err(format!("the sentinel's token changed: {:?}", info.token));
        }
        if kind == Kind::RedisLease {
            // Redis keeps a key only while a lease lives: once the mid-hold
            // lease (ttl 1 s, cut off) has run out, only the sentinel's.
            let mut rows = 0;
            for _ in 0..30 {
                rows = lease_rows(&db, &run).await;
                if rows == rows_before {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if rows != rows_before {
                return Err(format!(
                    "{rows} lease keys of this run, expected {rows_before}"
                ));
            }
        } else if kind.lease() {
            let rows = lease_rows(&db, &run).await;
            // The odd names, the durations name and the mid-hold name, at
            // most: their leases have ended, and the background sweep may
            // have deleted their rows already (the sentinel's stays).
            let expected = rows_before + accepted.len() as i64 + 2;
            if !(rows_before..=expected).contains(&rows) {
                return Err(format!(
                    "{rows} rows of this run, expected {rows_before} to {expected}"
                ));
            }
        }
        Ok(())
    })
    .await;
    held.release().await.expect("release the sentinel");

    println!(
        "bad input {}: {} cases answered clearly in bounded time, {} problems; the lease table intact",
        kind.label(),
        c.passed,
        c.problems.len()
    );
    for p in &c.problems {
        println!("  VIOLATION input {}: {p}", kind.label());
    }
    let _ = std::fs::remove_dir_all(&dir);
    c.problems.is_empty()
}

/// Rows of the default lease table whose name contains the run id.
async fn lease_rows(db: &Db, run: &str) -> i64 {
    let pattern = format!("%{run}%");
    match db {
        Db::Pg(p) => sqlx::query_scalar("SELECT count(*) FROM dblock_leases WHERE name LIKE $1")
            .bind(pattern)
            .fetch_one(p)
            .await
            .expect("count lease rows"),
        Db::My(p) => sqlx::query_scalar("SELECT count(*) FROM dblock_leases WHERE name LIKE ?")
            .bind(pattern)
            .fetch_one(p)
            .await
            .expect("count lease rows"),
        Db::Lite(p) => sqlx::query_scalar("SELECT count(*) FROM dblock_leases WHERE name LIKE ?")
            .bind(pattern)
            .fetch_one(p)
            .await
            .expect("count lease rows"),
        // Live lease keys under the default prefix (Redis keeps no row of a
        // free name).
        Db::Redis { conn, .. } => {
            let mut conn = conn.clone();
            let mut cursor = 0u64;
            let mut n = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("dblock:lock:*{run}*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .expect("count lease keys");
                n += keys.len() as i64;
                if next == 0 {
                    break n;
                }
                cursor = next;
            }
        }
    }
}

/// A port on 127.0.0.1 with nothing listening.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

/// Holds a lock through a proxy, then closes or black-holes the proxy: the
/// guard must report itself lost, and release must answer, in bounded time.
async fn mid_hold(ctl: &Endpoint, kind: Kind, run: &str, black_hole: bool) -> Result<(), String> {
    let (proxy, url) = Proxy::in_front_of(&ctl.url).await;
    let locks: Locks = Endpoint {
        kind,
        url,
        app: format!("dblock-torture-midhold-{run}"),
    }
    .locks()
    .await;
    let ttl = Duration::from_secs(1);
    let name = format!("input:{run}:midhold");
    let g = lease_ttl(locks.acquire(&name), kind, ttl)
        .wait(Duration::from_secs(5))
        .await
        .map_err(|e| format!("acquire: {e}"))?;
    let t = Instant::now();
    if black_hole {
        proxy.pause(0, true);
    } else {
        proxy.down(0, true);
    }
    // A lease is given up before its ttl. An advisory holder session is
    // checked every heartbeat and given max(heartbeat, 2 s) to answer (the
    // floor keeps a loaded machine from closing a session, and every lock
    // on it, over one slow reply); meanwhile the server still holds the
    // lock for the black-holed session, so nobody else can take it.
    let bound = if kind.lease() {
        ttl
    } else {
        HEARTBEAT + HEARTBEAT.max(Duration::from_secs(2))
    } + Duration::from_millis(500);
    if timeout(bound, g.lost()).await.is_err() {
        proxy.pause(0, false);
        return Err(format!("lost() did not fire within {bound:?}"));
    }
    let noticed = t.elapsed();
    let t = Instant::now();
    let r = timeout(Duration::from_secs(10), g.release()).await;
    let released = t.elapsed();
    proxy.pause(0, false);
    proxy.down(0, true);
    println!(
        "  {}: {}: lost() after {noticed:.1?}; release answered {:?} after {released:.1?}",
        kind.label(),
        if black_hole { "black hole" } else { "closed" },
        r.as_ref().map(|r| r.as_ref().map_err(|e| e.to_string()))
    );
    match r {
        Err(_) => Err("release did not answer within 10 s after the guard was lost".into()),
        Ok(Ok(())) => Err("release reported success for a lost lock".into()),
        Ok(Err(_)) => Ok(()),
    }
}

/// SQLite's analogue of a database that stops: another connection holds
/// the file's write lock for longer than the ttl. The guard must report
/// itself lost; the lease is free again once the file is.
async fn sqlite_locked_mid_hold(locks: &Locks, db: &Db, run: &str) -> Result<(), String> {
    let Db::Lite(pool) = db else { unreachable!() };
    let ttl = Duration::from_secs(1);
    let name = format!("input:{run}:midhold");
    let g = locks
        .acquire(&name)
        .ttl(ttl)
        .await
        .map_err(|e| e.to_string())?;
    let mut c = pool.acquire().await.map_err(|e| e.to_string())?;
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut *c)
        .await
        .map_err(|e| e.to_string())?;
    let lost = timeout(ttl + Duration::from_millis(500), g.lost()).await;
    sqlx::query("ROLLBACK")
        .execute(&mut *c)
        .await
        .map_err(|e| e.to_string())?;
    drop(c);
    if lost.is_err() {
        return Err("lost() did not fire while the file was locked past the ttl".into());
    }
    match timeout(Duration::from_secs(10), g.release()).await {
        Err(_) => Err("release did not answer within 10 s".into()),
        Ok(Ok(())) => Err("release reported success for a lost lock".into()),
        Ok(Err(_)) => Ok(()),
    }
}
