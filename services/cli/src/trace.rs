//! The CLI's own trace. With `OTEL_EXPORTER_OTLP_ENDPOINT` set (the variable every OpenTelemetry SDK reads; e.g.
//! `http://otel-collector:4317`, OTLP over gRPC), a client command exports one span for its run, and every call it
//! makes carries that span's W3C trace context, so the coordinator's job and everything below it join the caller's
//! trace. `TRACEPARENT` / `TRACESTATE` in the environment (set by CI systems and other tracing-aware launchers) make
//! the command's span a child of that trace. `OTEL_SERVICE_NAME` names the exporting service (`mip`).

use anyhow::Result;
use mip_common::telemetry::{TelemetryConfig, TelemetryGuard};

use crate::verbosity::Verbosity;

/// Logs (with `-v`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, span export; call inside the runtime and keep
/// the guard until the command's span has ended (dropping it flushes the spans).
pub fn init(v: Verbosity) -> Result<Option<TelemetryGuard>> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty());
    if endpoint.is_none() && !v.client_logs() {
        return Ok(None);
    }
    let guard = mip_common::telemetry::init(&TelemetryConfig {
        otlp_endpoint: endpoint,
        service_name: std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "mip".to_owned()),
        log_filter: v.filter(),
        log_format: v.log_format(),
        ..TelemetryConfig::default()
    })?;
    Ok(Some(guard))
}

/// The span of one command run (`mip generate` …), a child of the environment's `TRACEPARENT` when set.
pub fn command_span(command: &'static str) -> tracing::Span {
    let span = tracing::info_span!("command", otel.name = command, otel.kind = "client");
    mip_common::propagation::set_parent(&span, mip_common::propagation::extract_env());
    span
}
