//! Redis: leases as keys with a server-side expiry ([`Lease`]), the correct
//! version of the familiar `SET key value NX PX ttl` lock.
//!
//! # How a lease is kept
//!
//! Each step is one Lua script, run atomically by the server, with every
//! key in `KEYS` and every value in `ARGV` (nothing is formatted into a
//! script). Every expiry is the server's: `PX` / `PEXPIRE` on the key and
//! the server's `TIME`; the client's clock decides nothing.
//!
//! - **Claim**: `SET {prefix}lock:{name} "{owner} {token} {acquired µs} x
//!   {holder}" NX PX ttl`, and in the same script the fencing token (below)
//!   is drawn and stored. A held name answers "busy" at once (and is
//!   marked waited for if the claimer will wait, see "Waiting").
//! - **Renew** (background, batched): one script per renewal tick for every
//!   lease the process holds that is due, each `PEXPIRE`d to its own ttl
//!   only if its value still starts with its owner id and token. One round
//!   trip renews up to 10,000 of them (a script holds the whole server
//!   while it runs, so a larger tick sends one script per 10,000 leases).
//! - **Extend** and **release**: one script each, checking the owner id and
//!   the token the same way. Release deletes the key and, if a waiter
//!   marked it, `PUBLISH`es the name; with `hold_at_least` the key is kept, its owner id replaced by
//!   `-` (so no renewal or release can match it any more), until
//!   `acquired_at + hold` by the server's clock.
//! - **Force release** deletes the key whoever holds it, and publishes.
//! - **Inspect** reads the key, its `PTTL` and `TIME` in one script;
//!   **list** walks `SCAN MATCH {prefix}lock:*` (never `KEYS`) and reads
//!   each page of keys with the same script.
//!
//! # Fencing tokens without persistence
//!
//! One counter key, `{prefix}token`, is shared by every name (so the keys
//! dblock keeps are one per live lease plus this one: nothing per name
//! lives forever). Each claim takes
//!
//! ```text
//! token = max(counter + 1, server TIME in microseconds)
//! ```
//!
//! and stores it back in the counter, in the claim's script. So:
//!
//! - tokens strictly increase across every name while the counter lives
//!   (`counter + 1`), even for two claims in the same microsecond or a
//!   server clock stepped back;
//! - when the counter is lost — a restart of a Redis that keeps nothing on
//!   disk, a `FLUSHALL`, a failover to a replica that had not received the
//!   last writes — the next token is the server's clock in microseconds,
//!   which is above every earlier token **as long as the server's clock
//!   (the new primary's, after a failover) reads later than it did at the
//!   last claim before the loss**. The counter can run ahead of the clock
//!   only by the number of claims made within one microsecond (Redis runs
//!   far fewer than one script per microsecond), so any restart, which
//!   takes milliseconds at least, resumes above it.
//!
//! What the guarantee rests on is therefore the server's wall clock not
//! going back across a loss of the counter (keep it synchronised with
//! NTP slewing, not stepping, and fail over between machines whose clocks
//! agree to better than the failover takes). Tokens are about
//! 1.8 × 10¹⁵ today and stay exact in the scripts' double precision until
//! the year 2255.
//!
//! # Waiting
//!
//! A release publishes the name on the channel `{prefix}released:{name}`
//! when someone may be waiting for it: a claim that misses and will wait
//! turns the lease's mode `x` into `w` ("waited for") in the same script,
//! and only the release of a lease so marked publishes (the release of a
//! lease nobody waited for, the common case, costs the server no
//! `PUBLISH`). Since the mark and the miss are one atomic step, a release
//! after a waiter's miss always publishes; one before the waiter's
//! subscription takes effect is covered by the wake-up each new
//! subscription gives its waiters. The release of permits and readers,
//! and `force_release`, always publish. A backend with waiters keeps one extra pub/sub connection that
//! subscribes to exactly the names its waiters wait for, wakes them when
//! a release arrives, and stops a minute after the last waiter. Polling
//! with backoff (bounded by [`LeaseOptions::max_poll`](crate::LeaseOptions))
//! stays as the fallback: for a lease that expires rather than being
//! released, and while the pub/sub connection is down.
//!
//! # What Redis can and cannot promise
//!
//! Redis replicates asynchronously: a primary that fails right after
//! granting a lease may not have passed the key to the replica that takes
//! over, and the new primary grants the name again. dblock cannot prevent
//! that on Redis (nor does Redlock, whose safety rests on timing
//! assumptions); what it does guarantee is that the second holder's token
//! is larger, so a resource that checks [`LockGuard::token`](crate::LockGuard::token)
//! refuses the first holder's late writes. Use a SQL backend where losing a
//! lock on failover is not acceptable at all.
//!
//! Redis Cluster is not supported (a claim touches two keys that would
//! live in different slots). Redis 6.2 or later is needed: scripts read
//! `TIME` before writing, the claim draws its token by `SET ... GET` and
//! marks a lease waited for with `SET ... KEEPTTL`, and the pub/sub
//! connection speaks RESP3 (tested on Redis 7).
//!
//! **Shared (reader) leases** (`.shared()`): readers are permits of
//! capacity 1 without an upper bound, fields of the hash
//! `{prefix}permits:{name}`, each with its own token. A writer that finds
//! readers and will wait sets `{prefix}writer:{name}` (`PX`: a little past
//! its next try) in its claim script; reader claims wait while it exists,
//! so readers cannot starve a writer, and a writer's claim deletes it. The
//! last reader's release publishes on the name's channel, waking the
//! writer.

mod lease;
mod listen;

#[doc(hidden)]
pub use lease::bench_scripts;
pub use lease::Lease;
