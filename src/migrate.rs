//! Schema bookkeeping shared by the per-database `migrate` functions.
//!
//! dblock records what it applied in its own table, `dblock_schema_migrations`,
//! so it never touches an application's `_sqlx_migrations`.

/// One schema step: its version, a short description, and its SQL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

/// The bookkeeping table's name.
pub(crate) const BOOKKEEPING: &str = "dblock_schema_migrations";
