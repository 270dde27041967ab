//! The backends under test, the registers in their databases, and the
//! database-side views the checkers and the fault injector need.

use std::str::FromStr;
use std::time::Duration;

use dblock::{LeaseOptions, Locks};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

/// A backend of the torture run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Advisory,
    PgLease,
    MyLease,
    LiteLease,
    /// `mysql::Lease` on the three-node Galera cluster
    /// (`DBLOCK_TEST_GALERA_URLS`), workers spread over the nodes.
    Galera,
    RedisLease,
}

pub const ALL: [Kind; 6] = [
    Kind::Advisory,
    Kind::PgLease,
    Kind::MyLease,
    Kind::LiteLease,
    Kind::Galera,
    Kind::RedisLease,
];

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Advisory => "postgres-advisory",
            Kind::PgLease => "postgres-lease",
            Kind::MyLease => "mysql-lease",
            Kind::LiteLease => "sqlite-lease",
            Kind::Galera => "mysql-galera",
            Kind::RedisLease => "redis-lease",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        ALL.into_iter().find(|k| k.label() == s)
    }

    /// Whether it talks to a server over TCP (through the proxy).
    pub fn networked(self) -> bool {
        self != Kind::LiteLease
    }

    pub fn lease(self) -> bool {
        self != Kind::Advisory
    }

    /// Whether the backend is available in this build. The MySQL lease
    /// backend is wired once `dblock::mysql` exists.
    pub fn available(self) -> bool {
        self != Kind::MyLease || MYSQL_BACKEND
    }
}

/// Flipped to true together with the `Kind::MyLease` arm of [`locks`].
pub const MYSQL_BACKEND: bool = true;

/// A pool on one of the three databases; for Redis, a connection to it and
/// the PostgreSQL database that holds the registers (the resource the locks
/// protect lives apart from the lock service, and survives its restarts).
#[derive(Debug, Clone)]
pub enum Db {
    Pg(PgPool),
    My(MySqlPool),
    Lite(SqlitePool),
    Redis {
        conn: redis::aio::ConnectionManager,
        registers: PgPool,
    },
}

/// The registers of a Redis run are in PostgreSQL: this variable names it
/// (`scripts/test` sets it; workers inherit it).
fn registers_pg_url() -> String {
    std::env::var("DBLOCK_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "the Redis torture run keeps its registers in PostgreSQL: set DBLOCK_TEST_POSTGRES_URL"
        )
    })
}

/// A client for a Redis URL.
fn redis_client(url: &str) -> redis::Client {
    redis::Client::open(url).expect("redis url")
}

/// How a worker (or the controller) reaches its database.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub kind: Kind,
    /// A URL for the servers, a file path for SQLite.
    pub url: String,
    /// PostgreSQL `application_name` of the sessions (for the checks).
    pub app: String,
}

/// Advisory heartbeat in the torture runs: a terminated session is noticed
/// within this long.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

impl Endpoint {
    /// A pool of `size`, made lazily (a worker may start while the server
    /// restarts). Acquiring a connection gives up after 5 s.
    pub async fn pool(&self, size: u32) -> Db {
        match self.kind {
            Kind::Advisory | Kind::PgLease => {
                let opts = PgConnectOptions::from_str(&self.url)
                    .expect("postgres url")
                    .application_name(&self.app);
                Db::Pg(
                    PgPoolOptions::new()
                        .max_connections(size)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_lazy_with(opts),
                )
            }
            Kind::MyLease | Kind::Galera => {
                let opts = MySqlConnectOptions::from_str(&self.url).expect("mysql url");
                Db::My(
                    MySqlPoolOptions::new()
                        .max_connections(size)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_lazy_with(opts),
                )
            }
            Kind::LiteLease => {
                let opts = SqliteConnectOptions::new()
                    .filename(&self.url)
                    .busy_timeout(Duration::from_secs(5));
                Db::Lite(
                    SqlitePoolOptions::new()
                        .max_connections(size)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_lazy_with(opts),
                )
            }
            Kind::RedisLease => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(Duration::from_secs(5)))
                    .set_connection_timeout(Some(Duration::from_secs(5)));
                let conn = redis::aio::ConnectionManager::new_lazy_with_config(
                    redis_client(&self.url),
                    config,
                )
                .expect("redis connection");
                let opts = PgConnectOptions::from_str(&registers_pg_url())
                    .expect("postgres url")
                    .application_name(&self.app);
                Db::Redis {
                    conn,
                    registers: PgPoolOptions::new()
                        .max_connections(size)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_lazy_with(opts),
                }
            }
        }
    }

    /// A `Locks` on this endpoint, as the harness's workers use it.
    pub async fn locks(&self) -> Locks {
        match self.kind {
            Kind::Advisory => {
                let Db::Pg(pool) = self.pool(3).await else {
                    unreachable!()
                };
                let backend = dblock::postgres::Advisory::new(pool)
                    .with_options(dblock::postgres::AdvisoryOptions::default().heartbeat(HEARTBEAT))
                    .expect("options");
                Locks::new(backend)
            }
            Kind::PgLease => {
                let Db::Pg(pool) = self.pool(3).await else {
                    unreachable!()
                };
                Locks::new(
                    dblock::postgres::Lease::new(pool)
                        .with_options(LeaseOptions::default())
                        .expect("options"),
                )
            }
            Kind::MyLease | Kind::Galera => {
                let Db::My(pool) = self.pool(3).await else {
                    unreachable!()
                };
                Locks::new(
                    dblock::mysql::Lease::new(pool)
                        .with_options(LeaseOptions::default())
                        .expect("options"),
                )
            }
            Kind::LiteLease => Locks::new(
                dblock::sqlite::Lease::open(&self.url)
                    .await
                    .expect("open the SQLite file"),
            ),
            // Connects lazily: a worker may start while the server restarts.
            Kind::RedisLease => Locks::new(
                dblock::redis::Lease::new(redis_client(&self.url))
                    .with_options(LeaseOptions::default())
                    .expect("options"),
            ),
        }
    }
}

/// Which of a holder's fenced writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Write {
    /// The first write of a critical section: `WHERE fence < token`.
    Entry,
    /// The last: `WHERE fence = token` (this holder is still the newest).
    Exit,
}

impl Write {
    pub fn as_str(self) -> &'static str {
        match self {
            Write::Entry => "entry",
            Write::Exit => "exit",
        }
    }
    pub fn parse(s: &str) -> Option<Write> {
        match s {
            "entry" => Some(Write::Entry),
            "exit" => Some(Write::Exit),
            _ => None,
        }
    }
}

/// The fence of the semaphore mode, where up to `n` holders write at
/// once: it keeps the `n` highest entry tokens it accepted (its window).
/// An entry is admitted if the window has room or its token is above the
/// window's lowest (it then joins, and the lowest leaves if the window
/// overflows); any later write only while its token is in the window. So
/// at most `n` holders can have writes admitted at any time, and a holder
/// paused past its lease is refused once `n` newer holders have entered.
/// A long holder may be refused too (`n` newer ones entered, not all
/// beside it): the price of fencing without knowing the permits' slots;
/// it then ends its section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    pub n: usize,
    /// Ascending.
    pub tokens: Vec<u64>,
}

impl Window {
    pub fn new(n: u32) -> Window {
        Window {
            n: n as usize,
            tokens: Vec::new(),
        }
    }

    /// The stored form: the tokens, comma-separated.
    pub fn parse(n: u32, stored: &str) -> Window {
        let mut w = Window::new(n);
        w.tokens = stored
            .split(',')
            .filter(|t| !t.is_empty())
            .map(|t| t.parse().expect("a window token"))
            .collect();
        w.tokens.sort_unstable();
        w
    }

    pub fn stored(&self) -> String {
        self.tokens
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn admits(&self, token: u64, write: Write) -> bool {
        match write {
            Write::Entry => {
                !self.tokens.contains(&token)
                    && (self.tokens.len() < self.n
                        || self.tokens.first().is_some_and(|&t| token > t))
            }
            Write::Exit => self.tokens.contains(&token),
        }
    }

    /// Records an accepted write.
    pub fn accept(&mut self, token: u64, write: Write) {
        if write == Write::Entry && !self.tokens.contains(&token) {
            self.tokens.push(token);
            self.tokens.sort_unstable();
            while self.tokens.len() > self.n {
                self.tokens.remove(0);
            }
        }
    }
}

/// One fenced write the register accepted, in the order it accepted them.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub token: u64,
    pub write: Write,
    pub worker: String,
}

/// The registers of one name at the end of a run.
#[derive(Debug, Clone)]
pub struct Registers {
    pub value: i64,
    pub fence: i64,
    pub unguarded: i64,
    pub accepted: Vec<Accepted>,
}

impl Db {
    /// Creates dblock's tables where the backend has a migration
    /// (PostgreSQL, MySQL/MariaDB); SQLite and Redis need none here.
    pub async fn migrate(&self) {
        match self {
            Db::Pg(pool) => dblock::postgres::migrate(pool).await.expect("migrate"),
            Db::My(pool) => dblock::mysql::migrate(pool).await.expect("migrate"),
            Db::Lite(_) | Db::Redis { .. } => {}
        }
    }

    /// Creates the register tables (once per database) and the rows of
    /// `names` for this run.
    pub async fn setup_registers(&self, run: &str, names: &[String]) {
        let this = self.registers_db();
        let statements: &[&str] = match &this {
            Db::Pg(_) => &[
                "CREATE TABLE IF NOT EXISTS dblock_torture_fenced (
                    run text, name text, value bigint NOT NULL DEFAULT 0,
                    fence bigint NOT NULL DEFAULT 0, PRIMARY KEY (run, name))",
                "CREATE TABLE IF NOT EXISTS dblock_torture_accepted (
                    id bigserial PRIMARY KEY, run text NOT NULL, name text NOT NULL,
                    token bigint NOT NULL, kind text NOT NULL, worker text NOT NULL)",
                "CREATE TABLE IF NOT EXISTS dblock_torture_unguarded (
                    run text, name text, value bigint NOT NULL DEFAULT 0, PRIMARY KEY (run, name))",
                "CREATE TABLE IF NOT EXISTS dblock_torture_window (
                    run text, name text, tokens text NOT NULL DEFAULT '', PRIMARY KEY (run, name))",
            ],
            Db::My(_) => &[
                "CREATE TABLE IF NOT EXISTS dblock_torture_fenced (
                    run VARCHAR(64), name VARCHAR(255), value BIGINT NOT NULL DEFAULT 0,
                    fence BIGINT NOT NULL DEFAULT 0, last_kind VARCHAR(8), last_worker VARCHAR(32),
                    PRIMARY KEY (run, name)) ENGINE = InnoDB",
                "CREATE TABLE IF NOT EXISTS dblock_torture_accepted (
                    id BIGINT AUTO_INCREMENT PRIMARY KEY, run VARCHAR(64) NOT NULL,
                    name VARCHAR(255) NOT NULL, token BIGINT NOT NULL, kind VARCHAR(8) NOT NULL,
                    worker VARCHAR(32) NOT NULL, KEY (run, name)) ENGINE = InnoDB",
                "CREATE TABLE IF NOT EXISTS dblock_torture_unguarded (
                    run VARCHAR(64), name VARCHAR(255), value BIGINT NOT NULL DEFAULT 0,
                    PRIMARY KEY (run, name)) ENGINE = InnoDB",
                "CREATE TABLE IF NOT EXISTS dblock_torture_window (
                    run VARCHAR(64), name VARCHAR(255), tokens VARCHAR(4000) NOT NULL DEFAULT '',
                    PRIMARY KEY (run, name)) ENGINE = InnoDB",
                // The accepted write is recorded by the same statement.
                "CREATE TRIGGER IF NOT EXISTS dblock_torture_accept
                    AFTER UPDATE ON dblock_torture_fenced FOR EACH ROW
                    INSERT INTO dblock_torture_accepted (run, name, token, kind, worker)
                    VALUES (NEW.run, NEW.name, NEW.fence, NEW.last_kind, NEW.last_worker)",
            ],
            Db::Lite(_) => &[
                "CREATE TABLE IF NOT EXISTS dblock_torture_fenced (
                    run TEXT, name TEXT, value INTEGER NOT NULL DEFAULT 0,
                    fence INTEGER NOT NULL DEFAULT 0, last_kind TEXT, last_worker TEXT,
                    PRIMARY KEY (run, name))",
                "CREATE TABLE IF NOT EXISTS dblock_torture_accepted (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, name TEXT NOT NULL,
                    token INTEGER NOT NULL, kind TEXT NOT NULL, worker TEXT NOT NULL)",
                "CREATE TABLE IF NOT EXISTS dblock_torture_unguarded (
                    run TEXT, name TEXT, value INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run, name))",
                "CREATE TABLE IF NOT EXISTS dblock_torture_window (
                    run TEXT, name TEXT, tokens TEXT NOT NULL DEFAULT '', PRIMARY KEY (run, name))",
                "CREATE TRIGGER IF NOT EXISTS dblock_torture_accept
                    AFTER UPDATE ON dblock_torture_fenced FOR EACH ROW BEGIN
                    INSERT INTO dblock_torture_accepted (run, name, token, kind, worker)
                    VALUES (NEW.run, NEW.name, NEW.fence, NEW.last_kind, NEW.last_worker); END",
            ],
            Db::Redis { .. } => unreachable!(),
        };
        for s in statements {
            this.execute(s, &[]).await.expect("create register tables");
        }
        for name in names {
            for table in [
                "dblock_torture_fenced",
                "dblock_torture_unguarded",
                "dblock_torture_window",
            ] {
                let sql = format!(
                    "INSERT INTO {table} (run, name) VALUES ({}, {})",
                    this.p(1),
                    this.p(2)
                );
                this.execute(&sql, &[run, name])
                    .await
                    .expect("insert register row");
            }
        }
    }

    /// Where the registers are: the database itself, or for Redis its
    /// PostgreSQL register database.
    fn registers_db(&self) -> Db {
        match self {
            Db::Redis { registers, .. } => Db::Pg(registers.clone()),
            other => other.clone(),
        }
    }

    /// The placeholder for parameter `i`.
    fn p(&self, i: usize) -> String {
        match self {
            Db::Pg(_) => format!("${i}"),
            _ => "?".to_owned(),
        }
    }

    async fn execute(&self, sql: &str, args: &[&str]) -> sqlx::Result<u64> {
        macro_rules! run {
            ($pool:expr) => {{
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()));
                for a in args {
                    q = q.bind(a.to_string());
                }
                Ok(q.execute($pool).await?.rows_affected())
            }};
        }
        match self {
            Db::Pg(p) => run!(p),
            Db::My(p) => run!(p),
            Db::Lite(p) => run!(p),
            Db::Redis { .. } => Box::pin(self.registers_db().execute(sql, args)).await,
        }
    }

    /// A fenced read-modify-write: `value + 1` and the fence set to `token`,
    /// accepted only if the fence allows it (unless `fencing` is off, the
    /// negative control). Returns whether it was accepted.
    ///
    /// With a `window` of `n` (the semaphore mode), the fence is the name's
    /// [`Window`] instead, in one transaction that first locks the name's
    /// window row; an accepted write is recorded in `dblock_torture_accepted`
    /// by the same transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn fenced(
        &self,
        run: &str,
        name: &str,
        token: u64,
        write: Write,
        worker: &str,
        fencing: bool,
        window: Option<u32>,
    ) -> sqlx::Result<bool> {
        if let Db::Redis { .. } = self {
            let regs = self.registers_db();
            let write = regs.fenced(run, name, token, write, worker, fencing, window);
            return Box::pin(write).await;
        }
        if let Some(n) = window {
            let p = |i| self.p(i);
            // A write first, so that SQLite takes its write lock at once (a
            // read first would make two writers deadlock on the upgrade).
            let lock = format!(
                "UPDATE dblock_torture_window SET tokens = tokens WHERE run = {} AND name = {}",
                p(1),
                p(2)
            );
            let read = format!(
                "SELECT tokens FROM dblock_torture_window WHERE run = {} AND name = {}",
                p(1),
                p(2)
            );
            let store = format!(
                "UPDATE dblock_torture_window SET tokens = {} WHERE run = {} AND name = {}",
                p(1),
                p(2),
                p(3)
            );
            let accepted = format!(
                "INSERT INTO dblock_torture_accepted (run, name, token, kind, worker)
                 VALUES ({}, {}, {}, {}, {})",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5)
            );
            macro_rules! txn {
                ($pool:expr) => {{
                    let mut tx = $pool.begin().await?;
                    sqlx::query(sqlx::AssertSqlSafe(lock))
                        .bind(run)
                        .bind(name)
                        .execute(&mut *tx)
                        .await?;
                    let stored: String = sqlx::query_scalar(sqlx::AssertSqlSafe(read))
                        .bind(run)
                        .bind(name)
                        .fetch_one(&mut *tx)
                        .await?;
                    let mut window = Window::parse(n, &stored);
                    let ok = window.admits(token, write) || !fencing;
                    if ok {
                        window.accept(token, write);
                        sqlx::query(sqlx::AssertSqlSafe(store))
                            .bind(window.stored())
                            .bind(run)
                            .bind(name)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(sqlx::AssertSqlSafe(accepted))
                            .bind(run)
                            .bind(name)
                            .bind(token as i64)
                            .bind(write.as_str())
                            .bind(worker)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    Ok(ok)
                }};
            }
            return match self {
                Db::Pg(pool) => txn!(pool),
                Db::My(pool) => txn!(pool),
                Db::Lite(pool) => txn!(pool),
                Db::Redis { .. } => unreachable!("redirected to the registers"),
            };
        }
        let cond = match (fencing, write) {
            (false, _) => "TRUE",
            (true, Write::Entry) => "fence < {T}",
            (true, Write::Exit) => "fence = {T}",
        };
        let token = token as i64;
        match self {
            Db::Pg(pool) => {
                let sql = format!(
                    "WITH u AS (UPDATE dblock_torture_fenced SET value = value + 1, fence = $3
                                 WHERE run = $1 AND name = $2 AND {} RETURNING 1)
                     INSERT INTO dblock_torture_accepted (run, name, token, kind, worker)
                     SELECT $1, $2, $3, $4, $5 FROM u RETURNING id",
                    cond.replace("{T}", "$3")
                );
                let row: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(run)
                    .bind(name)
                    .bind(token)
                    .bind(write.as_str())
                    .bind(worker)
                    .fetch_optional(pool)
                    .await?;
                Ok(row.is_some())
            }
            Db::My(pool) => {
                let sql = format!(
                    "UPDATE dblock_torture_fenced SET value = value + 1, fence = ?,
                            last_kind = ?, last_worker = ?
                      WHERE run = ? AND name = ? AND {}",
                    cond.replace("{T}", "?")
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(token)
                    .bind(write.as_str())
                    .bind(worker)
                    .bind(run)
                    .bind(name);
                if fencing {
                    q = q.bind(token);
                }
                Ok(q.execute(pool).await?.rows_affected() == 1)
            }
            Db::Lite(pool) => {
                let sql = format!(
                    "UPDATE dblock_torture_fenced SET value = value + 1, fence = ?1,
                            last_kind = ?2, last_worker = ?3
                      WHERE run = ?4 AND name = ?5 AND {}",
                    cond.replace("{T}", "?1")
                );
                let r = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(token)
                    .bind(write.as_str())
                    .bind(worker)
                    .bind(run)
                    .bind(name)
                    .execute(pool)
                    .await?;
                Ok(r.rows_affected() == 1)
            }
            Db::Redis { .. } => unreachable!("redirected to the registers"),
        }
    }

    /// Reads the unguarded register.
    pub async fn uread(&self, run: &str, name: &str) -> sqlx::Result<i64> {
        if let Db::Redis { .. } = self {
            return Box::pin(self.registers_db().uread(run, name)).await;
        }
        let sql = format!(
            "SELECT value FROM dblock_torture_unguarded WHERE run = {} AND name = {}",
            self.p(1),
            self.p(2)
        );
        macro_rules! get {
            ($pool:expr) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(run)
                    .bind(name)
                    .fetch_one($pool)
                    .await
            };
        }
        match self {
            Db::Pg(p) => get!(p),
            Db::My(p) => get!(p),
            Db::Lite(p) => get!(p),
            Db::Redis { .. } => unreachable!("redirected to the registers"),
        }
    }

    /// Writes the unguarded register, whatever it holds now.
    pub async fn uwrite(&self, run: &str, name: &str, value: i64) -> sqlx::Result<()> {
        if let Db::Redis { .. } = self {
            return Box::pin(self.registers_db().uwrite(run, name, value)).await;
        }
        let sql = format!(
            "UPDATE dblock_torture_unguarded SET value = {} WHERE run = {} AND name = {}",
            self.p(1),
            self.p(2),
            self.p(3)
        );
        macro_rules! put {
            ($pool:expr) => {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(value)
                    .bind(run)
                    .bind(name)
                    .execute($pool)
                    .await
                    .map(|_| ())
            };
        }
        match self {
            Db::Pg(p) => put!(p),
            Db::My(p) => put!(p),
            Db::Lite(p) => put!(p),
            Db::Redis { .. } => unreachable!("redirected to the registers"),
        }
    }

    /// The registers of `name` and the fenced writes accepted, in order.
    pub async fn registers(&self, run: &str, name: &str) -> sqlx::Result<Registers> {
        if let Db::Redis { .. } = self {
            return Box::pin(self.registers_db().registers(run, name)).await;
        }
        let (p1, p2) = (self.p(1), self.p(2));
        let fenced = format!(
            "SELECT value, fence FROM dblock_torture_fenced WHERE run = {p1} AND name = {p2}"
        );
        let unguarded =
            format!("SELECT value FROM dblock_torture_unguarded WHERE run = {p1} AND name = {p2}");
        let accepted = format!(
            "SELECT token, kind, worker FROM dblock_torture_accepted
              WHERE run = {p1} AND name = {p2} ORDER BY id"
        );
        macro_rules! read {
            ($pool:expr) => {{
                let (value, fence): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(fenced))
                    .bind(run)
                    .bind(name)
                    .fetch_one($pool)
                    .await?;
                let unguarded: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(unguarded))
                    .bind(run)
                    .bind(name)
                    .fetch_one($pool)
                    .await?;
                let rows = sqlx::query(sqlx::AssertSqlSafe(accepted))
                    .bind(run)
                    .bind(name)
                    .fetch_all($pool)
                    .await?;
                let mut out = Vec::new();
                for r in rows {
                    let kind: String = r.try_get(1)?;
                    out.push(Accepted {
                        token: r.try_get::<i64, _>(0)? as u64,
                        write: Write::parse(&kind).expect("kind"),
                        worker: r.try_get(2)?,
                    });
                }
                Ok(Registers {
                    value,
                    fence,
                    unguarded,
                    accepted: out,
                })
            }};
        }
        match self {
            Db::Pg(p) => read!(p),
            Db::My(p) => read!(p),
            Db::Lite(p) => read!(p),
            Db::Redis { .. } => unreachable!("redirected to the registers"),
        }
    }

    /// Deletes this run's register rows.
    pub async fn cleanup(&self, run: &str) {
        for table in [
            "dblock_torture_fenced",
            "dblock_torture_unguarded",
            "dblock_torture_accepted",
            "dblock_torture_window",
        ] {
            let sql = format!("DELETE FROM {table} WHERE run = {}", self.p(1));
            let _ = self.execute(&sql, &[run]).await;
        }
    }

    /// Ends the database sessions whose client ports are `ports` (the
    /// upstream side of the proxy): `pg_terminate_backend` or `KILL
    /// CONNECTION`. Returns how many were ended.
    pub async fn terminate_ports(&self, ports: &[u16]) -> usize {
        if ports.is_empty() {
            return 0;
        }
        let ports: Vec<i32> = ports.iter().map(|&p| i32::from(p)).collect();
        match self {
            Db::Pg(pool) => sqlx::query_scalar::<_, bool>(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE client_addr = '127.0.0.1' AND client_port = ANY($1)",
            )
            .bind(&ports)
            .fetch_all(pool)
            .await
            .map(|v| v.into_iter().filter(|b| *b).count())
            .unwrap_or(0),
            Db::My(pool) => {
                let ids = mysql_sessions(pool, &ports).await;
                let mut n = 0;
                for id in ids {
                    let sql = format!("KILL CONNECTION {id}");
                    if sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(pool)
                        .await
                        .is_ok()
                    {
                        n += 1;
                    }
                }
                n
            }
            Db::Lite(_) => 0,
            // CLIENT KILL by the client address Redis sees.
            Db::Redis { conn, .. } => {
                let mut conn = conn.clone();
                let mut n = 0;
                for port in ports {
                    let killed: redis::RedisResult<i64> = redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("ADDR")
                        .arg(format!("127.0.0.1:{port}"))
                        .arg("SKIPME")
                        .arg("yes")
                        .query_async(&mut conn)
                        .await;
                    n += killed.unwrap_or(0) as usize;
                }
                n
            }
        }
    }

    /// Sessions of this run's workers left inside a transaction:
    /// `pg_stat_activity` 'idle in transaction' by application name, or
    /// `information_schema.INNODB_TRX` by client port. A leaked transaction
    /// stays; one that is merely running (a background sweep's `DELETE` in
    /// autocommit, a claim between its statements) is gone a moment later:
    /// so the least of a few looks over about a second and a half.
    pub async fn open_transactions(&self, app_prefix: &str, ports: &[u16]) -> i64 {
        let mut least = i64::MAX;
        for look in 0..5 {
            if look > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            least = least.min(self.open_transactions_now(app_prefix, ports).await);
            if least == 0 {
                break;
            }
        }
        least
    }

    async fn open_transactions_now(&self, app_prefix: &str, ports: &[u16]) -> i64 {
        match self {
            Db::Pg(pool) => sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name LIKE $1 || '%' AND state LIKE 'idle in transaction%'",
            )
            .bind(app_prefix)
            .fetch_one(pool)
            .await
            .expect("pg_stat_activity"),
            Db::My(pool) => {
                let ports: Vec<i32> = ports.iter().map(|&p| i32::from(p)).collect();
                let ids = mysql_sessions(pool, &ports).await;
                let trx: Vec<u64> = sqlx::query_scalar(
                    "SELECT CAST(trx_mysql_thread_id AS UNSIGNED) FROM information_schema.INNODB_TRX",
                )
                .fetch_all(pool)
                .await
                .expect("INNODB_TRX");
                trx.iter().filter(|t| ids.contains(t)).count() as i64
            }
            // dblock runs no MULTI on Redis: each step is one script.
            Db::Lite(_) | Db::Redis { .. } => 0,
        }
    }

    /// Advisory locks held on these keys, by any session (`pg_locks`).
    pub async fn advisory_held(&self, keys: &[i64]) -> i64 {
        let Db::Pg(pool) = self else { return 0 };
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1
                AND ((classid::bigint << 32) | objid::bigint) = ANY($1)",
        )
        .bind(keys)
        .fetch_one(pool)
        .await
        .expect("pg_locks")
    }
}

/// MySQL session ids whose client port is one of `ports`.
async fn mysql_sessions(pool: &MySqlPool, ports: &[i32]) -> Vec<u64> {
    let rows: Vec<(u64, String)> =
        sqlx::query_as("SELECT CAST(ID AS UNSIGNED), HOST FROM information_schema.PROCESSLIST")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    rows.into_iter()
        .filter(|(_, host)| {
            host.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<i32>().ok())
                .is_some_and(|p| ports.contains(&p))
        })
        .map(|(id, _)| id)
        .collect()
}

/// `.ttl(ttl)` on a lease backend; an advisory lock refuses a ttl.
pub fn lease_ttl(acquire: dblock::Acquire<'_>, kind: Kind, ttl: Duration) -> dblock::Acquire<'_> {
    if kind.lease() {
        acquire.ttl(ttl)
    } else {
        acquire
    }
}
