//! Workers from DNS: `coordinator.workers_dns` (`NAME:PORT`, e.g. a Kubernetes headless service) is resolved with
//! the system resolver on start and every `coordinator.dns_interval_ms`; every address becomes a worker
//! (`http://IP:PORT`, or `https://` with `worker_tls`), next to the static `coordinator.workers`. A failed lookup
//! keeps the current workers (a resolver hiccup must not empty the cluster).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::registry::Registry;

/// Longest wait for one lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What to resolve and how to build URLs.
#[derive(Debug, Clone)]
pub struct DnsWorkers {
    pub name: String,
    pub port: u16,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// `coordinator.workers`, always kept.
    pub fixed: Vec<String>,
}

/// A lookup failed or timed out.
#[derive(Debug, thiserror::Error)]
#[error("resolving coordinator.workers_dns `{name}:{port}`: {message}")]
pub struct LookupError {
    pub name: String,
    pub port: u16,
    pub message: String,
}

/// The URL of a worker at `addr` (IPv6 in brackets, without a zone id).
pub fn url_of(scheme: &str, addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{scheme}://{a}"),
        SocketAddr::V6(a) => format!("{scheme}://[{}]:{}", a.ip(), a.port()),
    }
}

impl DnsWorkers {
    /// The fixed workers followed by one URL per resolved address (sorted, without duplicates).
    pub async fn resolve(&self) -> Result<Vec<String>, LookupError> {
        let err = |message: String| LookupError {
            name: self.name.clone(),
            port: self.port,
            message,
        };
        let addrs = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((self.name.as_str(), self.port)))
            .await
            .map_err(|_| err(format!("no answer within {LOOKUP_TIMEOUT:?}")))?
            .map_err(|e| err(e.to_string()))?;
        let mut found: Vec<String> = addrs.map(|a| url_of(self.scheme, a)).collect();
        found.sort();
        found.dedup();
        let mut urls = self.fixed.clone();
        urls.extend(found.into_iter().filter(|u| !self.fixed.contains(u)));
        Ok(urls)
    }

    /// Resolves once and applies the result to `registry`; errors are logged and change nothing.
    pub async fn refresh(&self, registry: &Registry) {
        match self.resolve().await {
            Ok(urls) => {
                if let Err(e) = registry.set_workers(&urls) {
                    tracing::warn!(error = %e, "applying the resolved workers failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "worker discovery failed; keeping the current workers"),
        }
    }

    /// Refreshes every `interval` until `stop` turns true (the caller refreshed once at start).
    pub async fn follow(self, registry: Arc<Registry>, interval: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.refresh(&registry).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_localhost_and_keeps_fixed_workers_first() {
        let d = DnsWorkers {
            name: "localhost".into(),
            port: 7001,
            scheme: "http",
            fixed: vec!["http://w:1".into()],
        };
        let urls = d.resolve().await.expect("localhost resolves");
        assert_eq!(urls[0], "http://w:1");
        assert!(
            urls.iter()
                .any(|u| u == "http://127.0.0.1:7001" || u == "http://[::1]:7001"),
            "{urls:?}"
        );
        let v6: SocketAddr = "[fe80::1%2]:5".parse().expect("v6");
        assert_eq!(url_of("https", v6), "https://[fe80::1]:5");
        let bad = DnsWorkers {
            name: "no-such-host.invalid".into(),
            ..d
        };
        let e = bad.resolve().await.expect_err("nxdomain").to_string();
        assert!(
            e.contains("coordinator.workers_dns") && e.contains("no-such-host.invalid"),
            "{e}"
        );
    }
}
