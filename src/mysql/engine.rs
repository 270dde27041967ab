//! The engine self-test: what the server behind a MySQL pool is, checked
//! once at a backend's first use, and what dblock refuses on it.
//!
//! Detection reads three values and nothing else, so that a unit test can
//! feed it every server string it matches: `VERSION()`, and the global and
//! session values of `wsrep_on` (absent on MySQL without a wsrep patch).

use sqlx::{MySqlPool, Row};

use super::{map_err, Conn};
use crate::{Error, Result};

/// Which server family speaks the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Flavor {
    /// MySQL (including Percona Server and MySQL Group Replication members).
    MySql,
    /// MariaDB.
    MariaDb,
    /// TiDB (PingCAP), which answers `VERSION()` with `...-TiDB-v...`.
    TiDb,
}

/// What dblock found out about a MySQL-protocol server; see
/// [`Lease::engine`](super::Lease::engine) and [`engine`](super::engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    flavor: Flavor,
    version: String,
    galera: bool,
    session_replicated: bool,
}

impl Engine {
    /// Classifies a server from `VERSION()` and the global and session
    /// values of `wsrep_on` (`None` where the server has no such variable).
    /// A node of a Galera cluster is one whose global `wsrep_on` is on.
    pub fn from_server(
        version: &str,
        global_wsrep_on: Option<&str>,
        session_wsrep_on: Option<&str>,
    ) -> Engine {
        let on = |v: Option<&str>| {
            v.is_some_and(|v| matches!(v.trim().to_ascii_uppercase().as_str(), "ON" | "1" | "TRUE"))
        };
        let flavor = if version.contains("TiDB") {
            Flavor::TiDb
        } else if version.contains("MariaDB") {
            Flavor::MariaDb
        } else {
            Flavor::MySql
        };
        let galera = on(global_wsrep_on);
        Engine {
            flavor,
            version: version.to_owned(),
            galera,
            // Without a session value the session follows the global one.
            session_replicated: !galera || session_wsrep_on.is_none() || on(session_wsrep_on),
        }
    }

    /// The server family.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// `VERSION()` as the server reported it.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether the server is a node of a Galera cluster (`wsrep_on` is on):
    /// MariaDB Galera Cluster, Percona XtraDB Cluster, MySQL-wsrep.
    pub fn is_galera(&self) -> bool {
        self.galera
    }

    /// Whether dblock can keep leases on this server, or
    /// [`Error::Unsupported`] saying why not. Refused: a Galera node whose
    /// session has `wsrep_on = OFF`, where lease rows would be written on
    /// that node alone and another node could grant the same name.
    pub fn check_leases(&self) -> Result<()> {
        if !self.session_replicated {
            return Err(unsupported(
                "this session has wsrep_on=OFF on a Galera node, so lease rows would not \
                 replicate and another node could grant the same name; remove `SET wsrep_on=OFF` \
                 from the pool's connection setup",
            ));
        }
        Ok(())
    }

    /// Whether the server's named locks (`GET_LOCK`) exclude across every
    /// client of the database, or [`Error::Unsupported`] saying why not.
    /// On Galera a `GET_LOCK` is held on the one node that granted it: a
    /// client of another node gets the same name at once. dblock's leases
    /// never rely on `GET_LOCK`; this is for anything that would.
    pub fn check_named_locks(&self) -> Result<()> {
        if self.galera {
            return Err(unsupported(
                "GET_LOCK on a Galera cluster is local to one node, so clients of another node \
                 are not excluded; use dblock::mysql::Lease, whose rows are certified cluster-wide",
            ));
        }
        Ok(())
    }

    /// Whether [`lock_in_transaction`](super::lock_in_transaction) can keep its promise
    /// here, or [`Error::Unsupported`] saying why not. Refused on Galera:
    /// the row lock it takes is local to one node, so a lease claim through
    /// another node is not excluded, and the cluster then aborts the
    /// transaction; MariaDB 10.11 may even report that abort to none of the
    /// transaction's later prepared statements, nor its `COMMIT` (seen
    /// here: 2-4 runs in 30), so the caller believes it committed under the
    /// lock while it was rolled back.
    pub fn check_lock_in_tx(&self) -> Result<()> {
        if self.galera {
            return Err(lock_in_tx_on_galera());
        }
        Ok(())
    }

    /// Whether a read that decides a claim, or that an operator looks at,
    /// should first wait for the node to apply every write set the cluster
    /// committed before it (`wsrep_sync_wait`). MariaDB Galera only: other
    /// wsrep servers have no `SET STATEMENT` to scope it to one statement.
    pub(crate) fn causal_reads(&self) -> bool {
        self.galera && self.flavor == Flavor::MariaDb
    }
}

pub(crate) fn lock_in_tx_on_galera() -> Error {
    unsupported(
        "lock_in_transaction on a Galera cluster: its row lock holds on one node only, so a lease \
         granted through another node is not excluded; use dblock::mysql::Lease (leases are \
         certified cluster-wide) and fence your writes with its token",
    )
}

/// Whether the server of `conn` is a Galera node (global `wsrep_on`); one
/// statement, harmless inside the caller's transaction.
pub(crate) async fn is_galera_node(conn: &mut sqlx::MySqlConnection) -> Result<bool, sqlx::Error> {
    let row = sqlx::raw_sql("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
        .fetch_optional(&mut *conn)
        .await?;
    let value = match row {
        Some(row) => Some(row.try_get::<String, _>(1)?),
        None => None,
    };
    Ok(Engine::from_server("", value.as_deref(), None).galera)
}

fn unsupported(what: &str) -> Error {
    Error::Unsupported {
        backend: "mysql-lease",
        what: what.to_owned(),
    }
}

/// Asks the server behind `pool` what it is (three short statements on one
/// connection).
///
/// # Cancel safety
/// Cancel safe: plain reads; a connection dropped mid-statement is closed,
/// not returned to the pool.
pub async fn engine(pool: &MySqlPool) -> Result<Engine> {
    let mut conn = Conn::acquire(pool).await.map_err(map_err)?;
    let outcome = async {
        let c = conn.begin_use();
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&mut *c)
            .await?;
        let mut wsrep = [None, None];
        for (k, scope) in [
            "SHOW GLOBAL VARIABLES LIKE 'wsrep_on'",
            "SHOW SESSION VARIABLES LIKE 'wsrep_on'",
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(row) = sqlx::raw_sql(scope).fetch_optional(&mut *c).await? {
                wsrep[k] = Some(row.try_get::<String, _>(1)?);
            }
        }
        Ok::<_, sqlx::Error>((version, wsrep))
    }
    .await;
    conn.settle(&outcome);
    let (version, [global, session]) = outcome.map_err(map_err)?;
    Ok(Engine::from_server(
        &version,
        global.as_deref(),
        session.as_deref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavors_from_version_strings() {
        let mysql = Engine::from_server("8.0.36", None, None);
        assert_eq!(mysql.flavor(), Flavor::MySql);
        assert!(!mysql.is_galera());
        assert!(mysql.check_leases().is_ok());
        assert!(mysql.check_named_locks().is_ok());
        assert!(mysql.check_lock_in_tx().is_ok());
        assert!(!mysql.causal_reads());

        let maria = Engine::from_server("10.11.19-MariaDB-0+deb12u1", Some("OFF"), Some("OFF"));
        assert_eq!(maria.flavor(), Flavor::MariaDb);
        assert!(!maria.is_galera(), "wsrep_on=OFF is a plain MariaDB server");
        assert!(maria.check_leases().is_ok());
        assert!(maria.check_named_locks().is_ok());

        let tidb = Engine::from_server("8.0.11-TiDB-v7.5.1", None, None);
        assert_eq!(tidb.flavor(), Flavor::TiDb);
        assert_eq!(tidb.version(), "8.0.11-TiDB-v7.5.1");
    }

    #[test]
    fn galera_nodes_detected_and_named_locks_refused() {
        for (version, flavor, causal) in [
            ("10.11.19-MariaDB-0+deb12u1", Flavor::MariaDb, true),
            ("11.4.3-MariaDB-log", Flavor::MariaDb, true),
            // Percona XtraDB Cluster reports a MySQL version.
            ("8.0.36-28.1", Flavor::MySql, false),
        ] {
            for on in ["ON", "on", "1"] {
                let e = Engine::from_server(version, Some(on), Some(on));
                assert!(e.is_galera(), "{version} {on}");
                assert_eq!(e.flavor(), flavor);
                assert_eq!(e.causal_reads(), causal);
                assert!(e.check_leases().is_ok());
                let err = e.check_lock_in_tx().unwrap_err();
                assert!(
                    matches!(&err, Error::Unsupported { what, .. } if what.contains("lock_in_transaction")),
                    "{err:?}"
                );
                let err = e.check_named_locks().unwrap_err();
                assert!(
                    matches!(&err, Error::Unsupported { what, .. } if what.contains("GET_LOCK") && what.contains("Galera")),
                    "{err:?}"
                );
            }
        }
    }

    #[test]
    fn galera_session_without_replication_refused() {
        let e = Engine::from_server("10.11.19-MariaDB", Some("ON"), Some("OFF"));
        assert!(e.is_galera());
        let err = e.check_leases().unwrap_err();
        assert!(
            matches!(&err, Error::Unsupported { what, .. } if what.contains("wsrep_on=OFF")),
            "{err:?}"
        );
        // A session value the server does not report follows the global one.
        assert!(Engine::from_server("10.11.19-MariaDB", Some("ON"), None)
            .check_leases()
            .is_ok());
        // wsrep_on=OFF in a session of a server that is not a Galera node is
        // just a plain server.
        assert!(
            Engine::from_server("10.11.19-MariaDB", Some("OFF"), Some("OFF"))
                .check_leases()
                .is_ok()
        );
    }
}
