//! Redis over TLS (`rediss://`, as every managed Redis serves it) for both services, against a real `redis-server`
//! with a `tls-port` and a certificate from a throwaway CA: the coordinator keeps its job there and the worker its
//! subject embeddings, and a server whose certificate the client does not trust is refused.

use std::time::Duration;

use mip_common::tls::testing::TestPki;
use mip_coordinator::store::RedisStore;
use mip_proto::v1::JobStatus;
use mip_tests::*;

/// A redis-server serving TLS with a certificate of a fresh test CA; the folder holding the PKI, the PKI, the
/// server and its `rediss://` URL.
fn tls_redis() -> (tempfile::TempDir, TestPki, RedisServer, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = TestPki::generate(dir.path()).expect("pki");
    let redis = RedisServer::start_tls(&pki.server_cert, &pki.server_key);
    let tls_url = redis.tls_url().expect("tls url");
    (dir, pki, redis, tls_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_and_worker_keep_their_state_in_a_tls_redis() {
    let (_dir, pki, redis, tls_url) = tls_redis();
    let ca = path_str(&pki.ca_cert);

    let ws = workers_with(1, |c| {
        c.redis.url = tls_url.clone();
        c.redis.ca = ca.clone();
    })
    .await;
    let cfg = config(vec![url(&ws[0], "http")], None, |c| {
        c.redis.url = tls_url.clone();
        c.redis.ca = ca.clone();
    });
    let mut coord = Coord::run(cfg, None, None).await;
    wait_healthy(&mut coord.client, 1).await;

    let job = submit(&mut coord.client, mip_tests::job(2, 1, "")).await;
    let (_, done) = watch_all(&mut coord.client, &job.job_id).await;
    assert_eq!(done.status, JobStatus::Done as i32, "{done:?}");

    // Read back over the plain port: only the TLS port was given to the services, so what is there came over TLS.
    assert_eq!(stored_results(&redis, &job.job_id).await, vec![0]);
    let mut conn = redis_conn(&redis).await;
    let subjects: Vec<String> = redis::cmd("KEYS")
        .arg("mip:subject:*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(!subjects.is_empty(), "the worker cached the subject in Redis");
    stop_all(coord, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_or_a_ca_with_a_plain_url_is_refused() {
    let (_dir, pki, redis, tls_url) = tls_redis();
    let ttl = Duration::from_secs(60);

    // The system's trust roots do not include the test CA.
    let e = RedisStore::connect(&tls_url, None, ttl)
        .await
        .err()
        .expect("an unknown issuer is refused")
        .to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // With the CA the same URL works.
    assert!(RedisStore::connect(&tls_url, Some(&pki.ca_cert), ttl).await.is_ok());

    // A CA beside a plain URL is a configuration error naming the field.
    let cfg = config(vec!["http://127.0.0.1:1".to_owned()], None, |c| {
        c.redis.url = redis.url();
        c.redis.ca = path_str(&pki.ca_cert);
    });
    let e = cfg.validate().expect_err("plain url with a CA").to_string();
    assert!(e.contains("redis.ca") && e.contains("rediss://"), "{e}");
}
