//! `mip serve all --listen ADDR --workers N --model DIR [--redis URL] [--config FILE]`: a coordinator and N workers
//! in one process (the workers on 127.0.0.1:0). Announces `coordinator listening on ADDR (N workers)` on stdout
//! like `serve coordinator`, and stops cleanly on SIGTERM / Ctrl-C (coordinator first, then the workers drain).
//!
//! The optional file has two sections, each the shape of the matching service's own file:
//! `coordinator: {server, redis, coordinator}` and `worker: {server, limits, redis, cache, model, executor,
//! telemetry}`; the environment overrides them as `MIP_COORDINATOR__…` / `MIP_WORKER__…`, and the flags win.
//! The workers' listen address, TLS and worker list are set here.

use std::path::PathBuf;

use anyhow::{Context, Result};
use mip_common::telemetry::{TelemetryConfig, TelemetryGuard};
use mip_coordinator::config::CoordinatorConfig;
use mip_worker::config::WorkerConfig;
use serde::{Deserialize, Serialize};

use crate::local::LocalCluster;
use crate::verbosity::Verbosity;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file (YAML or TOML) with `coordinator:` and `worker:` sections.
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC address of the coordinator, e.g. 0.0.0.0:50050.
    #[arg(long)]
    listen: Option<String>,
    /// Number of workers (each loads the model).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// `demo` or a model bundle folder (with mip.json).
    #[arg(long)]
    model: Option<String>,
    /// Redis for both the job store and the shared subject cache, e.g. redis://127.0.0.1:6379/0.
    #[arg(long)]
    redis: Option<String>,
    /// cpu, cuda or cuda:N (every worker on the same device).
    #[arg(long, value_parser = crate::device::device_arg)]
    device: Option<String>,
    /// The weights' precision.
    #[arg(long, value_parser = crate::device::DTYPES)]
    dtype: Option<String>,
    /// Load and validate the configuration (defaults, file, environment, flags) with the service's own loader,
    /// report the first problem or that it is valid, and exit without serving.
    #[arg(long)]
    check_config: bool,
}

/// The file shape of `serve all`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AllConfig {
    pub coordinator: CoordinatorConfig,
    pub worker: WorkerConfig,
}

/// Logs on stderr (`RUST_LOG`, else info with `-v`, else warn); keep the guard alive.
pub fn init_logs(v: Verbosity, service: &str) -> Result<TelemetryGuard> {
    let log_filter = v.filter();
    mip_common::telemetry::init(&TelemetryConfig {
        otlp_endpoint: None,
        sample_ratio: 1.0,
        service_name: service.into(),
        log_filter,
        log_format: v.log_format(),
    })
}

/// The configuration: defaults, file, environment, flags.
fn load(a: &Args) -> Result<AllConfig> {
    fn flag<'a>(key: &'static str, v: &'a Option<String>) -> Option<(&'static str, &'a str)> {
        v.as_deref().map(|v| (key, v))
    }
    let flags: Vec<(&str, &str)> = [
        flag("coordinator.server.listen", &a.listen),
        flag("coordinator.redis.url", &a.redis),
        flag("worker.redis.url", &a.redis),
        flag("worker.model.path", &a.model),
        flag("worker.model.device", &a.device),
        flag("worker.model.dtype", &a.dtype),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut config: AllConfig = mip_common::config::load(a.config.as_deref(), true, &flags)?;
    if config.worker.model.path == "demo" {
        let dir = crate::model::demo_path(!a.check_config)?;
        config.worker.model.path = dir.display().to_string();
    }
    Ok(config)
}

pub fn run(a: Args, v: Verbosity) -> Result<()> {
    if !(1..=64).contains(&a.workers) {
        anyhow::bail!("`--workers` must be in 1..=64, got {}", a.workers);
    }
    let config = load(&a)?;
    // Check both halves before binding anything (the worker list is filled in later).
    config.worker.validate()?;
    let mut probe = config.coordinator.clone();
    probe.coordinator.workers = vec!["http://127.0.0.1:1".into()];
    probe.validate()?;
    if a.check_config {
        println!("configuration is valid (coordinator and worker)");
        return Ok(());
    }
    let rt = crate::client::runtime()?;
    rt.block_on(async move {
        let guard = init_logs(v, "mip-all")?;
        let listen = config.coordinator.server.listen.clone();
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("binding server.listen {listen}"))?;
        let addr = listener.local_addr()?;
        let cluster = LocalCluster::start(&config.worker, a.workers, config.coordinator, listener).await?;
        println!(
            "coordinator listening on {addr} ({} workers: {})",
            a.workers,
            cluster.worker_urls.join(", ")
        );
        let result = cluster.run_until(mip_common::shutdown::signal()).await;
        guard.shutdown()?;
        result
    })
}
