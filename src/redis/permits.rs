//! Permits of semaphores in Redis (see [`crate::lease::permits`]).
//!
//! The permits of a name live in one hash, `{prefix}permits:{name}`: a
//! field per permit, named by its token, whose value is `owner token
//! acquired_µs expires_µs n holder` (owner `-` once released with
//! `hold_at_least`). While permits are live, the name's lock key holds a
//! marker, `- token acquired n -`, expiring with the latest permit: the
//! plain claim's `SET NX` then fails, and plain renewals and releases never
//! match it. Each step is one Lua script, so a claim counts the live
//! permits and takes one atomically; tokens come from the same counter as
//! plain leases.
//!
//! Readers are permits of capacity 1 without an upper bound. A writer
//! that misses a name whose key is such a marker and is going to wait
//! sets `{prefix}writer:{name}` (with `PX`: it lapses by itself if the
//! writer goes away) in its claim script; a reader claim refuses while it
//! exists, and a writer's successful claim deletes it.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{bad_reply, millis, time, RedisStore};
use crate::lease::permits::{self, disagreement};
use crate::lease::{Claim, Claimed, LeaseId, NewExpiry, Renewal, Renewed};
use crate::{LockInfo, Result};

/// Lua that drops the expired permits of hash `hk` (a local: `KEYS[2]` in
/// the scripts of one name) and leaves, in `live`, the values of the others
/// and, in `latest`, the latest expiry.
macro_rules! lua_live {
    () => {
        "local live, latest = {}, 0
local all = redis.call('HGETALL', hk)
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], '^%S+ %S+ %S+ (%d+) '))
  if expires > now then
    live[#live + 1] = all[i + 1]
    if expires > latest then latest = expires end
  else
    redis.call('HDEL', hk, all[i])
  end
end
"
    };
}

/// Lua that makes the marker `lk` and the hash `hk` (locals: `KEYS[1]` and
/// `KEYS[2]` in the scripts of one name) last until `latest` (µs), or
/// deletes both when no permit is live.
macro_rules! lua_settle {
    () => {
        "if latest > now then
  local ms = string.format('%.0f', math.ceil((latest - now) / 1000))
  redis.call('PEXPIRE', lk, ms)
  redis.call('PEXPIRE', hk, ms)
else
  redis.call('DEL', lk, hk)
end
"
    };
}

/// Lua that finds the permit of owner `ARGV[1]` and token `ARGV[2]` in
/// the hash `KEYS[2]`, answering 0 unless it is there and live, and leaves
/// its value's parts in `v`, `p` (`owner token `), `acquired` (matched by
/// the pattern given), `expires` and `rest`.
macro_rules! lua_own_permit {
    ($acquired:literal) => {
        concat!(
            "local v = redis.call('HGET', KEYS[2], ARGV[2])
local p = ARGV[1] .. ' ' .. ARGV[2] .. ' '
if not v or string.sub(v, 1, #p) ~= p then return 0 end
local acquired, expires, rest = string.match(v, '^%S+ %S+ (",
            $acquired,
            ") (%d+) (.*)$')
if tonumber(expires) <= now then return 0 end
"
        )
    };
}

/// KEYS: the lock key, the permits hash, the token counter, the waiting
/// writer's mark. ARGV: owner, holder, ttl in ms, n (1 for a reader).
/// Answers `{token, expires µs}`, `{-1, n found}` when the name is held
/// with another n (a plain lease counting as 1), or false when every
/// permit is taken (for a reader: when a writer holds the name or waits
/// for it, see [`crate::lease::permits`], "Readers").
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local lk, hk = KEYS[1], KEYS[2]\n",
        "local n = tonumber(ARGV[4])
local marker = redis.call('GET', KEYS[1])
if marker and not string.match(marker, '^%- %S+ %S+ n ') then
  if n == 1 then
    -- A reader waits for a writer: its release is to publish (mode `w`).
    local head, tail = string.match(marker, '^(%S+ %S+ %S+ )x( .*)$')
    if head then
      redis.call('SET', KEYS[1], head .. 'w' .. tail, 'KEEPTTL')
    end
    return false
  end
  return {-1, 1}
end
if n == 1 and redis.call('EXISTS', KEYS[4]) == 1 then return false end
",
        lua_live!(),
        "if #live > 0 then
  local found = tonumber(string.match(live[1], '^%S+ %S+ %S+ %S+ (%d+) '))
  if found ~= n then return {-1, found} end
  if n > 1 and #live >= n then return false end
end
local token = math.max((tonumber(redis.call('GET', KEYS[3])) or 0) + 1, now)
local s = string.format('%.0f', token)
local expires = now + tonumber(ARGV[3]) * 1000
redis.call('SET', KEYS[3], s)
redis.call('HSET', KEYS[2], s, ARGV[1] .. ' ' .. s .. ' ' .. string.format('%.0f', now) .. ' '
  .. string.format('%.0f', expires) .. ' ' .. ARGV[4] .. ' ' .. ARGV[2])
if expires > latest then latest = expires end
redis.call('SET', KEYS[1], '- ' .. s .. ' ' .. string.format('%.0f', now) .. ' n -')
",
        lua_settle!(),
        "return {token, expires}"
    ))
});

/// KEYS: the lock key, the permits hash. ARGV: owner, token, ttl in ms.
/// Renews the permit if still ours and live; its new expiry in µs, or 0.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local lk, hk = KEYS[1], KEYS[2]\n",
        lua_own_permit!("%S+"),
        "local until_ = now + tonumber(ARGV[3]) * 1000
redis.call('HSET', KEYS[2], ARGV[2], p .. acquired .. ' ' .. string.format('%.0f', until_) .. ' ' .. rest)
",
        lua_live!(),
        lua_settle!(),
        "return until_"
    ))
});

/// KEYS: per lease, its lock key and its permits hash. ARGV: per lease,
/// owner, token, ttl in ms. Renews each permit (or reader) still ours and
/// live, then settles each name touched once. Answers, per lease, its new
/// expiry in µs, or 0 if it is no longer ours.
static RENEW_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local out, touched = {}, {}
for i = 1, #KEYS / 2 do
  local lk, hk = KEYS[2 * i - 1], KEYS[2 * i]
  local token = ARGV[3 * i - 1]
  local p = ARGV[3 * i - 2] .. ' ' .. token .. ' '
  local v = redis.call('HGET', hk, token)
  out[i] = 0
  if v and string.sub(v, 1, #p) == p then
    local acquired, expires, rest = string.match(v, '^%S+ %S+ (%S+) (%d+) (.*)$')
    if tonumber(expires) > now then
      local until_ = now + tonumber(ARGV[3 * i]) * 1000
      redis.call('HSET', hk, token,
        p .. acquired .. ' ' .. string.format('%.0f', until_) .. ' ' .. rest)
      out[i] = until_
      touched[hk] = lk
    end
  end
end
for hk, lk in pairs(touched) do
",
        lua_live!(),
        lua_settle!(),
        "end
return out"
    ))
});

/// KEYS: the lock key, the permits hash. ARGV: owner, token,
/// hold_at_least in ms (0 without), channel, name. Ends the permit if
/// still ours (or keeps it, owner `-`, until `acquired + hold`), settles
/// the marker and wakes waiters. 1 if it was ours.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local lk, hk = KEYS[1], KEYS[2]\n",
        lua_own_permit!("%d+"),
        "local hold_until = tonumber(acquired) + tonumber(ARGV[3]) * 1000
if hold_until > now then
  redis.call('HSET', KEYS[2], ARGV[2], '- ' .. ARGV[2] .. ' ' .. acquired .. ' '
    .. string.format('%.0f', hold_until) .. ' ' .. rest)
else
  redis.call('HDEL', KEYS[2], ARGV[2])
end
",
        lua_live!(),
        lua_settle!(),
        "redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1"
    ))
});

/// KEYS: the lock key, the permits hash. Answers now (µs) and the values of
/// the live permits.
static INSPECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local lk, hk = KEYS[1], KEYS[2]\n",
        "local marker = redis.call('GET', KEYS[1])
if not marker or not string.match(marker, '^%- %S+ %S+ n ') then return {now} end
",
        lua_live!(),
        "table.insert(live, 1, now)
return live"
    ))
});

impl RedisStore {
    pub(super) async fn claim_permit(&self, claim: &Claim<'_>) -> Result<Option<Claimed>> {
        if (claim.abandoned)() {
            return Ok(None);
        }
        let mut invocation = CLAIM.prepare_invoke();
        invocation
            .key(self.keys.lock(claim.name))
            .key(self.keys.permits(claim.name))
            .key(self.keys.counter())
            .key(self.keys.writer(claim.name))
            .arg(claim.owner)
            .arg(claim.holder)
            .arg(millis(claim.ttl))
            .arg(claim.max_holders);
        let reply: Option<(i64, i64)> = self.conn.script(&invocation).await?;
        match reply {
            None => Ok(None),
            Some((-1, found)) => Err(disagreement(
                claim.name,
                claim.max_holders,
                found.clamp(0, u32::MAX as i64) as u32,
            )),
            Some((token, expires_at)) => Ok(Some(Claimed {
                token: token as u64,
                expires_at: time(expires_at)?,
            })),
        }
    }

    pub(super) async fn renew_holder(&self, lease: LeaseId<'_>, ttl: Duration) -> NewExpiry {
        let LeaseId { name, owner, token } = lease;
        let mut invocation = RENEW.prepare_invoke();
        invocation
            .key(self.keys.lock(name))
            .key(self.keys.permits(name))
            .arg(owner)
            .arg(token)
            .arg(millis(ttl));
        let at: i64 = self.conn.script_again(&invocation).await?;
        (at > 0).then(|| time(at)).transpose()
    }

    /// Renews the permits (and readers) of `batch` by one script.
    pub(super) async fn renew_permits(&self, batch: &[Renewal]) -> Result<Vec<Renewed>> {
        let mut invocation = RENEW_MANY.prepare_invoke();
        for r in batch {
            invocation
                .key(self.keys.lock(&r.name))
                .key(self.keys.permits(&r.name))
                .arg(&*r.owner)
                .arg(r.token)
                .arg(millis(r.ttl));
        }
        let reply: Vec<i64> = self.conn.script_again(&invocation).await?;
        super::renewal_answers(batch, reply)
    }

    pub(super) async fn release_holder(
        &self,
        lease: LeaseId<'_>,
        hold: Option<Duration>,
    ) -> Result<bool> {
        self.release_by(&RELEASE, true, lease, hold).await
    }

    /// The live permits of `name`, if its lock key is a semaphore's marker.
    pub(super) async fn inspect_permits(&self, name: &str) -> Result<Option<LockInfo>> {
        let mut invocation = INSPECT.prepare_invoke();
        invocation
            .key(self.keys.lock(name))
            .key(self.keys.permits(name));
        let reply: Vec<redis::Value> = self.conn.script_again(&invocation).await?;
        let mut values = reply.into_iter();
        let _now = values.next();
        let mut permits: Vec<Permit> = Vec::new();
        for v in values {
            let redis::Value::BulkString(bytes) = v else {
                return Err(bad_reply("not a permit", format!("{v:?}")));
            };
            let text = String::from_utf8_lossy(&bytes).into_owned();
            permits.push(Permit::parse(&text)?);
        }
        if permits.is_empty() {
            return Ok(None);
        }
        let mut holders: Vec<&str> = permits.iter().map(|p| p.holder.as_str()).collect();
        holders.sort_unstable();
        holders.dedup();
        Ok(Some(permits::info(
            name.to_owned(),
            permits.len() as u32,
            permits.iter().map(|p| p.n).max().unwrap_or(1),
            permits.iter().map(|p| p.token).max().unwrap_or(0),
            holders.join(", "),
            time(permits.iter().map(|p| p.acquired).min().unwrap_or(0))?,
            time(permits.iter().map(|p| p.expires).max().unwrap_or(0))?,
        )))
    }
}

/// One permit's value in the hash.
struct Permit {
    token: u64,
    acquired: i64,
    expires: i64,
    n: u32,
    holder: String,
}

impl Permit {
    fn parse(value: &str) -> Result<Permit> {
        let bad = || bad_reply("not a dblock permit", value.to_owned());
        let mut parts = value.splitn(6, ' ');
        let mut next = || parts.next().ok_or_else(bad);
        let _owner = next()?;
        let token = next()?.parse().map_err(|_| bad())?;
        let acquired = next()?.parse().map_err(|_| bad())?;
        let expires = next()?.parse().map_err(|_| bad())?;
        let n = next()?.parse().map_err(|_| bad())?;
        let holder = next()?.to_owned();
        Ok(Permit {
            token,
            acquired,
            expires,
            n,
            holder,
        })
    }
}
