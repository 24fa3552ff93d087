//! Shared service plumbing for the worker and the coordinator.
//!
//! - [`config`]: one file (YAML or TOML) plus `MIP_…` environment overrides, into a typed struct.
//! - [`deadline`]: the caller's deadline from the `grpc-timeout` header.
//! - [`errors`]: the table from error kinds to gRPC codes, with a stable `reason` in the status metadata.
//! - [`shutdown`]: a future that resolves on SIGTERM or Ctrl-C.
//! - [`telemetry`]: log subscriber and OTLP trace export, with a guard that flushes on drop.
//! - [`propagation`]: W3C trace context in gRPC metadata (server-side parent, client interceptor).
//! - [`metrics_http`]: the `/metrics` (Prometheus text) and `/healthz` HTTP endpoint.
//! - [`reflection`]: gRPC server reflection, v1 and v1alpha.
//! - [`request_layer`]: the tower layer giving every gRPC call a server span and request metrics.
//! - [`redis_client`]: Redis clients, `redis://` or `rediss://` (TLS against system roots or a CA file).
//! - [`tls`]: server and client TLS (mutual TLS when a client CA is set) from PEM files.
//! - `testing` (feature `testing`, for other crates' tests): a throwaway `redis-server` on a free loopback port;
//!   `tls::testing` writes a throwaway PKI.

pub mod config;
pub mod deadline;
pub mod errors;
pub mod metrics_http;
pub mod propagation;
pub mod redis_client;
pub mod reflection;
pub mod request_layer;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
