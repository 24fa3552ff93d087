//! The coordinator's transport and security against real in-process workers (fixture model) over real gRPC on
//! loopback: TLS on the public API, mutual TLS towards the workers, bearer tokens, message size limits, workers
//! from DNS, health rotation and subject affinity. Job state stays in memory (no Redis needed).

#[path = "support/coord.rs"]
#[allow(dead_code)]
mod coord;
#[path = "../../worker/tests/support/worker.rs"]
#[allow(dead_code)]
mod worker_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use coord::{cat, connect, http_get, request, wait_workers, Client, Coord, Worker};
use mip_common::tls::testing::TestPki;
use mip_proto::v1::job_event::Event;
use mip_proto::v1::{JobStatus, ListJobsRequest, Subject, SubmitJobRequest, WatchJobRequest};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use worker_support::{image, subject, BOUND};

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// A loopback address nothing listens on right now.
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Submits `samples` images of `subjects`, waits (bounded) for the end; returns the final status and the workers of
/// the images.
async fn run_job(c: &mut Client, subjects: Vec<Subject>, samples: u32, deadline_ms: u64) -> (i32, Vec<String>) {
    let req = SubmitJobRequest {
        requests: vec![request(subjects)],
        samples,
        deadline_ms,
        ..Default::default()
    };
    let job = c.submit_job(req).await.expect("submit").into_inner();
    let watch = WatchJobRequest { job_id: job.job_id };
    let mut stream = c.watch_job(watch).await.expect("watch").into_inner();
    let mut workers = Vec::new();
    loop {
        let e = tokio::time::timeout(BOUND, stream.message())
            .await
            .expect("event in time")
            .expect("stream ok")
            .expect("stream ends only after Done");
        match e.event {
            Some(Event::Image(i)) => workers.push(i.worker),
            Some(Event::Done(d)) => return (d.job.expect("job").status, workers),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_on_the_api_and_mutual_tls_to_workers() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = TestPki::generate(dir.path()).expect("pki");
    let worker = Worker::start(|c| {
        c.server.tls.cert = s(&pki.server_cert);
        c.server.tls.key = s(&pki.server_key);
        c.server.tls.client_ca = s(&pki.ca_cert);
    })
    .await;
    let worker_url = worker.url("https");
    let coordinator = Coord::start(|c| {
        c.coordinator.workers = vec![worker_url.clone()];
        c.server.tls.cert = s(&pki.server_cert);
        c.server.tls.key = s(&pki.server_key);
        c.worker_tls.ca = s(&pki.ca_cert);
        c.worker_tls.cert = s(&pki.client_cert);
        c.worker_tls.key = s(&pki.client_key);
        c.worker_tls.domain = "localhost".into();
    })
    .await;
    let tls = pki.client_tls(false).client_config().expect("client tls");
    let mut client = coordinator.client(Some(tls), None).await;
    wait_workers(&mut client, "healthy over mTLS", |w| w.len() == 1 && w[0].healthy).await;
    let images = client
        .generate(request(cat()))
        .await
        .expect("generate over TLS")
        .into_inner();
    assert_eq!(images.images.len(), 1);
    assert_eq!(images.images[0].worker, worker_url);

    // A plaintext client gets nowhere.
    let plain = tokio::time::timeout(BOUND, async {
        match connect(coordinator.addr, None, None).await {
            Err(_) => true,
            Ok(mut c) => c.list_jobs(ListJobsRequest::default()).await.is_err(),
        }
    })
    .await
    .expect("plaintext attempt ends");
    assert!(plain, "a plaintext client must fail against server.tls");

    // Without a client certificate the worker refuses the coordinator: unhealthy, and no task runs.
    let no_identity = Coord::start(|c| {
        c.coordinator.workers = vec![worker_url.clone()];
        c.worker_tls.ca = s(&pki.ca_cert);
        c.worker_tls.domain = "localhost".into();
    })
    .await;
    let mut plain_client = no_identity.client(None, None).await;
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
    let worker = Worker::start(|_| {}).await;
    let coordinator = Coord::start(|c| {
        c.coordinator.workers = vec![worker.url("http")];
        c.auth.tokens_file = s(&tokens);
        c.server.max_message_bytes = 1 << 20;
        c.telemetry.metrics_listen = metrics.to_string();
    })
    .await;
    let mut valid = coordinator.client(None, Some("second-token")).await;
    wait_workers(&mut valid, "healthy", |w| w.len() == 1 && w[0].healthy).await;

    let job = || SubmitJobRequest {
        requests: vec![request(cat())],
        samples: 1,
        ..Default::default()
    };
    for token in [None, Some("wrong-token"), Some("first-token ")] {
        let mut c = coordinator.client(None, token).await;
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
        .generate(request(cat()))
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
    coordinator.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_from_dns_leave_and_rejoin_rotation() {
    let a_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a_addr = a_listener.local_addr().expect("addr");
    let a = Worker::start_on(a_listener, |_| {});
    let b = Worker::start(|_| {}).await;
    let (a_url, b_url) = (a.url("http"), b.url("http"));
    let coordinator = Coord::start(|c| {
        c.coordinator.workers = vec![b_url.clone()];
        c.coordinator.workers_dns = format!("localhost:{}", a_addr.port());
        c.coordinator.dns_interval_ms = 200;
        c.coordinator.worker_concurrency = 1;
    })
    .await;
    let mut client = coordinator.client(None, None).await;
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
    let a2 = Worker::start_on(listener, |_| {});
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
    let ws = [Worker::start(|_| {}).await, Worker::start(|_| {}).await];
    let coordinator = Coord::start(|c| {
        c.coordinator.workers = ws.iter().map(|w| w.url("http")).collect();
        c.telemetry.metrics_listen = metrics.to_string();
    })
    .await;
    let mut client = coordinator.client(None, None).await;
    wait_workers(&mut client, "both healthy", |w| {
        w.iter().filter(|w| w.healthy).count() == 2
    })
    .await;
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
