//! Transport security from config: the worker over TLS, and with mutual TLS only a client holding a certificate
//! from the cluster's CA can call it.

use std::time::Duration;

use mip_common::tls::testing::TestPki;
use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::InfoRequest;
use mip_worker::testing::TestWorker;
use tonic::transport::{Channel, ClientTlsConfig};

async fn call_info(addr: std::net::SocketAddr, tls: ClientTlsConfig) -> Result<String, String> {
    let fut = async {
        let ch = Channel::from_shared(format!("https://localhost:{}", addr.port()))
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let r = WorkerClient::new(ch)
            .info(InfoRequest {})
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        Ok(r.into_inner().worker_id)
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

async fn tls_worker(pki: &TestPki, mutual: bool) -> TestWorker {
    let s = pki.server_tls(mutual);
    TestWorker::start(|c| {
        c.server.tls.cert = s.cert.display().to_string();
        c.server.tls.key = s.key.display().to_string();
        c.server.tls.client_ca = s.client_ca.map(|p| p.display().to_string()).unwrap_or_default();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_the_cluster_ca() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = TestPki::generate(dir.path()).expect("pki");
    let w = tls_worker(&pki, true).await;
    let ok = pki.client_tls(true).client_config().expect("client tls");
    // The port may take a moment to open: retry the valid client within a bound.
    let mut last = Err(String::new());
    for _ in 0..100 {
        last = call_info(w.addr, ok.clone()).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.as_deref(), Ok("test-worker"));
    let no_cert = pki.client_tls(false).client_config().expect("client tls");
    assert!(
        call_info(w.addr, no_cert).await.is_err(),
        "a client without a certificate is refused"
    );
    let mut rogue = pki.client_tls(true);
    rogue.cert = Some(pki.rogue_client_cert.clone());
    rogue.key = Some(pki.rogue_client_key.clone());
    let rogue = rogue.client_config().expect("client tls");
    assert!(
        call_info(w.addr, rogue).await.is_err(),
        "a certificate from another CA is refused"
    );
    assert_eq!(
        call_info(w.addr, ok).await.as_deref(),
        Ok("test-worker"),
        "still serving valid clients"
    );
    // Plaintext is not accepted on a TLS port.
    let plain = Channel::from_shared(format!("http://{}", w.addr))
        .expect("url")
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(WorkerClient::new(ch).info(InfoRequest {}).await.is_err());
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_without_client_certificates() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = TestPki::generate(dir.path()).expect("pki");
    let w = tls_worker(&pki, false).await;
    let ca_only = pki.client_tls(false).client_config().expect("client tls");
    let mut last = Err(String::new());
    for _ in 0..100 {
        last = call_info(w.addr, ca_only.clone()).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.as_deref(), Ok("test-worker"));
    w.stop().await;
}
