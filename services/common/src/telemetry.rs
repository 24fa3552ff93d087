//! Process-wide telemetry: logs and, optionally, distributed traces.
//!
//! [`init`] installs a `tracing` subscriber made of an `fmt` layer on stderr (human-readable, or one JSON object per
//! line with [`LogFormat::Json`]) behind the env-filter of [`TelemetryConfig::log_filter`] and, when [`TelemetryConfig::otlp_endpoint`] is set, a `tracing-opentelemetry`
//! layer that exports spans over OTLP/gRPC (batch span processor, parent-based trace-id-ratio sampler) behind a
//! filter of its own: every INFO span is exported whatever the log level. The W3C TraceContext propagator is always set as
//! the global propagator, so [`crate::propagation`] carries `traceparent` across gRPC hops.
//!
//! The returned [`TelemetryGuard`] flushes and shuts the exporter down when dropped (or on
//! [`TelemetryGuard::shutdown`]); keep it alive for the life of the process. A second [`init`] in the same process
//! (tests) leaves the first subscriber in place and returns a guard that does nothing.
//!
//! With an OTLP endpoint, [`init`] must be called inside a Tokio runtime (the gRPC channel is driven by it), and the
//! runtime must outlive the guard. Spans are batched and exported by the SDK's own thread, so a slow collector never
//! blocks request handling; shutting down waits at most the SDK's export timeouts.

use anyhow::{bail, Context as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;

/// The spans exported over OTLP: every span at INFO or above, whatever the log filter says.
const SPAN_LEVEL: LevelFilter = LevelFilter::INFO;

/// How logs are written on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (`timestamp`, `level`, `fields`, `target`, `span`), for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format must be `text` or `json`, got {other:?}")),
        }
    }
}

/// The `telemetry` section of a service's config file (worker and coordinator alike): trace export and the
/// Prometheus endpoint. [`TelemetryConfig`] is what [`init`] takes, built from it by the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySection {
    /// OTLP gRPC endpoint; empty = no export.
    pub otlp_endpoint: String,
    pub sample_ratio: f64,
    /// `host:port` of `GET /metrics`; empty = not served.
    pub metrics_listen: String,
    /// `text` or `json` (`--log-format` wins).
    pub log_format: LogFormat,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
            metrics_listen: String::new(),
            log_format: LogFormat::Text,
        }
    }
}

/// The `telemetry` configuration section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`; `None` exports no traces.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new (root) traces to sample, in `0.0..=1.0`; children follow their parent's decision.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// `tracing-subscriber` env-filter directives, e.g. `info,mip_worker=debug`.
    pub log_filter: String,
    /// Text or JSON lines on stderr.
    pub log_format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "mip".to_owned(),
            log_filter: "info".to_owned(),
            log_format: LogFormat::Text,
        }
    }
}

/// Keeps the trace exporter alive; flushes and shuts it down on drop or [`TelemetryGuard::shutdown`].
#[derive(Debug)]
#[must_use = "dropping the guard shuts the trace exporter down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// A guard that owns nothing (telemetry was already initialised, or no exporter was configured).
    pub fn noop() -> Self {
        Self { provider: None }
    }

    /// Whether this guard owns an OTLP trace exporter.
    pub fn exports_traces(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes pending spans and shuts the exporter down (bounded by the SDK's export timeouts).
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.shutdown_provider()
    }

    fn shutdown_provider(&mut self) -> anyhow::Result<()> {
        let Some(provider) = self.provider.take() else {
            return Ok(());
        };
        let finish = move || {
            let flushed = provider.force_flush().context("flushing spans");
            let shut = provider.shutdown().context("shutting the trace exporter down");
            flushed.and(shut)
        };
        // The export runs on the SDK's thread but its gRPC channel is driven by Tokio: on a multi-thread runtime,
        // hand this worker's tasks to the others while we wait. (On a current-thread runtime the export cannot
        // progress while we block, and the SDK's timeouts bound the wait.)
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(finish)
        } else {
            finish()
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown_provider() {
            eprintln!("telemetry: {e:#}");
        }
    }
}

/// Installs the global subscriber (and the OTLP tracer when configured). See the module docs.
pub fn init(cfg: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_new(&cfg.log_filter)
        .with_context(|| format!("`telemetry.log_filter` is not a valid filter, got {:?}", cfg.log_filter))?;
    if !(0.0..=1.0).contains(&cfg.sample_ratio) {
        bail!(
            "`telemetry.sample_ratio` must be in 0.0..=1.0, got {}",
            cfg.sample_ratio
        );
    }
    let provider = match cfg.otlp_endpoint.as_deref() {
        Some(endpoint) => Some(tracer_provider(endpoint, cfg)?),
        None => None,
    };
    // Each layer has its own filter: the log level (`-v`, `RUST_LOG`) decides what reaches stderr, never which
    // spans are exported (those are sampled by `sample_ratio` alone).
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(cfg.service_name.clone()))
            .with_filter(SPAN_LEVEL)
    });
    let fmt_layer = match cfg.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init();
    if installed.is_err() {
        // Already initialised in this process: keep the first subscriber, discard what we built.
        if let Some(p) = provider {
            let _ = p.shutdown();
        }
        return Ok(TelemetryGuard::noop());
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    Ok(TelemetryGuard { provider })
}

/// OTLP/gRPC exporter behind a batch span processor, with a parent-based ratio sampler.
fn tracer_provider(endpoint: &str, cfg: &TelemetryConfig) -> anyhow::Result<SdkTracerProvider> {
    if tokio::runtime::Handle::try_current().is_err() {
        bail!("`telemetry.otlp_endpoint` is set ({endpoint}) but telemetry::init was called outside a Tokio runtime");
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("`telemetry.otlp_endpoint`: building the OTLP exporter for {endpoint:?}"))?;
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio)));
    let resource = Resource::builder().with_service_name(cfg.service_name.clone()).build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_rejected_with_the_field_name() {
        let cfg = TelemetryConfig {
            sample_ratio: 1.5,
            ..TelemetryConfig::default()
        };
        let e = init(&cfg).expect_err("ratio out of range");
        assert!(
            e.to_string().contains("telemetry.sample_ratio") && e.to_string().contains("1.5"),
            "{e}"
        );

        let cfg = TelemetryConfig {
            log_filter: "info,[[[".to_owned(),
            ..TelemetryConfig::default()
        };
        let e = init(&cfg).expect_err("bad filter");
        assert!(e.to_string().contains("telemetry.log_filter"), "{e}");

        let cfg = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:4317".to_owned()),
            ..Default::default()
        };
        let e = init(&cfg).expect_err("no runtime");
        assert!(e.to_string().contains("Tokio runtime"), "{e}");
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: TelemetryConfig = serde_json::from_str(r#"{"otlp_endpoint":"http://c:4317"}"#).expect("parses");
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://c:4317"));
        assert_eq!((c.sample_ratio, c.log_filter.as_str()), (1.0, "info"));
        assert!(serde_json::from_str::<TelemetryConfig>(r#"{"ratio":0.5}"#).is_err());
    }
}
