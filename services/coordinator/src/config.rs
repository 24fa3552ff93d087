//! The coordinator's configuration: [`CoordinatorConfig`] is the serde shape of the file and the `MIP_…`
//! environment (loaded with `mip_common::config::load`); [`CoordinatorConfig::validate`] turns it once into the
//! immutable [`ValidConfig`] the server runs from.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::CoordinatorError;

/// The whole configuration, section by section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    pub server: ServerConfig,
    pub redis: RedisConfig,
    pub coordinator: SchedulingConfig,
}

/// `server`: the public gRPC endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_message_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50050".into(),
            max_message_bytes: 64 << 20,
        }
    }
}

/// `redis`: where job state lives; empty url = memory only (nothing survives a restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
    /// Lifetime of job state and results.
    pub ttl_seconds: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            ttl_seconds: 24 * 3600,
        }
    }
}

/// `coordinator`: workers and scheduling limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulingConfig {
    /// Worker URLs (`http://host:port`; a bare `host:port` gets `http://`).
    pub workers: Vec<String>,
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
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        Self {
            workers: Vec::new(),
            max_queued_tasks: 1024,
            max_attempts: 3,
            worker_concurrency: 0,
            health_interval_ms: 1000,
            max_requests: 64,
            max_samples: 16,
            lease_ms: 10_000,
            priority_aging_ms: 30_000,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub max_message_bytes: usize,
    pub redis_url: Option<String>,
    pub ttl: Duration,
    pub workers: Vec<String>,
    pub max_queued_tasks: usize,
    pub max_attempts: u32,
    pub worker_concurrency: Option<u32>,
    pub health_interval: Duration,
    pub max_requests: usize,
    pub max_samples: u32,
    pub lease: Duration,
    pub priority_aging: Option<Duration>,
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
        if c.workers.is_empty() {
            return Err(CoordinatorError::invalid(
                "coordinator.workers",
                "must name at least one worker",
                "[]",
            ));
        }
        let workers = c
            .workers
            .iter()
            .map(|w| normalize_url(w))
            .collect::<Result<Vec<_>, _>>()?;
        let ranges: [(&'static str, u64, u64, u64); 7] = [
            ("coordinator.max_queued_tasks", c.max_queued_tasks as u64, 1, 1 << 20),
            ("coordinator.max_attempts", c.max_attempts.into(), 1, 10),
            ("coordinator.health_interval_ms", c.health_interval_ms, 10, 600_000),
            ("coordinator.max_requests", c.max_requests as u64, 1, 4096),
            ("coordinator.max_samples", c.max_samples.into(), 1, 1024),
            ("coordinator.lease_ms", c.lease_ms, 200, 600_000),
            ("coordinator.priority_aging_ms", c.priority_aging_ms, 0, 86_400_000),
        ];
        for (field, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return Err(CoordinatorError::invalid(field, format!("must be in {lo}..={hi}"), v));
            }
        }
        if self.redis.ttl_seconds == 0 {
            return Err(CoordinatorError::invalid("redis.ttl_seconds", "must be positive", 0));
        }
        Ok(ValidConfig {
            max_message_bytes: self.server.max_message_bytes,
            redis_url: (!self.redis.url.is_empty()).then(|| self.redis.url.clone()),
            ttl: Duration::from_secs(self.redis.ttl_seconds),
            workers,
            max_queued_tasks: c.max_queued_tasks,
            max_attempts: c.max_attempts,
            worker_concurrency: (c.worker_concurrency > 0).then_some(c.worker_concurrency),
            health_interval: Duration::from_millis(c.health_interval_ms),
            max_requests: c.max_requests,
            max_samples: c.max_samples,
            lease: Duration::from_millis(c.lease_ms),
            priority_aging: (c.priority_aging_ms > 0).then(|| Duration::from_millis(c.priority_aging_ms)),
        })
    }
}

/// `host:port` → `http://host:port`; URLs must parse as URIs with a host.
fn normalize_url(w: &str) -> Result<String, CoordinatorError> {
    let w = w.trim();
    let url = if w.contains("://") {
        w.to_owned()
    } else {
        format!("http://{w}")
    };
    match url.parse::<tonic::transport::Uri>() {
        Ok(u) if u.host().is_some_and(|h| !h.is_empty()) => Ok(url.trim_end_matches('/').to_owned()),
        _ => Err(CoordinatorError::invalid(
            "coordinator.workers",
            "must hold URLs like http://host:port",
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
}
