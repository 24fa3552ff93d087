//! The metrics and liveness HTTP endpoint of a service (separate from its gRPC port).
//!
//! - `GET /metrics`: the registry in the Prometheus text exposition format (`text/plain; version=0.0.4`).
//! - `GET /healthz`: `ok` while the process serves HTTP.
//!
//! [`serve_metrics`] takes a bound listener (tests bind `127.0.0.1:0`) and a shutdown future.

use std::future::Future;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder as _, Registry, TextEncoder};

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("metrics listener address")?;
    axum::serve(listener, metrics_router(registry))
        .with_graceful_shutdown(shutdown)
        .await
        .with_context(|| format!("metrics HTTP server on {addr}"))
}

/// The `/metrics` + `/healthz` routes, for services that mount them on their own HTTP server.
pub fn metrics_router(registry: Registry) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(registry)
}

/// The registry in the Prometheus text exposition format (an error comment when encoding fails).
pub fn render(registry: &Registry) -> String {
    TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|e| format!("# error encoding metrics: {e}\n"))
}

async fn metrics(State(registry): State<Registry>) -> Response {
    let encoder = TextEncoder::new();
    match encoder.encode_to_string(&registry.gather()) {
        Ok(body) => ([(header::CONTENT_TYPE, encoder.format_type().to_owned())], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}")).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A minimal HTTP/1.1 GET over raw TCP; returns the whole response (head and body).
    async fn get_raw(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("send request");
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.expect("read response");
        String::from_utf8(out).expect("utf-8 response")
    }

    #[tokio::test]
    async fn serves_metrics_and_health_then_shuts_down() {
        let registry = Registry::new();
        let counter = prometheus::IntCounter::new("mip_test_requests_total", "test counter").expect("counter");
        registry.register(Box::new(counter.clone())).expect("register");
        counter.inc_by(3);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(listener, registry, async {
            let _ = stop_rx.await;
        }));

        let limit = Duration::from_secs(10);
        let metrics = tokio::time::timeout(limit, get_raw(addr, "/metrics"))
            .await
            .expect("metrics in time");
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{metrics}"
        );
        assert!(metrics.lines().any(|l| l == "mip_test_requests_total 3"), "{metrics}");

        let health = tokio::time::timeout(limit, get_raw(addr, "/healthz"))
            .await
            .expect("healthz in time");
        assert!(
            health.starts_with("HTTP/1.1 200") && health.ends_with("\r\n\r\nok"),
            "{health}"
        );

        let missing = tokio::time::timeout(limit, get_raw(addr, "/nope"))
            .await
            .expect("404 in time");
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

        stop_tx.send(()).expect("server still running");
        let result = tokio::time::timeout(limit, server)
            .await
            .expect("stops in time")
            .expect("join");
        result.expect("server exits cleanly");
    }
}
