//! The embedding cache: subjects' image tokens and names' text embeddings, content-addressed, in two tiers — an
//! in-process LRU in front of a shared Redis — so a subject encoded by any worker is not encoded again.
//!
//! (First cut: memory tier only, no eviction, no Redis; the API is the one the worker service codes against.)

pub mod keys;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// What the cache holds; counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Subject,
    Text,
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheTier {
    Memory,
    Redis,
    Miss,
}

/// Cache settings (from the worker config's `redis` and `cache` sections).
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `redis://host:port/db`; `None` = memory tier only.
    pub redis_url: Option<String>,
    /// Time to live of Redis entries.
    pub ttl: Duration,
    /// Per-operation Redis timeout; a slower Redis counts as an error and the worker goes on without it.
    pub redis_timeout: Duration,
    /// Byte budget of the in-process LRU.
    pub lru_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            ttl: Duration::from_secs(7 * 24 * 3600),
            redis_timeout: Duration::from_millis(250),
            lru_bytes: 256 << 20,
        }
    }
}

/// Counters per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindStats {
    pub hits_memory: u64,
    pub hits_redis: u64,
    pub misses: u64,
}

/// Counters of the whole cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub subject: KindStats,
    pub text: KindStats,
    /// Redis operations that failed or timed out.
    pub redis_errors: u64,
    /// Entries found corrupt or mismatched (re-computed and overwritten).
    pub corrupt: u64,
}

/// A cloneable handle to the cache.
#[derive(Clone, Default)]
pub struct EmbeddingCache {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Vec<u8>>,
    stats: CacheStats,
}

impl EmbeddingCache {
    /// Builds the cache. Never fails: an unreachable Redis means memory-only until it comes back.
    pub async fn connect(_cfg: CacheConfig) -> Self {
        Self::default()
    }

    /// The value under `key`, or `compute()`'s result, stored in every tier. `valid` checks a found value (header,
    /// checksum, shape); an invalid one counts as corrupt, is recomputed and overwritten. Concurrent calls for one
    /// missing key run `compute` once.
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
        let found = self.lock().map.get(key).cloned();
        if let Some(v) = found {
            if valid(&v) {
                self.count(kind, CacheTier::Memory);
                return Ok((v, CacheTier::Memory));
            }
            self.lock().stats.corrupt += 1;
        }
        let v = compute().await?;
        self.lock().map.insert(key.to_owned(), v.clone());
        self.count(kind, CacheTier::Miss);
        Ok((v, CacheTier::Miss))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        self.lock().stats
    }

    fn count(&self, kind: EntryKind, tier: CacheTier) {
        let mut g = self.lock();
        let s = match kind {
            EntryKind::Subject => &mut g.stats.subject,
            EntryKind::Text => &mut g.stats.text,
        };
        match tier {
            CacheTier::Memory => s.hits_memory += 1,
            CacheTier::Redis => s.hits_redis += 1,
            CacheTier::Miss => s.misses += 1,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
