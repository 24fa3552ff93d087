//! Faults a GPU fleet has, end to end as a user meets them: three `mip serve worker` processes and a `mip serve
//! coordinator` process on the fixture model, and a 9-image batch through `mip submit`. After the first image one
//! busy worker is killed (SIGKILL) or frozen (SIGSTOP: alive, its connections open, silent), or the coordinator's
//! Redis is paused for 8 s. Every case: `mip submit` exits 0 with 9 images, each task done exactly once; a frozen
//! worker is given up on through the HTTP/2 keepalive of the worker channels and comes back once thawed; submissions
//! refused while Redis cannot persist them are retried by the client. Each case prints how long the batch took
//! after the fault.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use mip_tests::process::{fixture_setup, item, json_lines, mip, mip_cmd, pngs, summary, text, tmp, Served};
use mip_tests::RedisServer;
use serde_json::Value;

/// Upper bound of any wait (three model loads on a busy 2-core machine included).
const BOUND: Duration = Duration::from_secs(300);
/// The batch: 9 images of 64x64 in this many steps each.
const IMAGES: u64 = 9;
const STEPS: u32 = 8;

struct Cluster {
    dir: PathBuf,
    workers: Vec<Served>,
    coordinator: Served,
    url: String,
}

impl Cluster {
    /// Three workers and a coordinator that pings its workers every second; its job store is `redis` (a URL) or
    /// memory.
    fn start(name: &str, redis: Option<&str>) -> Self {
        let dir = tmp(name);
        let model = fixture_setup(&dir);
        let model = model.to_str().expect("utf-8");
        let workers: Vec<Served> = (0..3)
            .map(|_| Served::start(&["serve", "worker", "--listen", "127.0.0.1:0", "--model", model], &[]))
            .collect();
        let urls: Vec<String> = workers.iter().map(|w| w.url("http")).collect();
        let urls = urls.join(",");
        let mut envs = vec![
            ("MIP_COORDINATOR__HEALTH_INTERVAL_MS", "200"),
            ("MIP_COORDINATOR__WORKER_KEEPALIVE_INTERVAL_MS", "1000"),
            ("MIP_COORDINATOR__WORKER_KEEPALIVE_TIMEOUT_MS", "1000"),
        ];
        if let Some(url) = redis {
            envs.push(("MIP_REDIS__URL", url));
        }
        let coordinator = Served::start(
            &["serve", "coordinator", "--listen", "127.0.0.1:0", "--workers", &urls],
            &envs,
        );
        let url = coordinator.url("http");
        let c = Self {
            dir,
            workers,
            coordinator,
            url,
        };
        c.wait_healthy(3);
        c
    }

    /// `mip workers --coordinator URL --json`.
    fn workers(&self) -> Vec<Value> {
        let o = mip(&["workers", "--coordinator", &self.url, "--json"]);
        serde_json::from_slice::<Vec<Value>>(&o.stdout).unwrap_or_default()
    }

    fn wait_healthy(&self, n: usize) {
        let start = Instant::now();
        while self.workers().iter().filter(|w| w["healthy"] == true).count() < n {
            assert!(
                start.elapsed() < BOUND,
                "{n} workers not healthy in time: {:?}",
                self.workers()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The index of a worker that has a task in flight now.
    fn busy_worker(&self) -> usize {
        let start = Instant::now();
        loop {
            for w in self.workers() {
                if w["load"].as_u64().unwrap_or(0) > 0 {
                    let url = w["url"].as_str().unwrap_or_default().to_owned();
                    if let Some(i) = self.workers.iter().position(|s| s.url("http") == url) {
                        return i;
                    }
                }
            }
            assert!(start.elapsed() < BOUND, "no worker became busy");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `mip submit` of the 9-image manifest with `concurrency` jobs in flight, in the background.
    fn submit(&self, concurrency: u32) -> (Child, PathBuf) {
        let lines: Vec<String> = (0..IMAGES).map(|k| item(700 + k, STEPS, false)).collect();
        let manifest = self.dir.join("batch.jsonl");
        std::fs::write(&manifest, lines.join("\n") + "\n").expect("manifest");
        let out = self.dir.join("out");
        let child = mip_cmd()
            .args(["submit", manifest.to_str().expect("utf-8"), "--coordinator", &self.url])
            .args([
                "--out",
                out.to_str().expect("utf-8"),
                "--json",
                "--concurrency",
                &concurrency.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mip submit starts");
        (child, out)
    }

    /// SIGTERM to every process still running; each must exit cleanly.
    fn stop(self) {
        for w in self.workers {
            assert!(w.terminate().success(), "a worker exits cleanly on SIGTERM");
        }
        assert!(
            self.coordinator.terminate().success(),
            "the coordinator exits cleanly on SIGTERM"
        );
    }

    /// `mip jobs --all --json` → the jobs.
    fn jobs(&self) -> Vec<Value> {
        let o = mip(&["jobs", "--coordinator", &self.url, "--all", "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).expect("jobs json");
        v["jobs"].as_array().cloned().unwrap_or_default()
    }
}

/// Waits (bounded) until `out` holds a first image.
fn wait_first_image(out: &Path, submit: &mut Child) {
    let start = Instant::now();
    while pngs(out).is_empty() {
        assert!(start.elapsed() < BOUND, "no image appeared");
        assert!(
            submit.try_wait().expect("wait").is_none(),
            "submit ended before any image"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `mip submit` (bounded) and checks the batch: exit 0, 9 images with the 9 seeds, every job done with
/// one task done. Returns the time from `since`.
fn finish(c: &Cluster, submit: Child, out: &Path, since: Instant) -> Duration {
    let o = {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(submit.wait_with_output());
        });
        rx.recv_timeout(BOUND).expect("mip submit finishes").expect("output")
    };
    let took = since.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    let s = summary(&json_lines(&o));
    assert_eq!(
        (s["done"].clone(), s["failed"].clone()),
        (IMAGES.into(), 0.into()),
        "{s}"
    );
    let seeds: BTreeSet<u64> = pngs(out)
        .iter()
        .map(|p| {
            let side: Value = serde_json::from_slice(&std::fs::read(p.with_extension("json")).expect("sidecar"))
                .expect("sidecar json");
            side["seed"].as_u64().expect("seed")
        })
        .collect();
    assert_eq!(seeds, (700..700 + IMAGES).collect(), "each image exactly once");
    let jobs = c.jobs();
    assert_eq!(jobs.len(), IMAGES as usize);
    for j in &jobs {
        assert_eq!(
            (j["status"].as_str(), j["done_tasks"].as_u64()),
            (Some("done"), Some(1)),
            "{j}"
        );
    }
    took
}

#[test]
fn a_killed_worker_costs_no_image() {
    let mut c = Cluster::start("fault-kill", None);
    let (mut submit, out) = c.submit(9);
    wait_first_image(&out, &mut submit);
    let victim = c.busy_worker();
    c.workers[victim].signal("-KILL");
    let took = finish(&c, submit, &out, Instant::now());
    eprintln!("worker SIGKILL: the batch finished {took:?} after the kill");
    drop(c.workers.remove(victim));
    c.stop();
}

#[test]
fn a_frozen_worker_is_routed_around_and_rejoins_when_thawed() {
    let c = Cluster::start("fault-stop", None);
    let (mut submit, out) = c.submit(9);
    wait_first_image(&out, &mut submit);
    let victim = c.busy_worker();
    c.workers[victim].signal("-STOP");
    let frozen = Instant::now();
    let took = finish(&c, submit, &out, frozen);
    eprintln!("worker SIGSTOP: the batch finished {took:?} after the freeze");
    assert!(
        took < Duration::from_secs(60),
        "the batch took {took:?} after the freeze"
    );
    let healthy = c.workers().iter().filter(|w| w["healthy"] == true).count();
    assert_eq!(healthy, 2, "the frozen worker is out of rotation: {:?}", c.workers());
    c.workers[victim].signal("-CONT");
    c.wait_healthy(3);
    c.stop();
}

#[test]
fn a_redis_pause_of_8_seconds_is_ridden_out() {
    let redis = RedisServer::start();
    let c = Cluster::start("fault-redis-pause", Some(&redis.url()));
    // Three jobs in flight: the later items are submitted while Redis is paused.
    let (mut submit, out) = c.submit(3);
    wait_first_image(&out, &mut submit);
    redis.pause();
    let paused = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    redis.resume();
    let took = finish(&c, submit, &out, paused);
    eprintln!("redis paused 8 s: the batch finished {took:?} after the pause began");
    c.stop();
}
