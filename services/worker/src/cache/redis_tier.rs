//! The shared tier: Redis through one multiplexed connection, used best-effort. Every operation is bounded by
//! the configured timeout; a failure or timeout is counted and reported as "not found" / "not stored", never as a
//! request error. A lost connection (I/O error, or several timeouts in a row, as from a frozen server) is dropped
//! and re-established by one background task with exponential backoff; meanwhile operations fail fast (counted)
//! instead of waiting for it.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};

/// Timeouts in a row after which the connection is presumed dead and re-established.
const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;
/// First and largest pause between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Background reconnection attempts may take this long at least (they block no request).
const RECONNECT_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// Why a Redis operation did not happen; logged and counted, never returned to a request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheError {
    #[error(transparent)]
    Client(#[from] mip_common::redis_client::RedisClientError),
    #[error("redis {op} failed: {source}")]
    Redis {
        op: &'static str,
        #[source]
        source: RedisError,
    },
    #[error("redis {op} took longer than `redis.timeout` = {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("redis is not connected (reconnecting in the background)")]
    Unavailable,
}

/// The connection and its bookkeeping.
struct Link {
    conn: Option<MultiplexedConnection>,
    /// Bumped on every new connection, so a failure seen on an old one does not drop a new one.
    generation: u64,
    reconnecting: bool,
    timeouts_in_row: u32,
}

/// A best-effort Redis tier.
pub(crate) struct RedisTier {
    client: Client,
    timeout: Duration,
    link: Mutex<Link>,
    errors: AtomicU64,
}

impl RedisTier {
    /// Parses `url` and tries one connection, bounded by `timeout`; when that fails a background task keeps
    /// trying. Fails only on a malformed URL.
    pub(crate) async fn connect(url: &str, ca: Option<&Path>, timeout: Duration) -> Result<Arc<Self>, CacheError> {
        let client = mip_common::redis_client::client(url, ca)?;
        let tier = Arc::new(Self {
            client,
            timeout,
            link: Mutex::new(Link {
                conn: None,
                generation: 0,
                reconnecting: false,
                timeouts_in_row: 0,
            }),
            errors: AtomicU64::new(0),
        });
        match tier.open(timeout).await {
            Ok(conn) => tier.install(conn),
            Err(e) => {
                tier.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "redis unreachable at start; serving without it until it answers");
                tier.spawn_reconnect();
            }
        }
        Ok(tier)
    }

    /// Operations that failed, timed out, or were skipped for want of a connection.
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Whether a connection is currently held (it may still turn out broken on its next use).
    pub(crate) fn connected(&self) -> bool {
        self.link().conn.is_some()
    }

    /// `GET key`; `None` when absent or when Redis could not answer in time.
    pub(crate) async fn get(self: &Arc<Self>, key: &str) -> Option<Vec<u8>> {
        let res = self
            .run("GET", |mut c| {
                let cmd = redis::cmd("GET").arg(key).clone();
                async move { cmd.query_async::<Option<Vec<u8>>>(&mut c).await }
            })
            .await;
        res.unwrap_or_else(|e| {
            tracing::debug!(error = %e, key, "redis get skipped");
            None
        })
    }

    /// `SET key value EX ttl`; returns whether it was stored.
    pub(crate) async fn set_ex(self: &Arc<Self>, key: &str, value: &[u8], ttl: Duration) -> bool {
        let secs = ttl.as_secs().max(1);
        let res = self
            .run("SET", |mut c| {
                let cmd = redis::cmd("SET").arg(key).arg(value).arg("EX").arg(secs).clone();
                async move { cmd.query_async::<()>(&mut c).await }
            })
            .await;
        match res {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, key, "redis set skipped");
                false
            }
        }
    }

    /// Runs one operation on the current connection within the timeout, with the error and reconnection
    /// bookkeeping.
    async fn run<T, F, Fut>(self: &Arc<Self>, op: &'static str, f: F) -> Result<T, CacheError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let current = {
            let link = self.link();
            link.conn.clone().map(|c| (c, link.generation))
        };
        let Some((conn, generation)) = current else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.spawn_reconnect();
            return Err(CacheError::Unavailable);
        };
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(v)) => {
                self.link().timeouts_in_row = 0;
                Ok(v)
            }
            Ok(Err(source)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                // An error reply from the server leaves the connection usable; anything else does not.
                if source.code().is_none() {
                    tracing::warn!(error = %source, op, "redis connection lost; reconnecting in the background");
                    self.drop_connection(generation);
                }
                Err(CacheError::Redis { op, source })
            }
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let stuck = {
                    let mut link = self.link();
                    link.timeouts_in_row += 1;
                    link.timeouts_in_row >= TIMEOUTS_BEFORE_RECONNECT
                };
                if stuck {
                    tracing::warn!(
                        op,
                        "redis timed out {TIMEOUTS_BEFORE_RECONNECT} times in a row; reconnecting"
                    );
                    self.drop_connection(generation);
                }
                Err(CacheError::Timeout {
                    op,
                    after: self.timeout,
                })
            }
        }
    }

    /// One connection attempt, bounded by `timeout`.
    async fn open(&self, timeout: Duration) -> Result<MultiplexedConnection, CacheError> {
        let cfg = AsyncConnectionConfig::new().set_connection_timeout(Some(timeout));
        match tokio::time::timeout(timeout, self.client.get_multiplexed_async_connection_with_config(&cfg)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(source)) => Err(CacheError::Redis { op: "connect", source }),
            Err(_) => Err(CacheError::Timeout {
                op: "connect",
                after: timeout,
            }),
        }
    }

    fn install(&self, conn: MultiplexedConnection) {
        let mut link = self.link();
        link.conn = Some(conn);
        link.generation += 1;
        link.timeouts_in_row = 0;
        link.reconnecting = false;
    }

    /// Drops connection `generation` (if still current) and starts reconnecting.
    fn drop_connection(self: &Arc<Self>, generation: u64) {
        {
            let mut link = self.link();
            if link.generation == generation {
                link.conn = None;
            }
        }
        self.spawn_reconnect();
    }

    /// Starts the background reconnection task unless it runs already (or a connection is held). The task ends
    /// when it connects or when the cache is dropped.
    fn spawn_reconnect(self: &Arc<Self>) {
        {
            let mut link = self.link();
            if link.reconnecting || link.conn.is_some() {
                return;
            }
            link.reconnecting = true;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.link().reconnecting = false;
            return;
        };
        let weak = Arc::downgrade(self);
        let attempt_timeout = self.timeout.max(RECONNECT_TIMEOUT_MIN);
        rt.spawn(reconnect_loop(weak, attempt_timeout));
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Tries to connect with exponential backoff until it succeeds or the tier is gone.
async fn reconnect_loop(weak: Weak<RedisTier>, attempt_timeout: Duration) {
    let mut delay = BACKOFF_MIN;
    loop {
        let Some(tier) = weak.upgrade() else { return };
        match tier.open(attempt_timeout).await {
            Ok(conn) => {
                tier.install(conn);
                tracing::info!("redis connection re-established");
                return;
            }
            Err(e) => tracing::debug!(error = %e, retry_in = ?delay, "redis reconnection failed"),
        }
        drop(tier);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}
