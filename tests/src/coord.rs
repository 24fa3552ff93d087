//! Coordinators of the tests: [`Coord`] in the test's runtime (stopped cleanly), [`KillableCoord`] in a runtime
//! of its own (ended at once, as a crash would), both on 127.0.0.1:0, and their gRPC clients with optional TLS and
//! bearer token.

use std::net::SocketAddr;
use std::time::Duration;

use mip_coordinator::config::CoordinatorConfig;
use mip_proto::v1::coordinator_client::CoordinatorClient;
use mip_proto::v1::{ListWorkersRequest, WorkerStatus};
use tokio::sync::oneshot;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::{RedisServer, TestWorker, BOUND};

/// Adds `authorization: Bearer <token>` when it holds one.
#[derive(Clone)]
pub struct Token(pub Option<String>);

impl Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            let v = format!("Bearer {t}").parse().expect("ascii token");
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

/// A coordinator client (with a token or without).
pub type Client = CoordinatorClient<InterceptedService<Channel, Token>>;

/// The test configuration: `urls`, fast health polling, `redis` (none: memory only), then `edit`.
pub fn config(
    urls: Vec<String>,
    redis: Option<&RedisServer>,
    edit: impl FnOnce(&mut CoordinatorConfig),
) -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::default();
    cfg.coordinator.workers = urls;
    cfg.coordinator.health_interval_ms = 100;
    cfg.server.drain_seconds = 2;
    if let Some(r) = redis {
        cfg.redis.url = r.url();
    }
    edit(&mut cfg);
    cfg
}

fn urls(workers: &[TestWorker]) -> Vec<String> {
    workers.iter().map(|w| crate::url(w, "http")).collect()
}

/// One connection attempt to the coordinator at `addr` (`tls`: https with that config).
pub async fn connect(
    addr: SocketAddr,
    tls: Option<ClientTlsConfig>,
    token: Option<&str>,
) -> Result<Client, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Channel::from_shared(format!("{scheme}://{addr}")).expect("url");
    if let Some(tls) = tls {
        ep = ep.tls_config(tls)?;
    }
    let channel = ep.connect_timeout(Duration::from_secs(5)).connect().await?;
    Ok(CoordinatorClient::with_interceptor(
        channel,
        Token(token.map(str::to_owned)),
    ))
}

/// A client of the coordinator at `addr`, once it accepts (bounded).
pub async fn connect_retry(addr: SocketAddr, tls: Option<ClientTlsConfig>, token: Option<&str>) -> Client {
    tokio::time::timeout(BOUND, async {
        loop {
            if let Ok(c) = connect(addr, tls.clone(), token).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("coordinator reachable")
}

/// Polls ListWorkers (bounded) until `pred` holds; returns that list.
pub async fn wait_workers(c: &mut Client, what: &str, pred: impl Fn(&[WorkerStatus]) -> bool) -> Vec<WorkerStatus> {
    tokio::time::timeout(BOUND, async {
        loop {
            let w = c.list_workers(ListWorkersRequest {}).await.expect("list workers");
            let w = w.into_inner().workers;
            if pred(&w) {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("workers never became: {what}"))
}

/// Waits (bounded) until at least `n` workers are healthy.
pub async fn wait_healthy(c: &mut Client, n: usize) {
    wait_workers(c, &format!("{n} healthy"), |w| {
        w.iter().filter(|w| w.healthy).count() >= n
    })
    .await;
}

/// A coordinator running in the test's runtime.
pub struct Coord {
    pub addr: SocketAddr,
    /// Plaintext or TLS, with a token or without, as [`run`](Self::run) was told.
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Coord {
    /// A coordinator over `workers` and `redis` (after `edit`), once all the workers are healthy.
    pub async fn start(workers: &[TestWorker], redis: &RedisServer, edit: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        Self::start_urls(urls(workers), workers.len(), redis, edit).await
    }

    /// A coordinator over `urls` and `redis`, once `healthy` of them are healthy.
    pub async fn start_urls(
        urls: Vec<String>,
        healthy: usize,
        redis: &RedisServer,
        edit: impl FnOnce(&mut CoordinatorConfig),
    ) -> Self {
        let mut c = Self::run(config(urls, Some(redis), edit), None, None).await;
        wait_healthy(&mut c.client, healthy).await;
        c
    }

    /// Runs `cfg` on 127.0.0.1:0; [`client`](Self::client) connects with `tls` and `token`.
    pub async fn run(cfg: CoordinatorConfig, tls: Option<ClientTlsConfig>, token: Option<&str>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mip_coordinator::server::run(cfg, listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            client: connect_retry(addr, tls, token).await,
            stop: Some(stop),
            task,
        }
    }

    /// Another client, with its own TLS and token.
    pub async fn connect(&self, tls: Option<ClientTlsConfig>, token: Option<&str>) -> Client {
        connect_retry(self.addr, tls, token).await
    }

    /// Signals shutdown (the coordinator drains, then stops); see [`stopped`](Self::stopped).
    pub fn request_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Whether `run` has returned.
    pub fn is_stopped(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits (bounded) for `run` to return after [`request_stop`](Self::request_stop) and checks it returned Ok.
    pub async fn stopped(self) {
        let r = tokio::time::timeout(BOUND, self.task).await.expect("stops in time");
        r.expect("join").expect("run returns Ok");
    }

    /// Stops the coordinator and checks that `run` returned Ok.
    pub async fn stop(mut self) {
        self.request_stop();
        self.stopped().await;
    }
}

/// A coordinator in a tokio runtime of its own, so that [`kill`](Self::kill) can end it (and every task it
/// spawned) at once, as a crash would: nothing of it runs afterwards and nothing is cleaned up.
pub struct KillableCoord {
    pub client: Client,
    runtime: Option<tokio::runtime::Runtime>,
}

impl KillableCoord {
    pub async fn start(workers: &[TestWorker], redis: &RedisServer, edit: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        let cfg = config(urls(workers), Some(redis), edit);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("coordinator runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            mip_coordinator::server::run(cfg, listener, std::future::pending::<()>()).await
        });
        let mut client = connect_retry(addr, None, None).await;
        wait_healthy(&mut client, workers.len()).await;
        Self {
            client,
            runtime: Some(runtime),
        }
    }

    /// Ends the coordinator's runtime without waiting for anything (its connections drop with it).
    pub fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for KillableCoord {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Stops `coord`, then each of `workers`, checking that every one of them returns Ok.
pub async fn stop_all(coord: Coord, workers: Vec<TestWorker>) {
    coord.stop().await;
    for w in workers {
        w.stop().await;
    }
}
