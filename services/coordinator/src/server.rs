//! Running a coordinator: [`run`] validates the configuration, loads the TLS material and the tokens file, connects
//! the job store, starts the worker poller (and DNS discovery, and the metrics endpoint, when configured) and serves
//! `mip.v1.Coordinator` (behind bearer-token auth when `auth.tokens_file` is set), `grpc.health.v1` and reflection
//! on the listener, over TLS when `server.tls` is set, with the lease loop beside it. When `shutdown` resolves it
//! drains: health NOT_SERVING, new jobs refused (UNAVAILABLE `draining`), running jobs given up to
//! `server.drain_seconds` to finish; the unfinished ones are then handed over (their tasks stopped here, their
//! leases released so another replica resumes them at once), and the server stops.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mip_proto::v1::coordinator_server::{CoordinatorServer, SERVICE_NAME};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::api::CoordinatorApi;
use crate::auth::{BearerAuth, Tokens};
use crate::config::{worker_scheme, CoordinatorConfig, ValidConfig};
use crate::discovery::DnsWorkers;
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryOptions};
use crate::service::Coordinator;
use mip_common::request_layer::RequestLayer;

/// Background tasks that stop with the server.
struct Background {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// Runs a coordinator on `listener` until `shutdown` resolves.
pub async fn run(config: CoordinatorConfig, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<()> {
    let cfg = config.validate()?;
    let server_tls = match &cfg.server_tls {
        Some(t) => Some(t.server_config().context("server.tls")?),
        None => None,
    };
    let worker_tls = match &cfg.worker_tls {
        Some(t) => Some(t.client_config().context("worker_tls")?),
        None => None,
    };
    let tokens = cfg.tokens_file.as_deref().map(Tokens::load).transpose()?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding telemetry.metrics_listen {addr}"))?,
        ),
        None => None,
    };
    let metrics = Metrics::new()?;
    let store = crate::store::connect(cfg.redis_url.as_deref(), cfg.redis_ca.as_deref(), cfg.ttl)
        .await
        .context("connecting the job store (redis.url)")?;
    let registry = Arc::new(Registry::new(
        &cfg.workers,
        RegistryOptions {
            fixed_limit: cfg.worker_concurrency,
            max_message_bytes: cfg.max_message_bytes,
            tls: worker_tls,
            metrics: metrics.clone(),
            keepalive: cfg.worker_keepalive,
        },
    )?);
    let background = start_background(&cfg, &registry, &metrics, metrics_listener).await;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving)
        .await;
    let (reflection, reflection_v1alpha) = mip_common::reflection::services(&[mip_proto::FILE_DESCRIPTOR_SET])
        .context("building the reflection services")?;
    let max = cfg.max_message_bytes;
    let (ping_every, ping_timeout) = cfg.server_keepalive;
    let drain = cfg.drain;
    let auth = BearerAuth::new(tokens, metrics.clone());
    let requests = RequestLayer::new(metrics.requests.clone());
    let core = Coordinator::new(cfg, registry, store, metrics);
    let (leases_stop, leases_stopped) = oneshot::channel::<()>();
    let leases = tokio::spawn({
        let core = core.clone();
        async move {
            core.leases()
                .run(&core, async {
                    let _ = leases_stopped.await;
                })
                .await;
        }
    });
    let api = CoordinatorServer::new(CoordinatorApi::new(core.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let api = InterceptedService::new(api, auth);
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(ping_every))
        .http2_keepalive_timeout(Some(ping_timeout))
        // Every call's span (a child of the caller's trace) and request metrics, refusals included.
        .layer(requests);
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls).context("server.tls configuration")?;
    }
    tracing::info!(addr = ?listener.local_addr().ok(), "coordinator listening");
    let (server_stop, server_stopped) = oneshot::channel::<()>();
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = server_stopped.await;
        });
    tokio::pin!(server);
    let mut early = tokio::select! {
        r = &mut server => Some(r),
        () = shutdown => None,
    };
    if early.is_none() {
        // The server keeps answering while draining: health NOT_SERVING, SubmitJob refused with `draining`,
        // watches and reads served.
        tracing::info!(seconds = drain.as_secs(), "shutdown requested: draining");
        health
            .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::NotServing)
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        tokio::select! {
            r = &mut server => early = Some(r),
            drained = core.drain(drain) => if !drained {
                tracing::warn!(seconds = drain.as_secs(), "drain time over: handing the unfinished jobs over");
            },
        }
    }
    core.hand_over().await;
    let _ = leases_stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), leases).await;
    let result = match early {
        Some(r) => r,
        None => {
            let _ = server_stop.send(());
            tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .unwrap_or(Ok(()))
        }
    };
    background.stop().await;
    result.context("gRPC server")
}

/// The health poller, DNS discovery (first lookup done before returning) and the metrics endpoint.
async fn start_background(
    cfg: &ValidConfig,
    registry: &Arc<Registry>,
    metrics: &Metrics,
    metrics_listener: Option<TcpListener>,
) -> Background {
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    if let Some((name, port)) = &cfg.workers_dns {
        let dns = DnsWorkers {
            name: name.clone(),
            port: *port,
            scheme: worker_scheme(cfg.worker_tls.is_some()),
            fixed: cfg.workers.clone(),
        };
        dns.refresh(registry).await;
        tasks.push(tokio::spawn(dns.follow(
            registry.clone(),
            cfg.dns_interval,
            stopped.clone(),
        )));
    }
    tasks.push(tokio::spawn(
        registry.clone().poll(cfg.health_interval, stopped.clone()),
    ));
    if let Some(listener) = metrics_listener {
        tracing::info!(addr = ?listener.local_addr().ok(), "metrics listening");
        let mut stopped = stopped.clone();
        let until = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let registry = metrics.registry().clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = mip_common::metrics_http::serve_metrics(listener, registry, until).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        }));
    }
    Background { stop, tasks }
}
