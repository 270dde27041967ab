//! The `dblock` binary, run as separate processes.
//!
//! Scenarios that involve a lock run once per backend through
//! [`per_backend!`]; checks of the command line itself (usage, help,
//! redaction) run once.
#![cfg(feature = "cli")]

mod common;

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

fn signal(child: &Child, sig: Signal) {
    let pid = child.id().expect("still running") as i32;
    kill(Pid::from_raw(pid), sig).expect("signal dblock");
}

/// Generates one test per backend for each scenario.
macro_rules! per_backend {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;

            #[tokio::test]
            async fn postgres_advisory() {
                super::$scenario(Db::new(Backend::PgAdvisory).await).await
            }

            #[tokio::test]
            async fn postgres_lease() {
                super::$scenario(Db::new(Backend::PgLease).await).await
            }

            #[tokio::test]
            async fn mysql_lease() {
                super::$scenario(Db::new(Backend::MysqlLease).await).await
            }

            #[tokio::test]
            async fn sqlite_lease() {
                super::$scenario(Db::new(Backend::SqliteLease).await).await
            }

            #[tokio::test]
            async fn redis_lease() {
                super::$scenario(Db::new(Backend::RedisLease).await).await
            }
        }
    )*};
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

    let out = output(&mut db.run(&name, &[], "exit 0")).await;
    assert_code(&out, 0);
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
    assert_code(&finish(holder).await, 128 + 15);
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
    assert_code(&out, 128 + 2);
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
    assert_code(&finish(holder).await, 128 + 2);
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
    assert_code(&finish(holder).await, 128 + 15);

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
    assert_code(&finish(holder).await, 128 + 15);
}

/// A command that ignores SIGTERM gets SIGKILL after --kill-after.
#[tokio::test]
async fn kill_after_escalates_to_sigkill() {
    let db = Db::new(Backend::PgAdvisory).await;
    let name = common::unique("stubborn");
    let holder = db
        .hold(
            &name,
            &["--kill-after", "1s"],
            r#"trap '' TERM; echo > "$READY"; while :; do sleep 0.1; done"#,
        )
        .await;
    let started = Instant::now();
    assert_code(
        &output(db.dblock().args(["release", &name, "--force"])).await,
        0,
    );
    let out = finish(holder).await;
    assert_code(&out, 76);
    assert!(stderr(&out).contains("SIGKILL"), "{}", stderr(&out));
    assert!(started.elapsed() >= Duration::from_secs(1));
}

/// Without a URL, dblock keeps its locks in `dblock.db` in the current
/// directory, created with its schema on first use.
#[tokio::test]
async fn default_database_is_sqlite_in_current_directory() {
    let dir = scratch_dir();
    let out = output(dblock_in(&dir).args(["run", "job", "--", "true"])).await;
    assert_code(&out, 0);
    assert!(dir.join("dblock.db").exists());
    let out = output(dblock_in(&dir).args(["status", "job"])).await;
    assert_code(&out, 1);
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
    ];
    for args in cases {
        let out = output(dblock_in(&dir).args(*args)).await;
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?} says why");
    }
}

/// Bad names and durations exit 65, before any connection is tried.
#[tokio::test]
async fn invalid_names_and_durations_exit_65() {
    let dir = scratch_dir();
    let long = "n".repeat(256);
    let cases: &[&[&str]] = &[
        &["run", "", "--", "true"],
        &["run", &long, "--", "true"],
        &["run", "x", "--ttl", "banana", "--", "true"],
        &["run", "x", "--ttl", "1ms", "--", "true"],
        &["run", "x", "--wait", "5 parsecs", "--", "true"],
        &["run", "x", "--wait", "1000years", "--", "true"],
        &["run", "x", "--kill-after", "10", "--", "true"],
        &["status", ""],
        &["release", &long, "--force"],
        &["--connect-timeout", "soon", "list"],
    ];
    for args in cases {
        let mut cmd = dblock_in(&dir);
        cmd.args(["--url", "postgres://u@127.0.0.1:1/db"])
            .args(*args);
        let out = output(&mut cmd).await;
        assert_eq!(code(&out), 65, "{args:?}: {}", stderr(&out));
    }
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
        "dblock.db",
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
        "--wait",
        "--no-wait",
        "--shared",
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
        "65",
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
