//! The worker registry: one slot per configured worker URL (a lazily connected channel, health, Info, the
//! in-flight count and its limit). A poller refreshes health (`grpc.health.v1` for `mip.v1.Worker`) and Info;
//! dispatch takes a [`Permit`] per task in flight, released on drop.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{InfoRequest, WorkerInfo, WorkerStatus};
use tokio::sync::{watch, Notify};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::error::CoordinatorError;
use crate::placement::Candidate;

/// How long one health or Info call may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One worker.
pub struct WorkerSlot {
    pub url: String,
    channel: Channel,
    healthy: AtomicBool,
    in_flight: AtomicU32,
    limit: AtomicU32,
    info: Mutex<Option<WorkerInfo>>,
    last_error: Mutex<String>,
}

/// All workers.
pub struct Registry {
    workers: Vec<WorkerSlot>,
    fixed_limit: Option<u32>,
    max_message_bytes: usize,
    released: Notify,
}

/// A task slot on worker `idx`; dropping it frees the slot and wakes waiting tasks.
pub struct Permit {
    registry: Arc<Registry>,
    pub idx: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.registry.workers[self.idx].in_flight.fetch_sub(1, Ordering::SeqCst);
        self.registry.released.notify_waiters();
    }
}

impl Permit {
    pub fn url(&self) -> &str {
        &self.registry.workers[self.idx].url
    }

    /// A client of the permit's worker.
    pub fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::new(self.registry.workers[self.idx].channel.clone())
            .max_decoding_message_size(self.registry.max_message_bytes)
            .max_encoding_message_size(self.registry.max_message_bytes)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Registry {
    /// Slots for `urls` (channels connect on first use); workers count as unhealthy until polled.
    pub fn new(urls: &[String], fixed_limit: Option<u32>, max_message_bytes: usize) -> Result<Self, CoordinatorError> {
        let workers = urls
            .iter()
            .map(|u| {
                let ep = Endpoint::from_shared(u.clone()).map_err(|e| CoordinatorError::WorkerUrl {
                    url: u.clone(),
                    message: e.to_string(),
                })?;
                let ep = ep.connect_timeout(PROBE_TIMEOUT).tcp_nodelay(true);
                Ok(WorkerSlot {
                    url: u.clone(),
                    channel: ep.connect_lazy(),
                    healthy: AtomicBool::new(false),
                    in_flight: AtomicU32::new(0),
                    limit: AtomicU32::new(fixed_limit.unwrap_or(1)),
                    info: Mutex::new(None),
                    last_error: Mutex::new(String::new()),
                })
            })
            .collect::<Result<Vec<_>, CoordinatorError>>()?;
        Ok(Self {
            workers,
            fixed_limit,
            max_message_bytes,
            released: Notify::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Placement's view; workers in `excluded` are unusable unless every healthy one is excluded.
    pub fn candidates(&self, excluded: &[usize]) -> Vec<Candidate<'_>> {
        let healthy = |w: &WorkerSlot| w.healthy.load(Ordering::SeqCst);
        let all_excluded = self
            .workers
            .iter()
            .enumerate()
            .all(|(i, w)| !healthy(w) || excluded.contains(&i));
        self.workers
            .iter()
            .enumerate()
            .map(|(i, w)| Candidate {
                url: &w.url,
                load: w.in_flight.load(Ordering::SeqCst),
                usable: healthy(w) && (all_excluded || !excluded.contains(&i)),
            })
            .collect()
    }

    /// Takes a slot on worker `idx` if it is below its limit.
    pub fn try_acquire(self: &Arc<Self>, idx: usize) -> Option<Permit> {
        let w = &self.workers[idx];
        let limit = w.limit.load(Ordering::SeqCst);
        w.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1))
            .ok()?;
        Some(Permit {
            registry: self.clone(),
            idx,
        })
    }

    /// Resolves when a slot is released (or health was polled); callers `enable` it before looking, and bound it.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }

    /// Marks a worker unhealthy after a failed call (the poller marks it healthy again).
    pub fn mark_unhealthy(&self, idx: usize, why: &str) {
        let w = &self.workers[idx];
        w.healthy.store(false, Ordering::SeqCst);
        *lock(&w.last_error) = why.to_owned();
    }

    /// The workers for ListWorkers.
    pub fn snapshot(&self) -> Vec<WorkerStatus> {
        self.workers
            .iter()
            .map(|w| WorkerStatus {
                url: w.url.clone(),
                healthy: w.healthy.load(Ordering::SeqCst),
                load: w.in_flight.load(Ordering::SeqCst),
                limit: w.limit.load(Ordering::SeqCst),
                info: lock(&w.info).clone(),
                last_error: lock(&w.last_error).clone(),
            })
            .collect()
    }

    /// Polls every worker now, then every `interval` until `stop` turns true.
    pub async fn poll(self: Arc<Self>, interval: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            futures::future::join_all((0..self.workers.len()).map(|i| self.probe(i))).await;
            self.released.notify_waiters();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    async fn probe(&self, idx: usize) {
        let w = &self.workers[idx];
        let req = HealthCheckRequest {
            service: "mip.v1.Worker".into(),
        };
        let mut health = HealthClient::new(w.channel.clone());
        let serving = match tokio::time::timeout(PROBE_TIMEOUT, health.check(req)).await {
            Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving => Ok(()),
            Ok(Ok(r)) => Err(format!("health {:?}", r.get_ref().status())),
            Ok(Err(e)) => Err(format!("health check: {} {}", e.code(), e.message())),
            Err(_) => Err(format!("health check timed out after {PROBE_TIMEOUT:?}")),
        };
        let mut client = WorkerClient::new(w.channel.clone());
        if let Ok(Ok(info)) = tokio::time::timeout(PROBE_TIMEOUT, client.info(InfoRequest {})).await {
            let info = info.into_inner();
            let limit = self.fixed_limit.unwrap_or(info.capacity.saturating_add(1)).max(1);
            w.limit.store(limit, Ordering::SeqCst);
            *lock(&w.info) = Some(info);
        }
        match serving {
            Ok(()) => {
                w.healthy.store(true, Ordering::SeqCst);
                lock(&w.last_error).clear();
            }
            Err(e) => {
                if w.healthy.swap(false, Ordering::SeqCst) {
                    tracing::warn!(worker = %w.url, error = %e, "worker unhealthy");
                }
                *lock(&w.last_error) = e;
            }
        }
    }
}
