//! TLS for the gRPC hops, from PEM files named in config sections.
//!
//! - [`ServerTls`]: the server's certificate chain and key; with `client_ca` set, clients must present a
//!   certificate signed by that CA (mutual TLS).
//! - [`ClientTls`]: the CA that signed the server's certificate, an optional client identity for mutual TLS, and an
//!   optional domain name to verify instead of the host in the URL.
//!
//! The files are read and checked for the expected PEM blocks here, so a wrong path or a swapped cert/key fails at
//! startup with the field and the file in the message; rustls parses the contents when the server or channel is
//! built. With the `testing` feature, [`testing::TestPki`] writes a throwaway CA and certificates for tests.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Errors loading TLS material; each names the config field, the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("TLS `{field}` file `{path}`: cannot read it: {source}")]
    Read {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file holds no PEM block of the expected kind.
    #[error("TLS `{field}` file `{path}`: expected a PEM {expected} block, found none")]
    NotPem {
        field: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    /// Only half of a client identity was configured.
    #[error("TLS client identity: `{given}` is set but `{missing}` is not; set both or neither")]
    HalfIdentity { given: &'static str, missing: &'static str },
}

/// Server-side TLS section: `cert` + `key` (PEM), optional `client_ca` to require client certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain of the server (leaf first).
    pub cert: PathBuf,
    /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificate(s); when set, clients must present a certificate signed by one of them.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// Client-side TLS section: the `ca` to trust, optional `cert` + `key` for mutual TLS, optional `domain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM CA certificate(s) that signed the server's certificate.
    pub ca: PathBuf,
    /// PEM client certificate chain, for servers that require client certificates.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name to verify the server's certificate against, instead of the host of the endpoint URL.
    #[serde(default)]
    pub domain: Option<String>,
}

impl ServerTls {
    /// The tonic server TLS config; mutual TLS (client certificate required) when `client_ca` is set.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let identity = Identity::from_pem(read_cert("cert", &self.cert)?, read_key("key", &self.key)?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config
                .client_ca_root(Certificate::from_pem(read_cert("client_ca", ca)?))
                .client_auth_optional(false);
        }
        Ok(config)
    }
}

impl ClientTls {
    /// The tonic channel TLS config: trust `ca`, present `cert` + `key` when both are set.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_cert("ca", &self.ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(read_cert("cert", cert)?, read_key("key", key)?));
            }
            (Some(_), None) => {
                return Err(TlsError::HalfIdentity {
                    given: "cert",
                    missing: "key",
                })
            }
            (None, Some(_)) => {
                return Err(TlsError::HalfIdentity {
                    given: "key",
                    missing: "cert",
                })
            }
            (None, None) => {}
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

fn read(field: &'static str, path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_owned(),
        source,
    })
}

/// Reads a file that must hold at least one `CERTIFICATE` PEM block.
fn read_cert(field: &'static str, path: &Path) -> Result<String, TlsError> {
    let pem = read(field, path)?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(TlsError::NotPem {
            field,
            path: path.to_owned(),
            expected: "CERTIFICATE",
        });
    }
    Ok(pem)
}

/// Reads a file that must hold a `… PRIVATE KEY` PEM block.
fn read_key(field: &'static str, path: &Path) -> Result<String, TlsError> {
    let pem = read(field, path)?;
    let has_key = pem
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----"));
    if !has_key {
        return Err(TlsError::NotPem {
            field,
            path: path.to_owned(),
            expected: "PRIVATE KEY",
        });
    }
    Ok(pem)
}

/// Throwaway PKI for tests (feature `testing`): enable it in a crate's dev-dependencies on `mip-common`.
#[cfg(feature = "testing")]
pub mod testing {
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    use super::{ClientTls, ServerTls};

    /// Errors generating or writing the test PKI.
    #[derive(Debug, thiserror::Error)]
    pub enum TestPkiError {
        #[error("generating test certificates: {0}")]
        Generate(#[from] rcgen::Error),
        #[error("writing `{path}`: {source}")]
        Write {
            path: PathBuf,
            #[source]
            source: std::io::Error,
        },
    }

    /// PEM files of a test CA, a server certificate for `localhost` and `127.0.0.1`, a client certificate signed by
    /// the CA, and a client certificate from a second, unrelated CA (for negative tests).
    #[derive(Debug, Clone)]
    pub struct TestPki {
        pub ca_cert: PathBuf,
        pub server_cert: PathBuf,
        pub server_key: PathBuf,
        pub client_cert: PathBuf,
        pub client_key: PathBuf,
        pub rogue_client_cert: PathBuf,
        pub rogue_client_key: PathBuf,
    }

    impl TestPki {
        /// Generates fresh keys and certificates and writes them as PEM files into `dir`.
        pub fn generate(dir: &Path) -> Result<TestPki, TestPkiError> {
            let (ca_pem, ca) = new_ca("mip test CA")?;
            let (_, rogue_ca) = new_ca("mip rogue CA")?;
            let (server_cert, server_key) = leaf(
                &ca,
                "localhost",
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            )?;
            let (client_cert, client_key) = leaf(&ca, "mip-test-client", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
            let (rogue_cert, rogue_key) =
                leaf(&rogue_ca, "mip-rogue-client", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
            Ok(TestPki {
                ca_cert: write(dir, "ca.pem", &ca_pem)?,
                server_cert: write(dir, "server.pem", &server_cert)?,
                server_key: write(dir, "server.key", &server_key)?,
                client_cert: write(dir, "client.pem", &client_cert)?,
                client_key: write(dir, "client.key", &client_key)?,
                rogue_client_cert: write(dir, "rogue-client.pem", &rogue_cert)?,
                rogue_client_key: write(dir, "rogue-client.key", &rogue_key)?,
            })
        }

        /// Server section: this PKI's server identity; `mutual` requires client certificates signed by the CA.
        pub fn server_tls(&self, mutual: bool) -> ServerTls {
            ServerTls {
                cert: self.server_cert.clone(),
                key: self.server_key.clone(),
                client_ca: mutual.then(|| self.ca_cert.clone()),
            }
        }

        /// Client section trusting the CA, presenting the valid client certificate when `with_identity`.
        pub fn client_tls(&self, with_identity: bool) -> ClientTls {
            ClientTls {
                ca: self.ca_cert.clone(),
                cert: with_identity.then(|| self.client_cert.clone()),
                key: with_identity.then(|| self.client_key.clone()),
                domain: Some("localhost".to_owned()),
            }
        }
    }

    fn new_ca(name: &str) -> Result<(String, Issuer<'static, KeyPair>), TestPkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key)?.pem();
        Ok((pem, Issuer::new(params, key)))
    }

    /// A certificate for `names` signed by `issuer`; returns (cert PEM, key PEM).
    fn leaf(
        issuer: &Issuer<'_, KeyPair>,
        common_name: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String), TestPkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf, TestPkiError> {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(|source| TestPkiError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let missing = dir.path().join("missing.pem");
        let tls = ServerTls {
            cert: missing.clone(),
            key: missing.clone(),
            client_ca: None,
        };
        let e = tls.server_config().expect_err("missing file").to_string();
        assert!(
            e.contains("`cert`") && e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );

        let key_only = dir.path().join("key.pem");
        std::fs::write(
            &key_only,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let tls = ServerTls {
            cert: key_only.clone(),
            key: key_only.clone(),
            client_ca: None,
        };
        let e = tls.server_config().expect_err("key given as cert").to_string();
        assert!(
            e.contains("`cert`") && e.contains("key.pem") && e.contains("CERTIFICATE"),
            "{e}"
        );

        let client = ClientTls {
            ca: key_only.clone(),
            cert: None,
            key: None,
            domain: None,
        };
        let e = client.client_config().expect_err("key given as ca").to_string();
        assert!(e.contains("`ca`") && e.contains("CERTIFICATE"), "{e}");
    }

    #[test]
    fn half_a_client_identity_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").expect("write");
        let client = ClientTls {
            ca,
            cert: Some(dir.path().join("c.pem")),
            key: None,
            domain: None,
        };
        let e = client.client_config().expect_err("cert without key").to_string();
        assert!(e.contains("`cert` is set but `key` is not"), "{e}");
    }

    #[test]
    fn sections_deserialize_with_optional_fields() {
        let s: ServerTls = serde_json::from_str(r#"{"cert":"/c.pem","key":"/k.pem"}"#).expect("server");
        assert_eq!(s.client_ca, None);
        let c: ClientTls = serde_json::from_str(r#"{"ca":"/ca.pem","domain":"w"}"#).expect("client");
        assert_eq!((c.cert, c.domain.as_deref()), (None, Some("w")));
        assert!(serde_json::from_str::<ServerTls>(r#"{"cert":"/c","key":"/k","ca":"/x"}"#).is_err());
    }
}
