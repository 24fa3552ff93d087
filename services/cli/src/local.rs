//! A whole cluster in this process: N workers on `127.0.0.1:0` and a coordinator over them on a given listener,
//! each on the same Tokio runtime (the workers' candle work runs on their own executor threads). Used by
//! `mip generate` without `--coordinator` (one worker) and by `mip serve all`.
//!
//! Stopping is ordered: the coordinator first (no new jobs), then the workers (which drain).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mip_coordinator::config::CoordinatorConfig;
use mip_proto::v1::ListWorkersRequest;
use mip_worker::config::WorkerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::Coordinator;

/// The running services.
pub struct LocalCluster {
    pub addr: SocketAddr,
    pub worker_urls: Vec<String>,
    stop_coordinator: watch::Sender<bool>,
    stop_workers: watch::Sender<bool>,
    coordinator: Option<JoinHandle<Result<()>>>,
    workers: Vec<Option<JoinHandle<Result<()>>>>,
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

impl LocalCluster {
    /// Starts `n` workers from `worker` (each on its own loopback port, plaintext, named `worker-{i}`) and a
    /// coordinator from `coordinator` over them on `listener`. Must run inside a Tokio runtime.
    pub async fn start(
        worker: &WorkerConfig,
        n: usize,
        mut coordinator: CoordinatorConfig,
        listener: TcpListener,
    ) -> Result<Self> {
        let (stop_workers, workers_rx) = watch::channel(false);
        let (stop_coordinator, coordinator_rx) = watch::channel(false);
        let (worker_urls, handles) = spawn_workers(worker, n, &workers_rx).await?;
        let workers = handles.into_iter().map(Some).collect();
        coordinator.coordinator.workers = worker_urls.clone();
        let addr = listener.local_addr()?;
        let coordinator = Some(tokio::spawn(mip_coordinator::server::run(
            coordinator,
            listener,
            stopped(coordinator_rx),
        )));
        Ok(Self {
            addr,
            worker_urls,
            stop_coordinator,
            stop_workers,
            coordinator,
            workers,
        })
    }

    /// Waits (at most `bound`) until the coordinator reports `n` healthy workers; fails early when a service
    /// ended (e.g. the model did not load).
    pub async fn wait_healthy(&mut self, client: &mut Coordinator, n: usize, bound: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            self.check_running().await?;
            if let Ok(r) = client.list_workers(ListWorkersRequest {}).await {
                if r.into_inner().workers.iter().filter(|w| w.healthy).count() >= n {
                    return Ok(());
                }
            }
            if start.elapsed() > bound {
                bail!("the embedded workers were not ready after {} s", bound.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An error when a service has ended (with its error).
    async fn check_running(&mut self) -> Result<()> {
        if let Some(h) = self.coordinator.take_if(|h| h.is_finished()) {
            return Err(ended("coordinator", h.await));
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Some(h) = w.take_if(|h| h.is_finished()) {
                return Err(ended(&format!("worker-{i}"), h.await));
            }
        }
        Ok(())
    }

    /// Runs until `shutdown` resolves (then stops cleanly) or a service ends on its own (an error).
    pub async fn run_until(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return self.stop().await,
                () = tokio::time::sleep(Duration::from_millis(250)) => {
                    if let Err(e) = self.check_running().await {
                        let _ = self.stop().await;
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Stops the coordinator, then the workers (they drain); the first error, if any.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop_coordinator.send(true);
        let mut first = None;
        if let Some(h) = self.coordinator {
            match h.await {
                Ok(Ok(())) => {}
                r => first = Some(ended("coordinator", r)),
            }
        }
        let _ = self.stop_workers.send(true);
        for (i, w) in self.workers.into_iter().enumerate() {
            if let Some(h) = w {
                match h.await {
                    Ok(Ok(())) => {}
                    r => {
                        first.get_or_insert(ended(&format!("worker-{i}"), r));
                    }
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Starts `n` workers from `worker` (each on its own loopback port, plaintext, named `worker-{i}` when there are
/// several; only the first keeps `metrics_listen`); they stop (draining) when `stop` turns true or its sender is
/// dropped. Returns their URLs and tasks.
pub async fn spawn_workers(
    worker: &WorkerConfig,
    n: usize,
    stop: &watch::Receiver<bool>,
) -> Result<(Vec<String>, Vec<JoinHandle<Result<()>>>)> {
    let mut urls = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a worker on 127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let mut cfg = worker.clone();
        cfg.server.listen = addr.to_string();
        cfg.server.tls = Default::default();
        if cfg.server.worker_id.is_empty() || n > 1 {
            cfg.server.worker_id = format!("worker-{i}");
        }
        if i > 0 {
            // One process, one metrics port: only the first worker serves it.
            cfg.telemetry.metrics_listen.clear();
        }
        urls.push(format!("http://{addr}"));
        tasks.push(tokio::spawn(mip_worker::server::run(cfg, l, stopped(stop.clone()))));
    }
    Ok((urls, tasks))
}

fn ended(what: &str, r: std::result::Result<Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match r {
        Ok(Ok(())) => anyhow::anyhow!("the embedded {what} stopped"),
        Ok(Err(e)) => anyhow::anyhow!("the embedded {what} failed: {e:#}"),
        Err(e) => anyhow::anyhow!("the embedded {what} panicked: {e}"),
    }
}
