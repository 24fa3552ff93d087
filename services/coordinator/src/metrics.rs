//! The coordinator's Prometheus metrics in a [`Registry`] of their own (several coordinators can live in one
//! process in tests); `telemetry.metrics_listen` serves them with `mip_common::metrics_http`.
//!
//! Families: `mip_coord_queue_depth{priority}` (tasks waiting for a worker), `mip_coord_task_duration_seconds
//! {outcome}` (one task from its first placement to its image or final failure), `mip_coord_task_retries_total`,
//! `mip_coord_affinity_total{outcome}` (hot: the rendezvous-first worker, which served the same subjects before;
//! cold: the rendezvous-first worker, not seen with them; spilled: another worker, because of load or health),
//! `mip_coord_rejected_total{reason}` (queue_full, unauthenticated, invalid_argument, deadline_exceeded, …),
//! `mip_coord_jobs_total{status}` (finished jobs), `mip_coord_workers{state}` (healthy / unhealthy) and
//! `mip_coord_fenced_writes_total` (writes the store refused because another coordinator claimed the job).

use mip_common::request_layer::RequestMetrics;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Every metric of one coordinator; cheap to clone (the families are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub queue_depth: IntGaugeVec,
    pub task_duration: HistogramVec,
    pub retries: IntCounter,
    pub affinity: IntCounterVec,
    pub rejected: IntCounterVec,
    pub jobs: IntCounterVec,
    pub workers: IntGaugeVec,
    pub fenced: IntCounter,
    /// `mip_grpc_requests_total` and `mip_grpc_request_duration_seconds`, recorded by the server's
    /// [`RequestLayer`](mip_common::request_layer::RequestLayer).
    pub requests: RequestMetrics,
}

/// Building the metrics failed (a duplicate name: a programming error, reported rather than panicking).
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Affinity outcomes, the label values of `mip_coord_affinity_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    Hot,
    Cold,
    Spilled,
}

impl Affinity {
    pub fn label(self) -> &'static str {
        match self {
            Self::Hot => "hot",
            Self::Cold => "cold",
            Self::Spilled => "spilled",
        }
    }
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let queue_depth = IntGaugeVec::new(
            Opts::new("mip_coord_queue_depth", "Tasks waiting for a worker, by job priority"),
            &["priority"],
        )?;
        let task_duration = HistogramVec::new(
            HistogramOpts::new(
                "mip_coord_task_duration_seconds",
                "One task from its first placement to its image or final failure",
            )
            .buckets(prometheus::exponential_buckets(0.01, 2.0, 16)?),
            &["outcome"],
        )?;
        let retries = IntCounter::new(
            "mip_coord_task_retries_total",
            "Task attempts retried on another worker",
        )?;
        let affinity = IntCounterVec::new(
            Opts::new("mip_coord_affinity_total", "Task placements by affinity outcome"),
            &["outcome"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "mip_coord_rejected_total",
                "Calls or tasks refused before any work, by reason",
            ),
            &["reason"],
        )?;
        let jobs = IntCounterVec::new(
            Opts::new("mip_coord_jobs_total", "Finished jobs by status"),
            &["status"],
        )?;
        let workers = IntGaugeVec::new(Opts::new("mip_coord_workers", "Known workers by state"), &["state"])?;
        let fenced = IntCounter::new(
            "mip_coord_fenced_writes_total",
            "Job state writes refused because another coordinator claimed the job",
        )?;
        registry.register(Box::new(fenced.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(task_duration.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(affinity.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(workers.clone()))?;
        let requests = RequestMetrics::register(&registry)?;
        Ok(Self {
            registry,
            queue_depth,
            task_duration,
            retries,
            affinity,
            rejected,
            jobs,
            workers,
            fenced,
            requests,
        })
    }

    /// The registry holding every metric (to serve it).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a refusal.
    pub fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// Counts a placement.
    pub fn placed(&self, outcome: Affinity) {
        self.affinity.with_label_values(&[outcome.label()]).inc();
    }

    /// Moves `n` tasks of `priority` into (`delta` > 0) or out of (`delta` < 0) the queue.
    pub fn queue(&self, priority: i32, delta: i64) {
        self.queue_depth.with_label_values(&[&priority.to_string()]).add(delta);
    }

    /// The Prometheus text exposition of the registry.
    pub fn render(&self) -> String {
        mip_common::metrics_http::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new().expect("metrics");
        m.queue(5, 3);
        m.queue(5, -1);
        m.placed(Affinity::Spilled);
        m.reject("queue_full");
        m.retries.inc();
        m.task_duration.with_label_values(&["ok"]).observe(0.5);
        m.jobs.with_label_values(&["done"]).inc();
        m.workers.with_label_values(&["healthy"]).set(3);
        let text = m.render();
        for needle in [
            "mip_coord_queue_depth{priority=\"5\"} 2",
            "mip_coord_affinity_total{outcome=\"spilled\"} 1",
            "mip_coord_rejected_total{reason=\"queue_full\"} 1",
            "mip_coord_task_retries_total 1",
            "mip_coord_task_duration_seconds_count{outcome=\"ok\"} 1",
            "mip_coord_jobs_total{status=\"done\"} 1",
            "mip_coord_workers{state=\"healthy\"} 3",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
