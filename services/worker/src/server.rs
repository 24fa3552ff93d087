//! Running a worker: [`run`] validates the configuration, starts the device executor (which loads the model and
//! warms up in the background), serves `mip.v1.Worker`, `grpc.health.v1` (NOT_SERVING until the executor is ready,
//! and again after a device error) and reflection (v1 and v1alpha) on the given listener, and `GET /metrics` on
//! `telemetry.metrics_listen`. When `shutdown` resolves it drains: health NOT_SERVING, no new requests, running
//! work may finish within `server.drain_seconds` (then it is cancelled), the server stops, the executor thread ends.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use mip_common::request_layer::RequestLayer;
use mip_proto::v1::worker_server::{WorkerServer, SERVICE_NAME};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::api::WorkerApi;
use crate::cache::EmbeddingCache;
use crate::config::{TlsFiles, WorkerConfig};
use crate::executor::{Executor, ExecutorOptions};
use crate::metrics::Metrics;
use crate::pipeline::ModelSpec;
use crate::service::WorkerCore;

/// Extra knobs for embedding the server (tests).
#[derive(Default)]
pub struct RunOptions {
    /// When set, the executor waits for it before loading the model (lets a test observe NOT_SERVING).
    pub load_gate: Option<oneshot::Receiver<()>>,
    /// Metrics to record into (a fresh registry when absent).
    pub metrics: Option<Metrics>,
}

/// Runs a worker on `listener` until `shutdown` resolves, then drains and returns.
pub async fn run(config: WorkerConfig, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<()> {
    run_with(config, listener, shutdown, RunOptions::default()).await
}

/// [`run`] with [`RunOptions`].
pub async fn run_with(
    config: WorkerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    opts: RunOptions,
) -> Result<()> {
    let cfg = config.validate()?;
    let spec = ModelSpec::from_bundle(&cfg.model_dir)?;
    let metrics = match opts.metrics {
        Some(m) => m,
        None => Metrics::new()?,
    };
    let tls = cfg.tls.as_ref().map(load_tls).transpose()?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding telemetry.metrics_listen {addr}"))?,
        ),
        None => None,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let (reflection, reflection_v1alpha) = mip_common::reflection::services(&[mip_proto::FILE_DESCRIPTOR_SET])
        .context("building the reflection services")?;

    let exec_opts = ExecutorOptions {
        model_name: model_name(&cfg.model_dir),
        spec,
        device: cfg.device,
        dtype: cfg.dtype,
        vae_tiling: cfg.vae_tiling,
        max_image_pixels: cfg.limits.max_image_pixels,
        channel_capacity: cfg.queue_capacity + 1,
    };
    let (exec, loaded) =
        Executor::spawn(exec_opts, metrics.clone(), opts.load_gate).context("starting the executor")?;
    let cache = EmbeddingCache::connect(cfg.cache.clone()).await;
    let core = WorkerCore::new(
        exec,
        cache,
        metrics.clone(),
        cfg.limits,
        cfg.queue_capacity,
        cfg.worker_id.clone(),
    );
    let health_task = tokio::spawn(follow_readiness(health.clone(), core.executor().subscribe_ready()));

    let (metrics_stop, metrics_stopped) = watch::channel(false);
    let metrics_task = metrics_listener.map(|l| tokio::spawn(serve_metrics(l, metrics.clone(), metrics_stopped)));

    let api = WorkerServer::new(WorkerApi::new(core.clone())).max_decoding_message_size(cfg.max_message_bytes);
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(cfg.keepalive.0))
        .http2_keepalive_timeout(Some(cfg.keepalive.1))
        // Every call's span and request metrics; the coordinator's Info polls start no trace of their own.
        .layer(RequestLayer::new(metrics.requests.clone()).probe("/mip.v1.Worker/Info"));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("server TLS configuration")?;
    }
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let local = listener.local_addr().ok();
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);
    tracing::info!(addr = ?local, worker_id = %cfg.worker_id, "worker listening");

    let load_failed = async {
        match loaded.await {
            Ok(Ok(())) => std::future::pending().await,
            Ok(Err(e)) => e,
            Err(_) => "the executor thread ended while loading".to_owned(),
        }
    };
    let mut failure = None;
    tokio::select! {
        r = &mut server => {
            health_task.abort();
            core.executor().stop(Duration::from_secs(5)).await;
            return r.context("gRPC server");
        }
        () = shutdown => tracing::info!("shutdown requested: draining"),
        e = load_failed => failure = Some(e),
    }

    health_task.abort();
    set_health(&health, ServingStatus::NotServing).await;
    // The server keeps accepting while draining (health checks, refusals with `draining`).
    tokio::select! {
        r = &mut server => {
            core.executor().stop(Duration::from_secs(5)).await;
            return r.context("gRPC server");
        }
        drained = core.drain(cfg.drain) => if !drained {
            tracing::warn!(seconds = cfg.drain.as_secs(), "drain time over: cancelling running work");
        },
    }
    let _ = stop_tx.send(());
    if tokio::time::timeout(cfg.drain + Duration::from_secs(5), &mut server)
        .await
        .is_err()
    {
        tracing::warn!("gRPC server did not stop in time");
    }
    core.executor().stop(Duration::from_secs(5)).await;
    let _ = metrics_stop.send(true);
    if let Some(t) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    match failure {
        Some(e) => Err(anyhow::anyhow!("model load failed: {e}")),
        None => Ok(()),
    }
}

fn model_name(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Mirrors the executor's readiness into the health service.
async fn follow_readiness(health: HealthReporter, mut ready: watch::Receiver<bool>) {
    loop {
        let status = if *ready.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_health(&health, status).await;
        if ready.changed().await.is_err() {
            return;
        }
    }
}

/// The server TLS configuration from PEM files; with `client_ca`, clients must present a certificate it signed.
pub fn load_tls(t: &TlsFiles) -> Result<ServerTlsConfig> {
    let tls = mip_common::tls::ServerTls {
        cert: t.cert.clone(),
        key: t.key.clone(),
        client_ca: t.client_ca.clone(),
    };
    Ok(tls.server_config()?)
}

/// Serves `GET /metrics` (and `/healthz`) from the worker's registry until `stop` turns true.
async fn serve_metrics(listener: TcpListener, metrics: Metrics, mut stop: watch::Receiver<bool>) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "metrics listening");
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let registry = metrics.registry().clone();
    if let Err(e) = mip_common::metrics_http::serve_metrics(listener, registry, stopped).await {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}
