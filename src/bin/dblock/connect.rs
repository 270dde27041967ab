//! From a URL to a [`Locks`]: which backend, connecting, and the schema.

use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use dblock::postgres::{Advisory, AdvisoryOptions};
use dblock::{Backend, Locks};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{MySqlPool, PgPool};

use crate::args::BackendKind;
use crate::exit::{CliResult, Failure};
use crate::lease;
use crate::redact::scrub;

/// The SQLite file used when no URL is given: `dblock/dblock.db` in the
/// user's state directory (`$XDG_STATE_HOME`, else `~/.local/state`). A
/// fixed place, whatever the current directory, so that every `dblock run`
/// of the user on this machine sees the same locks. `None` when the user
/// has no home directory.
pub fn default_sqlite_file() -> Option<PathBuf> {
    dirs::state_dir().map(|dir| dir.join("dblock").join("dblock.db"))
}

/// How the default file is named in messages and help.
pub const DEFAULT_SQLITE_SHOWN: &str = "~/.local/state/dblock/dblock.db";

/// How often an advisory guard checks its session: a lock broken by an
/// operator is noticed (and the command stopped) within about this long.
const ADVISORY_HEARTBEAT: Duration = Duration::from_secs(1);

/// The most connections one dblock process opens.
const MAX_CONNECTIONS: u32 = 4;

/// Which database and mechanism hold the locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// PostgreSQL advisory locks.
    PgAdvisory,
    /// The PostgreSQL lease table.
    PgLease,
    /// The MySQL/MariaDB lease table.
    MysqlLease,
    /// The SQLite lease table.
    SqliteLease,
    /// Redis keys.
    RedisLease,
}

/// A resolved `--url`/`--backend` pair; nothing is connected yet.
#[derive(Debug, Clone)]
pub struct Target {
    /// The backend.
    pub kind: Kind,
    /// The URL as given (may hold a password: never print it).
    url: Option<String>,
    /// The URL for messages, password masked.
    pub shown: String,
}

impl Target {
    /// Whether this is the default SQLite file (no URL given).
    pub fn is_default(&self) -> bool {
        self.url.is_none()
    }
}

impl Kind {
    /// The backend, as `status` and `list` name it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::PgAdvisory => "postgres-advisory",
            Kind::PgLease => "postgres-lease",
            Kind::MysqlLease => "mysql-lease",
            Kind::SqliteLease => "sqlite-lease",
            Kind::RedisLease => "redis-lease",
        }
    }
}

/// Works out the backend from the URL's scheme and `--backend`, without
/// touching the database. Usage errors exit 64.
pub fn resolve(url: Option<&str>, backend: Option<BackendKind>) -> CliResult<Target> {
    let url = url.filter(|u| !u.trim().is_empty());
    let Some(url) = url else {
        if backend == Some(BackendKind::Advisory) {
            return Err(Failure::usage(format!(
                "--backend advisory needs PostgreSQL: give a postgres:// URL with --url or \
                 DBLOCK_URL (without one, dblock uses a lease table in the SQLite file \
                 {DEFAULT_SQLITE_SHOWN})"
            )));
        }
        let shown = match default_sqlite_file() {
            Some(path) => format!("sqlite:{} (the default)", path.display()),
            None => format!("sqlite:{DEFAULT_SQLITE_SHOWN} (the default)"),
        };
        return Ok(Target {
            kind: Kind::SqliteLease,
            url: None,
            shown,
        });
    };
    let shown = scrub(url);
    let lower = url.to_ascii_lowercase();
    let kind = if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        match backend {
            Some(BackendKind::Lease) => Kind::PgLease,
            _ => Kind::PgAdvisory,
        }
    } else {
        let kind = if lower.starts_with("mysql://") || lower.starts_with("mariadb://") {
            Kind::MysqlLease
        } else if lower.starts_with("sqlite:") {
            Kind::SqliteLease
        } else if lower.starts_with("redis://") {
            Kind::RedisLease
        } else {
            let scheme = shown.split(':').next().unwrap_or_default();
            return Err(Failure::usage(format!(
                "unsupported database URL scheme {scheme:?}: use postgres://, postgresql://, \
                 mysql://, mariadb://, sqlite: or redis://"
            )));
        };
        if backend == Some(BackendKind::Advisory) {
            return Err(Failure::usage(format!(
                "--backend advisory needs PostgreSQL; {shown} only offers lease locks \
                 (drop --backend, or use --backend lease)"
            )));
        }
        kind
    };
    Ok(Target {
        kind,
        url: Some(url.to_owned()),
        shown,
    })
}

/// An open connection pool on the target's database.
#[derive(Debug)]
pub enum Db {
    /// PostgreSQL.
    Pg(PgPool),
    /// MySQL or MariaDB.
    Mysql(MySqlPool),
    /// SQLite: the lease backend, opened (with its schema) on its file.
    Sqlite(Arc<dyn Backend>),
    /// Redis: the lease backend, connected (it needs no schema).
    Redis(Arc<dyn Backend>),
}

/// A target with its database connected.
#[derive(Debug)]
pub struct Session {
    /// What was connected to.
    pub target: Target,
    db: Db,
}

/// Opens a pool on the target's database and checks that it answers.
/// `app` names the connection in PostgreSQL's `pg_stat_activity` unless the
/// URL sets `application_name`. Fails with 64 for a malformed URL, 69 when
/// the database cannot be reached within `timeout`.
pub async fn open(target: Target, app: &str, timeout: Duration) -> CliResult<Session> {
    let shown = target.shown.clone();
    let unreachable = |e: sqlx::Error| {
        let mut f = Failure::from(dblock::Error::Database(e));
        if f.code != crate::exit::USAGE {
            f.code = crate::exit::UNAVAILABLE;
        }
        f.context(format_args!("cannot connect to {shown}"))
    };
    let bad_url = |e: sqlx::Error| Failure::usage(format!("invalid database URL {shown}: {e}"));
    let db = match target.kind {
        Kind::PgAdvisory | Kind::PgLease => {
            let url = target.url.as_deref().unwrap_or_default();
            let mut options = PgConnectOptions::from_str(url).map_err(bad_url)?;
            if options.get_application_name().is_none() {
                options = options.application_name(&truncate(app, 63));
            }
            let pool = PgPoolOptions::new()
                .max_connections(MAX_CONNECTIONS)
                .acquire_timeout(timeout)
                .connect_with(options)
                .await
                .map_err(unreachable)?;
            Db::Pg(pool)
        }
        Kind::MysqlLease => {
            let url = target.url.as_deref().unwrap_or_default();
            let options = MySqlConnectOptions::from_str(url).map_err(bad_url)?;
            let pool = MySqlPoolOptions::new()
                .max_connections(MAX_CONNECTIONS)
                .acquire_timeout(timeout)
                .connect_with(options)
                .await
                .map_err(unreachable)?;
            Db::Mysql(pool)
        }
        Kind::SqliteLease => {
            // `sqlite::Lease::open` creates the file and its schema, puts it
            // in WAL mode and sets a busy timeout, so that many dblock
            // processes can share it.
            let path = match target.url.as_deref() {
                Some(url) => sqlite_path(url).ok_or_else(|| {
                    Failure::usage(format!(
                        "{shown} is not a database file: dblock needs a file that other \
                         processes can open too (sqlite:PATH)"
                    ))
                })?,
                None => {
                    let path = default_sqlite_file().ok_or_else(|| {
                        Failure::usage(
                            "no home directory for the default SQLite file: give a database \
                             URL with --url or DBLOCK_URL",
                        )
                    })?;
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| {
                            Failure::unavailable(format!("cannot create {}: {e}", dir.display()))
                        })?;
                    }
                    path
                }
            };
            Db::Sqlite(lease::sqlite_open(&path).await.map_err(|f| {
                if f.code == crate::exit::USAGE {
                    f
                } else {
                    f.context(format_args!("cannot open {shown}"))
                }
            })?)
        }
        Kind::RedisLease => {
            let url = target.url.as_deref().unwrap_or_default();
            let opened = tokio::time::timeout(timeout, lease::redis_open(url)).await;
            Db::Redis(match opened {
                Ok(Ok(backend)) => backend,
                Ok(Err(f)) if f.code == crate::exit::USAGE => {
                    return Err(Failure::usage(format!("invalid Redis URL {shown}")))
                }
                Ok(Err(f)) => return Err(f.context(format_args!("cannot connect to {shown}"))),
                Err(_) => {
                    return Err(Failure::unavailable(format!(
                        "cannot connect to {shown}: no answer within {timeout:?}"
                    )))
                }
            })
        }
    };
    Ok(Session { target, db })
}

impl Session {
    /// Creates or updates dblock's schema.
    pub async fn migrate(&self) -> CliResult<()> {
        let r = match &self.db {
            Db::Pg(pool) => dblock::postgres::migrate(pool).await.map_err(Failure::from),
            Db::Mysql(pool) => lease::mysql_migrate(pool).await,
            // Opening the file created the schema; Redis needs none.
            Db::Sqlite(_) | Db::Redis(_) => Ok(()),
        };
        r.map_err(|f| {
            f.context(format_args!(
                "creating the dblock schema in {}",
                self.target.shown
            ))
        })
    }

    /// The lock facade on this database.
    pub fn locks(&self) -> CliResult<Locks> {
        self.locks_of(self.target.kind)
    }

    /// Every lock mechanism on this database, the chosen one first, each
    /// with its name: on PostgreSQL both advisory locks and the lease
    /// table, which never exclude each other; elsewhere the one there is.
    pub fn all_locks(&self) -> CliResult<Vec<(&'static str, Locks)>> {
        let kinds: &[Kind] = match self.target.kind {
            Kind::PgAdvisory => &[Kind::PgAdvisory, Kind::PgLease],
            Kind::PgLease => &[Kind::PgLease, Kind::PgAdvisory],
            Kind::MysqlLease => &[Kind::MysqlLease],
            Kind::SqliteLease => &[Kind::SqliteLease],
            Kind::RedisLease => &[Kind::RedisLease],
        };
        kinds
            .iter()
            .map(|&kind| Ok((kind.name(), self.locks_of(kind)?)))
            .collect()
    }

    fn locks_of(&self, kind: Kind) -> CliResult<Locks> {
        let backend: Arc<dyn Backend> = match (&self.db, kind) {
            (Db::Pg(pool), Kind::PgAdvisory) => {
                let options = AdvisoryOptions::default().heartbeat(ADVISORY_HEARTBEAT);
                Arc::new(Advisory::new(pool.clone()).with_options(options)?)
            }
            (Db::Pg(pool), _) => lease::postgres(pool.clone())?,
            (Db::Mysql(pool), _) => lease::mysql(pool.clone())?,
            (Db::Sqlite(backend), _) | (Db::Redis(backend), _) => backend.clone(),
        };
        Ok(Locks::from_arc(backend))
    }

    /// Runs `op`; if it finds dblock's schema missing, creates the schema and
    /// runs `op` once more. This is "migrate on first use" for commands that
    /// write.
    pub async fn with_schema<T, F, Fut>(&self, mut op: F) -> CliResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = dblock::Result<T>>,
    {
        match op().await {
            Err(dblock::Error::SchemaMissing { .. }) => {
                self.migrate().await?;
                op().await.map_err(Failure::from)
            }
            r => r.map_err(Failure::from),
        }
    }
}

/// The file of a `sqlite:` URL (`sqlite:PATH`, `sqlite://PATH`, with any
/// `?options` dropped); `None` for an in-memory or empty one, which other
/// processes could not share.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = &url["sqlite:".len()..];
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_pick_backends() {
        let k = |url: Option<&str>, b| resolve(url, b).map(|t| t.kind).map_err(|f| f.code);
        assert_eq!(k(None, None), Ok(Kind::SqliteLease));
        assert_eq!(k(Some(""), None), Ok(Kind::SqliteLease));
        assert_eq!(k(None, Some(BackendKind::Advisory)), Err(64));
        assert_eq!(k(Some("postgres://h/db"), None), Ok(Kind::PgAdvisory));
        assert_eq!(k(Some("POSTGRESQL://h/db"), None), Ok(Kind::PgAdvisory));
        assert_eq!(
            k(Some("postgres://h/db"), Some(BackendKind::Lease)),
            Ok(Kind::PgLease)
        );
        assert_eq!(k(Some("mysql://h/db"), None), Ok(Kind::MysqlLease));
        assert_eq!(k(Some("mariadb://h/db"), None), Ok(Kind::MysqlLease));
        assert_eq!(
            k(Some("mariadb://h/db"), Some(BackendKind::Advisory)),
            Err(64)
        );
        assert_eq!(k(Some("sqlite:x.db"), None), Ok(Kind::SqliteLease));
        assert_eq!(
            k(Some("sqlite::memory:"), Some(BackendKind::Lease)),
            Ok(Kind::SqliteLease)
        );
        assert_eq!(k(Some("sqlite:x.db"), Some(BackendKind::Advisory)), Err(64));
        assert_eq!(k(Some("redis://h"), None), Ok(Kind::RedisLease));
        assert_eq!(k(Some("REDIS://h:6379/0"), None), Ok(Kind::RedisLease));
        assert_eq!(k(Some("redis://h"), Some(BackendKind::Advisory)), Err(64));
        assert_eq!(k(Some("memcached://h"), None), Err(64));
    }

    #[test]
    fn unsupported_scheme_message_hides_password() {
        let f = resolve(Some("memcached://u:hunter22@h/0"), None).unwrap_err();
        assert!(!f.message.contains("hunter22"), "{}", f.message);
    }

    #[test]
    fn sqlite_paths() {
        let p = |u| sqlite_path(u).map(|p| p.display().to_string());
        assert_eq!(p("sqlite:locks.db").as_deref(), Some("locks.db"));
        assert_eq!(p("sqlite://locks.db").as_deref(), Some("locks.db"));
        assert_eq!(
            p("sqlite:///var/lib/x.db").as_deref(),
            Some("/var/lib/x.db")
        );
        assert_eq!(
            p("sqlite:/var/lib/x.db?mode=rwc").as_deref(),
            Some("/var/lib/x.db")
        );
        assert_eq!(p("sqlite::memory:"), None);
        assert_eq!(p("sqlite:"), None);
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("abc", 2), "ab");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
