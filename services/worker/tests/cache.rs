//! The embedding cache against a real `redis-server`: tiers, a second worker sharing Redis, Redis down / stopped /
//! frozen, corrupt entries, single-flight, the LRU byte budget and TTLs. Every wait is bounded.

use std::convert::Infallible;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mip_common::testing::RedisServer;
use mip_worker::cache::{CacheConfig, CacheTier, EmbeddingCache, EntryKind};

/// Upper bound of any single cache call here: far above the Redis timeout, so only a hang trips it.
const CALL_BOUND: Duration = Duration::from_secs(10);

fn config(url: &str) -> CacheConfig {
    CacheConfig {
        redis_url: Some(url.to_owned()),
        ttl: Duration::from_secs(60),
        redis_timeout: Duration::from_millis(300),
        lru_bytes: 1 << 20,
        ..CacheConfig::default()
    }
}

async fn connect(cfg: CacheConfig) -> Result<EmbeddingCache> {
    tokio::time::timeout(CALL_BOUND, EmbeddingCache::connect(cfg))
        .await
        .context("connect must not hang")
}

/// A well-formed stored value.
fn value(tag: &str, len: usize) -> Vec<u8> {
    let mut v = format!("emb:{tag}:").into_bytes();
    v.resize(len.max(v.len()), 0xab);
    v
}

fn valid(bytes: &[u8]) -> bool {
    bytes.starts_with(b"emb:")
}

/// `get_or_compute` whose compute returns `v` and counts its runs in `runs`.
async fn get(cache: &EmbeddingCache, key: &str, v: &[u8], runs: &AtomicUsize) -> Result<(Vec<u8>, CacheTier)> {
    let call = cache.get_or_compute(EntryKind::Subject, key, valid, || async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Infallible>(v.to_vec())
    });
    let res = tokio::time::timeout(CALL_BOUND, call)
        .await
        .context("get_or_compute must not hang")?;
    Ok(res.unwrap_or_else(|e| match e {}))
}

async fn raw(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(url)?.get_multiplexed_async_connection().await?)
}

/// Waits (≤ 10 s) until `cache` gets Redis hits again: each round, a fresh cache instance (another worker) writes a
/// new key and `cache` must find it in Redis.
async fn wait_for_redis_hit(cache: &EmbeddingCache, url: &str) -> Result<()> {
    let writer = connect(config(url)).await?;
    let runs = AtomicUsize::new(0);
    for round in 0..50 {
        let key = format!("recover-{round}");
        let v = value(&key, 32);
        let (_, tier) = get(&writer, &key, &v, &runs).await?;
        ensure!(tier == CacheTier::Miss, "the writer computes {key}");
        let (got, tier) = get(cache, &key, &value("wrong", 32), &runs).await?;
        if tier == CacheTier::Redis {
            ensure!(got == v, "the redis hit returns the writer's value");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("no redis hit within 10 s: the cache did not reconnect")
}

fn closed_port_url() -> Result<String> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = l.local_addr()?.port();
    drop(l);
    Ok(format!("redis://127.0.0.1:{port}/"))
}

#[tokio::test(flavor = "multi_thread")]
async fn miss_then_memory_hit_and_a_second_worker_hits_redis() -> Result<()> {
    let server = RedisServer::start();
    let a = connect(config(&server.url())).await?;
    assert!(a.redis_connected());
    let runs = AtomicUsize::new(0);
    let v = value("s1", 100);
    assert_eq!(get(&a, "s1", &v, &runs).await?, (v.clone(), CacheTier::Miss));
    assert_eq!(get(&a, "s1", &v, &runs).await?, (v.clone(), CacheTier::Memory));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let b = connect(config(&server.url())).await?;
    let b_runs = AtomicUsize::new(0);
    assert_eq!(
        get(&b, "s1", &value("other", 100), &b_runs).await?,
        (v.clone(), CacheTier::Redis)
    );
    assert_eq!(
        get(&b, "s1", &value("other", 100), &b_runs).await?,
        (v.clone(), CacheTier::Memory)
    );
    assert_eq!(b_runs.load(Ordering::SeqCst), 0, "the second worker never computes");

    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(
        (sa.subject.misses, sa.subject.hits_memory, sa.subject.hits_redis),
        (1, 1, 0)
    );
    assert_eq!(
        (sb.subject.misses, sb.subject.hits_memory, sb.subject.hits_redis),
        (0, 1, 1)
    );
    assert_eq!((sa.redis_errors, sb.redis_errors, sa.corrupt), (0, 0, 0));
    assert_eq!(sa.text, Default::default(), "text counters are separate");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_at_start_serves_from_memory_and_compute() -> Result<()> {
    for url in [closed_port_url()?, "redis://10.255.255.1:6379/".to_owned()] {
        let cache = connect(config(&url)).await?;
        assert!(!cache.redis_connected(), "{url}");
        let runs = AtomicUsize::new(0);
        let v = value("down", 64);
        assert_eq!(get(&cache, "k", &v, &runs).await?, (v.clone(), CacheTier::Miss));
        assert_eq!(get(&cache, "k", &v, &runs).await?, (v.clone(), CacheTier::Memory));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(cache.stats().redis_errors > 0, "{url}: errors are counted");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_stopped_mid_run_degrades_then_recovers() -> Result<()> {
    let mut server = RedisServer::start();
    let cache = connect(config(&server.url())).await?;
    let runs = AtomicUsize::new(0);
    let v1 = value("before", 64);
    assert_eq!(get(&cache, "before", &v1, &runs).await?.1, CacheTier::Miss);

    server.stop();
    let v2 = value("during", 64);
    assert_eq!(get(&cache, "during", &v2, &runs).await?, (v2.clone(), CacheTier::Miss));
    assert_eq!(
        get(&cache, "before", &v1, &runs).await?,
        (v1.clone(), CacheTier::Memory)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let errors = cache.stats().redis_errors;
    assert!(errors > 0, "a stopped redis counts errors");

    server.restart();
    wait_for_redis_hit(&cache, &server.url()).await?;
    assert!(cache.redis_connected());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_redis_entry_is_recomputed_and_overwritten() -> Result<()> {
    let server = RedisServer::start();
    let mut conn = raw(&server.url()).await?;
    let () = redis::cmd("SET")
        .arg("bad")
        .arg(b"garbage".as_slice())
        .query_async(&mut conn)
        .await?;

    let cache = connect(config(&server.url())).await?;
    let runs = AtomicUsize::new(0);
    let v = value("fixed", 64);
    assert_eq!(get(&cache, "bad", &v, &runs).await?, (v.clone(), CacheTier::Miss));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().corrupt, 1);

    let stored: Option<Vec<u8>> = redis::cmd("GET").arg("bad").query_async(&mut conn).await?;
    assert_eq!(stored, Some(v.clone()), "the entry is overwritten with the valid value");
    let ttl: i64 = redis::cmd("TTL").arg("bad").query_async(&mut conn).await?;
    assert!(ttl > 0, "the overwrite carries a TTL, got {ttl}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_misses_compute_once() -> Result<()> {
    let server = RedisServer::start();
    let cache = connect(config(&server.url())).await?;
    let runs = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (cache, runs) = (cache.clone(), runs.clone());
            tokio::spawn(async move {
                let call = cache.get_or_compute(EntryKind::Text, "name", valid, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, Infallible>(value(&format!("from-{i}"), 64))
                });
                tokio::time::timeout(CALL_BOUND, call).await
            })
        })
        .collect();
    let mut values = Vec::new();
    for t in tasks {
        let (v, _tier) = t.await?.context("bounded")?.unwrap_or_else(|e| match e {});
        values.push(v);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "compute runs once");
    assert!(
        values.iter().all(|v| v == &values[0]),
        "everyone gets the one computed value"
    );
    let s = cache.stats().text;
    assert_eq!(s.misses, 1);
    assert_eq!(s.coalesced + s.hits_memory, 7, "{s:?}");
    assert_eq!(s.hits_redis, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_leader_hands_over_to_a_waiter() -> Result<()> {
    let server = RedisServer::start();
    let cache = connect(config(&server.url())).await?;
    let c = cache.clone();
    let leader = tokio::spawn(async move {
        c.get_or_compute(EntryKind::Subject, "flaky", valid, || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err::<Vec<u8>, _>("encoder failed")
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let runs = AtomicUsize::new(0);
    let v = value("second-try", 64);
    let got = get(&cache, "flaky", &v, &runs).await?;
    assert_eq!(
        leader.await?,
        Err("encoder failed"),
        "the error goes to the call that computed"
    );
    assert_eq!(got, (v, CacheTier::Miss), "the waiter computed itself");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lru_evicts_past_its_byte_budget() -> Result<()> {
    let server = RedisServer::start();
    let cache = connect(CacheConfig {
        lru_bytes: 3000,
        ..config(&server.url())
    })
    .await?;
    let runs = AtomicUsize::new(0);
    for key in ["lru-a", "lru-b", "lru-c"] {
        assert_eq!(get(&cache, key, &value(key, 1000), &runs).await?.1, CacheTier::Miss);
    }
    let s = cache.stats();
    assert!(s.memory_bytes <= 3000, "{s:?}");
    assert_eq!(s.memory_entries, 2);
    // `lru-a` was evicted: it comes back from Redis, not memory, and is not recomputed.
    assert_eq!(
        get(&cache, "lru-a", &value("x", 1000), &runs).await?,
        (value("lru-a", 1000), CacheTier::Redis)
    );
    assert_eq!(
        get(&cache, "lru-c", &value("x", 1000), &runs).await?.1,
        CacheTier::Memory
    );
    // A value above the budget is never kept in memory.
    let big = value("big", 5000);
    assert_eq!(get(&cache, "big", &big, &runs).await?.1, CacheTier::Miss);
    assert_eq!(get(&cache, "big", &big, &runs).await?.1, CacheTier::Redis);
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_entries_carry_the_ttl() -> Result<()> {
    let server = RedisServer::start();
    let cache = connect(CacheConfig {
        ttl: Duration::from_secs(100),
        ..config(&server.url())
    })
    .await?;
    let runs = AtomicUsize::new(0);
    get(&cache, "ttl-key", &value("t", 16), &runs).await?;
    let mut conn = raw(&server.url()).await?;
    let ttl: i64 = redis::cmd("TTL").arg("ttl-key").query_async(&mut conn).await?;
    assert!(ttl > 0 && ttl <= 100, "TTL must be in 1..=100, got {ttl}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_redis_times_out_and_is_counted() -> Result<()> {
    let server = RedisServer::start();
    let cache = connect(config(&server.url())).await?;
    let runs = AtomicUsize::new(0);
    let v1 = value("warm", 32);
    assert_eq!(get(&cache, "warm", &v1, &runs).await?.1, CacheTier::Miss);
    let errors = cache.stats().redis_errors;

    server.pause();
    // Bounded by `get`'s CALL_BOUND (10 s); the Redis timeout is 300 ms per operation.
    // Three keys: enough timeouts in a row that the cache also drops the connection and reconnects afterwards.
    let mut during = Vec::new();
    for key in ["frozen-1", "frozen-2", "frozen-3"] {
        during.push((value(key, 32), get(&cache, key, &value(key, 32), &runs).await));
    }
    let hit = get(&cache, "warm", &v1, &runs).await;
    server.resume();
    for (v, got) in during {
        assert_eq!(got?, (v, CacheTier::Miss), "served by compute while redis is frozen");
    }
    assert_eq!(hit?, (v1, CacheTier::Memory));
    assert!(cache.stats().redis_errors > errors, "timeouts count as redis errors");

    wait_for_redis_hit(&cache, &server.url()).await?;
    Ok(())
}
