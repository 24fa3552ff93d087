//! `mip serve worker` as a user runs it: two worker processes sharing a real Redis. A subject encoded by the first
//! is a Redis hit for the second, whose image encoder never runs — as `mip workers --json` shows. SIGTERM drains
//! and exits cleanly.

use std::time::{Duration, Instant};

use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{CacheTier, EncodeSubjectsRequest, Subject};
use mip_tests::process::{mip, tmp, Served};
use mip_tests::RedisServer;

/// `mip serve worker` in a child process.
struct ServedWorker {
    served: Served,
    url: String,
}

impl ServedWorker {
    /// Starts `mip serve worker` on port 0 over the model bundle in `bundle`, sharing `redis`.
    fn start(bundle: &std::path::Path, redis: &str) -> Self {
        let bundle = bundle.to_str().expect("utf-8");
        let args = [
            "serve",
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--redis",
            redis,
            "--model",
            bundle,
        ];
        let served = Served::start(&args, &[]);
        Self {
            url: served.url("http"),
            served,
        }
    }

    /// `mip workers --workers URL --json`, parsed.
    fn workers_json(&self) -> serde_json::Value {
        let out = mip(&["workers", "--workers", &self.url, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            if self.workers_json()[0]["ready"] == true {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("worker {} not ready in time", self.url);
    }

    /// SIGTERM, then the exit status (bounded wait).
    fn terminate(self) -> std::process::ExitStatus {
        self.served.terminate()
    }
}

fn encode(url: &str, rt: &tokio::runtime::Runtime) -> (String, CacheTier) {
    rt.block_on(async {
        let mut c = WorkerClient::connect(url.to_owned()).await.expect("connect");
        let img = mip_tests::image("cat_0.png");
        let s = Subject {
            name: "cat".into(),
            images: vec![img],
            subject_key: String::new(),
        };
        let r = c
            .encode_subjects(EncodeSubjectsRequest {
                subjects: vec![s],
                score: false,
            })
            .await
            .expect("encode")
            .into_inner();
        let e = &r.subjects[0];
        (e.subject_key.clone(), e.tier())
    })
}

#[test]
fn second_worker_process_shows_zero_encoder_calls() {
    let dir = tmp("serve-workers");
    mip_worker::testing::fixture_bundle(&dir);
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    let a = ServedWorker::start(&dir, &redis.url());
    a.wait_ready();
    let (key_a, tier_a) = encode(&a.url, &rt);
    assert_eq!(tier_a, CacheTier::Miss);
    assert_eq!(a.workers_json()[0]["counters"]["image_encoder_calls"], 1);

    let b = ServedWorker::start(&dir, &redis.url());
    b.wait_ready();
    let (key_b, tier_b) = encode(&b.url, &rt);
    assert_eq!(key_b, key_a);
    assert_eq!(tier_b, CacheTier::Redis);
    let info = b.workers_json();
    assert_eq!(info[0]["counters"]["image_encoder_calls"], 0, "{info}");
    assert_eq!(info[0]["counters"]["subject_hits_redis"], 1, "{info}");

    assert!(a.terminate().success(), "SIGTERM drains and exits 0");
    assert!(b.terminate().success(), "SIGTERM drains and exits 0");
}
