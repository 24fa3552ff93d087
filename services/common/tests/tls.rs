//! Real gRPC over TLS on loopback: the `grpc.health.v1` service behind `ServerTls`, called through `ClientTls`.
//! Mutual TLS accepts a client certificate signed by the CA and refuses none or a foreign one; plain TLS needs only
//! the CA. Every call is bounded by a timeout so a failure cannot hang the test.

use std::net::SocketAddr;
use std::time::Duration;

use mip_common::tls::testing::TestPki;
use mip_common::tls::{ClientTls, ServerTls};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const LIMIT: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        let joined = tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("server stops in time");
        joined.expect("server task").expect("server exits cleanly");
    }
}

async fn serve_health(tls: &ServerTls) -> Running {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = tls.server_config().expect("server tls config");
    let router = Server::builder()
        .tls_config(config)
        .expect("tls accepted by tonic")
        .add_service(service);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        router.serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
            let _ = stopped.await;
        }),
    );
    Running { addr, stop, task }
}

/// One health check over a fresh TLS channel; any failure (handshake or RPC) comes back as a string.
async fn check(addr: SocketAddr, tls: &ClientTls) -> Result<ServingStatus, String> {
    let config = tls.client_config().map_err(|e| e.to_string())?;
    let call = async {
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(config)
            .map_err(|e| format!("tls config: {e}"))?
            .connect_timeout(LIMIT)
            .timeout(LIMIT);
        let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .map_err(|s| format!("check: {s}"))?;
        Ok(reply.into_inner().status())
    };
    tokio::time::timeout(LIMIT * 2, call)
        .await
        .map_err(|_| "timed out".to_owned())?
}

#[tokio::test]
async fn mutual_tls_accepts_only_clients_signed_by_the_ca() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = TestPki::generate(dir.path()).expect("test pki");
    let server = serve_health(&pki.server_tls(true)).await;

    let status = check(server.addr, &pki.client_tls(true))
        .await
        .expect("valid client certificate is accepted");
    assert_eq!(status, ServingStatus::Serving);

    let anonymous = check(server.addr, &pki.client_tls(false)).await;
    assert!(
        anonymous.is_err(),
        "client without a certificate must be refused, got {anonymous:?}"
    );

    let rogue = ClientTls {
        cert: Some(pki.rogue_client_cert.clone()),
        key: Some(pki.rogue_client_key.clone()),
        ..pki.client_tls(false)
    };
    let refused = check(server.addr, &rogue).await;
    assert!(
        refused.is_err(),
        "client signed by another CA must be refused, got {refused:?}"
    );

    // The server still serves valid clients after the refused handshakes.
    let again = check(server.addr, &pki.client_tls(true))
        .await
        .expect("valid client after refusals");
    assert_eq!(again, ServingStatus::Serving);
    server.stop().await;
}

#[tokio::test]
async fn plain_tls_needs_only_the_ca_and_checks_the_server_name() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = TestPki::generate(dir.path()).expect("test pki");
    let server = serve_health(&pki.server_tls(false)).await;

    // No domain override: the certificate's IP SAN 127.0.0.1 matches the URL host.
    let by_ip = ClientTls {
        domain: None,
        ..pki.client_tls(false)
    };
    assert_eq!(
        check(server.addr, &by_ip).await.expect("plain TLS by IP"),
        ServingStatus::Serving
    );
    assert_eq!(
        check(server.addr, &pki.client_tls(false))
            .await
            .expect("plain TLS as localhost"),
        ServingStatus::Serving
    );

    let wrong_name = ClientTls {
        domain: Some("not-the-server.example".to_owned()),
        ..pki.client_tls(false)
    };
    let refused = check(server.addr, &wrong_name).await;
    assert!(
        refused.is_err(),
        "a name outside the certificate must be refused, got {refused:?}"
    );

    // A client that trusts another CA refuses the server.
    let other_dir = tempfile::tempdir().expect("tmp");
    let other = TestPki::generate(other_dir.path()).expect("second pki");
    let untrusted = check(server.addr, &other.client_tls(false)).await;
    assert!(
        untrusted.is_err(),
        "a server signed by an untrusted CA must be refused, got {untrusted:?}"
    );
    server.stop().await;
}
