//! `mip serve worker` runs a worker node; `mip serve coordinator` runs the cluster's front door over a list of
//! workers. Settings come from the defaults, then `--config FILE`, then the `MIP_…` environment (`MIP_REDIS__URL`,
//! …), then the flags; `--model demo` writes the demo model to the cache folder on first use. Both stop on
//! SIGTERM / Ctrl-C (a worker after draining).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use mip_common::telemetry::TelemetryConfig;
use mip_coordinator::config::CoordinatorConfig;
use mip_worker::config::WorkerConfig;

use crate::verbosity::Verbosity;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one model on one device over gRPC (mip.v1.Worker, health, reflection).
    Worker(WorkerArgs),
    /// Serve the public API (mip.v1.Coordinator): jobs split into tasks placed on workers.
    Coordinator(CoordinatorArgs),
    /// A coordinator and N workers in one process (the workers on 127.0.0.1:0).
    All(crate::serve_all::Args),
}

#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// Configuration file (YAML or TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC address, e.g. 0.0.0.0:50050.
    #[arg(long)]
    listen: Option<String>,
    /// Worker URLs, comma separated (http://host:port or host:port).
    #[arg(long, value_delimiter = ',')]
    workers: Vec<String>,
    /// Job state store, e.g. redis://127.0.0.1:6379/0 (empty: memory only).
    #[arg(long)]
    redis: Option<String>,
    /// Workers from DNS: NAME:PORT (e.g. a headless service), every address a worker, re-resolved periodically.
    #[arg(long)]
    workers_dns: Option<String>,
    /// Bearer tokens of the public API, one per line (`#` comments); unset: no authentication.
    #[arg(long)]
    tokens_file: Option<String>,
    /// Load and validate the configuration (defaults, file, environment, flags) with the service's own loader,
    /// report the first problem or that it is valid, and exit without serving.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Configuration file (YAML or TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC address, e.g. 0.0.0.0:50051.
    #[arg(long)]
    listen: Option<String>,
    /// `demo` or a model bundle folder (with mip.json).
    #[arg(long)]
    model: Option<String>,
    /// Shared cache, e.g. redis://127.0.0.1:6379/0.
    #[arg(long)]
    redis: Option<String>,
    /// cpu, cuda or cuda:N.
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

pub fn run(cmd: Command, v: Verbosity) -> Result<()> {
    match cmd {
        Command::Worker(a) => run_worker(a, v),
        Command::Coordinator(a) => run_coordinator(a, v),
        Command::All(a) => crate::serve_all::run(a, v),
    }
}

/// The flags that were given, as config overrides.
fn overrides<'a>(flags: &[(&'a str, &'a Option<String>)]) -> Vec<(&'a str, &'a str)> {
    flags
        .iter()
        .filter_map(|(key, value)| value.as_deref().map(|v| (*key, v)))
        .collect()
}

/// Runs a service on a new runtime: telemetry, bind `listen`, print the address with `describe`, then `serve`
/// until SIGTERM / Ctrl-C, and flush telemetry.
fn serve<F, Fut>(telemetry: TelemetryConfig, listen: &str, describe: String, serve: F) -> Result<()>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let guard = mip_common::telemetry::init(&telemetry)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding server.listen {listen}"))?;
        println!(
            "{} listening on {} ({describe})",
            telemetry.service_name.trim_start_matches("mip-"),
            listener.local_addr()?
        );
        let result = serve(listener).await;
        guard.shutdown()?;
        result
    })
}

fn run_coordinator(a: CoordinatorArgs, v: Verbosity) -> Result<()> {
    let flags = overrides(&[
        ("server.listen", &a.listen),
        ("redis.url", &a.redis),
        ("coordinator.workers_dns", &a.workers_dns),
        ("auth.tokens_file", &a.tokens_file),
    ]);
    let mut config = CoordinatorConfig::load(a.config.as_deref(), true, &flags)?;
    if !a.workers.is_empty() {
        config.coordinator.workers = a.workers.iter().filter(|w| !w.trim().is_empty()).cloned().collect();
    }
    config.validate()?;
    if a.check_config {
        println!("coordinator configuration is valid");
        return Ok(());
    }
    let telemetry = TelemetryConfig {
        otlp_endpoint: Some(config.telemetry.otlp_endpoint.clone()).filter(|e| !e.is_empty()),
        sample_ratio: config.telemetry.sample_ratio,
        service_name: "mip-coordinator".into(),
        log_filter: v.filter(),
        log_format: v.log_format_or(config.telemetry.log_format),
    };
    let listen = config.server.listen.clone();
    let c = &config.coordinator;
    let mut describe = format!("{} workers", c.workers.len());
    if !c.workers_dns.is_empty() {
        describe.push_str(&format!(" + dns {}", c.workers_dns));
    }
    if !config.auth.tokens_file.is_empty() {
        describe.push_str(", bearer auth");
    }
    if !config.server.tls.cert.is_empty() {
        describe.push_str(", tls");
    }
    serve(telemetry, &listen, describe, |listener| {
        mip_coordinator::server::run(config, listener, mip_common::shutdown::signal())
    })
}

fn run_worker(a: WorkerArgs, v: Verbosity) -> Result<()> {
    let flags = overrides(&[
        ("server.listen", &a.listen),
        ("model.path", &a.model),
        ("redis.url", &a.redis),
        ("model.device", &a.device),
        ("model.dtype", &a.dtype),
    ]);
    let mut config = WorkerConfig::load(a.config.as_deref(), true, &flags)?;
    if config.model.path == "demo" {
        let dir = crate::model::demo_path(!a.check_config)?;
        config.model.path = dir.display().to_string();
    }
    config.validate()?;
    if a.check_config {
        println!("worker configuration is valid");
        return Ok(());
    }
    let telemetry = TelemetryConfig {
        otlp_endpoint: Some(config.telemetry.otlp_endpoint.clone()).filter(|e| !e.is_empty()),
        sample_ratio: config.telemetry.sample_ratio,
        service_name: "mip-worker".into(),
        log_filter: v.filter(),
        log_format: v.log_format_or(config.telemetry.log_format),
    };
    let listen = config.server.listen.clone();
    let describe = format!("model {}", config.model.path);
    serve(telemetry, &listen, describe, |listener| {
        mip_worker::server::run(config, listener, mip_common::shutdown::signal())
    })
}
