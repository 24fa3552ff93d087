//! Bearer tokens on the public API: with `auth.tokens_file` set, every `mip.v1.Coordinator` call must carry
//! `authorization: Bearer <token>` naming one of the file's tokens; anything else is answered UNAUTHENTICATED
//! (`mip-reason: unauthenticated`) by [`BearerAuth`] before the request body is decoded, so a refused call touches
//! nothing. `grpc.health.v1` and reflection are not wrapped (Kubernetes probes stay open).
//!
//! Tokens are kept as blake3 digests and a presented token is compared with every one of them, each comparison in
//! constant time (`blake3::Hash`'s equality), so neither the position of a mismatch nor which token matched shows in
//! the timing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mip_common::errors::{status, Kind};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::metrics::Metrics;

/// Reading the tokens file failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.tokens_file `{path}`: cannot read it: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("auth.tokens_file `{path}` holds no token (one per line; blank lines and `#` comments are skipped)")]
    Empty { path: PathBuf },
}

/// The accepted tokens, as digests.
#[derive(Debug, Clone)]
pub struct Tokens {
    digests: Vec<blake3::Hash>,
}

impl Tokens {
    /// One token per line, trimmed; blank lines and lines starting with `#` are skipped.
    pub fn parse(text: &str) -> Self {
        let digests = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|t| blake3::hash(t.as_bytes()))
            .collect();
        Self { digests }
    }

    /// Reads and parses `path`; a file without any token is an error (it would lock every client out).
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        let tokens = Self::parse(&text);
        if tokens.is_empty() {
            return Err(AuthError::Empty { path: path.to_owned() });
        }
        Ok(tokens)
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `token` is one of the tokens; compares against all of them, each in constant time.
    pub fn accepts(&self, token: &str) -> bool {
        let presented = blake3::hash(token.as_bytes());
        let mut ok = false;
        for d in &self.digests {
            ok |= *d == presented;
        }
        ok
    }
}

/// The interceptor of `mip.v1.Coordinator`; without tokens it lets everything through.
#[derive(Clone)]
pub struct BearerAuth {
    tokens: Option<Arc<Tokens>>,
    metrics: Metrics,
}

impl BearerAuth {
    pub fn new(tokens: Option<Tokens>, metrics: Metrics) -> Self {
        Self {
            tokens: tokens.map(Arc::new),
            metrics,
        }
    }

    fn check(&self, tokens: &Tokens, req: &Request<()>) -> Result<(), &'static str> {
        let value = req
            .metadata()
            .get("authorization")
            .ok_or("missing `authorization: Bearer <token>` metadata")?;
        let value = value
            .to_str()
            .map_err(|_| "the `authorization` metadata is not ASCII")?;
        let (scheme, token) = value
            .split_once(' ')
            .ok_or("the `authorization` metadata must be `Bearer <token>`")?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err("the `authorization` metadata must use the Bearer scheme");
        }
        if tokens.accepts(token.trim()) {
            Ok(())
        } else {
            Err("the bearer token is not accepted")
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(req);
        };
        match self.check(tokens, &req) {
            Ok(()) => Ok(req),
            Err(why) => {
                self.metrics.reject("unauthenticated");
                Err(status(Kind::Unauthenticated, None, why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_skipping_blanks_and_comments() {
        let t = Tokens::parse("# team tokens\n\n  alpha  \n#beta\nga mma\n\t\n");
        assert_eq!(t.len(), 2);
        assert!(t.accepts("alpha") && t.accepts("ga mma"));
        assert!(!t.accepts("beta") && !t.accepts("#beta") && !t.accepts("") && !t.accepts("alph"));
        assert!(Tokens::parse("# only comments\n\n").is_empty());
    }

    #[test]
    fn load_reports_missing_and_empty_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let missing = dir.path().join("nope");
        let e = Tokens::load(&missing).expect_err("missing").to_string();
        assert!(e.contains("auth.tokens_file") && e.contains("nope"), "{e}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# nothing\n").expect("write");
        assert!(matches!(Tokens::load(&empty), Err(AuthError::Empty { .. })));
        std::fs::write(&empty, "s3cret\n").expect("write");
        assert_eq!(Tokens::load(&empty).expect("one").len(), 1);
    }

    #[test]
    fn interceptor_checks_the_header() {
        let metrics = Metrics::new().expect("metrics");
        let mut auth = BearerAuth::new(Some(Tokens::parse("s3cret")), metrics.clone());
        let with = |v: Option<&str>| {
            let mut r = Request::new(());
            if let Some(v) = v {
                r.metadata_mut().insert("authorization", v.parse().expect("ascii"));
            }
            r
        };
        assert!(auth.call(with(Some("Bearer s3cret"))).is_ok());
        assert!(auth.call(with(Some("bearer s3cret"))).is_ok());
        for bad in [None, Some("Bearer nope"), Some("Basic s3cret"), Some("s3cret")] {
            let e = auth.call(with(bad)).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert_eq!(mip_common::errors::reason_of(&e).as_deref(), Some("unauthenticated"));
        }
        assert!(metrics
            .render()
            .contains("mip_coord_rejected_total{reason=\"unauthenticated\"} 4"));
        let mut open = BearerAuth::new(None, metrics);
        assert!(open.call(with(None)).is_ok());
    }
}
