//! The gRPC client side of the CLI: [`ConnectArgs`] (`--coordinator`, `--token` / `MIP_TOKEN`, `--tls-ca`) and
//! [`connect`], which opens a channel (http, or https verified against `--tls-ca` or the system's trust roots) and
//! wraps it with the [`Auth`] interceptor that adds `authorization: Bearer <token>` and the current span's W3C trace
//! context (`traceparent`) to every call. [`status_error`] keeps a `Status`'s code and `mip-reason` in the one-line
//! error the user sees.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mip_proto::v1::coordinator_client::CoordinatorClient;
use mip_proto::v1::worker_client::WorkerClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::retry::Retry;

/// Largest message the CLI accepts (a job with its images).
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// How to reach the coordinator.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectArgs {
    /// Coordinator URL (http://host:port or https://host:port).
    #[arg(long, value_name = "URL")]
    pub coordinator: Option<String>,
    /// Bearer token sent with every call (default: $MIP_TOKEN).
    #[arg(long, env = "MIP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate (https URLs; default: the system's trust roots).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Keep retrying calls the coordinator refuses as unavailable or overloaded (or that a broken connection
    /// cut) for up to this many seconds, with exponential backoff and jitter; 0: no retries.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub retry_for: u64,
}

/// Adds `authorization: Bearer <token>` to every request when a token is set, and the current span's trace context
/// (see [`crate::trace`]) when there is one.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl Auth {
    /// An interceptor for `token` (`None` or empty: no header).
    pub fn new(token: Option<&str>) -> Result<Self> {
        let header = match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| anyhow::anyhow!("`--token` must be printable ASCII"))?,
            ),
        };
        Ok(Self { header })
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        mip_common::propagation::inject_current(request.metadata_mut());
        Ok(request)
    }
}

pub type Coordinator = CoordinatorClient<InterceptedService<Channel, Auth>>;
pub type Worker = WorkerClient<InterceptedService<Channel, Auth>>;

impl ConnectArgs {
    /// The retry policy of `--retry-for`.
    pub fn retry(&self) -> Retry {
        Retry {
            total: Duration::from_secs(self.retry_for),
        }
    }

    /// The `--coordinator` URL, or an error naming the flag.
    pub fn url(&self) -> Result<&str> {
        self.coordinator
            .as_deref()
            .context("`--coordinator URL` is required (e.g. http://127.0.0.1:50050)")
    }

    /// A client of the coordinator at `--coordinator`.
    pub async fn connect(&self) -> Result<Coordinator> {
        self.connect_to(self.url()?).await
    }

    /// A client of the coordinator at `url`, with this token and CA.
    pub async fn connect_to(&self, url: &str) -> Result<Coordinator> {
        let channel = channel(url, self.tls_ca.as_deref(), Duration::from_secs(10)).await?;
        Ok(
            CoordinatorClient::with_interceptor(channel, Auth::new(self.token.as_deref())?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// A client of a worker at `url`, with this token and CA; every call times out after `timeout`.
    pub async fn connect_worker(&self, url: &str, timeout: Duration) -> Result<Worker> {
        let channel = channel(url, self.tls_ca.as_deref(), timeout).await?;
        Ok(WorkerClient::with_interceptor(
            channel,
            Auth::new(self.token.as_deref())?,
        ))
    }
}

/// `host:port` → `http://host:port`; other URLs as given.
pub fn normalize(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// Connects to `url`; https is verified against `tls_ca` when given, else against the system's trust roots
/// (`SSL_CERT_FILE` / `SSL_CERT_DIR` override where those are read from).
async fn channel(url: &str, tls_ca: Option<&Path>, timeout: Duration) -> Result<Channel> {
    let url = normalize(url);
    let mut endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("bad URL {url:?}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    let https = url.starts_with("https://");
    if https {
        let tls = match tls_ca {
            Some(ca) => {
                let pem = std::fs::read(ca).with_context(|| format!("`--tls-ca`: cannot read {}", ca.display()))?;
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
            }
            None => ClientTlsConfig::new().with_native_roots(),
        };
        endpoint = endpoint.tls_config(tls).context("client TLS configuration")?;
    } else if !url.starts_with("http://") {
        bail!("URL must start with http:// or https://, got {url:?}");
    }
    endpoint.connect().await.map_err(|e| {
        let hint = if https && tls_ca.is_none() {
            " (verified against the system's trust roots; `--tls-ca FILE` names the CA that signed the server's \
             certificate)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot connect to {url}: {}{hint}", source_chain(&e))
    })
}

/// An error and its causes on one line.
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// A `Status` as one line with its code and reason: `InvalidArgument (invalid_argument): message`.
pub fn status_error(what: &str, s: &Status) -> anyhow::Error {
    match mip_common::errors::reason_of(s) {
        Some(reason) => anyhow::anyhow!("{what}: {:?} ({reason}): {}", s.code(), s.message()),
        None => anyhow::anyhow!("{what}: {:?}: {}", s.code(), s.message()),
    }
}

/// A current-thread-free runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_bearer_header_only_with_a_token() {
        let mut auth = Auth::new(Some("s3cret")).expect("token");
        let r = auth.call(Request::new(())).expect("ok");
        assert_eq!(r.metadata().get("authorization").expect("header"), "Bearer s3cret");
        let mut none = Auth::new(Some("  ")).expect("empty");
        assert!(none
            .call(Request::new(()))
            .expect("ok")
            .metadata()
            .get("authorization")
            .is_none());
        assert!(Auth::new(Some("bad\ntoken")).is_err());
    }

    #[test]
    fn bare_addresses_get_http() {
        assert_eq!(normalize("127.0.0.1:1/"), "http://127.0.0.1:1");
        assert_eq!(normalize("https://h:2"), "https://h:2");
    }
}
