//! End to end through the global telemetry state (one test per process, since the subscriber is global):
//! `telemetry::init` with an OTLP endpoint pointing at an in-process fake collector, a client span whose context the
//! `TraceInterceptor` injects, a server span parented from that metadata, and the guard's shutdown flushing both
//! spans to the collector with one trace id, the right parent and `service.name`. A second `init` is a no-op.

use std::time::Duration;

use mip_common::propagation::{set_parent_from, TraceInterceptor};
use mip_common::telemetry::{init, TelemetryConfig};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;
use tonic::service::Interceptor as _;
use tonic::transport::server::TcpIncoming;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

const LIMIT: Duration = Duration::from_secs(20);

/// Forwards every export request to the test.
struct FakeCollector(mpsc::Sender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for FakeCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .try_send(request.into_inner())
            .map_err(|e| tonic::Status::resource_exhausted(format!("test channel: {e}")))?;
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn service_names(req: &ExportTraceServiceRequest) -> Vec<String> {
    let attrs = req
        .resource_spans
        .iter()
        .filter_map(|rs| rs.resource.as_ref())
        .flat_map(|r| r.attributes.iter());
    attrs
        .filter(|kv| kv.key == "service.name")
        .filter_map(|kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn spans(req: &ExportTraceServiceRequest) -> impl Iterator<Item = &Span> {
    req.resource_spans
        .iter()
        .flat_map(|rs| rs.scope_spans.iter())
        .flat_map(|ss| ss.spans.iter())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_cross_grpc_metadata_and_reach_the_collector() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, mut rx) = mpsc::channel(64);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let collector = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(FakeCollector(tx)))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
                let _ = stopped.await;
            }),
    );

    // The services' default log level: what reaches stderr must not decide what is exported.
    let cfg = TelemetryConfig {
        otlp_endpoint: Some(format!("http://{addr}")),
        service_name: "mip-telemetry-test".to_owned(),
        log_filter: "warn".to_owned(),
        ..TelemetryConfig::default()
    };
    let guard = init(&cfg).expect("telemetry init");
    assert!(guard.exports_traces());

    // Client side: the interceptor writes the current span's context into the outgoing metadata.
    let client_span = tracing::info_span!("client_call");
    let request = client_span
        .in_scope(|| TraceInterceptor.call(tonic::Request::new(())))
        .expect("interceptor");
    let client_cx = client_span.context().span().span_context().clone();
    assert!(client_cx.is_valid() && client_cx.is_sampled());
    let traceparent = request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .expect("traceparent");
    assert_eq!(
        traceparent,
        format!("00-{}-{}-01", client_cx.trace_id(), client_cx.span_id())
    );

    // Server side: a fresh span takes its parent from the incoming metadata.
    let server_span = tracing::info_span!("server_handler");
    set_parent_from(&server_span, request.metadata());
    let server_cx = server_span.context().span().span_context().clone();
    assert_eq!(server_cx.trace_id(), client_cx.trace_id());
    assert_ne!(server_cx.span_id(), client_cx.span_id());
    drop(server_span);
    drop(client_span);

    // A second init in the same process must not panic and owns nothing.
    let second = init(&TelemetryConfig::default()).expect("second init");
    assert!(!second.exports_traces());
    drop(second);

    guard.shutdown().expect("flush and shutdown");

    let mut got = Vec::new();
    let mut names = Vec::new();
    while got.len() < 2 {
        let req = tokio::time::timeout(LIMIT, rx.recv())
            .await
            .expect("spans exported in time")
            .expect("collector");
        names.extend(service_names(&req));
        got.extend(spans(&req).cloned());
    }
    assert!(
        names.iter().all(|n| n == "mip-telemetry-test") && !names.is_empty(),
        "{names:?}"
    );
    let find = |name: &str| {
        got.iter()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name}: {got:?}"))
    };
    let (client, server) = (find("client_call"), find("server_handler"));
    assert_eq!(client.trace_id, client_cx.trace_id().to_bytes().to_vec());
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.parent_span_id, client.span_id);

    let _ = stop.send(());
    tokio::time::timeout(LIMIT, collector)
        .await
        .expect("collector stops")
        .expect("join")
        .expect("collector ok");
}
