//! The worker registry: one slot per worker URL (a lazily connected channel, health, Info, the in-flight count and
//! its limit, the affinity keys it served recently). Every slot gets a stable [`WorkerId`] that is never reused;
//! [`Registry::set_workers`] adds new URLs and retires vanished ones (a retired worker gets no new task, while the
//! [`Permit`]s of its running tasks keep its slot alive until they finish). A poller refreshes health
//! (`grpc.health.v1` for `mip.v1.Worker`) and Info; workers failing the check leave rotation until they pass again.
//! Dispatch takes a [`Permit`] per task in flight, released on drop.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use lru::LruCache;
use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{InfoRequest, WorkerInfo, WorkerStatus};
use tokio::sync::{watch, Notify};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::error::CoordinatorError;
use crate::metrics::Metrics;
use crate::placement::{has_subjects, Candidate};

/// How long one health or Info call may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Affinity keys remembered per worker (least recently used ones are forgotten).
pub const WARM_KEYS: usize = 4096;

pub use crate::placement::WorkerId;

/// How the registry reaches and limits workers.
#[derive(Clone)]
pub struct RegistryOptions {
    /// Tasks in flight per worker; `None` = the worker's `capacity` + 1 (from Info).
    pub fixed_limit: Option<u32>,
    /// Largest gRPC message both ways on every worker call and probe.
    pub max_message_bytes: usize,
    /// TLS towards the workers (their URLs are `https://`); `None` = plaintext.
    pub tls: Option<ClientTlsConfig>,
    /// The `mip_coord_workers{state}` gauge lives here.
    pub metrics: Metrics,
    /// `(interval, timeout)` of the HTTP/2 pings on every worker channel (sent while idle too).
    pub keepalive: (Duration, Duration),
}

/// One worker.
struct WorkerSlot {
    id: WorkerId,
    url: Arc<str>,
    channel: Channel,
    healthy: AtomicBool,
    in_flight: AtomicU32,
    limit: AtomicU32,
    info: Mutex<Option<WorkerInfo>>,
    last_error: Mutex<String>,
    warm: Mutex<LruCache<[u8; 32], ()>>,
}

/// All workers.
pub struct Registry {
    /// The workers in rotation, in id order.
    slots: RwLock<Vec<Arc<WorkerSlot>>>,
    next_id: AtomicUsize,
    opts: RegistryOptions,
    released: Notify,
    /// Wakes the poller when workers were added.
    added: Notify,
}

/// What [`Registry::set_workers`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub added: Vec<String>,
    pub retired: Vec<String>,
}

/// A task slot on worker `idx`; dropping it frees the slot and wakes waiting tasks.
pub struct Permit {
    registry: Arc<Registry>,
    slot: Arc<WorkerSlot>,
    /// The worker's stable id (for `mark_unhealthy` and exclusion lists).
    pub idx: WorkerId,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.registry.released.notify_waiters();
    }
}

impl Permit {
    pub fn url(&self) -> &str {
        &self.slot.url
    }

    /// A client of the permit's worker, with the registry's message size limits.
    pub fn client(&self) -> WorkerClient<Channel> {
        let max = self.registry.opts.max_message_bytes;
        WorkerClient::new(self.slot.channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    /// Remembers that this worker served the subjects of `key` (subject-less keys are not remembered).
    pub fn remember(&self, key: &[u8; 32]) {
        if has_subjects(key) {
            lock(&self.slot.warm).put(*key, ());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// Slots for `urls` (channels connect on first use); workers count as unhealthy until polled.
    pub fn new(urls: &[String], opts: RegistryOptions) -> Result<Self, CoordinatorError> {
        let registry = Self {
            slots: RwLock::new(Vec::new()),
            next_id: AtomicUsize::new(0),
            opts,
            released: Notify::new(),
            added: Notify::new(),
        };
        registry.set_workers(urls)?;
        Ok(registry)
    }

    fn slots(&self) -> Vec<Arc<WorkerSlot>> {
        self.slots.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn slot(&self, id: WorkerId) -> Option<Arc<WorkerSlot>> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots.iter().find(|s| s.id == id).cloned()
    }

    /// Workers in rotation (healthy or not, retired ones aside).
    pub fn len(&self) -> usize {
        self.slots.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn new_slot(&self, url: &str) -> Result<WorkerSlot, CoordinatorError> {
        let bad = |e: tonic::transport::Error| CoordinatorError::WorkerUrl {
            url: url.to_owned(),
            message: e.to_string(),
        };
        let mut ep = Endpoint::from_shared(url.to_owned())
            .map_err(bad)?
            .connect_timeout(PROBE_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.opts.keepalive.0)
            .keep_alive_timeout(self.opts.keepalive.1)
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.opts.tls {
            ep = ep.tls_config(tls.clone()).map_err(bad)?;
        }
        let warm = LruCache::new(NonZeroUsize::new(WARM_KEYS).unwrap_or(NonZeroUsize::MIN));
        Ok(WorkerSlot {
            id: self.next_id.fetch_add(1, Ordering::SeqCst),
            url: url.into(),
            channel: ep.connect_lazy(),
            healthy: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(self.opts.fixed_limit.unwrap_or(1)),
            info: Mutex::new(None),
            last_error: Mutex::new(String::new()),
            warm: Mutex::new(warm),
        })
    }

    /// Makes `urls` the workers in rotation: new URLs get fresh slots (and ids), vanished ones are retired (no new
    /// tasks; running ones finish on their permits). All URLs are checked first: on an error nothing changes.
    pub fn set_workers(&self, urls: &[String]) -> Result<Membership, CoordinatorError> {
        let current: Vec<Arc<str>> = self.slots().iter().map(|s| s.url.clone()).collect();
        let mut fresh = Vec::new();
        for u in urls {
            let known = current.iter().any(|c| **c == **u) || fresh.iter().any(|s: &WorkerSlot| *s.url == **u);
            if !known {
                fresh.push(self.new_slot(u)?);
            }
        }
        let mut change = Membership::default();
        {
            let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
            slots.retain(|s| {
                let keep = urls.iter().any(|u| **u == *s.url);
                if !keep {
                    change.retired.push(s.url.to_string());
                }
                keep
            });
            for s in fresh {
                change.added.push(s.url.to_string());
                slots.push(Arc::new(s));
            }
        }
        if !change.added.is_empty() || !change.retired.is_empty() {
            tracing::info!(added = ?change.added, retired = ?change.retired, "workers changed");
            self.added.notify_one();
            self.released.notify_waiters();
            self.update_gauge();
        }
        Ok(change)
    }

    /// Placement's view for a task with affinity `key`; workers in `excluded` are unusable unless every healthy one
    /// is excluded; with `scoring`, only workers whose Info says they can score are usable.
    pub fn candidates(&self, excluded: &[WorkerId], key: &[u8; 32], scoring: bool) -> Vec<Candidate> {
        let slots = self.slots();
        let can_score = |w: &WorkerSlot| lock(&w.info).as_ref().is_some_and(|i| i.scoring);
        let healthy = |w: &WorkerSlot| w.healthy.load(Ordering::SeqCst) && (!scoring || can_score(w));
        let all_excluded = slots.iter().all(|w| !healthy(w) || excluded.contains(&w.id));
        let subjects = has_subjects(key);
        slots
            .iter()
            .map(|w| Candidate {
                id: w.id,
                url: w.url.clone(),
                load: w.in_flight.load(Ordering::SeqCst),
                usable: healthy(w) && (all_excluded || !excluded.contains(&w.id)),
                warm: subjects && lock(&w.warm).contains(key),
            })
            .collect()
    }

    /// Whether any worker can score: `Some(true)` once one says so, `Some(false)` once every worker in rotation
    /// has loaded its model (Info names it) and none says so, `None` while that is not known.
    pub fn can_score(&self) -> Option<bool> {
        let mut known = true;
        for w in self.slots() {
            match lock(&w.info).as_ref() {
                Some(i) if i.scoring => return Some(true),
                Some(i) if !i.model.is_empty() => {}
                _ => known = false,
            }
        }
        (known && !self.is_empty()).then_some(false)
    }

    /// Takes a slot on worker `id` if it is in rotation and below its limit.
    pub fn try_acquire(self: &Arc<Self>, id: WorkerId) -> Option<Permit> {
        let slot = self.slot(id)?;
        let limit = slot.limit.load(Ordering::SeqCst);
        slot.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1))
            .ok()?;
        Some(Permit {
            registry: self.clone(),
            slot,
            idx: id,
        })
    }

    /// Resolves when a slot is released (or health was polled); callers `enable` it before looking, and bound it.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }

    /// Marks a worker unhealthy after a failed call (the poller marks it healthy again).
    pub fn mark_unhealthy(&self, id: WorkerId, why: &str) {
        if let Some(w) = self.slot(id) {
            w.healthy.store(false, Ordering::SeqCst);
            *lock(&w.last_error) = why.to_owned();
            self.update_gauge();
        }
    }

    /// The workers in rotation, for ListWorkers.
    pub fn snapshot(&self) -> Vec<WorkerStatus> {
        self.slots()
            .iter()
            .map(|w| WorkerStatus {
                url: w.url.to_string(),
                healthy: w.healthy.load(Ordering::SeqCst),
                load: w.in_flight.load(Ordering::SeqCst),
                limit: w.limit.load(Ordering::SeqCst),
                info: lock(&w.info).clone(),
                last_error: lock(&w.last_error).clone(),
                warm_subjects: u32::try_from(lock(&w.warm).len()).unwrap_or(u32::MAX),
            })
            .collect()
    }

    /// Sets `mip_coord_workers{state=healthy|unhealthy}` from the workers in rotation.
    fn update_gauge(&self) {
        let slots = self.slots();
        let healthy = slots.iter().filter(|w| w.healthy.load(Ordering::SeqCst)).count() as i64;
        let gauge = &self.opts.metrics.workers;
        gauge.with_label_values(&["healthy"]).set(healthy);
        gauge
            .with_label_values(&["unhealthy"])
            .set(slots.len() as i64 - healthy);
    }

    /// Polls every worker now, then every `interval` (or at once when workers were added) until `stop` turns true.
    pub async fn poll(self: Arc<Self>, interval: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            let slots = self.slots();
            futures::future::join_all(slots.iter().map(|w| self.probe(w))).await;
            self.update_gauge();
            self.released.notify_waiters();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.added.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    async fn probe(&self, w: &WorkerSlot) {
        let max = self.opts.max_message_bytes;
        let req = HealthCheckRequest {
            service: "mip.v1.Worker".into(),
        };
        let mut health = HealthClient::new(w.channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let serving = match tokio::time::timeout(PROBE_TIMEOUT, health.check(req)).await {
            Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving => Ok(()),
            Ok(Ok(r)) => Err(format!("health {:?}", r.get_ref().status())),
            Ok(Err(e)) => Err(format!("health check: {} {}", e.code(), e.message())),
            Err(_) => Err(format!("health check timed out after {PROBE_TIMEOUT:?}")),
        };
        let mut client = WorkerClient::new(w.channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        if serving.is_ok() {
            if let Ok(Ok(info)) = tokio::time::timeout(PROBE_TIMEOUT, client.info(InfoRequest {})).await {
                let info = info.into_inner();
                let limit = self.opts.fixed_limit.unwrap_or(info.capacity.saturating_add(1)).max(1);
                w.limit.store(limit, Ordering::SeqCst);
                *lock(&w.info) = Some(info);
            }
        }
        match serving {
            Ok(()) => {
                if !w.healthy.swap(true, Ordering::SeqCst) {
                    tracing::info!(worker = %w.url, id = w.id, "worker healthy");
                }
                lock(&w.last_error).clear();
            }
            Err(e) => {
                if w.healthy.swap(false, Ordering::SeqCst) {
                    tracing::warn!(worker = %w.url, id = w.id, error = %e, "worker unhealthy");
                }
                *lock(&w.last_error) = e;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(urls: &[&str]) -> Arc<Registry> {
        let urls: Vec<String> = urls.iter().map(|u| (*u).to_owned()).collect();
        let opts = RegistryOptions {
            fixed_limit: Some(2),
            max_message_bytes: 1 << 20,
            tls: None,
            metrics: Metrics::new().expect("metrics"),
            keepalive: (Duration::from_secs(5), Duration::from_secs(5)),
        };
        Arc::new(Registry::new(&urls, opts).expect("registry"))
    }

    fn healthy_all(r: &Registry) {
        for s in r.slots() {
            s.healthy.store(true, Ordering::SeqCst);
        }
    }

    fn ids(r: &Registry) -> Vec<(WorkerId, String)> {
        r.slots().iter().map(|s| (s.id, s.url.to_string())).collect()
    }

    #[tokio::test]
    async fn set_workers_adds_and_retires_with_stable_ids() {
        let r = registry(&["http://a:1", "http://b:1"]);
        assert_eq!(ids(&r), [(0, "http://a:1".into()), (1, "http://b:1".into())]);
        healthy_all(&r);
        let key = [5u8; 32];
        let permit = r.try_acquire(0).expect("a has room");

        let change = r.set_workers(&["http://b:1".into(), "http://c:1".into()]).expect("set");
        assert_eq!(change.added, ["http://c:1"]);
        assert_eq!(change.retired, ["http://a:1"]);
        assert_eq!(ids(&r), [(1, "http://b:1".into()), (2, "http://c:1".into())]);
        // The retired worker takes no new task, but the running one keeps its slot.
        assert!(r.try_acquire(0).is_none());
        assert_eq!(permit.url(), "http://a:1");
        drop(permit);
        assert!(r.candidates(&[], &key, false).iter().all(|c| c.id != 0));

        // A URL that comes back gets a new id; the same list twice changes nothing.
        r.set_workers(&["http://a:1".into(), "http://b:1".into(), "http://c:1".into()])
            .expect("again");
        assert_eq!(ids(&r).last().expect("a").0, 3);
        let same = r
            .set_workers(&["http://a:1".into(), "http://b:1".into(), "http://c:1".into()])
            .expect("same");
        assert_eq!(same, Membership::default());

        // A bad URL changes nothing.
        assert!(r.set_workers(&["not a url".into()]).is_err());
        assert_eq!(r.len(), 3);
    }

    #[tokio::test]
    async fn limits_health_exclusion_and_warm_keys() {
        let r = registry(&["http://a:1", "http://b:1"]);
        let key = [7u8; 32];
        assert!(
            r.candidates(&[], &key, false).iter().all(|c| !c.usable),
            "unhealthy until polled"
        );
        healthy_all(&r);
        let p1 = r.try_acquire(1).expect("1");
        let _p2 = r.try_acquire(1).expect("2");
        assert!(r.try_acquire(1).is_none(), "limit 2");
        drop(p1);
        assert!(r.try_acquire(1).is_some());

        let c = r.candidates(&[0], &key, false);
        assert_eq!(c.iter().map(|c| c.usable).collect::<Vec<_>>(), [false, true]);
        let c = r.candidates(&[0, 1], &key, false);
        assert!(c.iter().all(|c| c.usable), "all excluded: all usable again");
        r.mark_unhealthy(1, "boom");
        assert!(!r.candidates(&[], &key, false)[1].usable);
        assert_eq!(r.snapshot()[1].last_error, "boom");

        let p = r.try_acquire(0).expect("0");
        p.remember(&key);
        p.remember(&[0u8; 32]);
        assert!(r.candidates(&[], &key, false)[0].warm);
        assert!(!r.candidates(&[], &key, false)[1].warm);
        assert_eq!(r.snapshot()[0].warm_subjects, 1, "subject-less keys are not remembered");
        let text = r.opts.metrics.render();
        assert!(text.contains("mip_coord_workers{state=\"healthy\"} 1"), "{text}");
    }
}
