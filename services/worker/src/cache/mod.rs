//! The embedding cache: subjects' image tokens, names' text embeddings and subjects' reference features (for
//! scoring), content-addressed, in two tiers — an in-process LRU with a byte budget ([`lru`]) in front of a shared
//! Redis ([`redis_tier`]) — so a subject encoded by any worker is not encoded again.
//!
//! A lookup goes memory → Redis → `compute`. A Redis hit is copied into memory; a computed value is stored in
//! both tiers (`SET key value EX ttl`). Concurrent lookups of one missing key run `compute` once ([`flight`]).
//! Redis is best-effort: down, stopped or slow (every operation bounded by `redis_timeout`), the cache serves from
//! memory and `compute`, counts `redis_errors`, and reconnects in the background. A value that fails the caller's
//! `valid` check in either tier counts as `corrupt`, is recomputed and overwritten in both tiers.
//!
//! Counting: every `get_or_compute` that returns `Ok` counts exactly once for its kind, as `hits_memory`,
//! `hits_redis`, `misses` (this call ran `compute`) or `coalesced` (this call waited for a concurrent call's
//! Redis lookup or compute; it returns [`CacheTier::Memory`], since the value reached it inside this process).

mod flight;
pub mod keys;
mod lru;
mod redis_tier;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use flight::{FlightState, Flights, Join};
use lru::ByteLru;
use redis_tier::RedisTier;

/// What the cache holds; counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Subject,
    Text,
    /// A subject's reference features for scoring.
    References,
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheTier {
    /// The in-process LRU, or a concurrent call in this process that fetched or computed it.
    Memory,
    /// Redis (written by this or another worker).
    Redis,
    /// Neither: this call ran `compute`.
    Miss,
}

/// Cache settings (from the worker config's `redis` and `cache` sections).
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `redis://host:port/db`; `None` = memory tier only.
    pub redis_url: Option<String>,
    /// CA (PEM) that signs a `rediss://` server's certificate; `None` = the system's trust roots.
    pub redis_ca: Option<PathBuf>,
    /// Time to live of Redis entries (whole seconds, at least 1).
    pub ttl: Duration,
    /// Per-operation Redis timeout; a slower Redis counts as an error and the worker goes on without it.
    pub redis_timeout: Duration,
    /// Byte budget of the in-process LRU (keys + values); a value larger than the budget is not kept in memory.
    pub lru_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_ca: None,
            ttl: Duration::from_secs(7 * 24 * 3600),
            redis_timeout: Duration::from_millis(250),
            lru_bytes: 256 << 20,
        }
    }
}

/// Counters per kind. Each successful `get_or_compute` counts in exactly one of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindStats {
    pub hits_memory: u64,
    pub hits_redis: u64,
    /// Calls that ran `compute`.
    pub misses: u64,
    /// Calls that waited for a concurrent call of the same key instead of looking up or computing themselves.
    pub coalesced: u64,
}

/// Counters of the whole cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub subject: KindStats,
    pub text: KindStats,
    pub references: KindStats,
    /// Redis operations that failed, timed out, or were skipped while disconnected.
    pub redis_errors: u64,
    /// Entries found corrupt or mismatched (re-computed and overwritten).
    pub corrupt: u64,
    /// Entries and bytes (keys + values) in the memory tier now.
    pub memory_entries: u64,
    pub memory_bytes: u64,
}

/// A cloneable handle to the cache.
#[derive(Clone)]
pub struct EmbeddingCache {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    redis: Option<Arc<RedisTier>>,
    ttl: Duration,
}

/// Memory tier, flights and counters, under one lock so "not in memory" and "join the flight" are one step.
struct State {
    lru: ByteLru,
    flights: Flights,
    stats: CacheStats,
}

/// The first step of a lookup.
enum Step {
    Memory(Arc<[u8]>),
    Wait(watch::Receiver<FlightState>),
    Lead(u64, watch::Sender<FlightState>),
}

impl Default for EmbeddingCache {
    /// A memory-only cache with the default budget.
    fn default() -> Self {
        Self::with_redis(None, &CacheConfig::default())
    }
}

impl EmbeddingCache {
    /// Builds the cache. Never fails and returns within about `redis_timeout`: an unreachable Redis (or a
    /// malformed URL, logged) means memory-only until it comes back.
    pub async fn connect(cfg: CacheConfig) -> Self {
        let redis = match &cfg.redis_url {
            None => None,
            Some(url) => match RedisTier::connect(url, cfg.redis_ca.as_deref(), cfg.redis_timeout).await {
                Ok(tier) => Some(tier),
                Err(e) => {
                    tracing::error!(error = %e, "redis disabled");
                    None
                }
            },
        };
        Self::with_redis(redis, &cfg)
    }

    fn with_redis(redis: Option<Arc<RedisTier>>, cfg: &CacheConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    lru: ByteLru::new(cfg.lru_bytes),
                    flights: Flights::default(),
                    stats: CacheStats::default(),
                }),
                redis,
                ttl: cfg.ttl,
            }),
        }
    }

    /// The value under `key`, or `compute()`'s result, stored in every tier. `valid` checks a found value (header,
    /// checksum, shape); an invalid one counts as corrupt, is recomputed and overwritten. Concurrent calls for one
    /// missing key run `compute` once; if that call fails or is cancelled, the waiting calls start over (one of them
    /// computes). `compute`'s error is returned only to the call that ran it.
    pub async fn get_or_compute<F, Fut, E>(
        &self,
        kind: EntryKind,
        key: &str,
        valid: impl Fn(&[u8]) -> bool,
        compute: F,
    ) -> Result<(Vec<u8>, CacheTier), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        let mut recompute = false;
        let (id, tx) = loop {
            match self.step(key, recompute) {
                Step::Memory(v) => {
                    if valid(&v) {
                        self.count(kind, CacheTier::Memory);
                        return Ok((v.to_vec(), CacheTier::Memory));
                    }
                    tracing::warn!(key, "corrupt cache entry in memory; recomputing");
                    let mut st = self.lock();
                    st.lru.remove_if_same(key, &v);
                    st.stats.corrupt += 1;
                    recompute = true;
                }
                Step::Wait(rx) => {
                    if let Some(v) = flight::wait(rx).await {
                        self.lock_kind(kind, |s| s.coalesced += 1);
                        return Ok((v.to_vec(), CacheTier::Memory));
                    }
                    // The leader failed or was dropped: start over.
                }
                Step::Lead(id, tx) => break (id, tx),
            }
        };
        let lead = Lead {
            cache: self,
            key,
            id,
            tx,
        };
        self.lead(kind, lead, recompute, &valid, compute).await
    }

    /// Memory lookup, else joins or starts the key's flight (one lock).
    fn step(&self, key: &str, skip_memory: bool) -> Step {
        let mut st = self.lock();
        if !skip_memory {
            if let Some(v) = st.lru.get(key) {
                return Step::Memory(v);
            }
        }
        match st.flights.join(key) {
            Join::Lead { id, tx } => Step::Lead(id, tx),
            Join::Wait(rx) => Step::Wait(rx),
        }
    }

    /// The leader's part: Redis (unless the memory copy was corrupt), else compute; publish and store.
    async fn lead<F, Fut, E>(
        &self,
        kind: EntryKind,
        lead: Lead<'_>,
        recompute: bool,
        valid: &impl Fn(&[u8]) -> bool,
        compute: F,
    ) -> Result<(Vec<u8>, CacheTier), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        let key = lead.key;
        if let (false, Some(redis)) = (recompute, &self.shared.redis) {
            if let Some(v) = redis.get(key).await {
                if valid(&v) {
                    lead.finish(v.as_slice().into());
                    self.count(kind, CacheTier::Redis);
                    return Ok((v, CacheTier::Redis));
                }
                tracing::warn!(key, "corrupt cache entry in redis; recomputing");
                self.lock().stats.corrupt += 1;
            }
        }
        // On error `lead` is dropped here, which releases the waiters.
        let v = compute().await?;
        lead.finish(v.as_slice().into());
        self.count(kind, CacheTier::Miss);
        if let Some(redis) = &self.shared.redis {
            redis.set_ex(key, &v, self.shared.ttl).await;
        }
        Ok((v, CacheTier::Miss))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let mut s = {
            let st = self.lock();
            let mut s = st.stats;
            s.memory_entries = st.lru.len() as u64;
            s.memory_bytes = st.lru.bytes() as u64;
            s
        };
        s.redis_errors = self.shared.redis.as_ref().map_or(0, |r| r.errors());
        s
    }

    /// Whether a Redis connection is held now (false when memory-only, or while reconnecting).
    pub fn redis_connected(&self) -> bool {
        self.shared.redis.as_ref().is_some_and(|r| r.connected())
    }

    /// Removes `key` from the memory tier of this process (Redis keeps its copy); the next lookup goes to Redis.
    pub fn invalidate(&self, key: &str) {
        self.lock().lru.remove(key);
    }

    fn count(&self, kind: EntryKind, tier: CacheTier) {
        self.lock_kind(kind, |s| match tier {
            CacheTier::Memory => s.hits_memory += 1,
            CacheTier::Redis => s.hits_redis += 1,
            CacheTier::Miss => s.misses += 1,
        });
    }

    fn lock_kind(&self, kind: EntryKind, f: impl FnOnce(&mut KindStats)) {
        let mut st = self.lock();
        f(match kind {
            EntryKind::Subject => &mut st.stats.subject,
            EntryKind::Text => &mut st.stats.text,
            EntryKind::References => &mut st.stats.references,
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running flight; dropping it unfinished (error, cancellation) ends the flight without a value.
struct Lead<'a> {
    cache: &'a EmbeddingCache,
    key: &'a str,
    id: u64,
    tx: watch::Sender<FlightState>,
}

impl Lead<'_> {
    /// Keeps the value in memory, ends the flight and hands the value to the waiters.
    fn finish(self, value: Arc<[u8]>) {
        {
            let mut st = self.cache.lock();
            st.lru.insert(self.key, value.clone());
            st.flights.end(self.key, self.id);
        }
        self.tx.send_replace(FlightState::Done(value));
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.cache.lock().flights.end(self.key, self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn ok(_: &[u8]) -> bool {
        true
    }

    #[tokio::test]
    async fn miss_then_memory_hit_without_redis() {
        let cache = EmbeddingCache::default();
        let runs = AtomicUsize::new(0);
        for want in [CacheTier::Miss, CacheTier::Memory] {
            let (v, tier) = cache
                .get_or_compute(EntryKind::Text, "k", ok, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, ()>(vec![1, 2, 3])
                })
                .await
                .expect("computes");
            assert_eq!((v, tier), (vec![1, 2, 3], want));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let s = cache.stats();
        assert_eq!((s.text.misses, s.text.hits_memory, s.subject.misses), (1, 1, 0));
        assert_eq!((s.memory_entries, s.memory_bytes, s.redis_errors), (1, 4, 0));
        assert!(!cache.redis_connected());
    }

    #[tokio::test]
    async fn a_corrupt_memory_entry_is_recomputed_and_replaced() {
        let cache = EmbeddingCache::default();
        let good = |b: &[u8]| b.starts_with(b"ok");
        let r = cache
            .get_or_compute(EntryKind::Subject, "k", ok, || async { Ok::<_, ()>(b"bad".to_vec()) })
            .await;
        assert_eq!(r, Ok((b"bad".to_vec(), CacheTier::Miss)));
        let r = cache
            .get_or_compute(EntryKind::Subject, "k", good, || async { Ok::<_, ()>(b"ok!".to_vec()) })
            .await;
        assert_eq!(r, Ok((b"ok!".to_vec(), CacheTier::Miss)));
        let r = cache
            .get_or_compute(EntryKind::Subject, "k", good, || async { Err::<Vec<u8>, _>(()) })
            .await;
        assert_eq!(r, Ok((b"ok!".to_vec(), CacheTier::Memory)));
        assert_eq!(cache.stats().corrupt, 1);
    }

    #[tokio::test]
    async fn a_failed_compute_is_returned_and_not_cached() {
        let cache = EmbeddingCache::default();
        let r = cache
            .get_or_compute(EntryKind::Text, "k", ok, || async { Err::<Vec<u8>, _>("boom") })
            .await;
        assert_eq!(r, Err("boom"));
        let r = cache
            .get_or_compute(EntryKind::Text, "k", ok, || async { Ok::<_, &str>(vec![9]) })
            .await;
        assert_eq!(r, Ok((vec![9], CacheTier::Miss)));
        assert_eq!(cache.stats().text.misses, 1);
    }

    #[test]
    fn the_lookup_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let cache = EmbeddingCache::default();
        let fut = cache.get_or_compute(EntryKind::Text, "k", ok, || async { Ok::<_, ()>(vec![]) });
        assert_send(&fut);
    }

    #[tokio::test]
    async fn a_cancelled_leader_does_not_strand_its_waiters() {
        let cache = EmbeddingCache::default();
        let c = cache.clone();
        let leader = tokio::spawn(async move {
            c.get_or_compute(EntryKind::Subject, "k", ok, || async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<_, ()>(vec![0])
            })
            .await
        });
        // Let the leader start its flight, then queue a waiter behind it.
        while cache.lock().flights.len() == 0 {
            tokio::task::yield_now().await;
        }
        let c = cache.clone();
        let waiter = tokio::spawn(async move {
            c.get_or_compute(EntryKind::Subject, "k", ok, || async { Ok::<_, ()>(vec![1]) })
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter does not hang")
            .expect("waiter task");
        assert_eq!(got, Ok((vec![1], CacheTier::Miss)));
    }
}
