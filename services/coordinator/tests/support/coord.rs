//! Helpers of the transport tests: a coordinator on 127.0.0.1:0 (memory job store), clients with optional TLS and
//! bearer token, in-process workers on the fixture model on a given listener (so one can come back on its port).

use std::net::SocketAddr;
use std::time::Duration;

use mip_coordinator::config::CoordinatorConfig;
use mip_proto::v1::coordinator_client::CoordinatorClient;
use mip_proto::v1::{GenerationRequest, ListWorkersRequest, Subject, WorkerStatus};
use mip_worker::config::WorkerConfig;
use mip_worker::server::{run_with, RunOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::worker_support::{fixture_bundle, image, subject, BOUND};

/// A coordinator running in this process.
pub struct Coord {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Coord {
    /// Starts a coordinator (health polled every 100 ms, memory store) after `edit`.
    pub async fn start(edit: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        let mut cfg = CoordinatorConfig::default();
        cfg.coordinator.health_interval_ms = 100;
        edit(&mut cfg);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mip_coordinator::server::run(cfg, listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// A client (retrying the connection, bounded); `tls` = https with that config.
    pub async fn client(&self, tls: Option<ClientTlsConfig>, token: Option<&str>) -> Client {
        let addr = self.addr;
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

    /// Stops the coordinator and checks that `run` returned Ok.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = tokio::time::timeout(BOUND, self.task).await.expect("stops in time");
        r.expect("join").expect("run returns Ok");
    }
}

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

pub type Client = CoordinatorClient<InterceptedService<Channel, Token>>;

/// One connection attempt.
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

/// A worker running in this process on a listener of the test's choosing.
pub struct Worker {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// A worker on 127.0.0.1:0.
    pub async fn start(edit: impl FnOnce(&mut WorkerConfig)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, edit)
    }

    /// A worker on `listener` (no drain on stop), over the fixture model.
    pub fn start_on(listener: TcpListener, edit: impl FnOnce(&mut WorkerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        fixture_bundle(dir.path());
        let mut config = WorkerConfig::default();
        config.model.path = dir.path().display().to_string();
        config.server.drain_seconds = 0;
        config.server.worker_id = "transport-test-worker".into();
        edit(&mut config);
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let opts = RunOptions {
            load_gate: None,
            metrics: None,
        };
        let task = tokio::spawn(run_with(
            config,
            listener,
            async {
                let _ = stopped.await;
            },
            opts,
        ));
        Self {
            addr,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    /// The URL the coordinator knows it by.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// Stops the worker and waits for `run` to return Ok.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = tokio::time::timeout(BOUND, self.task).await.expect("stops in time");
        r.expect("join").expect("run returns Ok");
    }
}

/// A small request (64x64, 2 steps) about `subjects`.
pub fn request(subjects: Vec<Subject>) -> GenerationRequest {
    GenerationRequest {
        prompt: "a cat wearing a jacket".into(),
        subjects,
        width: 64,
        height: 64,
        steps: 2,
        seed: Some(10),
        ..Default::default()
    }
}

pub fn cat() -> Vec<Subject> {
    vec![subject("cat", vec![image("cat_0.png")])]
}

/// A GET over plain HTTP/1.1; the whole response.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(BOUND, fetch).await.expect("http in time")
}
