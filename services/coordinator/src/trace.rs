//! A job span's W3C trace context kept with the job, so a resumed job (after a restart, or on another replica)
//! continues the trace its first run began.

use tonic::metadata::{MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::store::TRACE_FIELDS;

/// The W3C fields of `span`'s context (empty when tracing has no OpenTelemetry layer or propagator).
pub fn trace_fields(span: &tracing::Span) -> Vec<(String, String)> {
    let mut md = MetadataMap::new();
    mip_common::propagation::inject(&span.context(), &mut md);
    TRACE_FIELDS
        .iter()
        .filter_map(|f| {
            let v = md.get(*f)?.to_str().ok()?;
            Some(((*f).to_owned(), v.to_owned()))
        })
        .collect()
}

/// Makes `span` continue the trace stored in `fields`.
pub fn continue_trace(span: &tracing::Span, fields: &[(String, String)]) {
    let mut md = MetadataMap::new();
    for (k, v) in fields {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            MetadataValue::try_from(v.as_str()),
        ) {
            md.insert(key, value);
        }
    }
    mip_common::propagation::set_parent_from(span, &md);
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    fn traceparent(fields: &[(String, String)]) -> String {
        fields
            .iter()
            .find(|(k, _)| k == "traceparent")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    #[test]
    fn a_resumed_job_span_continues_the_stored_trace() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("coordinator-test")));
        tracing::subscriber::with_default(subscriber, || {
            let first = tracing::info_span!(parent: None, "job");
            let stored = trace_fields(&first);
            let tp = traceparent(&stored);
            assert_eq!(tp.len(), 55, "00-<trace>-<span>-<flags>: {tp:?}");
            let resumed = tracing::info_span!(parent: None, "job", resumed = true);
            continue_trace(&resumed, &stored);
            let again = traceparent(&trace_fields(&resumed));
            assert_eq!(again[3..35], tp[3..35], "same trace");
            assert_ne!(again[36..52], tp[36..52], "a new span");
            let unrelated = traceparent(&trace_fields(&tracing::info_span!(parent: None, "job")));
            assert_ne!(unrelated[3..35], tp[3..35], "a fresh job starts its own trace");
        });
        assert!(
            trace_fields(&tracing::Span::none()).is_empty(),
            "no tracing: nothing stored"
        );
    }
}
