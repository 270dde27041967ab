//! The engine self-test: what dblock refuses to run on, told apart by the
//! server's `version()` string and by how a session behaves.
//!
//! Some engines speak PostgreSQL's protocol but not its locking semantics:
//! CockroachDB's advisory-lock functions are stubs that always succeed,
//! YugabyteDB has no advisory locks unless a flag is set (and then only in
//! recent versions) and no PostgreSQL WAL for the fencing tokens' timeline.
//! A transaction-mode pooler (PgBouncer `pool_mode=transaction`, Supavisor,
//! RDS Proxy) hands each transaction whichever server connection is free,
//! so a session-level lock would stay on a connection other clients use.
//! Each case is refused with [`Error::Unsupported`] naming the alternative.

use crate::Error;

/// Why the engine behind `version` cannot carry dblock's PostgreSQL
/// backends, or `None` when it is PostgreSQL (or an engine not known to be
/// unsafe).
pub(crate) fn refusal(version: &str) -> Option<&'static str> {
    if version.contains("CockroachDB") {
        Some(
            "CockroachDB is not supported: its pg_advisory_lock functions are stubs that \
             always succeed (two holders would both be granted), and it has no PostgreSQL WAL \
             timeline for failover-safe fencing tokens. Use a lock service outside CockroachDB",
        )
    } else if version.contains("-YB-") {
        Some(
            "YugabyteDB is not supported: its advisory locks are missing or off by default \
             (ysql_yb_enable_advisory_locks), and it has no PostgreSQL WAL timeline for \
             failover-safe fencing tokens. Use a lock service outside YugabyteDB",
        )
    } else {
        None
    }
}

/// The error for an engine refused by [`refusal`].
pub(crate) fn unsupported(backend: &'static str, why: &str) -> Error {
    Error::Unsupported {
        backend,
        what: why.to_owned(),
    }
}

/// The error of an [`Advisory`](super::Advisory) backend whose statements
/// do not all run on its own server session.
pub(crate) fn transaction_pooler() -> Error {
    Error::Unsupported {
        backend: "postgres-advisory",
        what: "session-level advisory locks through a transaction-pooling proxy \
               (PgBouncer pool_mode=transaction, Supavisor, RDS Proxy): this connection's \
               statements do not all run on one server session, so a lock would stay on a \
               server connection other clients use. Use postgres::Lease (with \
               transaction_pooling(true)), postgres::lock_in_transaction inside a transaction, or a \
               session-pooling port (pool_mode=session) or a direct connection"
            .to_owned(),
    }
}

/// SQLSTATE 42P05 (a prepared statement of that name exists) and 26000
/// (no prepared statement of that name): the named statements of a
/// connection meet other clients' on a server connection, which only a
/// transaction-pooling proxy does.
pub(crate) fn is_statement_clash(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P05" | "26000")))
}

/// The error of a [`Lease`](super::Lease) without
/// [`transaction_pooling`](super::Lease::transaction_pooling) whose
/// statements clashed on a transaction pooler's server connection.
pub(crate) fn lease_needs_transaction_pooling(e: &sqlx::Error) -> Error {
    Error::Unsupported {
        backend: "postgres-lease",
        what: format!(
            "named prepared statements through a transaction-pooling proxy (PgBouncer \
             pool_mode=transaction, Supavisor): {e}. Build the backend with \
             Lease::new(pool).transaction_pooling(true)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::refusal;

    #[test]
    fn cockroachdb_is_refused() {
        for v in [
            "CockroachDB CCL v23.1.11 (x86_64-pc-linux-gnu, built 2023/09/27 01:53:43, go1.19.10)",
            "CockroachDB OSS v2.1.0 (x86_64-unknown-linux-gnu, built 2018/10/30 20:47:51, go1.10.3)",
        ] {
            let why = refusal(v).expect(v);
            assert!(why.contains("CockroachDB") && why.contains("stubs"), "{why}");
        }
    }

    #[test]
    fn yugabytedb_is_refused() {
        for v in [
            "PostgreSQL 11.2-YB-2.18.0.0-b0 on x86_64-pc-linux-gnu, compiled by clang version 15.0.3, 64-bit",
            "PostgreSQL 15.2-YB-2.25.0.0-b0 on x86_64-pc-linux-gnu, compiled by clang version 17.0.6, 64-bit",
        ] {
            let why = refusal(v).expect(v);
            assert!(why.contains("YugabyteDB"), "{why}");
        }
    }

    #[test]
    fn postgresql_and_its_hosted_forms_pass() {
        for v in [
            "PostgreSQL 15.20 (Debian 15.20-0+deb12u1) on x86_64-pc-linux-gnu, compiled by gcc (Debian 12.2.0-14+deb12u1) 12.2.0, 64-bit",
            "PostgreSQL 16.3 on aarch64-unknown-linux-gnu, compiled by aarch64-unknown-linux-gnu-gcc (GCC) 9.5.0, 64-bit",
            "PostgreSQL 17.0 (Ubuntu 17.0-1.pgdg24.04+1) on x86_64-pc-linux-gnu, compiled by gcc, 64-bit",
        ] {
            assert_eq!(refusal(v), None, "{v}");
        }
    }
}
