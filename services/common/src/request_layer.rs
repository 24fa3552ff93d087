//! One tower layer for what every gRPC call of a service has in common, whichever method it is: a server span and
//! the request metrics. Both services install it on their tonic server (`Server::builder().layer(...)`), so no
//! handler counts or traces its own calls.
//!
//! - **Span**: `{service}/{method}` (OpenTelemetry's RPC conventions: `rpc.system`, `rpc.service`, `rpc.method`,
//!   `rpc.grpc.status_code`, kind server), a child of the W3C trace context in the request headers. The handler
//!   runs inside it, so what the handler does (and the work it hands to other tasks that capture the current span)
//!   lands in the caller's trace. Probes (`grpc.health.v1`, reflection, and the methods a service names as
//!   [`RequestLayer::probe`]) are traced only when the caller sends a trace context, so a poller does not start a
//!   new trace every second.
//! - **Metrics**: `mip_grpc_requests_total{grpc_service, method, code}` and
//!   `mip_grpc_request_duration_seconds{grpc_service, method, code}`, where `code` is the gRPC status name (`Ok`,
//!   `InvalidArgument`, …). A call ends, and is counted, when its response body ends: for a streaming call that is
//!   the last message and the trailers, not the headers. A response dropped before its end (the client went away)
//!   counts as `Cancelled`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use opentelemetry::trace::TraceContextExt as _;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tonic::Code;

/// Services whose calls are probes: traced only under a caller's trace.
const PROBE_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The request metrics, registered once per process registry.
#[derive(Clone)]
pub struct RequestMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl RequestMetrics {
    /// Creates and registers the two metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let labels = ["grpc_service", "method", "code"];
        let requests = IntCounterVec::new(
            Opts::new(
                "mip_grpc_requests_total",
                "gRPC calls handled, by service, method and status code",
            ),
            &labels,
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "mip_grpc_request_duration_seconds",
                "Time from a call's arrival to the end of its response (the last message of a stream)",
            )
            .buckets(vec![
                0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            &labels,
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Self { requests, latency })
    }

    fn observe(&self, service: &str, method: &str, code: Code, seconds: f64) {
        let code = format!("{code:?}");
        let labels = [service, method, code.as_str()];
        self.requests.with_label_values(&labels).inc();
        self.latency.with_label_values(&labels).observe(seconds);
    }
}

/// The layer: spans and metrics for every call of the server it wraps.
#[derive(Clone)]
pub struct RequestLayer {
    metrics: RequestMetrics,
    probes: Arc<Vec<String>>,
}

impl RequestLayer {
    pub fn new(metrics: RequestMetrics) -> Self {
        Self {
            metrics,
            probes: Arc::new(Vec::new()),
        }
    }

    /// Also treats `path` (`/package.Service/Method`) as a probe: traced only under a caller's trace.
    pub fn probe(mut self, path: &str) -> Self {
        Arc::make_mut(&mut self.probes).push(path.to_owned());
        self
    }
}

impl<S> tower_layer::Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RequestLayer`] wraps around a server.
#[derive(Clone)]
pub struct RequestService<S> {
    inner: S,
    layer: RequestLayer,
}

/// What a call's end needs: its labels, its start and its span.
struct Call {
    metrics: RequestMetrics,
    service: String,
    method: String,
    start: Instant,
    span: tracing::Span,
}

impl Call {
    fn finish(self, code: Code) {
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics.observe(&self.service, &self.method, code, seconds);
        self.span.record("rpc.grpc.status_code", code as i32);
        if code != Code::Ok {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

/// `/package.Service/Method` → (`package.Service`, `Method`); anything else is ("", path).
fn split_path(path: &str) -> (&str, &str) {
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((service, method)) if !service.is_empty() && !method.contains('/') => (service, method),
        _ => ("", path),
    }
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for RequestService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<ObservedBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let (service, method) = split_path(path);
        let parent = crate::propagation::extract_headers(req.headers());
        let probe = PROBE_SERVICES.contains(&service) || self.layer.probes.iter().any(|p| p == path);
        let span = if probe && !parent.has_active_span() {
            tracing::Span::none()
        } else {
            let span = tracing::info_span!(
                "grpc",
                otel.name = %format!("{service}/{method}"),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            crate::propagation::set_parent(&span, parent);
            span
        };
        let call = Call {
            metrics: self.layer.metrics.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
            start: Instant::now(),
            span: span.clone(),
        };
        let inner = span.in_scope(|| self.inner.call(req));
        ResponseFuture {
            inner: Box::pin(inner),
            call: Some(call),
        }
    }
}

/// The response future of [`RequestService`]: polls the handler inside the call's span.
pub struct ResponseFuture<F> {
    inner: Pin<Box<F>>,
    call: Option<Call>,
}

impl<F, RB, E> std::future::Future for ResponseFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<ObservedBody<RB>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let polled = match &this.call {
            Some(call) => call.span.in_scope(|| this.inner.as_mut().poll(cx)),
            None => this.inner.as_mut().poll(cx),
        };
        let result = match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        let Some(call) = this.call.take() else {
            // Polled after completion: the inner future decides what that means.
            return Poll::Ready(result.map(|r| {
                r.map(|body| ObservedBody {
                    inner: Box::pin(body),
                    call: None,
                })
            }));
        };
        Poll::Ready(match result {
            Err(e) => {
                call.finish(Code::Unknown);
                Err(e)
            }
            Ok(response) => {
                // A trailers-only response (every error tonic returns before a stream starts) has its status in
                // the headers: the call is over.
                let call = match grpc_status(response.headers()) {
                    Some(code) => {
                        call.finish(code);
                        None
                    }
                    None => Some(call),
                };
                Ok(response.map(|inner| ObservedBody {
                    inner: Box::pin(inner),
                    call,
                }))
            }
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.trim().parse::<i32>().ok()?;
    Some(Code::from_i32(v))
}

/// A response body that ends the call (metrics, span status) when its trailers arrive or it is dropped.
pub struct ObservedBody<B> {
    inner: Pin<Box<B>>,
    call: Option<Call>,
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.finish(Code::Cancelled);
        }
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(call) = this.call.take() {
                        call.finish(grpc_status(trailers).unwrap_or(Code::Unknown));
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Internal);
                }
            }
            Poll::Ready(None) => {
                // A gRPC response always ends with a status; a body that ends without one is not a success.
                if let Some(call) = this.call.take() {
                    call.finish(Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(split_path("/mip.v1.Worker/Generate"), ("mip.v1.Worker", "Generate"));
        assert_eq!(
            split_path("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(split_path("/metrics"), ("", "/metrics"));
        assert_eq!(split_path("/a/b/c"), ("", "/a/b/c"));
    }

    #[test]
    fn status_comes_from_the_grpc_status_header() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("3"));
        assert_eq!(grpc_status(&h), Some(Code::InvalidArgument));
    }
}
