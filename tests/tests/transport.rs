//! The coordinator's transport and security against real in-process workers (fixture model) over real gRPC on
//! loopback: TLS on the public API, mutual TLS towards the workers, bearer tokens, message size limits, workers
//! from DNS, health rotation and subject affinity. Job state stays in memory (no Redis needed).

use std::collections::BTreeSet;
use std::time::Duration;

use mip_common::tls::testing::TestPki;
use mip_coordinator::config::CoordinatorConfig;
use mip_proto::v1::{JobStatus, ListJobsRequest, SubmitJobRequest};
use mip_tests::*;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A memory-only coordinator configuration over `urls`, after `edit`.
fn memory(urls: Vec<String>, edit: impl FnOnce(&mut CoordinatorConfig)) -> CoordinatorConfig {
    config(urls, None, edit)
}

/// Whether a connection with `tls` to `addr` gets nowhere: it fails, or its first call does (bounded).
async fn refused(addr: std::net::SocketAddr, tls: Option<tonic::transport::ClientTlsConfig>) -> bool {
    tokio::time::timeout(BOUND, async {
        match connect(addr, tls, None).await {
            Err(_) => true,
            Ok(mut c) => c.list_jobs(ListJobsRequest::default()).await.is_err(),
        }
    })
    .await
    .expect("connection attempt ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_on_the_api_and_mutual_tls_to_workers() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = TestPki::generate(dir.path()).expect("pki");
    let worker = TestWorker::start(|c| {
        no_drain(c);
        c.server.tls.cert = path_str(&pki.server_cert);
        c.server.tls.key = path_str(&pki.server_key);
        c.server.tls.client_ca = path_str(&pki.ca_cert);
    })
    .await;
    let worker_url = url(&worker, "https");
    let cfg = memory(vec![worker_url.clone()], |c| {
        c.server.tls.cert = path_str(&pki.server_cert);
        c.server.tls.key = path_str(&pki.server_key);
        c.worker_tls.ca = path_str(&pki.ca_cert);
        c.worker_tls.cert = path_str(&pki.client_cert);
        c.worker_tls.key = path_str(&pki.client_key);
        c.worker_tls.domain = "localhost".into();
    });
    let tls = pki.client_tls(false).client_config().expect("client tls");
    let coordinator = Coord::run(cfg, Some(tls), None).await;
    let mut client = coordinator.client.clone();
    wait_workers(&mut client, "healthy over mTLS", |w| w.len() == 1 && w[0].healthy).await;
    let images = client
        .generate(request(2, cat()))
        .await
        .expect("generate over TLS")
        .into_inner();
    assert_eq!(images.images.len(), 1);
    assert_eq!(images.images[0].worker, worker_url);

    // A plaintext client gets nowhere.
    assert!(
        refused(coordinator.addr, None).await,
        "a plaintext client must fail against server.tls"
    );

    // Without a client certificate the worker refuses the coordinator: unhealthy, and no task runs.
    let cfg = memory(vec![worker_url.clone()], |c| {
        c.worker_tls.ca = path_str(&pki.ca_cert);
        c.worker_tls.domain = "localhost".into();
    });
    let no_identity = Coord::run(cfg, None, None).await;
    let mut plain_client = no_identity.client.clone();
    let w = wait_workers(&mut plain_client, "polled and refused", |w| !w[0].last_error.is_empty()).await;
    assert!(!w[0].healthy, "{w:?}");
    let (status, imgs) = run_job(&mut plain_client, cat(), 1, 300).await;
    assert_eq!(status, JobStatus::Failed as i32);
    assert!(imgs.is_empty());
    no_identity.stop().await;
    coordinator.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_tokens_and_message_limits() {
    let dir = tempfile::tempdir().expect("tmp");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# clients\nfirst-token\n\nsecond-token\n").expect("tokens");
    let metrics = free_addr();
    let worker = TestWorker::start(no_drain).await;
    let cfg = memory(vec![url(&worker, "http")], |c| {
        c.auth.tokens_file = path_str(&tokens);
        c.server.max_message_bytes = 1 << 20;
        c.telemetry.metrics_listen = metrics.to_string();
    });
    let coordinator = Coord::run(cfg, None, Some("second-token")).await;
    let mut valid = coordinator.client.clone();
    wait_healthy(&mut valid, 1).await;

    let job = || SubmitJobRequest {
        requests: vec![request(2, cat())],
        samples: 1,
        ..Default::default()
    };
    for token in [None, Some("wrong-token"), Some("first-token ")] {
        let mut c = coordinator.connect(None, token).await;
        let r = c.submit_job(job()).await;
        if token == Some("first-token ") {
            // Surrounding blanks are trimmed like the file's lines.
            let j = r.expect("trimmed token accepted").into_inner();
            c.cancel_job(mip_proto::v1::CancelJobRequest { job_id: j.job_id })
                .await
                .expect("cancel");
            continue;
        }
        let e = r.expect_err("refused");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert_eq!(mip_common::errors::reason_of(&e).as_deref(), Some("unauthenticated"));
        let e = c.list_jobs(ListJobsRequest::default()).await.expect_err("refused");
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let listed = valid
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs.len(), 1, "refused calls created no job: {listed:?}");

    // Health stays open for probes.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", coordinator.addr))
        .expect("url")
        .connect()
        .await
        .expect("channel");
    let h = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "mip.v1.Coordinator".into(),
        })
        .await
        .expect("health without a token");
    assert_eq!(h.into_inner().status, 1, "SERVING");

    // Over server.max_message_bytes: refused cleanly, and the server keeps serving.
    let mut big = job();
    big.requests[0].subjects = vec![subject("cat", vec![vec![7u8; 2 << 20]])];
    let e = valid.submit_job(big).await.expect_err("too large");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let ok = valid
        .generate(request(2, cat()))
        .await
        .expect("a normal call after")
        .into_inner();
    assert_eq!(ok.images.len(), 1);
    let listed = valid
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs.len(), 2, "the oversized job was not created");

    let text = http_get(metrics, "/metrics").await;
    assert!(
        text.contains("mip_coord_rejected_total{reason=\"unauthenticated\"} 4"),
        "{text}"
    );
    assert!(text.contains("mip_coord_workers{state=\"healthy\"} 1"), "{text}");
    // The request layer counts every call by method and code, refusals before any handler included.
    let line = |code: &str, method: &str| {
        format!("{{code=\"{code}\",grpc_service=\"mip.v1.Coordinator\",method=\"{method}\"}}")
    };
    assert!(
        text.contains(&format!("mip_grpc_requests_total{} 1", line("OutOfRange", "SubmitJob"))),
        "{text}"
    );
    assert!(text.contains(&line("Unauthenticated", "SubmitJob")), "{text}");
    assert!(
        text.contains(&format!(
            "mip_grpc_request_duration_seconds_count{}",
            line("Ok", "Generate")
        )),
        "{text}"
    );
    coordinator.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_from_dns_leave_and_rejoin_rotation() {
    let a_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a_addr = a_listener.local_addr().expect("addr");
    let a = TestWorker::start_on(a_listener, no_drain, None);
    let b = TestWorker::start(no_drain).await;
    let (a_url, b_url) = (url(&a, "http"), url(&b, "http"));
    let cfg = memory(vec![b_url.clone()], |c| {
        c.coordinator.workers_dns = format!("localhost:{}", a_addr.port());
        c.coordinator.dns_interval_ms = 200;
        c.coordinator.worker_concurrency = 1;
    });
    let coordinator = Coord::run(cfg, None, None).await;
    let mut client = coordinator.client.clone();
    let healthy = |w: &[mip_proto::v1::WorkerStatus], url: &str| w.iter().any(|w| w.url == url && w.healthy);
    wait_workers(&mut client, "a (from DNS) and b healthy", |w| {
        healthy(w, &a_url) && healthy(w, &b_url)
    })
    .await;

    // A stopped worker leaves rotation: unhealthy, and no task goes there.
    a.stop().await;
    wait_workers(&mut client, "a unhealthy", |w| {
        w.iter().any(|w| w.url == a_url && !w.healthy)
    })
    .await;
    let (status, used) = run_job(&mut client, cat(), 3, 0).await;
    assert_eq!(status, JobStatus::Done as i32);
    assert_eq!(used, vec![b_url.clone(); 3]);

    // A worker on the same port comes back into rotation and takes tasks.
    let listener = tokio::time::timeout(BOUND, async {
        loop {
            if let Ok(l) = tokio::net::TcpListener::bind(a_addr).await {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("port free again");
    let a2 = TestWorker::start_on(listener, no_drain, None);
    wait_workers(&mut client, "a healthy again", |w| healthy(w, &a_url)).await;
    let (status, used) = run_job(&mut client, cat(), 4, 0).await;
    assert_eq!(status, JobStatus::Done as i32);
    let used: BTreeSet<String> = used.into_iter().collect();
    assert!(used.contains(&a_url), "the returning worker is used: {used:?}");
    coordinator.stop().await;
    a2.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_subjects_land_hot() {
    let metrics = free_addr();
    let ws = [TestWorker::start(no_drain).await, TestWorker::start(no_drain).await];
    let cfg = memory(ws.iter().map(|w| url(w, "http")).collect(), |c| {
        c.telemetry.metrics_listen = metrics.to_string();
    });
    let coordinator = Coord::run(cfg, None, None).await;
    let mut client = coordinator.client.clone();
    wait_healthy(&mut client, 2).await;
    let jacket = || vec![subject("jacket", vec![image("jacket_0.png")])];
    let (status, first) = run_job(&mut client, jacket(), 1, 0).await;
    assert_eq!(status, JobStatus::Done as i32);
    let text = http_get(metrics, "/metrics").await;
    assert!(text.contains("mip_coord_affinity_total{outcome=\"cold\"} 1"), "{text}");
    assert!(!text.contains("outcome=\"hot\""), "{text}");

    let (status, second) = run_job(&mut client, jacket(), 1, 0).await;
    assert_eq!(status, JobStatus::Done as i32);
    assert_eq!(first, second);
    let text = http_get(metrics, "/metrics").await;
    assert!(text.contains("mip_coord_affinity_total{outcome=\"hot\"} 1"), "{text}");
    let workers = wait_workers(&mut client, "listed", |_| true).await;
    let warm: Vec<(String, u32)> = workers.into_iter().map(|w| (w.url, w.warm_subjects)).collect();
    for (url, n) in &warm {
        assert_eq!(*n, u32::from(*url == first[0]), "{warm:?}");
    }
    coordinator.stop().await;
    for w in ws {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_the_api_serves_only_clients_with_a_ca_signed_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = TestPki::generate(dir.path()).expect("pki");
    // No worker is needed to list jobs; nothing listens at this one.
    let cfg = memory(vec![format!("http://{}", free_addr())], |c| {
        c.server.tls.cert = path_str(&pki.server_cert);
        c.server.tls.key = path_str(&pki.server_key);
        c.server.tls.client_ca = path_str(&pki.ca_cert);
    });
    let with_identity = pki.client_tls(true).client_config().expect("client tls");
    let coordinator = Coord::run(cfg, Some(with_identity), None).await;
    let mut client = coordinator.client.clone();
    let listed = client
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("a client with a CA-signed certificate is served")
        .into_inner();
    assert!(listed.jobs.is_empty(), "{listed:?}");
    let mut one = job(2, 1, "");
    one.deadline_ms = 200;
    let j = client.submit_job(one).await.expect("submit over mTLS").into_inner();
    assert_eq!(j.total_tasks, 1);

    let without = pki.client_tls(false).client_config().expect("client tls");
    assert!(
        refused(coordinator.addr, Some(without)).await,
        "a client without a certificate must be refused under server.tls.client_ca"
    );
    let rogue = mip_common::tls::ClientTls {
        cert: Some(pki.rogue_client_cert.clone()),
        key: Some(pki.rogue_client_key.clone()),
        ..pki.client_tls(false)
    };
    let rogue = rogue.client_config().expect("rogue tls");
    assert!(
        refused(coordinator.addr, Some(rogue)).await,
        "a certificate from another CA must be refused"
    );
    assert!(refused(coordinator.addr, None).await, "plaintext is refused too");
    // The refusals did not disturb the server: the authenticated client still gets answers.
    let listed = client
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("still served");
    assert_eq!(listed.into_inner().jobs.len(), 1);
    coordinator.stop().await;
}
