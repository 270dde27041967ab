//! Schema bookkeeping shared by the per-database `migrate` functions.
//!
//! dblock records what it applied in its own table, `dblock_schema_migrations`,
//! so it never touches an application's `_sqlx_migrations`. Each database
//! serialises its migrators its own way (a transaction-scoped advisory
//! lock, `BEGIN IMMEDIATE`, a named lock); the steps themselves are applied
//! here, once, by [`apply`].

/// One schema step: its version, a short description, and its SQL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

/// The bookkeeping table's name.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) const BOOKKEEPING: &str = "dblock_schema_migrations";

/// The steps of one database, from its folder of `migrations/`:
/// `migrations!("postgres"; 1, "what it does", "0001_file.sql"; ...)`.
macro_rules! migrations {
    ($dir:literal; $($version:literal, $description:literal, $file:literal;)*) => {
        &[$($crate::migrate::Migration {
            version: $version,
            description: $description,
            sql: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"), "/migrations/", $dir, "/", $file
            )),
        }),*]
    };
}
pub(crate) use migrations;

/// How one database keeps its bookkeeping table: the statement that
/// creates it, the one that records a step (`version`, `description`
/// bound in that order), and whether sqlx may keep the recording
/// statement prepared (not through a transaction-pooling proxy).
pub(crate) struct Bookkeeping {
    pub create: &'static str,
    pub record: &'static str,
    pub persistent: bool,
}

/// Creates the bookkeeping table if needed and applies, on `conn` (in the
/// caller's transaction or under its lock), every step of `steps` it does
/// not record yet, recording each; `applied` is told each version as it is
/// applied (the caller logs it).
pub(crate) async fn apply<DB>(
    conn: &mut DB::Connection,
    steps: &[Migration],
    book: &Bookkeeping,
    applied: impl Fn(i64),
) -> sqlx::Result<()>
where
    DB: sqlx::Database + sqlx::database::HasStatementCache,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'static str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    sqlx::raw_sql(book.create).execute(&mut *conn).await?;
    let done: Vec<i64> = sqlx::query_scalar("SELECT version FROM dblock_schema_migrations")
        .persistent(book.persistent)
        .fetch_all(&mut *conn)
        .await?;
    for m in steps.iter().filter(|m| !done.contains(&m.version)) {
        sqlx::raw_sql(m.sql).execute(&mut *conn).await?;
        sqlx::query(book.record)
            .persistent(book.persistent)
            .bind(m.version)
            .bind(m.description)
            .execute(&mut *conn)
            .await?;
        applied(m.version);
    }
    Ok(())
}
