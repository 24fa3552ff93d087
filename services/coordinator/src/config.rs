//! The coordinator's configuration: [`CoordinatorConfig`] is the serde shape of the file and the `MIP_…`
//! environment (loaded with `mip_common::config::load`); [`CoordinatorConfig::validate`] turns it once into the
//! immutable [`ValidConfig`] the server runs from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mip_admission::{Limits, LimitsConfig};
use mip_common::tls::{ClientTls, ServerTls};

use serde::{Deserialize, Serialize};

use crate::error::CoordinatorError;

/// The whole configuration, section by section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    pub server: ServerConfig,
    /// Request limits, the same section (and defaults) as the worker's: what `SubmitJob` and `Generate` admit.
    pub limits: LimitsConfig,
    pub redis: RedisConfig,
    pub coordinator: SchedulingConfig,
    pub worker_tls: WorkerTlsConfig,
    pub auth: AuthConfig,
    pub telemetry: TelemetryConfig,
}

/// `server`: the public gRPC endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    /// Largest gRPC message, both ways, on every hop (public API, worker calls, probes).
    pub max_message_bytes: usize,
    pub tls: TlsConfig,
    /// HTTP/2 pings to clients every this many ms; a client silent for `keepalive_timeout_ms` more is dropped.
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    /// On SIGTERM: refuse new jobs (health NOT_SERVING) and let running jobs finish for at most this long, then
    /// hand the unfinished ones over (their leases released for another replica) and exit.
    pub drain_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50050".into(),
            max_message_bytes: 64 << 20,
            tls: TlsConfig::default(),
            keepalive_interval_ms: 10_000,
            keepalive_timeout_ms: 10_000,
            drain_seconds: 30,
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

/// `worker_tls`: how the coordinator reaches its workers; empty `ca` = plaintext. `cert` + `key` = a client identity
/// for workers that require one; `domain` = the name to verify instead of the URL's host (needed with DNS
/// discovery, whose URLs hold IP addresses).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerTlsConfig {
    pub ca: String,
    pub cert: String,
    pub key: String,
    pub domain: String,
}

/// `auth`: bearer tokens of the public API; empty `tokens_file` = no authentication.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// One token per line; blank lines and `#` comments are skipped.
    pub tokens_file: String,
}

/// `telemetry`: tracing export and the Prometheus endpoint (shared with the other service).
pub use mip_common::telemetry::TelemetrySection as TelemetryConfig;

/// `redis`: where job state lives; empty url = memory only (nothing survives a restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db`, or `rediss://` for TLS.
    pub url: String,
    /// PEM file of the CA that signs a `rediss://` server's certificate; empty = the system's trust roots.
    pub ca: String,
    /// Lifetime of job state and results.
    pub ttl_seconds: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            ca: String::new(),
            ttl_seconds: 24 * 3600,
        }
    }
}

/// `coordinator`: workers and scheduling limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulingConfig {
    /// Worker URLs (`http://host:port`; a bare `host:port` gets `http://`).
    pub workers: Vec<String>,
    /// `NAME:PORT` resolved on start and every `dns_interval_ms`; every address is a worker (`http://IP:PORT`, or
    /// `https://` with `worker_tls`); empty = only `workers`.
    pub workers_dns: String,
    pub dns_interval_ms: u64,
    /// Tasks waiting for a worker across all jobs; beyond it SubmitJob answers RESOURCE_EXHAUSTED.
    pub max_queued_tasks: usize,
    /// Tries of one task (on different workers when possible).
    pub max_attempts: u32,
    /// Tasks in flight per worker; 0 = the worker's `capacity` + 1 (from Info).
    pub worker_concurrency: u32,
    pub health_interval_ms: u64,
    pub max_requests: usize,
    pub max_samples: u32,
    /// Lifetime of a job's ownership lease in Redis (renewed every third of it); a dead coordinator's jobs are
    /// resumed by another (or the restarted) one after at most this long.
    pub lease_ms: u64,
    /// A waiting task's effective priority rises by 1 per this many milliseconds waited; 0 = no aging.
    pub priority_aging_ms: u64,
    /// HTTP/2 pings on the worker channels every this many ms (also while idle); a worker that does not answer one
    /// within `worker_keepalive_timeout_ms` (a frozen process) loses its connection and its running attempts.
    pub worker_keepalive_interval_ms: u64,
    pub worker_keepalive_timeout_ms: u64,
    /// Progress watchdog of a running attempt: silence allowed = factor x the longest step seen + slack; before two
    /// steps have arrived, `watchdog_first_event_ms` (0 = unbounded). Past it the attempt is cancelled, the worker
    /// marked unhealthy and the task retried elsewhere.
    pub watchdog_factor: f64,
    pub watchdog_slack_ms: u64,
    pub watchdog_first_event_ms: u64,
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        Self {
            workers: Vec::new(),
            workers_dns: String::new(),
            dns_interval_ms: 5000,
            max_queued_tasks: 1024,
            max_attempts: 3,
            worker_concurrency: 0,
            health_interval_ms: 1000,
            max_requests: 64,
            max_samples: 16,
            lease_ms: 10_000,
            priority_aging_ms: 30_000,
            worker_keepalive_interval_ms: 5_000,
            worker_keepalive_timeout_ms: 5_000,
            watchdog_factor: 4.0,
            watchdog_slack_ms: 10_000,
            watchdog_first_event_ms: 300_000,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub max_message_bytes: usize,
    pub limits: Limits,
    pub redis_url: Option<String>,
    /// `redis.ca`: the CA of a `rediss://` server.
    pub redis_ca: Option<PathBuf>,
    pub ttl: Duration,
    pub workers: Vec<String>,
    /// `(name, port)` of `coordinator.workers_dns`.
    pub workers_dns: Option<(String, u16)>,
    pub dns_interval: Duration,
    pub server_tls: Option<ServerTls>,
    pub worker_tls: Option<ClientTls>,
    pub tokens_file: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub telemetry: TelemetryConfig,
    pub max_queued_tasks: usize,
    pub max_attempts: u32,
    pub worker_concurrency: Option<u32>,
    pub health_interval: Duration,
    pub max_requests: usize,
    pub max_samples: u32,
    pub lease: Duration,
    pub priority_aging: Option<Duration>,
    /// `(interval, timeout)` of the HTTP/2 pings of the public server.
    pub server_keepalive: (Duration, Duration),
    /// `(interval, timeout)` of the HTTP/2 pings on the worker channels.
    pub worker_keepalive: (Duration, Duration),
    pub watchdog: crate::watchdog::Watchdog,
    /// How long a shutdown waits for running jobs.
    pub drain: Duration,
}

impl CoordinatorConfig {
    /// Loads defaults, then `file`, then (when `use_env`) the `MIP_…` environment, then `overrides`.
    pub fn load(
        file: Option<&Path>,
        use_env: bool,
        overrides: &[(&str, &str)],
    ) -> Result<Self, mip_common::config::ConfigError> {
        mip_common::config::load(file, use_env, overrides)
    }

    /// Checks every field once.
    pub fn validate(&self) -> Result<ValidConfig, CoordinatorError> {
        let c = &self.coordinator;
        let transport = self.transport()?;
        let tls = transport.worker_tls.is_some();
        let workers = c
            .workers
            .iter()
            .map(|w| normalize_url(w, tls))
            .collect::<Result<Vec<_>, _>>()?;
        let ranges: [(&'static str, u64, u64, u64); 14] = [
            ("server.drain_seconds", self.server.drain_seconds, 0, 3600),
            ("coordinator.dns_interval_ms", c.dns_interval_ms, 10, 3_600_000),
            ("coordinator.max_queued_tasks", c.max_queued_tasks as u64, 1, 1 << 20),
            ("coordinator.max_attempts", c.max_attempts.into(), 1, 10),
            ("coordinator.health_interval_ms", c.health_interval_ms, 10, 600_000),
            ("coordinator.max_requests", c.max_requests as u64, 1, 4096),
            ("coordinator.max_samples", c.max_samples.into(), 1, 1024),
            ("coordinator.lease_ms", c.lease_ms, 200, 600_000),
            ("coordinator.priority_aging_ms", c.priority_aging_ms, 0, 86_400_000),
            (
                "coordinator.worker_keepalive_interval_ms",
                c.worker_keepalive_interval_ms,
                100,
                3_600_000,
            ),
            (
                "coordinator.worker_keepalive_timeout_ms",
                c.worker_keepalive_timeout_ms,
                100,
                3_600_000,
            ),
            ("coordinator.watchdog_slack_ms", c.watchdog_slack_ms, 0, 3_600_000),
            (
                "server.keepalive_interval_ms",
                self.server.keepalive_interval_ms,
                100,
                3_600_000,
            ),
            (
                "server.keepalive_timeout_ms",
                self.server.keepalive_timeout_ms,
                100,
                3_600_000,
            ),
        ];
        for (field, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return Err(CoordinatorError::invalid(field, format!("must be in {lo}..={hi}"), v));
            }
        }
        if self.redis.ttl_seconds == 0 {
            return Err(CoordinatorError::invalid("redis.ttl_seconds", "must be positive", 0));
        }
        if !(c.watchdog_factor.is_finite() && (1.0..=1000.0).contains(&c.watchdog_factor)) {
            return Err(CoordinatorError::invalid(
                "coordinator.watchdog_factor",
                "must be a finite number in 1..=1000",
                c.watchdog_factor,
            ));
        }
        let redis_ca = (!self.redis.ca.is_empty()).then(|| PathBuf::from(&self.redis.ca));
        if !self.redis.url.is_empty() {
            // A malformed URL or an unreadable CA fails at startup, naming the field.
            mip_common::redis_client::client(&self.redis.url, redis_ca.as_deref())
                .map_err(|e| CoordinatorError::invalid("redis", "must name a usable Redis", e))?;
        }
        let limits = Limits::from_config(&self.limits)?;
        let ms = Duration::from_millis;
        Ok(ValidConfig {
            max_message_bytes: self.server.max_message_bytes,
            limits,
            redis_url: (!self.redis.url.is_empty()).then(|| self.redis.url.clone()),
            redis_ca,
            ttl: Duration::from_secs(self.redis.ttl_seconds),
            workers,
            workers_dns: transport.workers_dns,
            dns_interval: Duration::from_millis(c.dns_interval_ms),
            server_tls: transport.server_tls,
            worker_tls: transport.worker_tls,
            tokens_file: transport.tokens_file,
            metrics_listen: transport.metrics_listen,
            telemetry: self.telemetry.clone(),
            max_queued_tasks: c.max_queued_tasks,
            max_attempts: c.max_attempts,
            worker_concurrency: (c.worker_concurrency > 0).then_some(c.worker_concurrency),
            health_interval: Duration::from_millis(c.health_interval_ms),
            max_requests: c.max_requests,
            max_samples: c.max_samples,
            lease: Duration::from_millis(c.lease_ms),
            priority_aging: (c.priority_aging_ms > 0).then(|| Duration::from_millis(c.priority_aging_ms)),
            server_keepalive: (
                ms(self.server.keepalive_interval_ms),
                ms(self.server.keepalive_timeout_ms),
            ),
            worker_keepalive: (ms(c.worker_keepalive_interval_ms), ms(c.worker_keepalive_timeout_ms)),
            watchdog: crate::watchdog::Watchdog {
                factor: c.watchdog_factor,
                slack: ms(c.watchdog_slack_ms),
                first: (c.watchdog_first_event_ms > 0).then(|| ms(c.watchdog_first_event_ms)),
            },
            drain: Duration::from_secs(self.server.drain_seconds),
        })
    }
}

/// The transport and security settings, validated.
struct Transport {
    workers_dns: Option<(String, u16)>,
    server_tls: Option<ServerTls>,
    worker_tls: Option<ClientTls>,
    tokens_file: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
}

impl CoordinatorConfig {
    fn transport(&self) -> Result<Transport, CoordinatorError> {
        let c = &self.coordinator;
        let workers_dns = (!c.workers_dns.trim().is_empty())
            .then(|| parse_dns(c.workers_dns.trim()))
            .transpose()?;
        if c.workers.is_empty() && workers_dns.is_none() {
            return Err(CoordinatorError::invalid(
                "coordinator.workers / coordinator.workers_dns",
                "must name at least one worker or a DNS name (NAME:PORT)",
                "[] / \"\"",
            ));
        }
        let t = &self.telemetry;
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(CoordinatorError::invalid(
                "telemetry.sample_ratio",
                "must be in 0..=1",
                t.sample_ratio,
            ));
        }
        let metrics_listen = match t.metrics_listen.trim() {
            "" => None,
            a => Some(a.parse().map_err(|_| {
                CoordinatorError::invalid("telemetry.metrics_listen", "must be IP:port or empty", format!("{a:?}"))
            })?),
        };
        Ok(Transport {
            workers_dns,
            server_tls: server_tls(&self.server.tls)?,
            worker_tls: worker_tls(&self.worker_tls)?,
            tokens_file: (!self.auth.tokens_file.trim().is_empty())
                .then(|| PathBuf::from(self.auth.tokens_file.trim())),
            metrics_listen,
        })
    }
}

fn non_empty(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

fn server_tls(t: &TlsConfig) -> Result<Option<ServerTls>, CoordinatorError> {
    match (t.cert.is_empty(), t.key.is_empty()) {
        (true, true) if t.client_ca.is_empty() => Ok(None),
        (false, false) => Ok(Some(ServerTls {
            cert: PathBuf::from(&t.cert),
            key: PathBuf::from(&t.key),
            client_ca: non_empty(&t.client_ca),
        })),
        _ => Err(CoordinatorError::invalid(
            "server.tls",
            "needs both cert and key (client_ca only with them)",
            format!("cert {:?}, key {:?}, client_ca {:?}", t.cert, t.key, t.client_ca),
        )),
    }
}

fn worker_tls(t: &WorkerTlsConfig) -> Result<Option<ClientTls>, CoordinatorError> {
    if t.ca.is_empty() {
        if t.cert.is_empty() && t.key.is_empty() && t.domain.is_empty() {
            return Ok(None);
        }
        return Err(CoordinatorError::invalid(
            "worker_tls.ca",
            "must be set when worker_tls.cert, key or domain is",
            "\"\"",
        ));
    }
    if t.cert.is_empty() != t.key.is_empty() {
        return Err(CoordinatorError::invalid(
            "worker_tls.cert / worker_tls.key",
            "must be both set or both empty",
            format!("{:?} / {:?}", t.cert, t.key),
        ));
    }
    Ok(Some(ClientTls {
        ca: PathBuf::from(&t.ca),
        cert: non_empty(&t.cert),
        key: non_empty(&t.key),
        domain: (!t.domain.is_empty()).then(|| t.domain.clone()),
    }))
}

/// `NAME:PORT` (a bracketed IPv6 literal is accepted as the name).
fn parse_dns(s: &str) -> Result<(String, u16), CoordinatorError> {
    let bad = || CoordinatorError::invalid("coordinator.workers_dns", "must be NAME:PORT", format!("{s:?}"));
    let (name, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if name.is_empty() || port == 0 || name.contains('/') {
        return Err(bad());
    }
    Ok((name.to_owned(), port))
}

/// The URL scheme of workers: `https` with `worker_tls`, else `http`.
pub fn worker_scheme(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

/// `host:port` → `http://host:port` (`https://` with worker TLS); URLs must parse as URIs with a host, and their
/// scheme must match whether `worker_tls` is set.
fn normalize_url(w: &str, tls: bool) -> Result<String, CoordinatorError> {
    let w = w.trim();
    let scheme = worker_scheme(tls);
    let url = if w.contains("://") {
        w.to_owned()
    } else {
        format!("{scheme}://{w}")
    };
    match url.parse::<tonic::transport::Uri>() {
        Ok(u) if u.host().is_some_and(|h| !h.is_empty()) && u.scheme_str() == Some(scheme) => {
            Ok(url.trim_end_matches('/').to_owned())
        }
        _ => Err(CoordinatorError::invalid(
            "coordinator.workers",
            format!("must hold URLs like {scheme}://host:port (https exactly when worker_tls is set)"),
            format!("{w:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_and_normalizes() {
        let mut c = CoordinatorConfig::default();
        assert!(c.validate().is_err());
        c.coordinator.workers = vec!["127.0.0.1:1".into(), "http://h:2/".into()];
        let v = c.validate().expect("valid");
        assert_eq!(v.workers, ["http://127.0.0.1:1", "http://h:2"]);
        assert!(v.redis_url.is_none() && v.worker_concurrency.is_none());
        c.coordinator.max_attempts = 0;
        let e = c.validate().expect_err("attempts");
        assert!(e.to_string().contains("coordinator.max_attempts"), "{e}");
        c.coordinator.max_attempts = 3;
        assert_eq!(c.validate().expect("valid").lease, Duration::from_secs(10));
        c.coordinator.lease_ms = 100;
        let e = c.validate().expect_err("lease");
        assert!(e.to_string().contains("coordinator.lease_ms"), "{e}");
        c.coordinator.lease_ms = 600;
        c.coordinator.priority_aging_ms = 0;
        assert!(c.validate().expect("valid").priority_aging.is_none());
    }

    #[test]
    fn workers_or_dns_and_transport_sections() {
        let mut c = CoordinatorConfig::default();
        let e = c.validate().expect_err("no workers").to_string();
        assert!(
            e.contains("coordinator.workers") && e.contains("coordinator.workers_dns"),
            "{e}"
        );
        c.coordinator.workers_dns = "mip-worker-headless:50051".into();
        let v = c.validate().expect("dns only");
        assert_eq!(v.workers_dns, Some(("mip-worker-headless".into(), 50051)));
        assert_eq!(v.dns_interval, Duration::from_secs(5));
        assert!(v.server_tls.is_none() && v.worker_tls.is_none() && v.tokens_file.is_none());
        c.coordinator.workers_dns = "no-port".into();
        assert!(c
            .validate()
            .expect_err("dns")
            .to_string()
            .contains("coordinator.workers_dns"));
        c.coordinator.workers_dns = "[::1]:7".into();
        assert_eq!(c.validate().expect("v6").workers_dns, Some(("::1".into(), 7)));

        c.coordinator.workers = vec!["h:1".into()];
        c.worker_tls.ca = "/ca.pem".into();
        c.worker_tls.domain = "workers".into();
        let v = c.validate().expect("tls");
        assert_eq!(v.workers, ["https://h:1"]);
        assert_eq!(v.worker_tls.and_then(|t| t.domain).as_deref(), Some("workers"));
        c.coordinator.workers = vec!["http://h:1".into()];
        assert!(c.validate().expect_err("scheme").to_string().contains("https"));
        c.coordinator.workers.clear();
        c.worker_tls.cert = "/c.pem".into();
        let e = c.validate().expect_err("half identity").to_string();
        assert!(e.contains("worker_tls.cert"), "{e}");
        c.worker_tls = WorkerTlsConfig::default();

        c.server.tls.key = "/k.pem".into();
        assert!(c.validate().expect_err("half").to_string().contains("server.tls"));
        c.server.tls.cert = "/c.pem".into();
        c.auth.tokens_file = "/tokens".into();
        c.telemetry.metrics_listen = "127.0.0.1:9100".into();
        let v = c.validate().expect("all");
        assert!(v.server_tls.is_some() && v.tokens_file.is_some() && v.metrics_listen.is_some());
        c.telemetry.metrics_listen = "localhost".into();
        assert!(c
            .validate()
            .expect_err("addr")
            .to_string()
            .contains("telemetry.metrics_listen"));
    }
}
