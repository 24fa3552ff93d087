//! W3C trace context across gRPC hops, carried in tonic metadata (`traceparent`, `tracestate`).
//!
//! - Server side: [`set_parent_from`] makes a handler's span a child of the caller's span
//!   (`let span = info_span!("generate"); set_parent_from(&span, request.metadata());`).
//! - Client side: [`TraceInterceptor`] injects the current span's context into every outgoing request
//!   (`WorkerClient::with_interceptor(channel, TraceInterceptor)`).
//!
//! [`extract`] and [`inject`] use the global propagator that [`crate::telemetry::init`] sets; [`MetadataExtractor`]
//! and [`MetadataInjector`] adapt tonic metadata for any other `TextMapPropagator`.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::Context;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Reads propagation fields from tonic metadata (ASCII entries only; binary `-bin` entries are skipped).
pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes propagation fields into tonic metadata; a key or value that is not valid metadata is skipped.
pub struct MetadataInjector<'a>(pub &'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

/// The remote context in `metadata`, per the global propagator (an empty context when there is none).
pub fn extract(metadata: &MetadataMap) -> Context {
    let empty = Context::new();
    opentelemetry::global::get_text_map_propagator(|p| p.extract_with_context(&empty, &MetadataExtractor(metadata)))
}

/// The remote context in HTTP request headers (what a tower layer in front of a gRPC server sees).
pub fn extract_headers(headers: &http::HeaderMap) -> Context {
    extract(&MetadataMap::from_headers(headers.clone()))
}

/// Writes `cx` into `metadata` with the global propagator.
pub fn inject(cx: &Context, metadata: &mut MetadataMap) {
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(cx, &mut MetadataInjector(metadata)));
}

/// The trace context a parent process passed in the environment (`TRACEPARENT`, `TRACESTATE`: the convention of
/// CI systems and other tracing-aware launchers); an empty context when there is none.
pub fn extract_env() -> Context {
    let mut md = MetadataMap::new();
    for (var, key) in [("TRACEPARENT", "traceparent"), ("TRACESTATE", "tracestate")] {
        if let Some(v) = std::env::var(var).ok().and_then(|v| MetadataValue::try_from(v).ok()) {
            md.insert(key, v);
        }
    }
    extract(&md)
}

/// Makes `span` a child of `cx` when `cx` carries a span (nothing happens without an OpenTelemetry layer).
pub fn set_parent(span: &tracing::Span, cx: Context) {
    if opentelemetry::trace::TraceContextExt::has_active_span(&cx) {
        // Errors here only mean "no OpenTelemetry layer" or "span disabled": nothing to link.
        let _ = span.set_parent(cx);
    }
}

/// Writes the current `tracing` span's trace context into `metadata` (for interceptors of other crates).
pub fn inject_current(metadata: &mut MetadataMap) {
    inject(&tracing::Span::current().context(), metadata);
}

/// Makes `span` a child of the trace context carried by `metadata`.
///
/// Call it before the span is first used for tracing context. It does nothing when the metadata carries no context,
/// when no OpenTelemetry layer is installed (no OTLP endpoint), or when the span is disabled by the filter.
pub fn set_parent_from(span: &tracing::Span, metadata: &MetadataMap) {
    set_parent(span, extract(metadata));
}

/// Client interceptor: injects the current `tracing` span's trace context into every outgoing request.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceInterceptor;

impl Interceptor for TraceInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        inject_current(request.metadata_mut());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    fn known_context() -> Context {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn inject_then_extract_round_trips_the_span_context() {
        let propagator = TraceContextPropagator::new();
        let mut md = MetadataMap::new();
        md.insert("x-other", MetadataValue::from_static("keep"));
        propagator.inject_context(&known_context(), &mut MetadataInjector(&mut md));
        assert_eq!(
            md.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let back = propagator.extract(&MetadataExtractor(&md));
        let sc = back.span().span_context().clone();
        assert_eq!(
            sc.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id")
        );
        assert_eq!(sc.span_id(), SpanId::from_hex("00f067aa0ba902b7").expect("span id"));
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(md.get("x-other").and_then(|v| v.to_str().ok()), Some("keep"));
    }

    #[test]
    fn extract_without_traceparent_is_empty_and_keys_skip_binary() {
        let mut md = MetadataMap::new();
        md.insert_bin("blob-bin", tonic::metadata::MetadataValue::from_bytes(b"\x00\x01"));
        md.insert("traceparent", MetadataValue::from_static("garbage"));
        let extractor = MetadataExtractor(&md);
        assert_eq!(extractor.keys(), vec!["traceparent"]);
        let cx = TraceContextPropagator::new().extract(&extractor);
        assert!(!cx.span().span_context().is_valid());
    }
}
