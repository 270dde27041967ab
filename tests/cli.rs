//! The `dblock` binary, run as separate processes.
//!
//! Scenarios that involve a lock run once per backend through
//! [`per_backend!`]; checks of the command line itself (usage, help,
//! redaction) run once.
#![cfg(feature = "cli")]

mod common;
#[allow(dead_code)]
#[path = "torture/proxy.rs"]
mod proxy;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_dblock");
/// An upper bound for any one dblock invocation in these tests.
const LIMIT: Duration = Duration::from_secs(90);

/// The lock backends the binary can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    PgAdvisory,
    PgLease,
    MysqlLease,
    SqliteLease,
    RedisLease,
}

/// One backend's database, and a scratch directory for the test.
struct Db {
    backend: Backend,
    url: String,
    dir: PathBuf,
}

impl Db {
    async fn new(backend: Backend) -> Db {
        let dir = scratch_dir();
        let url = match backend {
            Backend::PgAdvisory | Backend::PgLease => common::postgres_url().await,
            Backend::MysqlLease => common::mysql_url().await,
            Backend::SqliteLease => format!("sqlite:{}", dir.join("locks.db").display()),
            Backend::RedisLease => common::redis_url(),
        };
        Db { backend, url, dir }
    }

    /// The same backend on a database of its own, without dblock's schema.
    /// Drop it with [`Db::drop_fresh`]. (The database name is made here of
    /// letters, digits and `_`, so splicing it into SQL is safe.)
    async fn fresh(&self) -> Db {
        let name = format!("dblock_cli_{}", rand_suffix().replace('-', "_"))
            .chars()
            .take(60)
            .collect::<String>();
        let base = &self.url[..self.url.rfind('/').expect("URL with a database")];
        let url = match self.backend {
            Backend::PgAdvisory | Backend::PgLease => {
                let pool = sqlx::PgPool::connect(&self.url).await.expect("connect");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&pool)
                    .await
                    .expect("create database");
                format!("{base}/{name}")
            }
            Backend::MysqlLease => {
                let pool = sqlx::MySqlPool::connect(&self.url).await.expect("connect");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&pool)
                    .await
                    .expect("create database");
                format!("{base}/{name}")
            }
            Backend::SqliteLease => {
                format!("sqlite:{}", self.dir.join(format!("{name}.db")).display())
            }
            // Redis has no schema: a logical database of its own, emptied.
            // Only this scenario uses it.
            Backend::RedisLease => {
                let url = format!("{base}/{REDIS_FRESH_DB}");
                flush_redis(&url).await;
                url
            }
        };
        Db {
            backend: self.backend,
            url,
            dir: self.dir.clone(),
        }
    }

    /// Drops a database made by [`Db::fresh`].
    async fn drop_fresh(self, server: &Db) {
        let name = &self.url[self.url.rfind('/').unwrap() + 1..];
        match self.backend {
            Backend::PgAdvisory | Backend::PgLease => {
                let pool = sqlx::PgPool::connect(&server.url).await.expect("connect");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE {name} WITH (FORCE)"
                )))
                .execute(&pool)
                .await
                .expect("drop database");
            }
            Backend::MysqlLease => {
                let pool = sqlx::MySqlPool::connect(&server.url)
                    .await
                    .expect("connect");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
                    .execute(&pool)
                    .await
                    .expect("drop database");
            }
            Backend::SqliteLease => {}
            Backend::RedisLease => flush_redis(&self.url).await,
        }
    }

    fn is_lease(&self) -> bool {
        self.backend != Backend::PgAdvisory
    }

    /// `dblock` with this database in `DATABASE_URL`, the backend chosen,
    /// and the scratch directory as working directory.
    fn dblock(&self) -> Command {
        let mut cmd = dblock_in(&self.dir);
        cmd.env("DATABASE_URL", &self.url);
        if self.backend == Backend::PgLease {
            cmd.args(["--backend", "lease"]);
        }
        cmd
    }

    /// `dblock run NAME [opts] -- sh -c SCRIPT`. Lease backends get a short
    /// ttl so that a broken lease is noticed quickly.
    fn run(&self, name: &str, opts: &[&str], script: &str) -> Command {
        let mut cmd = self.dblock();
        cmd.args(["run", name]).args(opts);
        if self.is_lease() {
            cmd.args(["--ttl", "3s"]);
        }
        cmd.args(["--", "sh", "-c", script]);
        cmd
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Starts `dblock run NAME -- sh -c SCRIPT` and waits until the command
    /// is running (its script must create `$READY`).
    async fn hold(&self, name: &str, opts: &[&str], script: &str) -> Child {
        let ready = self.path(&format!("ready-{}", rand_suffix()));
        let mut cmd = self.run(name, opts, script);
        cmd.env("READY", &ready)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("start dblock");
        wait_for_file(&ready).await;
        child
    }
}

/// The Redis logical database [`Db::fresh`] empties and uses.
const REDIS_FRESH_DB: u32 = 9;

async fn flush_redis(url: &str) {
    let mut conn = redis::Client::open(url)
        .expect("Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut conn)
        .await
        .expect("FLUSHDB");
}

/// A `dblock` command with no database in its environment.
fn dblock_in(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("DATABASE_URL")
        .env_remove("DBLOCK_URL")
        // The default SQLite file lives in the state directory: keep
        // tests' defaults in their scratch directory.
        .env("XDG_STATE_HOME", dir.join("state"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dblock-cli-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn rand_suffix() -> String {
    common::unique("f").replace(':', "-")
}

async fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + LIMIT;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a command to completion.
async fn output(cmd: &mut Command) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::time::timeout(LIMIT, cmd.output())
        .await
        .expect("dblock finished in time")
        .expect("dblock ran")
}

/// Waits for a started dblock to finish.
async fn finish(child: Child) -> Output {
    tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("dblock finished in time")
        .expect("dblock ran")
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or_else(|| {
        panic!(
            "dblock itself was killed: {:?}\nstderr: {}",
            out.status,
            stderr(out)
        )
    })
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_code(out: &Output, expected: i32) {
    assert_eq!(
        code(out),
        expected,
        "exit status\nstdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
}

/// dblock ended by `sig` (re-raised after its cleanup).
#[track_caller]
fn assert_killed_by(out: &Output, sig: Signal) {
    assert_eq!(
        out.status.signal(),
        Some(sig as i32),
        "dblock should have ended by {sig}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

fn signal(child: &Child, sig: Signal) {
    let pid = child.id().expect("still running") as i32;
    kill(Pid::from_raw(pid), sig).expect("signal dblock");
}

/// Generates one test per backend for each scenario. The backends are
/// listed once, here: a new one is one more `test_name Variant` pair.
macro_rules! per_backend {
    ($($scenario:ident),* $(,)?) => {
        per_backend!(@each [
            postgres_advisory PgAdvisory,
            postgres_lease PgLease,
            mysql_lease MysqlLease,
            sqlite_lease SqliteLease,
            redis_lease RedisLease
        ] $($scenario)*);
    };
    (@each $backends:tt $($scenario:ident)*) => {
        $(per_backend!(@one $scenario $backends);)*
    };
    (@one $scenario:ident [$($test:ident $variant:ident),*]) => {
        mod $scenario {
            use super::*;
            $(
                #[tokio::test]
                async fn $test() {
                    super::$scenario(Db::new(Backend::$variant).await).await
                }
            )*
        }
    };
}

per_backend!(
    concurrent_runs_never_overlap,
    command_status_and_environment,
    held_lock_exits_75,
    signals_are_forwarded,
    lost_lock_stops_command_and_exits_76,
    status_list_and_release,
    migrate_is_idempotent,
    schema_is_created_on_first_use,
    sigkill_of_dblock_kills_the_command,
    death_of_the_supervisor_kills_the_command,
    black_holed_connection_stops_a_stubborn_command_in_time,
    flock_flags,
    signals_are_re_raised,
    list_and_status_show_waiters_and_backend,
    job_control_stops_and_resumes,
    leader_shows_and_watches,
);

/// 8 concurrent `dblock run` on one name: the commands' start and end
/// markers never interleave, and fencing tokens increase in run order.
async fn concurrent_runs_never_overlap(db: Db) {
    let name = common::unique("overlap");
    let log = db.path("log");
    let script = r#"echo "start $(date +%s%N) $DBLOCK_TOKEN" >> "$LOG"; sleep 0.2; echo "end $(date +%s%N) $DBLOCK_TOKEN" >> "$LOG""#;
    let children: Vec<Child> = (0..8)
        .map(|_| {
            let mut cmd = db.run(&name, &["--wait", "60s"], script);
            cmd.env("LOG", &log)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn().expect("start dblock")
        })
        .collect();
    for child in children {
        assert_code(&finish(child).await, 0);
    }

    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<(&str, u128, u64)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0], f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(lines.len(), 16, "{text}");
    let mut last_end = 0;
    let mut last_token = 0;
    for pair in lines.chunks(2) {
        let (start, end) = (pair[0], pair[1]);
        assert_eq!((start.0, end.0), ("start", "end"), "overlap:\n{text}");
        assert_eq!(start.2, end.2, "interleaved runs:\n{text}");
        assert!(
            start.1 >= last_end,
            "started before the previous end:\n{text}"
        );
        assert!(start.2 > last_token, "tokens must increase:\n{text}");
        last_end = end.1;
        last_token = start.2;
    }
}

/// The command's exit status is dblock's; 128+N when a signal killed it;
/// it sees DBLOCK_NAME and DBLOCK_TOKEN; 127 when it does not exist.
async fn command_status_and_environment(db: Db) {
    let name = common::unique("status");
    let out = output(
        db.run(
            &name,
            &[],
            r#"test "$DBLOCK_NAME" = "$EXPECT" || exit 99; echo "token=$DBLOCK_TOKEN"; exit 7"#,
        )
        .env("EXPECT", &name),
    )
    .await;
    assert_code(&out, 7);
    let token: u64 = stdout(&out)
        .trim()
        .strip_prefix("token=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no token in {:?}", stdout(&out)));
    assert!(token > 0);

    // What the command leaves running in its group is killed before the
    // lock is released.
    let bg = db.path("bg");
    let out = output(
        db.run(&name, &[], r#"sleep 300 & echo $! > "$BG"; exit 0"#)
            .env("BG", &bg),
    )
    .await;
    assert_code(&out, 0);
    let bg: i32 = std::fs::read_to_string(&bg)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_dead(bg, Duration::from_millis(200)).await;
    let out = output(&mut db.run(&name, &[], "kill -KILL $$")).await;
    assert_code(&out, 128 + 9);

    let mut cmd = db.dblock();
    cmd.args(["run", &name, "--", "/nonexistent/command"]);
    let out = output(&mut cmd).await;
    assert_code(&out, 127);
    assert!(
        stderr(&out).contains("/nonexistent/command"),
        "{}",
        stderr(&out)
    );
    // The lock was released after each run.
    assert_code(
        &output(&mut db.run(&name, &["--no-wait"], "exit 0")).await,
        0,
    );
}

/// A held lock: `--no-wait` exits 75 at once, `--wait` after the wait.
async fn held_lock_exits_75(db: Db) {
    let name = common::unique("held");
    let holder = db
        .hold(&name, &[], r#"echo > "$READY"; exec sleep 60"#)
        .await;

    let started = Instant::now();
    let out = output(&mut db.run(&name, &["--no-wait"], "echo ran")).await;
    assert_code(&out, 75);
    assert!(!stdout(&out).contains("ran"));
    assert!(stderr(&out).contains("held elsewhere"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
    let out = output(&mut db.run(&name, &["--no-wait", "--quiet"], "echo ran")).await;
    assert_code(&out, 75);
    assert_eq!(stderr(&out), "", "--quiet");

    let started = Instant::now();
    let out = output(&mut db.run(&name, &["--wait", "1500ms"], "echo ran")).await;
    assert_code(&out, 75);
    assert!(!stdout(&out).contains("ran"));
    assert!(started.elapsed() >= Duration::from_millis(1500));

    signal(&holder, Signal::SIGTERM);
    assert_killed_by(&finish(holder).await, Signal::SIGTERM);
}

/// SIGTERM and SIGINT reach the command; the lock is released after it
/// exits; a signal while waiting for the lock stops dblock.
async fn signals_are_forwarded(db: Db) {
    let name = common::unique("signals");
    let log = db.path("trapped");
    let mut holder = db.run(
        &name,
        &[],
        r#"trap 'echo TERM >> "$LOG"; exit 3' TERM; echo > "$READY"; while :; do sleep 0.1; done"#,
    );
    let ready = db.path("ready-trap");
    holder
        .env("LOG", &log)
        .env("READY", &ready)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let holder = holder.spawn().expect("start dblock");
    wait_for_file(&ready).await;

    // A second dblock waiting for the lock gives up when signalled.
    let mut waiter = db.run(&name, &[], "echo ran");
    waiter.stdout(Stdio::piped()).stderr(Stdio::piped());
    let waiter = waiter.spawn().expect("start waiter");
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&waiter, Signal::SIGINT);
    let out = finish(waiter).await;
    assert_killed_by(&out, Signal::SIGINT);
    assert!(!stdout(&out).contains("ran"));

    signal(&holder, Signal::SIGTERM);
    let out = finish(holder).await;
    assert_code(&out, 3);
    assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), "TERM");
    // Released once the command exited.
    assert_code(
        &output(&mut db.run(&name, &["--no-wait"], "exit 0")).await,
        0,
    );

    let holder = db
        .hold(&name, &[], r#"echo > "$READY"; exec sleep 60"#)
        .await;
    signal(&holder, Signal::SIGINT);
    assert_killed_by(&finish(holder).await, Signal::SIGINT);
    assert_code(
        &output(&mut db.run(&name, &["--no-wait"], "exit 0")).await,
        0,
    );
}

/// An operator breaks the lock from another process: the holder's command
/// is stopped and dblock exits 76.
async fn lost_lock_stops_command_and_exits_76(db: Db) {
    let name = common::unique("lost");
    let holder = db
        .hold(
            &name,
            &["--kill-after", "5s"],
            r#"echo > "$READY"; exec sleep 60"#,
        )
        .await;
    let started = Instant::now();
    let mut release = db.dblock();
    release.args(["release", &name, "--force"]);
    assert_code(&output(&mut release).await, 0);
    let out = finish(holder).await;
    assert_code(&out, 76);
    assert!(stderr(&out).contains("lost"), "{}", stderr(&out));
    // Stopped by SIGTERM, well before the command's own 60 s.
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// `status` (0 held, 1 free, text and JSON), `list --json`, and `release`
/// (refused without --force; 1 when nothing is held).
async fn status_list_and_release(db: Db) {
    let name = common::unique("inspect");
    let holder = db
        .hold(&name, &[], r#"echo > "$READY"; exec sleep 60"#)
        .await;

    let out = output(db.dblock().args(["status", &name])).await;
    assert_code(&out, 0);
    assert!(
        stdout(&out).contains(&format!("{name}: held")),
        "{}",
        stdout(&out)
    );

    let out = output(db.dblock().args(["status", &name, "--json"])).await;
    assert_code(&out, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["held"], true);
    assert_eq!(v["name"], name.as_str());
    assert_eq!(v["mode"], "exclusive");

    let out = output(db.dblock().args(["list", "--json"])).await;
    assert_code(&out, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let found = v.as_array().expect("array").iter().any(|l| {
        l["name"] == name.as_str()
            || (db.backend == Backend::PgAdvisory && l["key"] == dblock::advisory_key(&name))
    });
    assert!(found, "{name} not in {v}");
    let out = output(db.dblock().arg("list")).await;
    assert_code(&out, 0);
    assert!(stdout(&out).starts_with("NAME"), "{}", stdout(&out));

    let out = output(db.dblock().args(["release", &name])).await;
    assert_code(&out, 64);
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));

    signal(&holder, Signal::SIGTERM);
    assert_killed_by(&finish(holder).await, Signal::SIGTERM);

    let out = output(db.dblock().args(["status", &name])).await;
    assert_code(&out, 1);
    assert!(stdout(&out).contains("free"));
    let out = output(db.dblock().args(["status", &name, "--json"])).await;
    assert_code(&out, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["held"], false);
    let out = output(db.dblock().args(["release", &name, "--force"])).await;
    assert_code(&out, 1);
}

async fn migrate_is_idempotent(db: Db) {
    for _ in 0..2 {
        let out = output(db.dblock().arg("migrate")).await;
        assert_code(&out, 0);
        assert!(stdout(&out).contains("up to date"), "{}", stdout(&out));
    }
}

/// On a database without dblock's schema, reads find nothing held (and
/// create nothing), and the first `run` creates the schema.
async fn schema_is_created_on_first_use(server: Db) {
    let db = server.fresh().await;
    let name = common::unique("fresh");
    let out = output(db.dblock().args(["status", &name])).await;
    assert_code(&out, 1);
    let out = output(db.dblock().args(["list", "--json"])).await;
    assert_code(&out, 0);
    assert_eq!(stdout(&out).trim(), "[]");
    assert_code(
        &output(db.dblock().args(["release", &name, "--force"])).await,
        1,
    );

    let mut tokens = Vec::new();
    for _ in 0..2 {
        let out = output(&mut db.run(&name, &[], "echo $DBLOCK_TOKEN")).await;
        assert_code(&out, 0);
        tokens.push(stdout(&out).trim().parse::<u64>().expect("token"));
    }
    assert!(tokens[1] > tokens[0], "{tokens:?}");
    db.drop_fresh(&server).await;
}

/// Shared holders run side by side; an exclusive one is kept out.
/// (Shared locks are native to advisory locks.)
#[tokio::test]
async fn shared_locks_coexist_on_advisory() {
    let db = Db::new(Backend::PgAdvisory).await;
    let name = common::unique("shared");
    let holder = db
        .hold(&name, &["--shared"], r#"echo > "$READY"; exec sleep 60"#)
        .await;
    assert_code(
        &output(&mut db.run(&name, &["--shared", "--no-wait"], "exit 0")).await,
        0,
    );
    assert_code(
        &output(&mut db.run(&name, &["--no-wait"], "exit 0")).await,
        75,
    );
    signal(&holder, Signal::SIGTERM);
    assert_killed_by(&finish(holder).await, Signal::SIGTERM);
}

/// A command that ignores SIGTERM gets SIGKILL after --kill-after when
/// that is shorter than the cut (a tenth of the ttl), and after the cut
/// when --kill-after is longer.
#[tokio::test]
async fn kill_after_escalates_to_sigkill_within_the_margin() {
    let db = Db::new(Backend::SqliteLease).await;
    for (kill_after, ttl, least, most) in [
        ("100ms", "3s", 100, 1_500),
        // A tenth of the 10 s ttl, not the hour asked for.
        ("1h", "10s", 1_000, 3_000),
    ] {
        let name = common::unique("stubborn");
        let ready = db.path(&format!("ready-{}", rand_suffix()));
        let mut cmd = db.dblock();
        cmd.args(["run", &name, "--kill-after", kill_after, "--ttl", ttl])
            .args(["--", "sh", "-c"])
            .arg(r#"trap '' TERM; echo > "$READY"; while :; do sleep 0.05; done"#)
            .env("READY", &ready)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let holder = cmd.spawn().expect("start dblock");
        wait_for_file(&ready).await;
        assert_code(
            &output(db.dblock().args(["release", &name, "--force"])).await,
            0,
        );
        let broken = Instant::now();
        let out = finish(holder).await;
        let took = broken.elapsed();
        assert_code(&out, 76);
        assert!(stderr(&out).contains("SIGKILL"), "{}", stderr(&out));
        // The loss is seen at the next renewal (a third of the ttl).
        let renewal = humantime::parse_duration(ttl).unwrap() / 3;
        assert!(
            took >= Duration::from_millis(least) && took <= renewal + Duration::from_millis(most),
            "--kill-after {kill_after} --ttl {ttl}: stopped {took:?} after the break"
        );
    }
}

/// An advisory lock is free as soon as its loss is seen: the command gets
/// SIGKILL right after SIGTERM, whatever --kill-after says.
#[tokio::test]
async fn advisory_loss_kills_at_once() {
    let db = Db::new(Backend::PgAdvisory).await;
    let name = common::unique("stubborn");
    let holder = db
        .hold(
            &name,
            &["--kill-after", "1h"],
            r#"trap '' TERM; echo > "$READY"; while :; do sleep 0.05; done"#,
        )
        .await;
    assert_code(
        &output(db.dblock().args(["release", &name, "--force"])).await,
        0,
    );
    let broken = Instant::now();
    let out = finish(holder).await;
    assert_code(&out, 76);
    // Noticed within the CLI's 1 s heartbeat (plus load), then killed.
    assert!(
        broken.elapsed() < Duration::from_secs(4),
        "{:?}",
        broken.elapsed()
    );
}

/// Without a URL, dblock keeps its locks in `dblock/dblock.db` under the
/// state directory ($XDG_STATE_HOME, else ~/.local/state), wherever it is
/// run from, and says on a terminal that the lock is for this machine only.
#[tokio::test]
async fn default_database_is_sqlite_in_the_state_directory() {
    let dir = scratch_dir();
    let elsewhere = scratch_dir();
    let out = output(dblock_in(&dir).args(["run", "job", "--", "true"])).await;
    assert_code(&out, 0);
    assert!(dir.join("state/dblock/dblock.db").exists());
    assert!(
        !dir.join("dblock.db").exists(),
        "not in the current directory"
    );
    // No terminal on stdin: no notice.
    assert!(!stderr(&out).contains("this machine"), "{}", stderr(&out));

    // Another directory, the same state directory: the same lock.
    let holder = {
        let ready = dir.join("ready");
        let mut cmd = dblock_in(&dir);
        cmd.args(["run", "job", "--", "sh", "-c"])
            .arg(r#"echo > "$READY"; exec sleep 60"#)
            .env("READY", &ready)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("start dblock");
        wait_for_file(&ready).await;
        child
    };
    let mut cmd = dblock_in(&elsewhere);
    cmd.env("XDG_STATE_HOME", dir.join("state"))
        .args(["run", "job", "-n", "--", "true"]);
    assert_code(&output(&mut cmd).await, 75);
    signal(&holder, Signal::SIGTERM);
    assert_killed_by(&finish(holder).await, Signal::SIGTERM);

    // Without XDG_STATE_HOME: ~/.local/state.
    let mut cmd = dblock_in(&dir);
    cmd.env_remove("XDG_STATE_HOME")
        .env("HOME", &elsewhere)
        .args(["run", "job", "--", "true"]);
    assert_code(&output(&mut cmd).await, 0);
    assert!(elsewhere.join(".local/state/dblock/dblock.db").exists());

    // On a terminal, one line says the lock is for this machine only.
    let out = in_terminal(&dir, &format!("{BIN} run job -- true")).await;
    assert!(
        out.contains("excludes only on this machine") && out.contains("state/dblock/dblock.db"),
        "{out}"
    );
}

/// A command started with SIGINT and SIGQUIT at their default actions
/// (`env --default-signal`), as in a terminal. A shell started by a
/// script's `&` without job control (as CI runners may start the tests)
/// ignores both, every process below it inherits that, and a shell that
/// ignored SIGINT on entry cannot undo it: a ^C test would then watch a
/// loop go on that a terminal would stop.
fn with_default_signals(program: &str) -> Command {
    let mut cmd = Command::new("env");
    cmd.args(["--default-signal=INT,QUIT", program]);
    cmd
}

/// Runs a shell command line with a terminal (a pseudo-terminal from
/// script(1)) as its stdin, stdout and stderr, and returns what it printed.
async fn in_terminal(dir: &Path, line: &str) -> String {
    let mut cmd = with_default_signals("script");
    cmd.args(["-qec", line, "/dev/null"])
        .env_remove("DATABASE_URL")
        .env_remove("DBLOCK_URL")
        .env("XDG_STATE_HOME", dir.join("state"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = output(&mut cmd).await;
    format!("{}{}", stdout(&out), stderr(&out))
}

/// `--ttl` on an advisory lock, which has no lease length, is refused
/// (exit 64, naming the lease backend) and the command does not run; the
/// same command without it runs.
#[tokio::test]
async fn ttl_on_an_advisory_lock_exits_64() {
    let db = Db::new(Backend::PgAdvisory).await;
    let name = common::unique("advisory-ttl");
    let ran = db.path(&format!("ran-{}", rand_suffix()));
    let out = output(
        db.dblock()
            .args([
                "run",
                &name,
                "--ttl",
                "3s",
                "--",
                "sh",
                "-c",
                "echo > \"$RAN\"",
            ])
            .env("RAN", &ran),
    )
    .await;
    assert_code(&out, 64);
    assert!(stderr(&out).contains("ttl"), "{}", stderr(&out));
    assert!(!ran.exists(), "the command ran");
    let out = output(
        db.dblock()
            .args(["run", &name, "--", "sh", "-c", "echo > \"$RAN\""])
            .env("RAN", &ran),
    )
    .await;
    assert_code(&out, 0);
    assert!(ran.exists(), "the command did not run");
}

/// Usage errors exit 64 without touching a database.
#[tokio::test]
async fn usage_errors_exit_64() {
    let dir = scratch_dir();
    let unreachable = "postgres://u@127.0.0.1:1/db";
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["run", "x"],
        &["run", "x", "true"],
        &["run", "x", "--wait", "1s", "--no-wait", "--", "true"],
        &["run", "x", "--bogus", "--", "true"],
        &[
            "--url",
            "mysql://u@127.0.0.1:1/db",
            "--backend",
            "advisory",
            "run",
            "x",
            "--",
            "true",
        ],
        &[
            "--url",
            "sqlite:x.db",
            "--backend",
            "advisory",
            "status",
            "x",
        ],
        &["--backend", "advisory", "list"],
        &["--backend", "paxos", "list"],
        &["--url", "memcached://127.0.0.1:1/0", "list"],
        &[
            "--url",
            "redis://127.0.0.1:1/0",
            "--backend",
            "advisory",
            "list",
        ],
        &["--url", unreachable, "release", "x"],
        &["status"],
        &["run", "x", "-n", "-w", "1s", "--", "true"],
        &["run", "x", "-c", "true", "--", "true"],
        &["run", "x", "-c"],
        &["run", "x", "-E"],
    ];
    for args in cases {
        let out = output(dblock_in(&dir).args(*args)).await;
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?} says why");
    }
}

/// Bad names, durations and numbers exit 64 with a message saying what is
/// allowed, before any connection is tried (the URL is unreachable), on
/// every kind of URL; nothing panics.
#[tokio::test]
async fn invalid_names_durations_and_numbers_exit_64() {
    let dir = scratch_dir();
    let long = "n".repeat(256);
    let cases: &[&[&str]] = &[
        &["run", "", "--", "true"],
        &["run", &long, "--", "true"],
        &["run", "x", "--ttl", "banana", "--", "true"],
        &["run", "x", "--ttl", "1ms", "--", "true"],
        &["run", "x", "--ttl", "367days", "--", "true"],
        &["run", "x", "--ttl", "300000000000y", "--", "true"],
        &["run", "x", "--wait", "5 parsecs", "--", "true"],
        &["run", "x", "--wait", "1000years", "--", "true"],
        &["run", "x", "-w", "300000000000y", "--", "true"],
        &["run", "x", "--timeout", "-1s", "--", "true"],
        &["run", "x", "--kill-after", "10", "--", "true"],
        &["run", "x", "--kill-after", "300000000000y", "--", "true"],
        &["run", "x", "--kill-after", "2h", "--", "true"],
        &["run", "x", "-E", "256", "--", "true"],
        &["run", "x", "-E", "-1", "--", "true"],
        &["run", "x", "--conflict-exit-code", "seven", "--", "true"],
        &["status", ""],
        &["release", &long, "--force"],
        &["--connect-timeout", "soon", "list"],
        &["--connect-timeout", "300000000000y", "list"],
        &["--connect-timeout", "1ms", "list"],
    ];
    for url in [
        "postgres://u@127.0.0.1:1/db",
        "mysql://u@127.0.0.1:1/db",
        &format!("sqlite:{}", dir.join("never.db").display()),
    ] {
        for args in cases {
            let mut cmd = dblock_in(&dir);
            cmd.args(["--url", url]).args(*args);
            let out = output(&mut cmd).await;
            assert_eq!(code(&out), 64, "{url} {args:?}: {}", stderr(&out));
            let err = stderr(&out);
            assert!(
                !err.is_empty() && !err.contains("panicked"),
                "{url} {args:?}: {err}"
            );
        }
    }
    assert!(!dir.join("never.db").exists(), "nothing written");
    let out = output(dblock_in(&dir).args([
        "--url",
        "postgres://u@127.0.0.1:1/db",
        "run",
        "x",
        "--kill-after",
        "300000000000y",
        "--",
        "true",
    ]))
    .await;
    assert!(stderr(&out).contains("0s to 1h"), "{}", stderr(&out));
}

/// An unreachable database exits 69, and its password is not printed.
#[tokio::test]
async fn unreachable_database_exits_69() {
    let dir = scratch_dir();
    for url in [
        "postgres://app:Sup3rSecret@127.0.0.1:1/db",
        "mysql://app:Sup3rSecret@127.0.0.1:1/db",
        "postgres://127.0.0.1:1/db?user=app&password=Sup3rSecret",
        "redis://app:Sup3rSecret@127.0.0.1:1/0",
    ] {
        for args in [
            &["run", "x", "--", "true"][..],
            &["status", "x"],
            &["list"],
            &["migrate"],
        ] {
            let started = Instant::now();
            let mut cmd = dblock_in(&dir);
            cmd.args(["--url", url, "--connect-timeout", "1s"])
                .args(args);
            let out = output(&mut cmd).await;
            assert_eq!(code(&out), 69, "{url} {args:?}: {}", stderr(&out));
            assert!(started.elapsed() < Duration::from_secs(10));
            let err = stderr(&out);
            assert!(!err.contains("Sup3rSecret"), "{err}");
            assert!(err.contains("127.0.0.1:1"), "says where: {err}");
        }
    }
}

/// Passwords never show, whether the URL comes from --url or DATABASE_URL,
/// in help, usage errors, successes or failures.
#[tokio::test]
async fn passwords_are_never_printed() {
    let dir = scratch_dir();
    let pg = common::postgres_url().await;
    // PostgreSQL under test may ignore the password (trust), which lets a
    // URL with one reach the success paths too.
    let host = match pg.split_once("://").expect("a URL").1.rsplit_once('@') {
        Some((_, host)) => host.to_owned(),
        None => pg.split_once("://").unwrap().1.to_owned(),
    };
    let with_password = format!("postgres://postgres:Zebra-Crossing-42@{host}");
    let secret = "Zebra-Crossing-42";
    let mut outputs = Vec::new();
    let invocations: &[&[&str]] = &[
        &["--help"],
        &["run", "--help"],
        &["migrate", "--help"],
        &["list", "--help"],
        &["status", "--help"],
        &["release", "--help"],
        &["help", "run"],
        &[],
        &["bogus"],
        &["migrate"],
        &["list"],
        &["status", "x"],
        &["run", "x", "--no-wait", "--", "true"],
        &["--backend", "lease", "list"],
    ];
    for args in invocations {
        let mut cmd = dblock_in(&dir);
        cmd.env("DATABASE_URL", &with_password).args(*args);
        outputs.push((format!("env {args:?}"), output(&mut cmd).await));
        let mut cmd = dblock_in(&dir);
        cmd.args(["--url", &with_password]).args(*args);
        outputs.push((format!("--url {args:?}"), output(&mut cmd).await));
    }
    // A URL where clap expects a subcommand.
    let mut cmd = dblock_in(&dir);
    cmd.args([with_password.as_str(), "run"]);
    outputs.push(("stray URL".into(), output(&mut cmd).await));
    let mut cmd = dblock_in(&dir);
    cmd.args(["--url", &format!("redis://u:{secret}@h/0"), "list"]);
    outputs.push(("redis".into(), output(&mut cmd).await));

    for (what, out) in &outputs {
        let text = format!("{}{}", stdout(out), stderr(out));
        assert!(
            !text.contains(secret),
            "{what} printed the password:\n{text}"
        );
    }
    // And the URL is still shown, masked, where it helps: in the success
    // message, or in the error if the server does check passwords.
    let migrate = &outputs
        .iter()
        .find(|(w, _)| w == "--url [\"migrate\"]")
        .unwrap()
        .1;
    let shown = if code(migrate) == 0 {
        stdout(migrate)
    } else {
        assert_code(migrate, 69);
        stderr(migrate)
    };
    assert!(shown.contains("postgres:***@"), "{shown}");
}

/// Each subcommand's `--help` says what it does and how it exits.
#[tokio::test]
async fn help_is_clear() {
    let dir = scratch_dir();
    let help = |args: &'static [&'static str]| {
        let mut cmd = dblock_in(&dir);
        cmd.args(args);
        async move {
            let out = output(&mut cmd).await;
            assert_code(&out, 0);
            stdout(&out)
        }
    };
    let top = help(&["--help"]).await;
    for needle in [
        "run",
        "migrate",
        "list",
        "status",
        "release",
        "DATABASE_URL",
        "DBLOCK_URL",
        ".local/state/dblock/dblock.db",
        "this machine",
        "never exclude each other",
        "postgres://",
        "mysql://",
        "sqlite:",
        "75",
        "76",
    ] {
        assert!(
            top.contains(needle),
            "dblock --help lacks {needle:?}:\n{top}"
        );
    }
    let run = help(&["run", "--help"]).await;
    for needle in [
        "-- <CMD>",
        "--ttl",
        "-w, --timeout",
        "--wait",
        "-n, --nonblock",
        "--no-wait",
        "-E, --conflict-exit-code",
        "-c, --command",
        "sh -c",
        "-s, --shared",
        "supervisor",
        "dblock dies",
        "a tenth of the ttl",
        "right after SIGTERM",
        "this machine",
        "--backend",
        "--kill-after",
        "--url",
        "DBLOCK_NAME",
        "DBLOCK_TOKEN",
        "SIGTERM",
        "SIGKILL",
        "30s",
        "5m",
        "64",
        "69",
        "75",
        "76",
        "128+N",
    ] {
        assert!(
            run.contains(needle),
            "dblock run --help lacks {needle:?}:\n{run}"
        );
    }
    let short = help(&["run", "-h"]).await;
    assert!(
        short.contains("Run a command while holding a lock"),
        "{short}"
    );
    let status = help(&["status", "--help"]).await;
    assert!(
        status.contains("--json") && status.contains("0 the lock is held"),
        "{status}"
    );
    let list = help(&["list", "--help"]).await;
    assert!(list.contains("--json"), "{list}");
    let release = help(&["release", "--help"]).await;
    for needle in ["--force", "terminated", "76"] {
        assert!(
            release.contains(needle),
            "release --help lacks {needle:?}:\n{release}"
        );
    }
    let migrate = help(&["migrate", "--help"]).await;
    assert!(migrate.contains("Idempotent"), "{migrate}");
    let version = help(&["--version"]).await;
    assert!(version.starts_with("dblock "), "{version}");
}

/// Whether a process runs (a zombie, waiting for its parent to reap it,
/// runs no more).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => {
            !matches!(stat.rsplit(") ").next(), Some(s) if s.starts_with('Z') || s.starts_with('X'))
        }
        Err(_) => false,
    }
}

/// The parent of a process.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process exists");
    let after = stat.rsplit(") ").next().unwrap();
    after.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Waits until `pid` runs no more; how long that took.
async fn wait_dead(pid: i32, limit: Duration) -> Duration {
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < limit,
            "process {pid} still runs after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.elapsed()
}

/// Nanoseconds since the epoch, as `date +%s%N` prints them.
fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A command for [`Db::start`] that records its pid in `$PIDFILE`, then a
/// line `date +%s%N` to `$TICKS` every 20 ms, forever; with `stubborn`, it
/// ignores SIGTERM.
fn ticker(stubborn: bool) -> String {
    format!(
        r#"{}sleep 300 & echo $! > "$PIDFILE.bg"; echo $$ > "$PIDFILE"; echo > "$READY"; while :; do date +%s%N >> "$TICKS"; sleep 0.02; done"#,
        if stubborn { "trap '' TERM; " } else { "" }
    )
}

/// What a started ticker left behind.
struct Ticker {
    child: Child,
    /// The command's pid.
    pid: i32,
    /// A process the command started in the background.
    bg: i32,
    ticks: PathBuf,
}

impl Ticker {
    /// The last tick written.
    fn last(&self) -> u128 {
        std::fs::read_to_string(&self.ticks)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .next_back()
            .unwrap_or(0)
    }
}

impl Db {
    /// Starts `cmd` (a `dblock run` of [`ticker`]) and waits until it runs.
    async fn start_ticker(&self, mut cmd: Command) -> Ticker {
        let id = rand_suffix();
        let (ready, pidfile, ticks) = (
            self.path(&format!("ready-{id}")),
            self.path(&format!("pid-{id}")),
            self.path(&format!("ticks-{id}")),
        );
        cmd.env("READY", &ready)
            .env("PIDFILE", &pidfile)
            .env("TICKS", &ticks)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("start dblock");
        wait_for_file(&ready).await;
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let pid = read(&pidfile);
        let bg = read(&pidfile.with_extension("bg"));
        Ticker {
            child,
            pid,
            bg,
            ticks,
        }
    }
}

/// `kill -9` of dblock: its command's group is killed at once (within two
/// seconds), and the next holder, already waiting, starts only after the
/// command's last sign of life.
async fn sigkill_of_dblock_kills_the_command(db: Db) {
    let name = common::unique("sigkill");
    let holder = db.start_ticker(db.run(&name, &[], &ticker(false))).await;
    let started = db.path("next-started");
    let mut next = db.run(&name, &["-w", "60s"], r#"date +%s%N > "$STARTED""#);
    next.env("STARTED", &started)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let next = next.spawn().expect("start the next holder");
    tokio::time::sleep(Duration::from_millis(300)).await;

    signal(&holder.child, Signal::SIGKILL);
    let took = wait_dead(holder.pid, Duration::from_secs(2)).await;
    wait_dead(holder.bg, Duration::from_secs(1)).await;
    let out = finish(next).await;
    assert_code(&out, 0);
    let next_started: u128 = std::fs::read_to_string(&started)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let last = holder.last();
    assert!(last > 0, "the command ticked");
    assert!(
        next_started > last,
        "the next holder started {} ms before the killed holder's command last ticked",
        (last - next_started) / 1_000_000
    );
    println!(
        "{:?}: command dead {took:?} after dblock's SIGKILL",
        db.backend
    );
}

/// `kill -9` of the supervisor (the command's parent): dblock kills the
/// command's group, releases the lock and exits 128+9.
async fn death_of_the_supervisor_kills_the_command(db: Db) {
    let name = common::unique("supervisor");
    let holder = db.start_ticker(db.run(&name, &[], &ticker(true))).await;
    let supervisor = parent_of(holder.pid);
    assert_ne!(
        supervisor,
        holder.child.id().unwrap() as i32,
        "a supervisor in between"
    );
    kill(Pid::from_raw(supervisor), Signal::SIGKILL).unwrap();
    let out = finish(holder.child).await;
    assert_code(&out, 128 + 9);
    wait_dead(holder.pid, Duration::from_secs(2)).await;
    wait_dead(holder.bg, Duration::from_secs(1)).await;
    assert_code(&output(&mut db.run(&name, &["-n"], "exit 0")).await, 0);
}

/// The holder's connection is black-holed (a proxy stops forwarding; for
/// SQLite, another process keeps the file locked) under a command that
/// ignores SIGTERM and a --kill-after of an hour: dblock exits 76, and the
/// command is dead while the lease is still valid by the database clock, so
/// nobody else could have been granted the lock while it ran.
async fn black_holed_connection_stops_a_stubborn_command_in_time(db: Db) {
    let name = common::unique("blackhole");
    let opts = ["--kill-after", "1h"];
    match db.backend {
        Backend::SqliteLease => {
            let file = db.url.strip_prefix("sqlite:").unwrap().to_owned();
            let holder = db.start_ticker(db.run(&name, &opts, &ticker(true))).await;
            let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db.url)
                .await
                .expect("open the file");
            sqlx::raw_sql("BEGIN EXCLUSIVE")
                .execute(&mut conn)
                .await
                .unwrap();
            let out = finish(holder.child).await;
            let now_us = (now_ns() / 1000) as i64;
            assert_code(&out, 76);
            // SIGKILLed: it runs no user code any more, and is reaped soon.
            wait_dead(holder.pid, Duration::from_millis(500)).await;
            let expires: i64 =
                sqlx::query_scalar("SELECT expires_at FROM dblock_leases WHERE name = ?")
                    .bind(&name)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            assert!(
                now_us < expires,
                "{file}: the command was stopped {} ms after the lease ran out",
                (now_us - expires) / 1000
            );
            sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
        }
        _ => {
            let (proxy, through) = proxy::Proxy::in_front_of(&db.url).await;
            let mut cmd = db.run(&name, &opts, &ticker(true));
            cmd.env("DATABASE_URL", through);
            let holder = db.start_ticker(cmd).await;
            // Checked on a direct connection, opened before the black hole.
            let lease = LeaseCheck::open(&db).await;
            let paused = Instant::now();
            proxy.pause(0, true);
            let out = finish(holder.child).await;
            let valid = lease.still_valid(&name).await;
            let took = paused.elapsed();
            proxy.pause(0, false);
            proxy.down(0, true);
            assert_code(&out, 76);
            // SIGKILLed: it runs no user code any more, and is reaped soon.
            wait_dead(holder.pid, Duration::from_millis(500)).await;
            assert!(
                valid,
                "{:?}: the command was stopped after its lease ran out\n{}",
                db.backend,
                stderr(&out)
            );
            if db.backend == Backend::PgAdvisory {
                // A 1 s heartbeat, and 2 s for a statement to answer.
                assert!(took < Duration::from_secs(6), "{took:?}");
            }
            println!("{:?}: stopped {took:?} after the black hole", db.backend);
        }
    }
}

/// A direct connection that tells whether a lease is still valid by the
/// database clock.
enum LeaseCheck {
    Pg(sqlx::PgPool),
    Mysql(sqlx::MySqlPool),
    /// Advisory locks do not expire: the server keeps the lock while the
    /// (black-holed) session lives.
    NoExpiry,
}

impl LeaseCheck {
    async fn open(db: &Db) -> LeaseCheck {
        match db.backend {
            Backend::PgLease => LeaseCheck::Pg(sqlx::PgPool::connect(&db.url).await.unwrap()),
            Backend::MysqlLease => {
                LeaseCheck::Mysql(sqlx::MySqlPool::connect(&db.url).await.unwrap())
            }
            _ => LeaseCheck::NoExpiry,
        }
    }

    async fn still_valid(&self, name: &str) -> bool {
        let (pg, my) = (
            "SELECT expires_at > clock_timestamp() FROM dblock_leases WHERE name = $1",
            "SELECT expires_at > UTC_TIMESTAMP(6) FROM dblock_leases WHERE name = ?",
        );
        match self {
            LeaseCheck::Pg(pool) => sqlx::query_scalar(pg).bind(name).fetch_one(pool).await,
            LeaseCheck::Mysql(pool) => sqlx::query_scalar(my).bind(name).fetch_one(pool).await,
            LeaseCheck::NoExpiry => Ok(true),
        }
        .expect("read the lease")
    }
}

/// flock(1)'s options: -n, -w, -E (the command's own 75 is not "busy"),
/// -c, -s, and their long forms.
async fn flock_flags(db: Db) {
    let name = common::unique("flock");
    // -c runs a command line through sh -c.
    let mut cmd = db.dblock();
    cmd.args([
        "run",
        &name,
        "-c",
        r#"echo "$DBLOCK_NAME" | tr a-z A-Z; exit 5"#,
    ]);
    let out = output(&mut cmd).await;
    assert_code(&out, 5);
    assert_eq!(stdout(&out).trim(), name.to_uppercase());
    let mut cmd = db.dblock();
    cmd.args(["run", &name, "--command", "exit 6"]);
    assert_code(&output(&mut cmd).await, 6);
    // The command's own 75, with -E, is not mistaken for "busy".
    let out = output(&mut db.run(&name, &["-E", "200"], "exit 75")).await;
    assert_code(&out, 75);

    let holder = db
        .hold(&name, &[], r#"echo > "$READY"; exec sleep 60"#)
        .await;
    for (opts, expected) in [
        (&["-n"][..], 75),
        (&["--nonblock"], 75),
        (&["--no-wait"], 75),
        (&["-n", "-E", "200"], 200),
        (&["--nonblock", "--conflict-exit-code", "0"], 0),
        (&["-n", "-q", "-E", "3"], 3),
    ] {
        let out = output(&mut db.run(&name, opts, "echo ran")).await;
        assert_code(&out, expected);
        assert!(!stdout(&out).contains("ran"), "{opts:?}");
    }
    for opts in [&["-w", "800ms"][..], &["--timeout", "800ms", "-E", "9"]] {
        let started = Instant::now();
        let out = output(&mut db.run(&name, opts, "echo ran")).await;
        assert_code(&out, if opts.len() > 2 { 9 } else { 75 });
        assert!(started.elapsed() >= Duration::from_millis(800), "{opts:?}");
        assert!(!stdout(&out).contains("ran"));
    }
    // -s: an exclusive holder keeps shared ones out too.
    assert_code(
        &output(&mut db.run(&name, &["-s", "-n"], "exit 0")).await,
        75,
    );
    signal(&holder, Signal::SIGTERM);
    assert_killed_by(&finish(holder).await, Signal::SIGTERM);

    // -s holders run side by side; an exclusive one waits.
    let shared = db
        .hold(&name, &["-s"], r#"echo > "$READY"; exec sleep 60"#)
        .await;
    assert_code(
        &output(&mut db.run(&name, &["--shared", "-n"], "exit 0")).await,
        0,
    );
    assert_code(&output(&mut db.run(&name, &["-n"], "exit 0")).await, 75);
    signal(&shared, Signal::SIGTERM);
    assert_killed_by(&finish(shared).await, Signal::SIGTERM);
}

/// A command killed by SIGINT, SIGTERM, SIGHUP or SIGQUIT (sent to dblock
/// and forwarded, or sent to the command directly) makes dblock end by the
/// same signal, after the lock is released: a calling loop stops.
async fn signals_are_re_raised(db: Db) {
    let name = common::unique("reraise");
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        let holder = db.start_ticker(db.run(&name, &[], &ticker(false))).await;
        signal(&holder.child, sig);
        assert_killed_by(&finish(holder.child).await, sig);
        assert!(!alive(holder.pid));
        assert_code(&output(&mut db.run(&name, &["-n"], "exit 0")).await, 0);
    }
    // Killed directly (as a terminal's ^C reaches a foreground command).
    let holder = db.start_ticker(db.run(&name, &[], &ticker(false))).await;
    kill(Pid::from_raw(holder.pid), Signal::SIGINT).unwrap();
    assert_killed_by(&finish(holder.child).await, Signal::SIGINT);
    // A ^C to a shell loop around dblock (SIGINT to its process group, as
    // a terminal sends it; the command, in a group of its own, gets it from
    // dblock) stops the loop.
    let backend = if db.backend == Backend::PgLease {
        "--backend lease"
    } else {
        ""
    };
    let ready = db.path("loop-ready");
    let script = format!(
        r#"for i in 1 2 3; do echo "run $i"; "{BIN}" {backend} run "{name}" -- sh -c 'echo > "$READY"; exec sleep 60'; done; echo "loop went on""#
    );
    let mut bash = with_default_signals("bash");
    bash.arg("-c")
        .arg(&script)
        .env("DATABASE_URL", &db.url)
        .env("READY", &ready)
        .env_remove("DBLOCK_URL")
        .current_dir(&db.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let bash = bash.spawn().expect("start bash");
    wait_for_file(&ready).await;
    nix::sys::signal::killpg(Pid::from_raw(bash.id().unwrap() as i32), Signal::SIGINT).unwrap();
    let out = finish(bash).await;
    assert!(
        stdout(&out).contains("run 1")
            && !stdout(&out).contains("run 2")
            && !stdout(&out).contains("loop went on"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_code(&output(&mut db.run(&name, &["-n"], "exit 0")).await, 0);
}

/// In a terminal, ^C goes to the command's group only (dblock gave it the
/// terminal); dblock passes it on to its own group, so a calling script's
/// loop stops as it would around any command.
#[tokio::test]
async fn ctrl_c_in_a_terminal_stops_a_calling_loop() {
    let dir = scratch_dir();
    let url = format!("sqlite:{}", dir.join("locks.db").display());
    let ready = dir.join("ready");
    std::fs::write(
        dir.join("loop.sh"),
        format!(
            r#"for i in 1 2 3; do echo "run $i"; "{BIN}" --url "{url}" run tty -- sh -c 'echo > "{ready}"; exec sleep 60'; done; echo "loop went on"
"#,
            ready = ready.display()
        ),
    )
    .unwrap();
    let mut cmd = with_default_signals("script");
    cmd.args(["-qec", "bash loop.sh", "/dev/null"])
        .env_remove("DATABASE_URL")
        .env_remove("DBLOCK_URL")
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("start script(1)");
    wait_for_file(&ready).await;
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"\x03")
        .await
        .unwrap();
    let out = finish(child).await;
    drop(stdin);
    let text = stdout(&out);
    assert!(
        text.contains("run 1") && !text.contains("run 2") && !text.contains("loop went on"),
        "{text}{}",
        stderr(&out)
    );
}

/// `status` names the backend holding a name; `list` and `status` show
/// waiters where the database shows them (PostgreSQL advisory locks).
async fn list_and_status_show_waiters_and_backend(db: Db) {
    let name = common::unique("waiters");
    let holder = db
        .hold(&name, &[], r#"echo > "$READY"; exec sleep 60"#)
        .await;
    let mut waiter = db.run(&name, &["-w", "60s"], "exit 0");
    waiter.stdout(Stdio::piped()).stderr(Stdio::piped());
    let waiter = waiter.spawn().expect("start waiter");
    let backend = match db.backend {
        Backend::PgAdvisory => "postgres-advisory",
        Backend::PgLease => "postgres-lease",
        Backend::MysqlLease => "mysql-lease",
        Backend::SqliteLease => "sqlite-lease",
        Backend::RedisLease => "redis-lease",
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = output(db.dblock().args(["status", &name, "--json"])).await;
        assert_code(&out, 0);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
        assert_eq!(v["backend"], backend, "{v}");
        assert_eq!(v["held"], true, "{v}");
        if db.backend != Backend::PgAdvisory {
            assert_eq!(v["waiters"], serde_json::Value::Null, "{v}");
            break;
        }
        if v["waiters"] == 1 {
            let out = output(db.dblock().args(["list", "--json"])).await;
            let all: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
            let mine = all
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["key"] == dblock::advisory_key(&name))
                .expect("listed");
            assert_eq!(mine["waiters"], 1, "{mine}");
            assert_eq!(mine["backend"], backend);
            let out = output(db.dblock().args(["status", &name])).await;
            assert!(stdout(&out).contains("waiters:  1"), "{}", stdout(&out));
            break;
        }
        assert!(Instant::now() < deadline, "no waiter seen: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = output(db.dblock().args(["status", &name])).await;
    assert!(
        stdout(&out).contains(&format!("backend:  {backend}")),
        "{}",
        stdout(&out)
    );
    signal(&holder, Signal::SIGTERM);
    assert_killed_by(&finish(holder).await, Signal::SIGTERM);
    assert_code(&finish(waiter).await, 0);
}

/// Advisory locks and leases of one name on one PostgreSQL database do not
/// exclude each other; `status` shows both, names each backend, and warns.
#[tokio::test]
async fn mixed_backends_are_shown_by_status() {
    let advisory = Db::new(Backend::PgAdvisory).await;
    let lease = Db::new(Backend::PgLease).await;
    let name = common::unique("mixed");
    let a = advisory
        .hold(&name, &[], r#"echo > "$READY"; exec sleep 60"#)
        .await;
    // Not excluded by the advisory lock: a different lock.
    let l = lease
        .hold(&name, &[], r#"echo > "$READY"; exec sleep 60"#)
        .await;
    for db in [&advisory, &lease] {
        let out = output(db.dblock().args(["status", &name])).await;
        assert_code(&out, 0);
        let text = stdout(&out);
        assert!(
            text.contains("backend:  postgres-advisory")
                && text.contains("backend:  postgres-lease")
                && text.contains("do not exclude each other"),
            "{text}"
        );
        let out = output(db.dblock().args(["status", &name, "--json"])).await;
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
        let first = if db.backend == Backend::PgAdvisory {
            ("postgres-advisory", "postgres-lease")
        } else {
            ("postgres-lease", "postgres-advisory")
        };
        assert_eq!(v["backend"], first.0, "{v}");
        assert_eq!(v["also"][0]["backend"], first.1, "{v}");
    }
    for holder in [a, l] {
        signal(&holder, Signal::SIGTERM);
        assert_killed_by(&finish(holder).await, Signal::SIGTERM);
    }
}

/// In the foreground of a terminal, the command gets the terminal: it is in
/// the terminal's foreground process group, and can read from it.
#[tokio::test]
async fn interactive_command_owns_the_terminal() {
    let dir = scratch_dir();
    let url = format!("sqlite:{}", dir.join("locks.db").display());
    std::fs::write(
        dir.join("fg.sh"),
        r#"fg=$(ps -o tpgid= -p $$ | tr -d ' '); me=$(ps -o pgid= -p $$ | tr -d ' ')
if [ "$fg" = "$me" ]; then echo FOREGROUND; else echo "BACKGROUND fg=$fg me=$me"; fi
test -t 0 && echo TTY
exit 0
"#,
    )
    .unwrap();
    let out = in_terminal(&dir, &format!("{BIN} --url {url} run tty -- sh fg.sh")).await;
    assert!(out.contains("FOREGROUND") && out.contains("TTY"), "{out}");
    // Without a terminal it runs in the background of nothing: no claim.
    let out =
        output(dblock_in(&dir).args(["--url", &url, "run", "tty", "--", "sh", "fg.sh"])).await;
    assert_code(&out, 0);
    assert!(!stdout(&out).contains("TTY"), "{}", stdout(&out));
}

/// The state letter of a process (`T` stopped, `S` sleeping, ...).
fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(") ")
        .next()
        .and_then(|s| s.chars().next())
        .unwrap_or('?')
}

async fn wait_state(pid: i32, wanted: char) {
    let t = Instant::now();
    while state(pid) != wanted {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "process {pid} is {:?}, not {wanted:?}",
            state(pid)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ticks(t: &Ticker) -> usize {
    count_lines(&t.ticks)
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .count()
}

/// A job-control stop of the command (SIGTSTP, as ^Z sends it) stops
/// dblock too; SIGCONT to dblock (the shell's `fg`) checks the lock and
/// continues the command. A lease that ran out meanwhile is found lost on
/// resuming: the command is killed without running again, and dblock exits
/// 76. A plain SIGSTOP of the command does not stop dblock.
async fn job_control_stops_and_resumes(db: Db) {
    let name = common::unique("jobs");
    // dblock in a process group of its own, whose parent (this test) is in
    // another group of the same session, as a shell's job is: the kernel
    // discards a job-control stop sent to an orphaned process group, and
    // this test's own group may be one (a test runner started in the
    // background of a shell that has exited).
    let job = |db: &Db| {
        let mut cmd = db.run(&name, &[], &ticker(false));
        cmd.process_group(0);
        cmd
    };
    let holder = db.start_ticker(job(&db)).await;
    let dblock = holder.child.id().unwrap() as i32;
    kill(Pid::from_raw(holder.pid), Signal::SIGTSTP).unwrap();
    wait_state(dblock, 'T').await;
    kill(Pid::from_raw(dblock), Signal::SIGCONT).unwrap();
    let before = ticks(&holder);
    let t = Instant::now();
    while ticks(&holder) <= before + 2 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the command was not continued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGSTOP from elsewhere: dblock goes on (and keeps renewing).
    kill(Pid::from_raw(holder.pid), Signal::SIGSTOP).unwrap();
    wait_state(holder.pid, 'T').await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_ne!(state(dblock), 'T', "dblock stopped for a SIGSTOP");
    kill(Pid::from_raw(holder.pid), Signal::SIGCONT).unwrap();
    signal(&holder.child, Signal::SIGTERM);
    assert_killed_by(&finish(holder.child).await, Signal::SIGTERM);

    if !db.is_lease() {
        return;
    }
    // Stopped for longer than the 3 s ttl.
    let holder = db.start_ticker(job(&db)).await;
    let dblock = holder.child.id().unwrap() as i32;
    kill(Pid::from_raw(holder.pid), Signal::SIGTSTP).unwrap();
    wait_state(dblock, 'T').await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let before = ticks(&holder);
    kill(Pid::from_raw(dblock), Signal::SIGCONT).unwrap();
    let (pid, file) = (holder.pid, holder.ticks.clone());
    let out = finish(holder.child).await;
    assert_code(&out, 76);
    assert!(!alive(pid));
    // At most a tick already under way when it stopped.
    assert!(
        count_lines(&file) <= before + 1,
        "the command ran on after the lease ran out"
    );
}

/// On PostgreSQL `list` and `status` also look at the other mechanism; a
/// user who may not read the lease table still gets the advisory locks,
/// with a note saying what was not shown.
#[tokio::test]
async fn lease_table_out_of_reach_is_skipped() {
    let db = Db::new(Backend::PgAdvisory).await;
    assert_code(&output(db.dblock().arg("migrate")).await, 0);
    let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
    // A role of this test's own, with no right on dblock's tables.
    sqlx::raw_sql(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dblock_cli_no_leases') THEN
             CREATE ROLE dblock_cli_no_leases LOGIN;
           END IF;
         END $$;
         REVOKE ALL ON dblock_leases FROM dblock_cli_no_leases",
    )
    .execute(&pool)
    .await
    .expect("create the role");
    let (scheme, rest) = db.url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let url = format!("{scheme}://dblock_cli_no_leases@{host}");

    let name = common::unique("noleases");
    let holder = db
        .hold(&name, &[], r#"echo > "$READY"; exec sleep 60"#)
        .await;
    let mut cmd = dblock_in(&db.dir);
    cmd.args(["--url", &url, "status", &name]);
    let out = output(&mut cmd).await;
    assert_code(&out, 0);
    assert!(
        stdout(&out).contains("backend:  postgres-advisory"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("not showing postgres-lease locks"),
        "{}",
        stderr(&out)
    );
    let mut cmd = dblock_in(&db.dir);
    cmd.args(["--url", &url, "list", "--json"]);
    let out = output(&mut cmd).await;
    assert_code(&out, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|l| l["key"] == dblock::advisory_key(&name)),
        "{v}"
    );
    // The lease table is the chosen one: its error is the command's.
    let mut cmd = dblock_in(&db.dir);
    cmd.args(["--url", &url, "--backend", "lease", "list"]);
    assert_code(&output(&mut cmd).await, 69);
    signal(&holder, Signal::SIGTERM);
    assert_killed_by(&finish(holder).await, Signal::SIGTERM);
}

/// A `Locks` of the library on the same database and backend as `db`'s
/// `dblock`, with dblock's schema in place.
async fn library_locks(db: &Db) -> dblock::Locks {
    match db.backend {
        Backend::PgAdvisory | Backend::PgLease => {
            let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
            dblock::postgres::migrate(&pool).await.expect("migrate");
            if db.backend == Backend::PgAdvisory {
                dblock::Locks::new(dblock::postgres::Advisory::new(pool))
            } else {
                dblock::Locks::new(dblock::postgres::Lease::new(pool))
            }
        }
        Backend::MysqlLease => {
            let pool = sqlx::MySqlPool::connect(&db.url).await.expect("connect");
            dblock::mysql::migrate(&pool).await.expect("migrate");
            dblock::Locks::new(dblock::mysql::Lease::new(pool))
        }
        Backend::SqliteLease => {
            let path = db.url.strip_prefix("sqlite:").expect("sqlite URL");
            dblock::Locks::new(dblock::sqlite::Lease::open(path).await.expect("open"))
        }
        Backend::RedisLease => {
            dblock::Locks::new(dblock::redis::Lease::open(&db.url).await.expect("open"))
        }
    }
}

/// `dblock leader` shows who leads an election run by the library (exit 0),
/// or that nobody does (exit 1), as text and JSON; `--watch` prints one
/// line per change: a new leader, a vacancy, a new term.
async fn leader_shows_and_watches(db: Db) {
    let name = common::unique("leader");
    let out = output(db.dblock().args(["leader", &name])).await;
    assert_code(&out, 1);
    assert_eq!(stdout(&out).trim(), format!("{name}: no leader"));
    let out = output(db.dblock().args(["leader", &name, "--json"])).await;
    assert_code(&out, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["name"], name.as_str());
    assert!(v["leader"].is_null(), "{v}");

    let locks = library_locks(&db).await;
    let first = locks.elect(&name, "host-a:1").unwrap();
    let leading = first.campaign().await.unwrap();
    let out = output(db.dblock().args(["leader", &name])).await;
    assert_code(&out, 0);
    let text = stdout(&out);
    assert!(text.contains(&format!("{name}: led by host-a:1")), "{text}");
    assert!(
        text.contains(&format!("term:     {}", leading.term())),
        "{text}"
    );
    let out = output(db.dblock().args(["leader", &name, "--json"])).await;
    assert_code(&out, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["leader"]["identity"], "host-a:1");
    assert_eq!(v["leader"]["term"], leading.term());

    let mut watch = db.dblock();
    watch
        .args(["leader", &name, "--json", "--watch", "--every", "100ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut watcher = watch.spawn().expect("start dblock leader --watch");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        watcher.stdout.take().unwrap(),
    ));
    let mut next = async || -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("no line from --watch")
            .expect("read")
            .expect("--watch ended");
        serde_json::from_str(&line).expect("a JSON line")
    };
    let v = next().await;
    assert_eq!(v["leader"]["term"], leading.term(), "{v}");
    let term = leading.term();
    leading.resign().await.unwrap();
    let v = next().await;
    assert!(v["leader"].is_null(), "{v}");
    let second = locks.elect(&name, "host-b:2").unwrap();
    let leading = second.campaign().await.unwrap();
    assert!(leading.term() > term);
    let v = next().await;
    assert_eq!(v["leader"]["identity"], "host-b:2", "{v}");
    assert_eq!(v["leader"]["term"], leading.term(), "{v}");
    leading.resign().await.unwrap();
    assert!(next().await["leader"].is_null());
    signal(&watcher, Signal::SIGTERM);
    assert_killed_by(&finish(watcher).await, Signal::SIGTERM);

    // --every belongs to --watch.
    let out = output(db.dblock().args(["leader", &name, "--every", "1s"])).await;
    assert_code(&out, 64);
}
