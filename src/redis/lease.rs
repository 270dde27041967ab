//! Leases as Redis keys, each step one Lua script run by the server.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script, ScriptInvocation, Value};

use super::listen::Listener;
use crate::lease::{
    lease_backend, Claim, Claimed, LeaseEngine, LeaseId, LeaseOptions, LeaseStore, NewExpiry,
    Renewal, Renewed, Wakeups,
};
use crate::{Error, LockInfo, LockMode, Result};

/// The key prefix unless [`Lease::with_prefix`] says otherwise.
const DEFAULT_PREFIX: &str = "dblock:";

/// The longest a prefix may be.
const MAX_PREFIX_LEN: usize = 64;

/// How long one request may go unanswered before the connection is
/// considered black-holed and replaced. Every dblock request is a short
/// script; a batch renewal of 100,000 leases takes well under a second.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A refused connection is tried again after 100, 200 and 400 ms (then the
/// request fails).
const CONNECT_RETRY_UP_TO: Duration = Duration::from_millis(400);

/// The most leases one renewal script renews. Redis runs a script alone,
/// holding every other client: one script renewing 84,000 leases took
/// 5.3 s in the scale benchmark on a loaded 2-core machine (past
/// [`RESPONSE_TIMEOUT`]), so a tick sends one script per 10,000 leases,
/// one after another, each about a tenth of that.
const MAX_BATCH: usize = 10_000;

/// Keys asked for per `SCAN` page (and read per inspect script) by `list`.
const SCAN_COUNT: usize = 1000;

/// The server's clock in microseconds: every script that needs "now" reads
/// it this way. Numbers in Redis' Lua are doubles, exact to 2^53 (the year
/// 2255 in microseconds), and `%.0f` prints them without an exponent.
macro_rules! lua_now {
    () => {
        "local t = redis.call('TIME')\n\
         local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    };
}

/// KEYS: the lease, the token counter, the waiting writer's mark. ARGV:
/// owner, holder, ttl in ms, the mark's length in ms (0: a claim that will
/// not wait), whether this claimer left the mark before (`1`) and deletes
/// it when it takes the name.
///
/// The token is `max(counter + 1, now in µs)`: strictly above the last one
/// while the counter lives, and above every earlier one after the counter is
/// lost as long as the server's clock has not gone back (see the module
/// docs). It is drawn by one `SET ... GET` of the counter to now, and set
/// again only when the counter was ahead of the clock (claims within one
/// microsecond, a clock stepped back): the counter never goes down, and a
/// claim that misses leaves it higher, which only skips tokens.
///
/// A claim that misses and will wait marks what it found: a name held by
/// readers (or permits: their marker) gets the waiting writer's mark,
/// which keeps new readers out (the answer is then 0 rather than nil, and
/// the claimer's next claim deletes the mark if it takes the name); a
/// lease gets its mode `x` turned into `w`, "waited for", so that its
/// release publishes. A release nobody waits for publishes nothing.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local ns = string.format('%.0f', now)
local s, token = ns, now
local last = tonumber(redis.call('SET', KEYS[2], s, 'GET'))
if last and last >= now then
  token = last + 1
  s = string.format('%.0f', token)
  redis.call('SET', KEYS[2], s)
end
local value = ARGV[1] .. ' ' .. s .. ' ' .. ns .. ' x ' .. ARGV[2]
if not redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[3]) then
  if ARGV[4] ~= '0' then
    local held = redis.call('GET', KEYS[1])
    if held and string.match(held, '^%- %S+ %S+ n ') then
      redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
      return 0
    end
    local head, tail = string.match(held or '', '^(%S+ %S+ %S+ )x( .*)$')
    if head then
      redis.call('SET', KEYS[1], head .. 'w' .. tail, 'KEEPTTL')
    end
  end
  return false
end
if ARGV[5] == '1' then
  redis.call('DEL', KEYS[3])
end
return {token, now + tonumber(ARGV[3]) * 1000}"
    ))
});

/// KEYS: n leases. ARGV: owner, token, ttl in ms for each. Renews each lease
/// whose value still starts with its owner and token (an expired key is
/// gone, a released one deleted or marked `-`). Answers, per lease, its new
/// expiry in µs, or 0 if it is no longer ours.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local out = {}
for i, key in ipairs(KEYS) do
  local p = ARGV[3 * i - 2] .. ' ' .. ARGV[3 * i - 1] .. ' '
  local v = redis.call('GET', key)
  if v and string.sub(v, 1, #p) == p then
    redis.call('PEXPIRE', key, ARGV[3 * i])
    out[i] = now + tonumber(ARGV[3 * i]) * 1000
  else
    out[i] = 0
  end
end
return out"
    ))
});

/// KEYS: the lease. ARGV: owner, token, hold_at_least in ms (0 without),
/// channel, name. Ends the lease if it is still ours: deletes it and, if a
/// waiter marked it (mode `w`, see [`CLAIM`]), publishes the name; or,
/// while `acquired + hold` is still ahead, keeps the key until then with
/// its owner replaced by `-`.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "local v = redis.call('GET', KEYS[1])
local p = ARGV[1] .. ' ' .. ARGV[2] .. ' '
if not v or string.sub(v, 1, #p) ~= p then
  return 0
end
local hold = tonumber(ARGV[3])
if hold > 0 then
  local acquired = tonumber(string.match(v, '^%S+ %S+ (%d+) '))
",
        lua_now!(),
        "  local left = math.ceil((acquired + hold * 1000 - now) / 1000)
  if left > 0 then
    redis.call('SET', KEYS[1], '-' .. string.sub(v, #ARGV[1] + 1), 'PX', string.format('%.0f', left))
    return 1
  end
end
redis.call('DEL', KEYS[1])
-- The mode follows the time after the owner and token: the first ' w '
-- past them (a holder containing ' w ' only costs a PUBLISH).
if string.find(v, ' w ', #p + 1, true) then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1"
    ))
});

/// KEYS: the lease, the name's permits. ARGV: channel, name. Ends them
/// whoever holds them.
static FORCE_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('DEL', KEYS[1], KEYS[2]) == 0 then
  return 0
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1",
    )
});

/// KEYS: n leases. Answers now (µs), then each lease's value (nil if gone)
/// and its PTTL (ms).
static INSPECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local out = {now}
for i, key in ipairs(KEYS) do
  out[2 * i] = redis.call('GET', key)
  out[2 * i + 1] = redis.call('PTTL', key)
end
return out"
    ))
});

/// dblock's claim and release scripts, for the benchmark's "raw, same
/// work" baseline (`benches/compare/redis.rs`): the bench sends them by hand
/// (EVALSHA) with the keys and arguments [`RedisStore`] gives them. Not a
/// stable interface.
#[doc(hidden)]
pub fn bench_scripts() -> [&'static Script; 2] {
    [&CLAIM, &RELEASE]
}

#[path = "permits.rs"]
mod permits;

/// Leases in Redis: the correct version of the `SET NX PX` lock, with owner
/// checks, renewal, fencing tokens that survive a restart without
/// persistence, and waiters woken by pub/sub. See the [module
/// docs](super) for the protocol and what Redis can promise.
///
/// Semaphores (`max_holders(n)`): the permits of a name are the fields of
/// the hash `dblock:permits:{name}`, and its lock key is their marker while
/// they are live; each step is one script, so a claim counts and takes
/// atomically.
///
/// Each lock is the key `dblock:lock:{name}` (the prefix is
/// [configurable](Lease::with_prefix)); every expiry is Redis' own (`PX`,
/// `PEXPIRE`, `TIME`). All requests go through one multiplexed connection,
/// replaced after a failure that leaves it unusable (dropped, reset, or a
/// request unanswered for 3 s, so a black-holed connection does not stall
/// the backend); waiters share one more connection for pub/sub (RESP3,
/// Redis 6 or later). Both are named `dblock:{pid}:{n}` (`CLIENT SETNAME`;
/// the pub/sub one with `:sub` after it), `n` counting the `Lease`s the
/// process made, so `CLIENT LIST` shows whose connections they are.
///
/// ```no_run
/// # async fn demo() -> dblock::Result<()> {
/// use std::time::Duration;
/// let locks = dblock::Locks::new(dblock::redis::Lease::open("redis://127.0.0.1:6379/0").await?);
/// let guard = locks
///     .acquire("reports:nightly")
///     .ttl(Duration::from_secs(30))
///     .await?;
/// // ... pass guard.token() along with every write the lock protects ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Lease {
    engine: LeaseEngine<RedisStore>,
    client: Client,
    /// The name of its connections (`CLIENT SETNAME`).
    name: Arc<str>,
    prefix: String,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("prefix", &self.prefix)
            .field("options", self.engine.options())
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Leases through `client`, under the key prefix `dblock:`, with default
    /// options. Connects lazily, at the first request (and again after a
    /// failure), so it needs no server and no runtime yet; the requests run
    /// on the Tokio runtime they are made from.
    pub fn new(client: Client) -> Self {
        static LEASES: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "dblock:{}:{}",
            std::process::id(),
            LEASES.fetch_add(1, Ordering::Relaxed)
        );
        Lease::assemble(
            client,
            name.into(),
            DEFAULT_PREFIX.to_owned(),
            LeaseOptions::default(),
        )
        .expect("the default options are valid")
    }

    /// Connects to the Redis server at `url` (`redis://[user:password@]host[:port][/db]`)
    /// and checks that it answers.
    ///
    /// A URL that cannot be parsed fails with [`Error::InvalidOption`]
    /// (without repeating the URL, which may hold a password); an
    /// unreachable server with [`Error::Redis`].
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is written, and a dropped call leaves no
    /// connection behind.
    pub async fn open(url: &str) -> Result<Lease> {
        let client = Client::open(url)
            .map_err(|e| Error::InvalidOption(format!("not a usable Redis URL: {e}")))?;
        let lease = Lease::new(client);
        let pong: String = lease.engine.store().conn.query(&redis::cmd("PING")).await?;
        if pong != "PONG" {
            return Err(Error::Redis(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "PING did not answer PONG",
                pong,
            ))));
        }
        Ok(lease)
    }

    /// Uses another key prefix (default `dblock:`): up to 64 characters out
    /// of `A-Z a-z 0-9 _ : . -`, so that it needs no escaping in a `SCAN`
    /// pattern. Leases under different prefixes never meet.
    pub fn with_prefix(self, prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        let ok = !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX_LEN
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'));
        if !ok {
            return Err(Error::InvalidOption(format!(
                "a Redis key prefix must be 1 to {MAX_PREFIX_LEN} characters out of \
                 A-Z a-z 0-9 _ : . - (got {prefix:?})"
            )));
        }
        let options = self.engine.options().clone();
        Lease::assemble(self.client, self.name, prefix, options)
    }

    /// Replaces the options (see [`LeaseOptions`]) after checking them:
    /// [`Error::InvalidOption`](crate::Error::InvalidOption) unless
    /// `0 < min_poll <= max_poll`. Like `with_options` on every backend, it
    /// returns a new backend over the same client and key prefix: locks held through `self`
    /// stay with `self` (configure the backend before taking locks).
    ///
    /// With pub/sub working, `max_poll` bounds only how late an expiry (not
    /// a release) is noticed.
    pub fn with_options(self, options: LeaseOptions) -> Result<Self> {
        Lease::assemble(self.client, self.name, self.prefix, options)
    }

    /// The client the leases are taken through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The name (`CLIENT SETNAME`) of this backend's connections,
    /// `dblock:{pid}:{n}`; its pub/sub connection's is this with `:sub`
    /// after it. For tests that kill only their own connections; not a
    /// stable interface.
    #[doc(hidden)]
    pub fn connection_name(&self) -> &str {
        &self.name
    }

    fn assemble(
        client: Client,
        name: Arc<str>,
        prefix: String,
        options: LeaseOptions,
    ) -> Result<Self> {
        let wakeups = Wakeups::new();
        let keys = Keys::new(&prefix);
        let store = RedisStore {
            conn: Conn::new(client.clone(), name.clone()),
            listener: Listener::new(
                client.clone(),
                format!("{name}:sub"),
                keys.clone(),
                &wakeups,
            ),
            keys,
            marks: Marks::default(),
        };
        Ok(Lease {
            engine: LeaseEngine::new(store, wakeups, options)?,
            client,
            name,
            prefix,
        })
    }
}

lease_backend!(Lease);

/// Where a prefix puts things.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
    /// The token counter's key, made once: every claim names it.
    counter: String,
}

impl Keys {
    const LOCK: &'static str = "lock:";

    fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
            counter: format!("{prefix}token"),
        }
    }

    fn lock(&self, name: &str) -> String {
        format!("{}{}{name}", self.prefix, Self::LOCK)
    }

    /// The hash of the permits of semaphore `name` (see [`permits`]).
    fn permits(&self, name: &str) -> String {
        format!("{}permits:{name}", self.prefix)
    }

    /// The mark of a writer waiting for the readers of `name` to leave
    /// (see [`permits`]).
    fn writer(&self, name: &str) -> String {
        format!("{}writer:{name}", self.prefix)
    }

    fn counter(&self) -> &str {
        &self.counter
    }

    /// The channel a release of `name` is published on.
    pub(super) fn channel(&self, name: &str) -> String {
        format!("{}released:{name}", self.prefix)
    }

    /// The `SCAN` pattern of every lease key (the prefix has no glob
    /// characters: [`Lease::with_prefix`] checks).
    fn pattern(&self) -> String {
        format!("{}{}*", self.prefix, Self::LOCK)
    }

    fn name_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(self.prefix.as_str())?
            .strip_prefix(Self::LOCK)
    }
}

/// One multiplexed connection, named (`CLIENT SETNAME`) after its
/// [`Lease`], and replaced after a request fails in a way that leaves it
/// unusable: dropped or reset by the server (`CLIENT KILL`, a restart), or
/// silent past [`RESPONSE_TIMEOUT`] (black-holed). The next request after
/// such a failure connects anew; concurrent requests share that connect.
struct Conn {
    client: Client,
    /// `CLIENT SETNAME` of every connection it makes (see [`Lease`]).
    name: Arc<str>,
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Held while connecting, so that one connect serves every request
    /// that finds no connection.
    connecting: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Conn {
    fn new(client: Client, name: Arc<str>) -> Self {
        Conn {
            client,
            name,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current.lock().unwrap().clone()
    }

    async fn get(&self) -> Result<(u64, MultiplexedConnection)> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        // A refused connection (a server restarting) is tried again a few
        // times, 100 ms apart and doubling, as the `ConnectionManager` did.
        let mut pause = Duration::from_millis(100);
        let mut conn = loop {
            match self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Err(e) if e.is_connection_refusal() && pause <= CONNECT_RETRY_UP_TO => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                connected => break connected?,
            }
        };
        name_connection(&mut conn, &self.name).await?;
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        *self.current.lock().unwrap() = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// Notes how a request of `generation` ended: a failure that leaves the
    /// connection unusable drops it, so the next request makes a new one.
    fn check<T>(&self, generation: u64, result: redis::RedisResult<T>) -> Result<T> {
        result.map_err(|e| {
            if e.is_timeout() || e.is_unrecoverable_error() || e.is_connection_dropped() {
                let mut current = self.current.lock().unwrap();
                if current.as_ref().is_some_and(|(g, _)| *g == generation) {
                    if e.is_timeout() {
                        tracing::warn!(error = %e,
                            "dblock: a Redis request timed out; replacing the connection");
                    } else {
                        tracing::debug!(error = %e,
                            "dblock: the Redis connection failed; the next request reconnects");
                    }
                    *current = None;
                }
            }
            Error::Redis(e)
        })
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T> {
        let (generation, mut conn) = self.get().await?;
        let result = invocation.invoke_async(&mut conn).await;
        self.check(generation, result)
    }

    /// Like [`Conn::script`], for a script that may run twice (renewals,
    /// releases and reads: a second run of a release that did land finds
    /// the lease gone and answers "not ours", which reports it lost, never
    /// the other way round). A request that failed because its connection
    /// was found dropped or reset (a restarted server, `CLIENT KILL`:
    /// the first request after it fails) is sent once more on a new
    /// connection, so that it answers what the server holds rather than
    /// the broken pipe. A timeout is not retried.
    async fn script_again<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T> {
        let (generation, mut conn) = self.get().await?;
        match invocation.invoke_async(&mut conn).await {
            Err(e)
                if !e.is_timeout() && (e.is_connection_dropped() || e.is_unrecoverable_error()) =>
            {
                tracing::debug!(error = %e, "dblock: the Redis connection was dropped; sending again");
                let _ = self.check::<()>(generation, Err(e));
                let (generation, mut conn) = self.get().await?;
                let result = invocation.invoke_async(&mut conn).await;
                self.check(generation, result)
            }
            result => self.check(generation, result),
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let (generation, mut conn) = self.get().await?;
        let result = cmd.query_async(&mut conn).await;
        self.check(generation, result)
    }
}

/// Names a new connection `name` (`CLIENT SETNAME`), so that `CLIENT LIST`
/// shows whose it is. A server that refuses (an ACL without `CLIENT`) keeps
/// it unnamed; a connection that fails here fails the connect.
pub(super) async fn name_connection(
    conn: &mut MultiplexedConnection,
    name: &str,
) -> redis::RedisResult<()> {
    let named: redis::RedisResult<()> = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .exec_async(conn)
        .await;
    match named {
        Err(e) if e.is_timeout() || e.is_unrecoverable_error() || e.is_connection_dropped() => {
            Err(e)
        }
        Err(e) => {
            tracing::debug!(error = %e, "dblock: CLIENT SETNAME refused; the connection stays unnamed");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// The Redis dialect of the lease protocol.
#[derive(Debug)]
pub(crate) struct RedisStore {
    conn: Conn,
    keys: Keys,
    listener: Listener,
    marks: Marks,
}

/// The owners (acquisitions) whose claim left a waiting writer's mark: their
/// claim that takes the name deletes it. Nobody else's claim touches the
/// mark, so the uncontended claim writes no third key.
///
/// An acquisition that gives up stays listed; past [`Marks::MAX`] the list
/// is cleared. A mark nobody deletes lapses by itself (its `PX` is a little
/// past its writer's next try), so forgetting one costs readers at most
/// that wait, never correctness.
#[derive(Debug, Default)]
struct Marks(Mutex<foldhash::HashSet<Box<str>>>);

impl Marks {
    const MAX: usize = 4096;

    fn left(&self, owner: &str) -> bool {
        self.0.lock().unwrap().contains(owner)
    }

    fn leave(&self, owner: &str) {
        let mut marks = self.0.lock().unwrap();
        if marks.len() >= Self::MAX {
            marks.clear();
        }
        marks.insert(owner.into());
    }

    fn forget(&self, owner: &str) {
        self.0.lock().unwrap().remove(owner);
    }
}

/// A duration as whole milliseconds for `PX`, rounded up (and at least 1).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_micros().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}

fn bad_reply(what: &'static str, detail: String) -> Error {
    Error::Redis(RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        what,
        detail,
    )))
}

/// A renewal script's answer for `batch`: per lease, its new expiry in µs,
/// or 0 if it is no longer ours.
fn renewal_answers(batch: &[Renewal], reply: Vec<i64>) -> Result<Vec<Renewed>> {
    if reply.len() != batch.len() {
        return Err(bad_reply(
            "renewal answered for a different number of leases",
            format!("{} for {}", reply.len(), batch.len()),
        ));
    }
    reply
        .into_iter()
        .map(|at| {
            Ok(if at > 0 {
                Renewed::Until(time(at)?)
            } else {
                Renewed::Gone
            })
        })
        .collect()
}

fn time(micros: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| bad_reply("lease time out of range", micros.to_string()))
}

/// Reads a lease's value, `"{owner} {token} {acquired µs} {mode} {holder}"`,
/// with its PTTL and the server's time.
fn info(name: &str, value: &str, pttl_ms: i64, now_us: i64) -> Result<LockInfo> {
    let mut parts = value.splitn(5, ' ');
    let (Some(_owner), Some(token), Some(acquired), Some(mode), Some(holder)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad_reply("not a dblock lease value", value.to_owned()));
    };
    let number = |s: &str| {
        s.parse::<i64>()
            .map_err(|_| bad_reply("not a dblock lease value", value.to_owned()))
    };
    let marker = mode == "n";
    let mode = if mode == "s" {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let mut info = LockInfo::new(Some(name.to_owned()), holder.to_owned(), mode);
    if marker {
        // A semaphore's marker: no holder of its own; inspect and list
        // report its permits instead.
        info.holders = 0;
    }
    info.token = Some(number(token)? as u64);
    info.acquired_at = Some(time(number(acquired)?)?);
    info.expires_at = Some(time(now_us.saturating_add(pttl_ms.saturating_mul(1000)))?);
    Ok(info)
}

impl RedisStore {
    /// Runs the release script `script` of a lease, or of a permit (whose
    /// permits hash is its second key): KEYS the lock key (and the permits
    /// hash), ARGV owner, token, hold_at_least in ms (0 without), channel,
    /// name. Whether it was ours.
    pub(super) async fn release_by(
        &self,
        script: &Script,
        permit: bool,
        lease: LeaseId<'_>,
        hold: Option<Duration>,
    ) -> Result<bool> {
        let LeaseId { name, owner, token } = lease;
        let mut invocation = script.prepare_invoke();
        invocation.key(self.keys.lock(name));
        if permit {
            invocation.key(self.keys.permits(name));
        }
        invocation
            .arg(owner)
            .arg(token)
            .arg(hold.map(millis).unwrap_or(0))
            .arg(self.keys.channel(name))
            .arg(name);
        let released: i64 = self.conn.script_again(&invocation).await?;
        Ok(released == 1)
    }

    /// Replaces each semaphore's marker among `infos` by its permits.
    async fn with_permits(&self, infos: Vec<LockInfo>) -> Result<Vec<LockInfo>> {
        let mut out = Vec::with_capacity(infos.len());
        for info in infos {
            match (info.holders, &info.name) {
                (0, Some(name)) => out.extend(self.inspect_permits(name).await?),
                _ => out.push(info),
            }
        }
        Ok(out)
    }

    /// The live leases among `names`, by one script.
    async fn inspect_many(&self, names: &[&str]) -> Result<Vec<LockInfo>> {
        let mut invocation = INSPECT.prepare_invoke();
        for name in names {
            invocation.key(self.keys.lock(name));
        }
        let reply: Vec<Value> = self.conn.script_again(&invocation).await?;
        let int = |v: &Value| match v {
            Value::Int(n) => Ok(*n),
            other => Err(bad_reply("expected an integer", format!("{other:?}"))),
        };
        let Some(now) = reply.first() else {
            return Err(bad_reply("empty inspect reply", String::new()));
        };
        let now = int(now)?;
        let mut out = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let (Some(value), Some(pttl)) = (reply.get(2 * k + 1), reply.get(2 * k + 2)) else {
                return Err(bad_reply("short inspect reply", format!("{reply:?}")));
            };
            let pttl = int(pttl)?;
            match value {
                Value::BulkString(bytes) if pttl >= 0 => {
                    let value = String::from_utf8_lossy(bytes);
                    out.push(info(name, &value, pttl, now)?);
                }
                // Gone (nil, PTTL -2), or without expiry (PTTL -1): not a
                // lease dblock wrote.
                _ => {}
            }
        }
        Ok(out)
    }
}

impl LeaseStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis-lease"
    }

    /// A third of the connection's [`RESPONSE_TIMEOUT`]: past that the
    /// client drops the claim's answer, and a claim that ran meanwhile
    /// would hold the name with no one to give it back.
    fn claim_grace(&self) -> Duration {
        RESPONSE_TIMEOUT / 3
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
        if claim.is_holder() {
            return self.claim_permit(claim).await;
        }
        if (claim.abandoned)() {
            return Ok(None);
        }
        let marked = claim.writer_waits.is_some() && self.marks.left(claim.owner);
        let mut invocation = CLAIM.prepare_invoke();
        invocation
            .key(self.keys.lock(claim.name))
            .key(self.keys.counter())
            .key(self.keys.writer(claim.name))
            .arg(claim.owner)
            .arg(claim.holder)
            .arg(millis(claim.ttl))
            .arg(claim.writer_waits.map_or(0, millis))
            .arg(if marked { "1" } else { "0" });
        let reply: Value = self.conn.script(&invocation).await?;
        match reply {
            Value::Nil => Ok(None),
            Value::Int(0) => {
                self.marks.leave(claim.owner);
                Ok(None)
            }
            Value::Array(ref pair) => match pair.as_slice() {
                [Value::Int(token), Value::Int(expires_at)] => {
                    if marked {
                        self.marks.forget(claim.owner);
                    }
                    Ok(Some(Claimed {
                        token: *token as u64,
                        expires_at: time(*expires_at)?,
                    }))
                }
                _ => Err(bad_reply("unexpected claim reply", format!("{reply:?}"))),
            },
            other => Err(bad_reply("unexpected claim reply", format!("{other:?}"))),
        }
    }

    async fn renew(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        let one = [Renewal {
            name: lease.name.into(),
            owner: lease.owner.into(),
            token: lease.token,
            ttl,
        }];
        Ok(match self.renew_many(&one).await?.first() {
            Some(Renewed::Until(at)) => Some(*at),
            _ => None,
        })
    }

    async fn renew_many(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let mut invocation = RENEW.prepare_invoke();
        for r in batch {
            invocation
                .key(self.keys.lock(&r.name))
                .arg(&*r.owner)
                .arg(r.token)
                .arg(millis(r.ttl));
        }
        let reply: Vec<i64> = self.conn.script_again(&invocation).await?;
        renewal_answers(batch, reply)
    }

    async fn renew_permit(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        self.renew_holder(lease, ttl).await
    }

    async fn renew_holders(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        self.renew_permits(batch).await
    }

    fn batch_len(&self, batch: &[Renewal]) -> usize {
        batch.len().min(MAX_BATCH)
    }

    async fn release(&self, lease: LeaseId<'_>, hold: Option<Duration>) -> Result<bool> {
        self.release_by(&RELEASE, false, lease, hold).await
    }

    async fn release_permit(&self, lease: LeaseId<'_>, hold: Option<Duration>) -> Result<bool> {
        self.release_holder(lease, hold).await
    }

    async fn force_release(&self, name: &str) -> Result<bool> {
        let mut invocation = FORCE_RELEASE.prepare_invoke();
        invocation
            .key(self.keys.lock(name))
            .key(self.keys.permits(name))
            .arg(self.keys.channel(name))
            .arg(name);
        let broken: i64 = self.conn.script(&invocation).await?;
        Ok(broken == 1)
    }

    async fn inspect(&self, name: &str) -> Result<Option<LockInfo>> {
        Ok(self
            .with_permits(self.inspect_many(&[name]).await?)
            .await?
            .pop())
    }

    async fn now(&self) -> Result<DateTime<Utc>> {
        // TIME answers seconds and microseconds, as strings.
        let (secs, micros): (i64, i64) = self.conn.query(&redis::cmd("TIME")).await?;
        time(secs.saturating_mul(1_000_000).saturating_add(micros))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let mut cursor: u64 = 0;
        let mut out: Vec<LockInfo> = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .conn
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(self.keys.pattern())
                        .arg("COUNT")
                        .arg(SCAN_COUNT),
                )
                .await?;
            let names: Vec<&str> = keys.iter().filter_map(|k| self.keys.name_of(k)).collect();
            if !names.is_empty() {
                out.extend(self.inspect_many(&names).await?);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // SCAN may return a key more than once.
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        self.with_permits(out).await
    }

    fn waiting(&self) {
        self.listener.ensure_running();
    }
}
