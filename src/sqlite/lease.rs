//! Leases in an SQLite table, timed by SQLite's own clock.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{AssertSqlSafe, Row, SqlitePool};

use super::doorbell::{bells, Bells};
use super::retry_busy;
#[path = "lease_permits.rs"]
mod permits;
use crate::lease::permits::{holders_table, merge_list};
use crate::lease::{
    lease_backend, push_json_str, Claim, Claimed, LeaseEngine, LeaseId, LeaseOptions, LeaseStore,
    NewExpiry, Renewal, Renewed, Wakeups, SWEEP_BATCH,
};
use crate::name::{quote_table, validate_table};
use crate::{Error, LockInfo, LockMode, Result};
use permits::PermitSql;

const DEFAULT_TABLE: &str = "dblock_leases";

/// How long a connection of [`Lease::open`] waits for the file's write lock
/// before SQLite reports it busy (and dblock retries).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections of a pool made by [`Lease::open`]: SQLite runs one writer at
/// a time, and lease statements are short.
const POOL_SIZE: u32 = 4;

/// Leases in an SQLite database file: the zero-setup lock service for one
/// machine. Every process (and every [`Lease`]) that opens the same file
/// shares its locks.
///
/// The protocol is that of [`postgres::Lease`](crate::postgres::Lease),
/// written for SQLite: a lease is a row of `dblock_leases`, taken with one
/// `INSERT .. ON CONFLICT .. DO UPDATE .. WHERE expires_at <= now ..
/// RETURNING`, renewed every ttl/3 (every lease due in one
/// `UPDATE .. FROM json_each(?1)` per renewal tick), and timed by SQLite's clock
/// (`julianday('now')`, the machine's wall clock at millisecond resolution,
/// stored as integer microseconds since the Unix epoch): the caller's
/// clock arithmetic never decides who holds a lock.
///
/// - **Fencing tokens** are per name, each grant the previous token + 1.
///   A row whose lease ended is deleted by a background sweep a couple of
///   seconds later (at most one sweep every 2 s per backend, started by
///   releases), which records the highest token it deleted in
///   `dblock_token_floor`; a name without a row starts above that floor,
///   so tokens never go back and the table holds about the names held
///   now, not every name ever used. Commits are durable
///   (`synchronous = FULL`, SQLite's default) so a token survives a power
///   loss too.
/// - **Semaphores** (`max_holders(n)`): each permit is a row of
///   `dblock_leases_holders` (migration 3; for a table of your own, the
///   same name with `_holders` appended), its token the name's next; the
///   name's lease row is the semaphore's marker while permits are live.
///   Every permit step is one `BEGIN IMMEDIATE` transaction.
/// - **Busy files**: each statement is one autocommit write that takes the
///   write lock before it reads, so SQLite's busy timeout applies; if the
///   file stays locked past it, the statement is retried with backoff (for
///   up to 10 s) instead of surfacing `SQLITE_BUSY`.
/// - **Waiting** polls with backoff (see [`LeaseOptions`]). Releases wake
///   waiters at once within one process, also across `Lease`s that
///   [`open`](Lease::open) the same file, and in other processes on the
///   machine through a doorbell file: while a process holds a lease it
///   holds a shared file lock on one of 256 files in the folder
///   `<database file>-dblock-bells` (created beside the file at the first
///   grant; the file is picked by a hash of the table and the name), and a
///   waiting process blocks for the exclusive lock in a thread, which it
///   gets at the release. At most 8 names are watched per backend (8
///   threads); past that, a read-only folder or an in-memory database,
///   another process notices within `max_poll`.
/// - **Shared (reader) leases** (`.shared()`): each reader is a row of the
///   holders table (`max_holders = 1`, its own token), taken like a permit
///   in one `BEGIN IMMEDIATE` transaction; the name's row is their marker
///   (mode `s`). A writer that finds readers and will wait marks the row
///   (`writer_waiting_until`, migration 4) in its one claim statement, at
///   each try, a little past its next one; new readers wait while the mark
///   lies ahead, so readers cannot starve a writer. A writer's claim clears
///   it, and it lapses by itself if the writer goes away. Readers ring the
///   release doorbell like plain leases (the first reader's process of a
///   name holds it).
/// - Without the table, calls fail with [`Error::SchemaMissing`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # let dir = std::env::temp_dir().join(format!("dblock-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let locks = dblock::Locks::new(dblock::sqlite::Lease::open(dir.join("locks.db")).await?);
/// let guard = locks.acquire("reports:nightly").await?;
/// assert!(locks.try_acquire("reports:nightly").await?.is_none());
/// guard.release().await?;
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), dblock::Error>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct Lease {
    engine: LeaseEngine<SqliteStore>,
    pool: SqlitePool,
    table: String,
    wakeups: Arc<Wakeups>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("table", &self.table)
            .field("options", self.engine.options())
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Leases in `dblock_leases`, through `pool`, with default options. Run
    /// [`migrate`](super::migrate) once beforehand, or use
    /// [`Lease::open`], which does everything.
    ///
    /// For several processes to share the file, give the pool a busy
    /// timeout (sqlx's default is 5 s) and preferably WAL journaling. The
    /// pool must reach one database file: a pool of several connections to
    /// a plain `:memory:` database would give each its own locks.
    pub fn new(pool: SqlitePool) -> Self {
        Lease::assemble(
            pool,
            DEFAULT_TABLE.to_owned(),
            LeaseOptions::default(),
            Wakeups::new(),
        )
        .expect("the default options are valid")
    }

    /// Opens the database file at `path`, creating it if needed (its folder
    /// must exist), and its lease table: no other set-up. The file is put in
    /// WAL mode, so that readers never wait for writers, and each connection
    /// waits up to 5 s for the write lock. Leases opened on the same file in
    /// this process wake each other's waiters at once.
    ///
    /// An empty path or `":memory:"` is refused with
    /// [`Error::InvalidOption`]: every connection would see its own private
    /// database. Use [`Memory`](crate::memory::Memory) for that.
    ///
    /// # Cancel safety
    /// Cancel safe: if dropped, the file may have been created and migrated
    /// (which is harmless to repeat) and nothing else is left behind.
    pub async fn open(path: impl AsRef<Path>) -> Result<Lease> {
        let path = path.as_ref();
        // Each connection of the pool would get its own private database,
        // and the connections would not exclude each other.
        if path.as_os_str().is_empty() || path == Path::new(":memory:") {
            return Err(Error::InvalidOption(format!(
                "sqlite::Lease::open needs a database file, not {path:?}; \
                 use dblock::memory::Memory for locks within one process"
            )));
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = retry_busy(|| {
            SqlitePoolOptions::new()
                .max_connections(POOL_SIZE)
                .connect_with(options.clone())
        })
        .await?;
        // WAL is a property of the file, so one connection sets it for all.
        // Switching needs a lock the busy timeout does not wait for: retry.
        let mode: String =
            retry_busy(|| sqlx::query_scalar("PRAGMA journal_mode = WAL").fetch_one(&pool)).await?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), %mode,
                "dblock: SQLite refused WAL mode; writers will block readers");
        }
        super::migrate(&pool).await?;
        let wakeups = match std::fs::canonicalize(path) {
            Ok(file) => shared_wakeups(file),
            Err(_) => Wakeups::new(),
        };
        Lease::assemble(
            pool,
            DEFAULT_TABLE.to_owned(),
            LeaseOptions::default(),
            wakeups,
        )
    }

    /// Uses another table, `table` or `schema.table` (`main`, or an attached
    /// database), with the same columns as `dblock_leases`. The name is
    /// checked by [`validate_table`](crate::validate_table)
    /// ([`Error::InvalidOption`] otherwise) and quoted.
    pub fn with_table(self, table: impl Into<String>) -> Result<Self> {
        let table = table.into();
        validate_table(&table)?;
        let options = self.engine.options().clone();
        Lease::assemble(self.pool, table, options, self.wakeups)
    }

    /// Replaces the options (see [`LeaseOptions`]) after checking them:
    /// [`Error::InvalidOption`](crate::Error::InvalidOption) unless
    /// `0 < min_poll <= max_poll`. Like `with_options` on every backend, it
    /// returns a new backend over the same pool and table: locks held through `self`
    /// stay with `self` (configure the backend before taking locks).
    ///
    /// `max_poll` bounds how late a waiter notices a release in another
    /// process.
    pub fn with_options(self, options: LeaseOptions) -> Result<Self> {
        Lease::assemble(self.pool, self.table, options, self.wakeups)
    }

    /// The pool the leases are taken through.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The lease table's name, as given.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn assemble(
        pool: SqlitePool,
        table: String,
        options: LeaseOptions,
        wakeups: Arc<Wakeups>,
    ) -> Result<Self> {
        let store = SqliteStore {
            bells: bells(pool.connect_options().get_filename(), &table),
            pool: pool.clone(),
            sql: Sql::new(&quote_table(&table)),
            permits: holders_table(&table)
                .map(|h| PermitSql::new(&quote_table(&table), &quote_table(&h))),
            table: table.clone(),
        };
        Ok(Lease {
            engine: LeaseEngine::new(store, wakeups.clone(), options)?,
            pool,
            table,
            wakeups,
        })
    }
}

lease_backend!(Lease);

/// The renewal of one row of table `t` (quoted): ?1 name, ?2 owner, ?3
/// token, ?4 ttl in microseconds; the new expiry if the row was still
/// theirs and live.
pub(super) fn renew_one(t: &str) -> Arc<str> {
    format!(
        "UPDATE {t} SET expires_at = {NOW} + ?4
          WHERE name = ?1 AND owner = ?2 AND token = ?3 AND expires_at > {NOW}
         RETURNING expires_at"
    )
    .into()
}

/// The batch renewal of table `t` (quoted): ?1 is the JSON document of
/// [`batch_json`], read by `json_each` and joined to the table by primary
/// key. A released row has no owner, so a batch landing after a release
/// cannot revive it. RETURNING may name only the table's columns: (name,
/// token) says which lease each row is.
pub(super) fn renew_batch(t: &str) -> Arc<str> {
    format!(
        "UPDATE {t} AS l SET expires_at = {NOW} + r.ttl
           FROM (SELECT json_extract(value, '$[0]') AS name,
                        json_extract(value, '$[1]') AS owner,
                        json_extract(value, '$[2]') AS token,
                        json_extract(value, '$[3]') AS ttl
                   FROM json_each(?1)) AS r
          WHERE l.name = r.name AND l.owner = r.owner AND l.token = r.token
            AND l.expires_at > {NOW}
         RETURNING name, token, expires_at"
    )
    .into()
}

/// The JSON document of a batch renewal: `[[name, owner, token, ttl µs], ...]`,
/// read by `json_each` in the statement.
fn batch_json(batch: &[Renewal]) -> String {
    let mut json = String::with_capacity(batch.len() * 96 + 2);
    json.push('[');
    for (k, r) in batch.iter().enumerate() {
        if k > 0 {
            json.push(',');
        }
        json.push('[');
        push_json_str(&mut json, &r.name);
        json.push(',');
        push_json_str(&mut json, &r.owner);
        json.push_str(&format!(",{},{}]", r.token as i64, micros(r.ttl)));
    }
    json.push(']');
    json
}

impl SqliteStore {
    /// The answers of a batch renewal whose renewed rows came back as
    /// `(name, token, new expiry)`: renewed if returned, gone (and its bell
    /// let go) otherwise.
    fn answers(&self, batch: &[Renewal], rows: &[(String, i64, i64)]) -> Result<Vec<Renewed>> {
        let index: HashMap<(&str, i64), usize> = batch
            .iter()
            .enumerate()
            .map(|(k, r)| ((&*r.name, r.token as i64), k))
            .collect();
        let mut answers = vec![Renewed::Gone; batch.len()];
        for (name, token, at) in rows {
            if let Some(&k) = index.get(&(name.as_str(), *token)) {
                answers[k] = Renewed::Until(time(*at)?);
            }
        }
        self.bells.disarm_gone(batch, &answers);
        Ok(answers)
    }
}

/// One set of in-process wake-ups per database file, shared by the
/// [`Lease::open`]s of that file while any of them lives.
fn shared_wakeups(file: PathBuf) -> Arc<Wakeups> {
    static FILES: Mutex<Option<HashMap<PathBuf, Weak<Wakeups>>>> = Mutex::new(None);
    let mut files = FILES.lock().unwrap();
    let files = files.get_or_insert_with(HashMap::new);
    files.retain(|_, w| w.strong_count() > 0);
    if let Some(w) = files.get(&file).and_then(Weak::upgrade) {
        return w;
    }
    let w = Wakeups::new();
    files.insert(file, Arc::downgrade(&w));
    w
}

/// SQLite's clock, in integer microseconds since the Unix epoch. `'now'` is
/// the same for every use within one statement. `julianday` has millisecond
/// resolution and exists in every SQLite version (unlike `unixepoch`).
const NOW: &str = "(CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)";

/// The statements for one table, built once.
#[derive(Debug)]
struct Sql {
    claim: Arc<str>,
    renew: Arc<str>,
    renew_many: Arc<str>,
    release: Arc<str>,
    force_release: Arc<str>,
    sweep: Arc<str>,
    raise_floor: Arc<str>,
    inspect: Arc<str>,
    list: Arc<str>,
}

impl Sql {
    fn new(t: &str) -> Self {
        const COLUMNS: &str = "name, holder, mode, token, acquired_at, expires_at";
        const FLOOR: &str = "dblock_token_floor";
        // Whether a claim finds the row's lease ended.
        const FREE: &str = "l.expires_at <= excluded.acquired_at";
        Sql {
            // ?4 is the ttl in microseconds. A held name returns no row. A
            // name without a row starts above the highest token ever swept
            // from the table (?5 is its name), so it never goes back;
            // SQLite's single writer orders this against the sweep.
            //
            // A name held by readers is not taken, but a writer that is
            // going to wait (?6, the mark's length in µs, not NULL) marks
            // it in the same statement, so that new readers stay out (see
            // `lease::permits`, "Readers"); a claim that takes the name
            // clears the mark. Every condition reads the old row and
            // `excluded.acquired_at`, SQLite's one instant for the whole
            // statement. The owner returned says whether the row is ours.
            claim: format!(
                "INSERT INTO {t} AS l (name, owner, holder, mode, token, acquired_at, expires_at)
                 VALUES (?1, ?2, ?3, 'x',
                         coalesce((SELECT floor FROM {FLOOR} WHERE lease_table = ?5), 0) + 1,
                         {NOW}, {NOW} + ?4)
                 ON CONFLICT (name) DO UPDATE
                    SET owner = CASE WHEN {FREE} THEN excluded.owner ELSE l.owner END,
                        holder = CASE WHEN {FREE} THEN excluded.holder ELSE l.holder END,
                        mode = CASE WHEN {FREE} THEN excluded.mode ELSE l.mode END,
                        token = CASE WHEN {FREE} THEN l.token + 1 ELSE l.token END,
                        acquired_at = CASE WHEN {FREE} THEN excluded.acquired_at ELSE l.acquired_at END,
                        expires_at = CASE WHEN {FREE} THEN excluded.expires_at ELSE l.expires_at END,
                        writer_waiting_until = CASE WHEN {FREE} THEN NULL
                            ELSE excluded.acquired_at + ?6 END
                  WHERE {FREE} OR (?6 IS NOT NULL AND l.mode = 's')
                 RETURNING owner, token, expires_at"
            )
            .into(),
            renew: renew_one(t),
            // Every lease of a batch in one statement.
            renew_many: renew_batch(t),
            // ?4 is hold_at_least in microseconds (0 without).
            release: format!(
                "UPDATE {t} SET owner = NULL, expires_at = max({NOW}, acquired_at + ?4)
                  WHERE name = ?1 AND owner = ?2 AND token = ?3 AND expires_at > {NOW}"
            )
            .into(),
            force_release: format!(
                "UPDATE {t} SET owner = NULL, expires_at = {NOW}
                  WHERE name = ?1 AND expires_at > {NOW}"
            )
            .into(),
            // Rows whose lease ended more than ?1 µs ago, a batch at a time;
            // the tokens they held raise the table's floor in the same
            // transaction.
            sweep: format!(
                "DELETE FROM {t} WHERE name IN (
                    SELECT name FROM {t} WHERE expires_at < {NOW} - ?1 LIMIT {SWEEP_BATCH})
                 RETURNING token"
            )
            .into(),
            raise_floor: format!(
                "INSERT INTO {FLOOR} (lease_table, floor) VALUES (?1, ?2)
                 ON CONFLICT (lease_table) DO UPDATE SET floor = max(floor, excluded.floor)"
            )
            .into(),
            inspect: format!("SELECT {COLUMNS} FROM {t} WHERE name = ?1 AND expires_at > {NOW}")
                .into(),
            list: format!("SELECT {COLUMNS} FROM {t} WHERE expires_at > {NOW} ORDER BY name")
                .into(),
        }
    }
}

/// The SQLite dialect of the lease protocol.
#[derive(Debug)]
pub(crate) struct SqliteStore {
    pool: SqlitePool,
    sql: Sql,
    /// The statements of semaphores' permits; `None` when the holders
    /// table's name would be too long.
    permits: Option<PermitSql>,
    /// The lease table's name as given: its key in `dblock_token_floor`.
    table: String,
    /// Release doorbells for waiters in other processes.
    bells: Bells,
}

pub(super) use crate::time::micros;

fn time(micros: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| Error::internal(format!("lease time {micros} µs is out of range")))
}

fn info(row: &SqliteRow) -> Result<LockInfo> {
    let mode: String = row.try_get("mode")?;
    let mode = if mode == "s" {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let holder: Option<String> = row.try_get("holder")?;
    let mut info = LockInfo::new(Some(row.try_get("name")?), holder.unwrap_or_default(), mode);
    info.token = Some(row.try_get::<i64, _>("token")? as u64);
    info.acquired_at = Some(time(row.try_get("acquired_at")?)?);
    info.expires_at = Some(time(row.try_get("expires_at")?)?);
    Ok(info)
}

impl LeaseStore for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite-lease"
    }

    fn released(&self, name: &str) -> impl std::future::Future<Output = ()> + Send {
        self.bells.released(name)
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        let at: i64 = retry_busy(|| {
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT {NOW}"))).fetch_one(&self.pool)
        })
        .await?;
        time(at)
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
        if claim.is_holder() {
            // Permits and readers ring their bell like plain leases: a
            // waiter elsewhere (a writer waiting for the last reader) wakes
            // when this process lets its share go.
            let claimed = self.claim_permit(claim).await?;
            return Ok(self.bells.armed(claim.name, claimed));
        }
        let row: Option<(Option<String>, i64, i64)> = retry_busy(|| async {
            // As for PostgreSQL: nothing is claimed for an acquirer that left
            // while this waited for a connection.
            // Boxed: sqlx's pool acquisition carries the state of opening a
            // connection, which would make the claim's future that large.
            let mut conn = Box::pin(self.pool.acquire()).await?;
            if (claim.abandoned)() {
                return Ok(None);
            }
            sqlx::query_as(AssertSqlSafe(self.sql.claim.clone()))
                .bind(claim.name)
                .bind(claim.owner)
                .bind(claim.holder)
                .bind(micros(claim.ttl))
                .bind(self.table.as_str())
                .bind(claim.writer_waits.map(micros))
                .fetch_optional(&mut *conn)
                .await
        })
        .await?;
        // A row that is not ours: held, perhaps marked by this writer.
        let row = row
            .filter(|(owner, _, _)| owner.as_deref() == Some(claim.owner))
            .map(|(_, token, expires_at)| (token, expires_at));
        if let Some((token, _)) = row {
            self.bells.arm(claim.name, token as u64);
        }
        row.map(|(token, expires_at)| {
            Ok(Claimed {
                token: token as u64,
                expires_at: time(expires_at)?,
            })
        })
        .transpose()
    }

    async fn renew(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        let at: Option<i64> = retry_busy(|| {
            sqlx::query_scalar(AssertSqlSafe(self.sql.renew.clone()))
                .bind(lease.name)
                .bind(lease.owner)
                .bind(lease.token as i64)
                .bind(micros(ttl))
                .fetch_optional(&self.pool)
        })
        .await?;
        self.bells
            .renewed(lease.name, lease.token, at)
            .map(time)
            .transpose()
    }

    async fn renew_permit(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        let at = self.renew_holder(lease, ttl).await?;
        Ok(self.bells.renewed(lease.name, lease.token, at))
    }

    async fn renew_many(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let json = batch_json(batch);
        let rows: Vec<(String, i64, i64)> = retry_busy(|| {
            sqlx::query_as(AssertSqlSafe(self.sql.renew_many.clone()))
                .bind(json.as_str())
                .fetch_all(&self.pool)
        })
        .await?;
        self.answers(batch, &rows)
    }

    async fn renew_holders(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let rows = self.renew_holders_batch(batch).await?;
        self.answers(batch, &rows)
    }

    async fn release(&self, lease: LeaseId<'_>, hold: Option<Duration>) -> Result<bool> {
        // The bell goes after the release statement (or if it is given up).
        let _disarm = self.bells.disarm_on_drop(lease.name, lease.token);
        let done = retry_busy(|| {
            sqlx::query(AssertSqlSafe(self.sql.release.clone()))
                .bind(lease.name)
                .bind(lease.owner)
                .bind(lease.token as i64)
                .bind(micros(hold.unwrap_or_default()))
                .execute(&self.pool)
        })
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn release_permit(&self, lease: LeaseId<'_>, hold: Option<Duration>) -> Result<bool> {
        let _disarm = self.bells.disarm_on_drop(lease.name, lease.token);
        self.release_holder(lease, hold).await
    }

    async fn force_release(&self, name: &str) -> Result<bool> {
        if let Some(broken) = self.force_release_all(name).await? {
            return Ok(broken);
        }
        let done = retry_busy(|| {
            sqlx::query(AssertSqlSafe(self.sql.force_release.clone()))
                .bind(name)
                .execute(&self.pool)
        })
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn inspect(&self, name: &str) -> Result<Option<LockInfo>> {
        if let Some(info) = self.inspect_permits(name).await? {
            return Ok(Some(info));
        }
        let row = retry_busy(|| {
            sqlx::query(AssertSqlSafe(self.sql.inspect.clone()))
                .bind(name)
                .fetch_optional(&self.pool)
        })
        .await?;
        row.as_ref().map(info).transpose()
    }

    async fn sweep(&self, grace: Duration) -> Result<u64> {
        let swept = retry_busy(|| async {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let tokens: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.sweep.clone()))
                .bind(micros(grace))
                .fetch_all(&mut *tx)
                .await?;
            if let Some(highest) = tokens.iter().max() {
                sqlx::query(AssertSqlSafe(self.sql.raise_floor.clone()))
                    .bind(self.table.as_str())
                    .bind(highest)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(tokens.len() as u64)
        })
        .await?;
        Ok(swept + self.sweep_permits(grace).await?)
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let rows =
            retry_busy(|| sqlx::query(AssertSqlSafe(self.sql.list.clone())).fetch_all(&self.pool))
                .await?;
        let plain = rows.iter().map(info).collect::<Result<_>>()?;
        Ok(merge_list(plain, self.list_permits().await?))
    }
}
