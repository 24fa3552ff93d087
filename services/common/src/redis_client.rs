//! Redis clients for both services. `redis://` is plain TCP; `rediss://` is TLS, verifying the server against the
//! system's trust roots, or against the CA in `redis.ca` (a PEM file) for a private CA. A CA with a plain URL is a
//! configuration error rather than silently ignored.

use std::path::{Path, PathBuf};

/// Why a Redis client could not be built; the message names the config field.
#[derive(Debug, thiserror::Error)]
pub enum RedisClientError {
    #[error("redis.url `{url}` is not a Redis URL: {reason}")]
    Url { url: String, reason: String },
    #[error("redis.ca is set but redis.url `{url}` is not `rediss://` (TLS)")]
    CaWithoutTls { url: String },
    #[error("redis.ca `{}`: {source}", path.display())]
    Ca { path: PathBuf, source: std::io::Error },
}

/// A client for `url`, trusting `ca` (PEM) for `rediss://` when given. Connects lazily.
pub fn client(url: &str, ca: Option<&Path>) -> Result<redis::Client, RedisClientError> {
    let bad_url = |e: redis::RedisError| RedisClientError::Url {
        url: url.to_owned(),
        reason: e.to_string(),
    };
    let Some(ca) = ca else {
        return redis::Client::open(url).map_err(bad_url);
    };
    if !url.starts_with("rediss://") {
        return Err(RedisClientError::CaWithoutTls { url: url.to_owned() });
    }
    let root = std::fs::read(ca).map_err(|source| RedisClientError::Ca {
        path: ca.to_owned(),
        source,
    })?;
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root),
    };
    redis::Client::build_with_tls(url, certs).map_err(bad_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_tls_urls_build_and_mistakes_name_the_field() {
        assert!(client("redis://127.0.0.1:6379/0", None).is_ok());
        assert!(client("rediss://127.0.0.1:6380/0", None).is_ok());
        let e = client("http://x", None).expect_err("not redis").to_string();
        assert!(e.contains("redis.url") && e.contains("http://x"), "{e}");
        let e = client("redis://x/", Some(Path::new("ca.pem")))
            .expect_err("plain")
            .to_string();
        assert!(e.contains("redis.ca") && e.contains("rediss://"), "{e}");
        let e = client("rediss://x/", Some(Path::new("/no/such/ca.pem")))
            .expect_err("missing")
            .to_string();
        assert!(e.contains("redis.ca") && e.contains("/no/such/ca.pem"), "{e}");
    }
}
