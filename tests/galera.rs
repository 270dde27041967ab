//! `dblock::mysql::Lease` on a three-node MariaDB Galera cluster
//! (`DBLOCK_TEST_GALERA_URLS`, started by `scripts/topology/galera.sh`),
//! with clients spread over every node at once (multi-primary).
#![cfg(feature = "mysql")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dblock::mysql::{lock_in_transaction, migrate, Flavor, Lease};
use dblock::{Error, Locks};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, MySqlPool};
use tokio::sync::{Barrier, OnceCell};

/// A pool on node `k` (modulo the number of nodes). The schema is created
/// once, through the first node; Galera replicates the DDL to the others.
async fn pool_on(k: usize) -> MySqlPool {
    pool_with(k, "").await
}

async fn pool_with(k: usize, setup: &'static str) -> MySqlPool {
    static MIGRATED: OnceCell<()> = OnceCell::const_new();
    let urls = common::galera_urls();
    MIGRATED
        .get_or_init(|| async {
            let pool = MySqlPool::connect(&urls[0]).await.unwrap_or_else(|e| {
                panic!(
                    "connect to Galera node {} (DBLOCK_TEST_GALERA_URLS): {e}",
                    urls[0]
                )
            });
            migrate(&pool).await.expect("migrate");
        })
        .await;
    let url = &urls[k % urls.len()];
    MySqlPoolOptions::new()
        .max_connections(20)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if !setup.is_empty() {
                    sqlx::raw_sql(setup).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to Galera node {url} (DBLOCK_TEST_GALERA_URLS): {e}"))
}

/// A pool on each node.
async fn every_node() -> Vec<MySqlPool> {
    let mut pools = Vec::new();
    for k in 0..common::galera_urls().len() {
        pools.push(pool_on(k).await);
    }
    pools
}

/// A `Locks` on each of `pools`.
fn on_every_node(pools: &[MySqlPool]) -> Vec<Locks> {
    pools
        .iter()
        .map(|p| Locks::new(Lease::new(p.clone())))
        .collect()
}

/// The behavioural suite's fixture: each new `Locks` talks to the next
/// node, so every behaviour runs with its parties on different nodes.
struct GaleraFixture {
    next: AtomicUsize,
}

impl suite::Fixture for GaleraFixture {
    async fn locks(&self) -> Locks {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        Locks::new(Lease::new(pool_on(k).await))
    }
    fn unreachable(&self) -> Locks {
        Locks::new(Lease::new(common::lazy_pool(common::NOWHERE_MY)))
    }
}

mod suite;

mod behaviour {
    use super::*;
    behaviour_suite!(async {
        GaleraFixture {
            next: AtomicUsize::new(0),
        }
    });
}

/// The sum over every node of a wsrep status counter.
async fn cluster_counter(pools: &[MySqlPool], name: &str) -> u64 {
    let mut sum = 0;
    for pool in pools {
        let value: String = sqlx::query_scalar(
            "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = ?",
        )
        .bind(name.to_ascii_uppercase())
        .fetch_one(pool)
        .await
        .unwrap();
        sum += value.parse::<u64>().unwrap();
    }
    sum
}

/// The engine self-test sees a Galera node behind every URL, refuses named
/// locks there, and grants leases.
#[tokio::test]
async fn engine_self_test_detects_galera() {
    for k in 0..common::galera_urls().len() {
        let lease = Lease::new(pool_on(k).await);
        let engine = lease.engine().await.unwrap();
        assert!(engine.is_galera(), "node {k}: {engine:?}");
        assert_eq!(engine.flavor(), Flavor::MariaDb);
        assert!(engine.check_leases().is_ok());
        assert!(engine.check_lock_in_tx().is_err());
        let err = engine.check_named_locks().unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    }
}

/// A pool whose sessions turn replication off would write lease rows on one
/// node only: the first claim is refused, and nothing is written.
#[tokio::test]
async fn session_without_replication_is_refused() {
    let local = Locks::new(Lease::new(pool_with(0, "SET SESSION wsrep_on = OFF").await));
    let name = common::unique("no-wsrep");
    let err = local.acquire(&name).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { what, .. } if what.contains("wsrep_on=OFF")),
        "{err:?}"
    );
    let pool = pool_on(0).await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dblock_leases WHERE name = ?")
        .bind(name.as_bytes())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "a refused claim wrote its row");
}

/// Claims of one free name on every node at the same instant: Galera lets
/// the first write set through and fails the others with a certification
/// conflict (1213, at COMMIT or as a brute-force abort). dblock retries
/// those, and each round ends with exactly one holder and no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certification_conflicts_are_retried() {
    let n = common::galera_urls().len();
    let pools = every_node().await;
    let locks = on_every_node(&pools);
    let conflicts = |pools| async move {
        cluster_counter(pools, "wsrep_local_cert_failures").await
            + cluster_counter(pools, "wsrep_local_bf_aborts").await
    };
    let before = conflicts(&pools).await;
    let rounds = 40;
    let mut last_token = 0;
    for round in 0..rounds {
        let name = common::unique("certify");
        // The row exists and every node has it, so that the round races
        // on the claim itself, not on creating the row.
        locks[0]
            .acquire(&name)
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        let barrier = Arc::new(Barrier::new(n));
        let mut tasks = Vec::new();
        for l in &locks {
            let (l, name, barrier) = (l.clone(), name.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let got = l.try_acquire(&name).await;
                // Keep the winner's guard until every claim has finished.
                got.map(|g| g.map(|g| (g.token(), g)))
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(Some(won)) => winners.push(won),
                Ok(None) => {}
                Err(e) => panic!("round {round}: a claim failed instead of being retried: {e:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {} holders", winners.len());
        let (token, guard) = winners.pop().unwrap();
        assert!(token >= 2, "round {round}: token {token}");
        last_token = last_token.max(token);
        guard.release().await.unwrap();
    }
    let after = conflicts(&pools).await;
    assert!(
        after > before,
        "no certification conflict happened in {rounds} rounds: the test proved nothing"
    );
    println!(
        "{} certification conflicts / brute-force aborts in {rounds} rounds",
        after - before
    );
}

/// Fencing tokens strictly increase across holders on different nodes:
/// claimed in turn on each node, and contended from every node at once in
/// the order the holders got in. Tokens come from the lease row, certified
/// cluster-wide; anything per node (AUTO_INCREMENT steps by
/// `auto_increment_increment` with a per-node offset on Galera) would
/// break this.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_tokens_increase_across_nodes() {
    let n = common::galera_urls().len();
    let locks = on_every_node(&every_node().await);
    // In turn: each claim on the next node, released or left to expire.
    let name = common::unique("fence-turns");
    let mut last = 0;
    for i in 0..(6 * n) {
        let token = if i % 4 == 3 {
            // A holder that dies: the next node takes over after the ttl.
            abandoned_claim(pool_on(i).await, &name).await
        } else {
            let g = locks[i % n]
                .acquire(&name)
                .wait(Duration::from_secs(10))
                .await
                .unwrap();
            let token = g.token();
            g.release().await.unwrap();
            token
        };
        assert!(
            token > last,
            "claim {i} on node {}: token {token} after {last}",
            i % n
        );
        last = token;
    }
    // Contended: every node's tasks queue for the name; each records its
    // token inside the critical section, so the log is in holding order.
    let name = common::unique("fence-contended");
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (k, l) in locks.iter().enumerate() {
        for _ in 0..3 {
            let (l, name, log) = (l.clone(), name.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    let g = l
                        .acquire(&name)
                        .wait(Duration::from_secs(30))
                        .await
                        .unwrap();
                    log.lock().unwrap().push((g.token(), k));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    g.release().await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap();
    assert_eq!(log.len(), n * 3 * 5);
    for w in log.windows(2) {
        assert!(
            w[1].0 > w[0].0,
            "token {:?} after {:?} (token, node)",
            w[1],
            w[0]
        );
    }
    let nodes: std::collections::HashSet<usize> = log.iter().map(|&(_, k)| k).collect();
    assert_eq!(nodes.len(), n, "some node never held the lock");
}

/// Takes `name` with a short ttl in a runtime that is then torn down, as a
/// killed process would leave it; returns the token.
async fn abandoned_claim(pool: MySqlPool, name: &str) -> u64 {
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let token = rt.block_on(async {
            let locks = Locks::new(Lease::new(pool));
            let g = locks
                .acquire(&name)
                .ttl(Duration::from_millis(600))
                .wait(Duration::from_secs(10))
                .await
                .unwrap();
            let token = g.token();
            std::mem::forget(g);
            token
        });
        rt.shutdown_background();
        token
    })
    .await
    .unwrap()
}

/// `lock_in_transaction` is refused on Galera (its row lock holds on one node only;
/// see `Engine::check_lock_in_tx`): `Unsupported`, nothing written, and the
/// caller's transaction still usable.
#[tokio::test]
async fn lock_in_tx_is_refused() {
    let pool = pool_on(0).await;
    let name = common::unique("tx-refused");
    let mut tx = pool.begin().await.unwrap();
    let err = lock_in_transaction(&mut tx, &name).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { what, .. } if what.contains("lock_in_transaction") && what.contains("Galera")),
        "{err:?}"
    );
    let err = Lease::new(pool.clone())
        .lock_in_transaction_with(&mut tx, &name, dblock::Wait::No)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let one: i64 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(one, 1);
    tx.commit().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dblock_leases WHERE name = ?")
        .bind(name.as_bytes())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "a refused lock_in_transaction wrote its row");
}

/// Pauses the applier of `pool`'s node (`FLUSH TABLES WITH READ LOCK` on a
/// Galera node desyncs it and holds back the write sets it receives) for
/// `for_ms` from now.
async fn pause_applier(pool: &MySqlPool, for_ms: u64) -> tokio::task::JoinHandle<()> {
    let mut pause = pool.acquire().await.unwrap();
    sqlx::raw_sql("FLUSH TABLES WITH READ LOCK")
        .execute(&mut *pause)
        .await
        .unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(for_ms)).await;
        sqlx::raw_sql("UNLOCK TABLES")
            .execute(&mut *pause)
            .await
            .unwrap();
    })
}

/// An inspection on a node whose applier is paused, of a release made on
/// another node: it waits until the node has applied the release
/// (`wsrep_sync_wait`) rather than answer from its stale copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_waits_for_writes_committed_on_other_nodes() {
    let (p1, p2) = (pool_on(0).await, pool_on(1).await);
    let (one, two) = (
        Locks::new(Lease::new(p1)),
        Locks::new(Lease::new(p2.clone())),
    );
    let name = common::unique("causal-inspect");
    let held = one.acquire(&name).await.unwrap();
    assert!(two.inspect(&name).await.unwrap().is_some());
    let resume = pause_applier(&p2, 500).await;
    held.release().await.unwrap();
    let started = tokio::time::Instant::now();
    assert!(
        two.inspect(&name).await.unwrap().is_none(),
        "inspect on the paused node answered from its stale copy"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the node was not paused"
    );
    resume.await.unwrap();
}

/// A claim right after a release on another node finds the name free.
/// (A paused applier cannot show this for claims: the pause's global read
/// lock also stops the claim's locking read. So: many quick rounds, each
/// released on one node and claimed at once on the next.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_sees_a_release_made_on_another_node() {
    let n = common::galera_urls().len();
    let locks = on_every_node(&every_node().await);
    let name = common::unique("causal-claim");
    let rounds = 300;
    let mut stale = 0;
    let mut held = locks[0].acquire(&name).await.unwrap();
    for i in 1..=rounds {
        held.release().await.unwrap();
        held = match locks[i % n].try_acquire(&name).await.unwrap() {
            Some(g) => g,
            None => {
                stale += 1;
                locks[i % n]
                    .acquire(&name)
                    .wait(Duration::from_secs(10))
                    .await
                    .unwrap()
            }
        };
    }
    held.release().await.unwrap();
    assert_eq!(
        stale, 0,
        "{stale} of {rounds} claims saw a lease released on another node as held"
    );
}

/// Points `pool` (of one connection) at `node`'s server, as a load
/// balancer that fails a client over to another node would: the
/// connection it has is closed, and the next one is made there.
async fn move_to(pool: &MySqlPool, node: &MySqlConnectOptions, port: u16) {
    pool.set_connect_options(node.clone());
    pool.acquire().await.unwrap().close().await.unwrap();
    let at: u16 = sqlx::query_scalar("SELECT @@port")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(at, port, "the pool did not move");
}

/// A holder's renewal and release, and an operator's forced release, sent
/// through a node other than the claim's right after it (a holder failed
/// over by a load balancer; an operator on any node): each finds the lease
/// the first node granted (their statements wait for the node to apply
/// it, `wsrep_sync_wait`), never the node's stale copy, which would report
/// the lease gone. Leases and semaphore permits. Before each claim, the
/// claim's node commits a large write (5,000 rows into a scratch table),
/// which the other nodes apply before the grant: without the wait, the
/// statements on another node then mostly find no lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_another_node_see_a_fresh_grant() {
    let urls = common::galera_urls();
    let n = urls.len();
    let nodes: Vec<MySqlConnectOptions> = urls.iter().map(|u| u.parse().unwrap()).collect();
    let operators = on_every_node(&every_node().await);
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .connect_with(nodes[0].clone())
        .await
        .unwrap();
    let holder = Locks::new(Lease::new(pool.clone()));
    let names = [
        common::unique("causal-write"),
        common::unique("causal-permit"),
    ];
    let rounds = 60;
    let scratch = "dblock_test_galera_scratch";
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {scratch}; \
         CREATE TABLE {scratch} (id BIGINT AUTO_INCREMENT PRIMARY KEY, pad CHAR(100))"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let mut missed = Vec::new();
    for i in 0..rounds {
        let (here, there) = (i % n, (i + 1) % n);
        move_to(&pool, &nodes[here], nodes[here].get_port()).await;
        let permits = (i / 3) % 2 == 1;
        let name = &names[usize::from(permits)];
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {scratch} (pad) SELECT 'x' FROM seq_1_to_5000"
        )))
        .execute(&pool)
        .await
        .unwrap();
        let mut claim = holder.acquire(name).ttl(Duration::from_secs(30));
        if permits {
            claim = claim.max_holders(2);
        }
        let held = claim
            .await
            .unwrap_or_else(|e| panic!("round {i}: {e} (missed before: {missed:?})"));
        let what = match (i % 3, permits) {
            (0, _) => {
                let freed = operators[there].force_release(name).await.unwrap();
                let _ = held.release().await;
                (!freed).then_some("force_release")
            }
            (1, _) => {
                move_to(&pool, &nodes[there], nodes[there].get_port()).await;
                let extended = held.extend(Duration::from_secs(30)).await.unwrap();
                let _ = held.release().await;
                extended.is_none().then_some("extend")
            }
            _ => {
                move_to(&pool, &nodes[there], nodes[there].get_port()).await;
                held.release().await.err().map(|_| "release")
            }
        };
        if let Some(what) = what {
            missed.push((i, permits, what));
            // Whatever is left of the round's lease must not block the next.
            operators[0].force_release(name).await.unwrap();
        }
    }
    sqlx::query(AssertSqlSafe(format!("DROP TABLE {scratch}")))
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        missed.is_empty(),
        "{} of {rounds} statements on another node missed a grant made just before \
         (round, semaphore, what): {missed:?}",
        missed.len()
    );
}

/// Ended rows are swept on a cluster too (the sweep runs on whichever node
/// released): names released on every node leave no rows a few seconds
/// later, seen from another node, and a swept name taken again on a third
/// node gets a greater token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swept_names_keep_increasing_tokens_across_nodes() {
    let n = common::galera_urls().len();
    let pools = every_node().await;
    let locks = on_every_node(&pools);
    let prefix = common::unique("galera-swept");
    let mut tokens = Vec::new();
    for i in 0..30 {
        let g = locks[i % n]
            .acquire(format!("{prefix}:{i}"))
            .wait(Duration::from_secs(10))
            .await
            .unwrap();
        tokens.push(g.token());
        g.release().await.unwrap();
    }
    let like = format!("{prefix}:%");
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut left: i64 = i64::MAX;
    while left > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = sqlx::query_scalar("SELECT count(*) FROM dblock_leases WHERE name LIKE ?")
            .bind(&like)
            .fetch_one(&pools[1 % n])
            .await
            .unwrap();
    }
    assert_eq!(left, 0, "rows of released names are left on node 1");
    for (i, before) in tokens.iter().enumerate() {
        let g = locks[(i + 2) % n]
            .acquire(format!("{prefix}:{i}"))
            .wait(Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            g.token() > *before,
            "{prefix}:{i} went back: {} after {before}",
            g.token()
        );
        g.release().await.unwrap();
    }
}
