//! Running a coordinator: [`run`] validates the configuration, connects the job store, starts the worker poller
//! and serves `mip.v1.Coordinator`, `grpc.health.v1` and reflection on the listener until `shutdown` resolves.

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, Result};
use mip_proto::v1::coordinator_server::{CoordinatorServer, SERVICE_NAME};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::api::CoordinatorApi;
use crate::config::CoordinatorConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::service::Coordinator;
use crate::store::Store;

/// Runs a coordinator on `listener` until `shutdown` resolves.
pub async fn run(config: CoordinatorConfig, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<()> {
    let cfg = config.validate()?;
    let store = Arc::new(
        Store::connect(cfg.redis_url.as_deref(), cfg.ttl)
            .await
            .context("connecting the job store (redis.url)")?,
    );
    let registry = Arc::new(Registry::new(
        &cfg.workers,
        cfg.worker_concurrency,
        cfg.max_message_bytes,
    )?);
    let (stop_poll, poll_stopped) = watch::channel(false);
    let poller = tokio::spawn(registry.clone().poll(cfg.health_interval, poll_stopped));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mip_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let max = cfg.max_message_bytes;
    let metrics = Metrics::new()?;
    let core = Coordinator::new(cfg, registry, store, metrics);
    let api = CoordinatorServer::new(CoordinatorApi::new(core))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    tracing::info!(addr = ?listener.local_addr().ok(), "coordinator listening");
    let result = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    let _ = stop_poll.send(true);
    let _ = poller.await;
    result.context("gRPC server")
}
