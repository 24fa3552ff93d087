//! The worker's Prometheus metrics (`mip_` prefix, listed in the README) in a [`Registry`] of their own, so several
//! workers can live in one process (tests) and the registry can be served by any HTTP endpoint
//! ([`Metrics::render`] gives the text format).

use mip_common::request_layer::RequestMetrics;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of one worker.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `mip_stage_duration_seconds{stage}`: queue, text, subjects, denoise, decode, png.
    pub stage_duration: HistogramVec,
    /// `mip_unet_step_seconds`: one denoising step (a CFG-batched UNet call and the scheduler step).
    pub unet_step: Histogram,
    /// `mip_subject_cache_hits_total{tier}`: memory or redis.
    pub subject_hits: IntCounterVec,
    /// `mip_subject_cache_misses_total`.
    pub subject_misses: IntCounter,
    /// `mip_image_encoder_calls_total`: executor jobs that ran the image encoder.
    pub image_encoder_calls: IntCounter,
    /// `mip_queue_depth`: admitted requests waiting for the device.
    pub queue_depth: IntGauge,
    /// `mip_requests_rejected_total{reason}`: queue_full, not_ready, draining.
    pub rejected: IntCounterVec,
    /// `mip_errors_total{reason}`: failures by reason (invalid_argument, device_error, …).
    pub errors: IntCounterVec,
    /// `mip_grpc_requests_total` and `mip_grpc_request_duration_seconds` (`{grpc_service, method, code}`),
    /// recorded by the server's [`RequestLayer`](mip_common::request_layer::RequestLayer).
    pub requests: RequestMetrics,
}

/// Building the metrics failed (a duplicate name: a programming error, reported rather than panicking).
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let stage_buckets = prometheus::exponential_buckets(0.001, 2.0, 18)?;
        let stage_duration = HistogramVec::new(
            HistogramOpts::new("mip_stage_duration_seconds", "Wall time per generation stage").buckets(stage_buckets),
            &["stage"],
        )?;
        let unet_step = Histogram::with_opts(
            HistogramOpts::new("mip_unet_step_seconds", "Wall time of one denoising step")
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 16)?),
        )?;
        let subject_hits = IntCounterVec::new(
            Opts::new("mip_subject_cache_hits_total", "Subject embeddings found in the cache"),
            &["tier"],
        )?;
        let subject_misses = IntCounter::new("mip_subject_cache_misses_total", "Subject embeddings computed")?;
        let image_encoder_calls = IntCounter::new("mip_image_encoder_calls_total", "Image encoder runs")?;
        let queue_depth = IntGauge::new("mip_queue_depth", "Admitted requests waiting for the device")?;
        let rejected = IntCounterVec::new(
            Opts::new("mip_requests_rejected_total", "Requests refused before any work"),
            &["reason"],
        )?;
        let errors = IntCounterVec::new(Opts::new("mip_errors_total", "Failed requests by reason"), &["reason"])?;
        registry.register(Box::new(stage_duration.clone()))?;
        registry.register(Box::new(unet_step.clone()))?;
        registry.register(Box::new(subject_hits.clone()))?;
        registry.register(Box::new(subject_misses.clone()))?;
        registry.register(Box::new(image_encoder_calls.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        let requests = RequestMetrics::register(&registry)?;
        Ok(Self {
            registry,
            stage_duration,
            unet_step,
            subject_hits,
            subject_misses,
            image_encoder_calls,
            queue_depth,
            rejected,
            errors,
            requests,
        })
    }

    /// The registry holding every metric (to serve it elsewhere).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Records a stage's duration in milliseconds.
    pub fn stage_ms(&self, stage: &str, ms: f64) {
        self.stage_duration.with_label_values(&[stage]).observe(ms / 1e3);
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
        m.stage_ms("denoise", 12.0);
        m.subject_hits.with_label_values(&["memory"]).inc();
        let text = m.render();
        for name in ["mip_stage_duration_seconds", "mip_subject_cache_hits_total"] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert!(text.contains("tier=\"memory\""), "{text}");
    }
}
