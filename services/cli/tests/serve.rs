//! `mip serve worker` as a user runs it: two worker processes sharing a real Redis. A subject encoded by the first
//! is a Redis hit for the second, whose image encoder never runs — as `mip workers --json` shows. SIGTERM drains
//! and exits cleanly.

#[allow(dead_code)]
#[path = "../../worker/tests/support/redis.rs"]
mod redis_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{CacheTier, EncodeSubjectsRequest, Subject};
use redis_support::RedisServer;

struct ServedWorker {
    child: Child,
    url: String,
}

impl ServedWorker {
    /// Starts `mip serve worker` on port 0 and reads the address it prints.
    fn start(bundle: &std::path::Path, redis: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mip"))
            .args(["serve", "worker", "--listen", "127.0.0.1:0", "--redis", redis])
            .arg("--model")
            .arg(bundle)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mip serve worker starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("first line");
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Self {
            child,
            url: format!("http://{addr}"),
        }
    }

    /// `mip workers --workers URL --json`, parsed.
    fn workers_json(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_mip"))
            .args(["workers", "--workers", &self.url, "--json"])
            .output()
            .expect("mip workers runs");
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
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("worker did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn encode(url: &str, rt: &tokio::runtime::Runtime) -> (String, CacheTier) {
    rt.block_on(async {
        let mut c = WorkerClient::connect(url.to_owned()).await.expect("connect");
        let img = std::fs::read(
            mip_worker::parity::fixtures_dir()
                .expect("fixtures")
                .join("cases/sdxl_two_objects/refs/cat_0.png"),
        )
        .expect("image");
        let s = Subject {
            name: "cat".into(),
            images: vec![img],
            subject_key: String::new(),
        };
        let r = c
            .encode_subjects(EncodeSubjectsRequest { subjects: vec![s] })
            .await
            .expect("encode")
            .into_inner();
        let e = &r.subjects[0];
        (e.subject_key.clone(), e.tier())
    })
}

#[test]
fn second_worker_process_shows_zero_encoder_calls() {
    let fixtures = mip_worker::parity::fixtures_dir().unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!("mip-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let manifest = serde_json::json!({
        "base": fixtures.join("sdxl"), "image_encoder": fixtures.join("image_encoder"),
        "adapter": fixtures.join("adapter/mip_sdxl_2obj.safetensors"), "default_size": [64, 64],
    });
    std::fs::write(dir.join("mip.json"), manifest.to_string()).expect("manifest");
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
