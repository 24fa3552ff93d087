//! The worker's configuration: [`WorkerConfig`] is the serde shape of the file (YAML or TOML) and the
//! `MIP_SECTION__FIELD` environment (loaded with `mip_common::config::load`); [`WorkerConfig::validate`] turns it
//! once into an immutable [`ValidConfig`] (addresses parsed, device and dtype parsed, limits checked against the
//! pipeline's hard maxima) that the server runs from. Empty strings mean "off" for optional settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::cache::CacheConfig;
use crate::limits::{Limits, LimitsConfig};
use crate::pipeline::vae_tiling::{TilingMode, VaeTiling};

/// A configuration value that breaks a rule; names the field, the rule and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config `{field}` {rule}, got {value}")]
pub struct ConfigInvalid {
    pub field: String,
    pub rule: String,
    pub value: String,
}

impl ConfigInvalid {
    pub fn new(field: impl Into<String>, rule: impl Into<String>, value: impl ToString) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
            value: value.to_string(),
        }
    }
}

/// The whole worker configuration, section by section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub redis: RedisConfig,
    pub cache: CacheSection,
    pub model: ModelConfig,
    pub executor: ExecutorConfig,
    pub telemetry: TelemetryConfig,
}

/// `server`: the gRPC endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the CLI binds (tests pass their own listener).
    pub listen: String,
    /// Name reported by `Info`; empty = the listen address.
    pub worker_id: String,
    /// Largest accepted gRPC message (tonic's `max_decoding_message_size`).
    pub max_message_bytes: usize,
    pub tls: TlsConfig,
    /// On shutdown, how long running work may take to finish before it is cancelled.
    pub drain_seconds: u64,
    /// HTTP/2 pings to clients every this many ms; a client silent for `keepalive_timeout_ms` more is dropped
    /// (its running work is cancelled like any dropped stream).
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            worker_id: String::new(),
            max_message_bytes: 64 << 20,
            tls: TlsConfig::default(),
            drain_seconds: 30,
            keepalive_interval_ms: 10_000,
            keepalive_timeout_ms: 10_000,
        }
    }
}

/// `server.tls`: PEM files; all empty = plaintext. `client_ca` set = mutual TLS (client certificates signed by it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: String,
    pub key: String,
    pub client_ca: String,
}

/// `redis`: the shared cache tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db`, or `rediss://` for TLS; empty = memory tier only.
    pub url: String,
    /// PEM file of the CA that signs a `rediss://` server's certificate; empty = the system's trust roots.
    pub ca: String,
    pub ttl_seconds: u64,
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            ca: String::new(),
            ttl_seconds: 7 * 24 * 3600,
            timeout_ms: 250,
        }
    }
}

/// `cache`: the in-process tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    pub lru_bytes: usize,
}

impl Default for CacheSection {
    fn default() -> Self {
        Self { lru_bytes: 256 << 20 }
    }
}

/// `model`: what to load and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A bundle folder (with `mip.json`); `demo` is resolved to a folder by the CLI before the server starts.
    pub path: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// VAE decode in overlapping tiles: `auto` (when a whole decode would not fit `vae_budget_mb` or the device's
    /// free memory), `always` or `never`.
    pub vae_tiling: String,
    /// Largest VAE tile in image pixels (a multiple of 64); 0 = the VAE config's `sample_size`.
    pub vae_tile_px: usize,
    /// Memory a whole VAE decode may use, in MiB; 0 = the device's free memory at decode time.
    pub vae_budget_mb: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: "demo".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            vae_tiling: "auto".into(),
            vae_tile_px: 0,
            vae_budget_mb: 0,
        }
    }
}

/// `executor`: the device thread's queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    /// Requests that may wait beyond the one running; more are answered RESOURCE_EXHAUSTED (`queue_full`).
    pub queue_capacity: usize,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self { queue_capacity: 8 }
    }
}

/// `telemetry`: tracing export and the Prometheus endpoint (shared with the other service).
pub use mip_common::telemetry::TelemetrySection as TelemetryConfig;

/// Which device the executor opens (on its own thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda(usize),
}

impl DeviceKind {
    /// `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Self::Cpu),
            "cuda" => Some(Self::Cuda(0)),
            _ => s.strip_prefix("cuda:")?.parse().ok().map(Self::Cuda),
        }
    }

    /// Opens the device.
    pub fn open(self) -> candle_core::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(n),
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "f32" => Some(DType::F32),
        "f16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        _ => None,
    }
}

/// The name of a compute dtype as used in cache keys and `Info`.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// PEM files of the server identity and, for mutual TLS, the client CA.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The validated, immutable configuration the server runs from.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub worker_id: String,
    pub max_message_bytes: usize,
    pub tls: Option<TlsFiles>,
    pub drain: Duration,
    /// `(interval, timeout)` of the server's HTTP/2 pings.
    pub keepalive: (Duration, Duration),
    pub limits: Limits,
    pub cache: CacheConfig,
    pub model_dir: PathBuf,
    pub device: DeviceKind,
    pub dtype: DType,
    pub vae_tiling: VaeTiling,
    pub queue_capacity: usize,
    pub metrics_listen: Option<SocketAddr>,
    pub telemetry: TelemetryConfig,
}

impl WorkerConfig {
    /// Loads defaults, then `file`, then (when `use_env`) the `MIP_…` environment, then `overrides`.
    pub fn load(
        file: Option<&Path>,
        use_env: bool,
        overrides: &[(&str, &str)],
    ) -> Result<Self, mip_common::config::ConfigError> {
        mip_common::config::load(file, use_env, overrides)
    }

    /// Checks every field once; the result is what the server runs from.
    pub fn validate(&self) -> Result<ValidConfig, ConfigInvalid> {
        let s = &self.server;
        let limits = Limits::from_config(&self.limits).map_err(|e| ConfigInvalid::new(e.field, e.rule, e.value))?;
        let min_message = limits.max_image_bytes.saturating_add(4096);
        if s.max_message_bytes < min_message {
            return Err(ConfigInvalid::new(
                "server.max_message_bytes",
                format!("must be at least limits.max_image_bytes + 4096 = {min_message}"),
                s.max_message_bytes,
            ));
        }
        let tls = tls_files(&s.tls)?;
        for (field, v) in [
            ("server.keepalive_interval_ms", s.keepalive_interval_ms),
            ("server.keepalive_timeout_ms", s.keepalive_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&v) {
                return Err(ConfigInvalid::new(field, "must be in 100..=3600000", v));
            }
        }
        let device = DeviceKind::parse(&self.model.device).ok_or_else(|| {
            ConfigInvalid::new(
                "model.device",
                "must be cpu, cuda or cuda:N",
                format!("{:?}", self.model.device),
            )
        })?;
        let dtype = parse_dtype(&self.model.dtype).ok_or_else(|| {
            ConfigInvalid::new(
                "model.dtype",
                "must be f32, f16 or bf16",
                format!("{:?}", self.model.dtype),
            )
        })?;
        let m = &self.model;
        let mode = m.vae_tiling.parse::<TilingMode>().map_err(|rule| {
            ConfigInvalid::new(
                "model.vae_tiling",
                format!("must be {rule}"),
                format!("{:?}", m.vae_tiling),
            )
        })?;
        if m.vae_tile_px != 0 && (!m.vae_tile_px.is_multiple_of(64) || m.vae_tile_px > 8192) {
            return Err(ConfigInvalid::new(
                "model.vae_tile_px",
                "must be 0 or a multiple of 64 up to 8192",
                m.vae_tile_px.to_string(),
            ));
        }
        let vae_tiling = VaeTiling {
            mode,
            tile_px: (m.vae_tile_px != 0).then_some(m.vae_tile_px),
            budget_bytes: (m.vae_budget_mb != 0).then_some(m.vae_budget_mb.saturating_mul(1 << 20)),
        };
        if self.model.path.is_empty() || self.model.path == "demo" {
            return Err(ConfigInvalid::new(
                "model.path",
                "must be a model bundle folder (`demo` is resolved by `mip serve worker`)",
                format!("{:?}", self.model.path),
            ));
        }
        if !(1..=4096).contains(&self.executor.queue_capacity) {
            return Err(ConfigInvalid::new(
                "executor.queue_capacity",
                "must be in 1..=4096",
                self.executor.queue_capacity,
            ));
        }
        let t = &self.telemetry;
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(ConfigInvalid::new(
                "telemetry.sample_ratio",
                "must be in 0..=1",
                t.sample_ratio,
            ));
        }
        let metrics_listen = optional_addr("telemetry.metrics_listen", &t.metrics_listen)?;
        let r = &self.redis;
        if r.timeout_ms == 0 || r.ttl_seconds == 0 {
            return Err(ConfigInvalid::new(
                "redis.timeout_ms / redis.ttl_seconds",
                "must be positive",
                format!("{} / {}", r.timeout_ms, r.ttl_seconds),
            ));
        }
        let redis_ca = (!r.ca.is_empty()).then(|| PathBuf::from(&r.ca));
        if !r.url.is_empty() {
            // A malformed URL or an unreadable CA is a startup error, not a silently memory-only cache.
            mip_common::redis_client::client(&r.url, redis_ca.as_deref())
                .map_err(|e| ConfigInvalid::new("redis", "must name a usable Redis", e))?;
        }
        let worker_id = if s.worker_id.is_empty() {
            s.listen.clone()
        } else {
            s.worker_id.clone()
        };
        Ok(ValidConfig {
            worker_id,
            max_message_bytes: s.max_message_bytes,
            tls,
            drain: Duration::from_secs(s.drain_seconds),
            keepalive: (
                Duration::from_millis(s.keepalive_interval_ms),
                Duration::from_millis(s.keepalive_timeout_ms),
            ),
            limits,
            cache: CacheConfig {
                redis_url: (!r.url.is_empty()).then(|| r.url.clone()),
                redis_ca,
                ttl: Duration::from_secs(r.ttl_seconds),
                redis_timeout: Duration::from_millis(r.timeout_ms),
                lru_bytes: self.cache.lru_bytes,
            },
            model_dir: PathBuf::from(&self.model.path),
            device,
            dtype,
            vae_tiling,
            queue_capacity: self.executor.queue_capacity,
            metrics_listen,
            telemetry: t.clone(),
        })
    }
}

fn optional_addr(field: &str, s: &str) -> Result<Option<SocketAddr>, ConfigInvalid> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| ConfigInvalid::new(field, "must be host:port (an IP address) or empty", format!("{s:?}")))
}

fn tls_files(t: &TlsConfig) -> Result<Option<TlsFiles>, ConfigInvalid> {
    match (t.cert.is_empty(), t.key.is_empty()) {
        (true, true) if t.client_ca.is_empty() => Ok(None),
        (false, false) => Ok(Some(TlsFiles {
            cert: PathBuf::from(&t.cert),
            key: PathBuf::from(&t.key),
            client_ca: (!t.client_ca.is_empty()).then(|| PathBuf::from(&t.client_ca)),
        })),
        _ => Err(ConfigInvalid::new(
            "server.tls",
            "needs both cert and key (client_ca only with them)",
            format!("cert {:?}, key {:?}, client_ca {:?}", t.cert, t.key, t.client_ca),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> WorkerConfig {
        let mut c = WorkerConfig::default();
        c.model.path = "/models/x".into();
        c
    }

    #[test]
    fn defaults_validate_once_a_model_is_named() {
        assert_eq!(
            WorkerConfig::default().validate().expect_err("demo").field,
            "model.path"
        );
        let v = ok().validate().expect("valid");
        assert_eq!(v.device, DeviceKind::Cpu);
        assert_eq!(v.worker_id, "0.0.0.0:50051");
        assert!(v.tls.is_none() && v.metrics_listen.is_none() && v.cache.redis_url.is_none());
    }

    #[test]
    fn bad_fields_are_named() {
        type Mutate = Box<dyn Fn(&mut WorkerConfig)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("model.device", Box::new(|c| c.model.device = "tpu".into())),
            ("model.dtype", Box::new(|c| c.model.dtype = "f64".into())),
            (
                "model.vae_tiling",
                Box::new(|c| c.model.vae_tiling = "sometimes".into()),
            ),
            ("model.vae_tile_px", Box::new(|c| c.model.vae_tile_px = 100)),
            ("executor.queue_capacity", Box::new(|c| c.executor.queue_capacity = 0)),
            (
                "telemetry.metrics_listen",
                Box::new(|c| c.telemetry.metrics_listen = "nope".into()),
            ),
            ("server.tls", Box::new(|c| c.server.tls.cert = "a.pem".into())),
            (
                "server.max_message_bytes",
                Box::new(|c| c.server.max_message_bytes = 10),
            ),
            ("limits.max_side", Box::new(|c| c.limits.max_side = 100_000)),
        ];
        for (field, mutate) in cases {
            let mut c = ok();
            mutate(&mut c);
            assert_eq!(c.validate().expect_err(field).field, field);
        }
    }

    #[test]
    fn loads_from_overrides() {
        let c =
            WorkerConfig::load(None, false, &[("model.path", "/m"), ("executor.queue_capacity", "3")]).expect("loads");
        assert_eq!(c.executor.queue_capacity, 3);
        assert_eq!(c.validate().expect("valid").queue_capacity, 3);
        assert_eq!(DeviceKind::parse("cuda:2"), Some(DeviceKind::Cuda(2)));
    }
}
