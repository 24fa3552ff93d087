//! Faults a GPU fleet has, end to end as a user meets them: three `mip serve worker` processes and a `mip serve
//! coordinator` process on the fixture model, and a 9-image batch through `mip submit`. After the first image:
//!
//! - one busy worker is killed (SIGKILL), or frozen (SIGSTOP: alive, its connections open, silent) — it is given
//!   up on through the HTTP/2 keepalive of the worker channels and comes back once thawed;
//! - the coordinator is killed (SIGKILL) and started again on the same address — it resumes the jobs once their
//!   leases lapse, and `mip submit` re-attaches its watches;
//! - the coordinator's Redis is paused for 8 s, or restarted empty (no persistence) — running jobs keep going
//!   from memory and are written again in full, submissions refused meanwhile are retried by the client;
//! - a second coordinator replica shares the Redis and the first (the owner of every job) is frozen past its
//!   lease, then thawed — the second takes the jobs over with newer fencing tokens, and the stale owner, awake
//!   again, overwrites nothing.
//!
//! Every case: `mip submit` exits 0 with 9 images, each task done exactly once, every stored job DONE with one
//! task done. Each case prints how long the batch took after the fault.

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

/// A short lease, so that jobs of a dead or frozen coordinator are taken over within seconds.
const LEASE_MS: &str = "2000";

struct Cluster {
    dir: PathBuf,
    workers: Vec<Served>,
    coordinator: Served,
    url: String,
    /// The coordinator's command line and environment, to start it again or a second replica.
    coordinator_args: Vec<String>,
    coordinator_envs: Vec<(String, String)>,
}

impl Cluster {
    /// Three workers and a coordinator that pings its workers every second; its job store is `redis` (a URL) or
    /// memory.
    fn start(name: &str, redis: Option<&str>) -> Self {
        Self::start_with(name, redis, &[])
    }

    /// [`start`](Self::start) with more coordinator environment.
    fn start_with(name: &str, redis: Option<&str>, extra: &[(&str, &str)]) -> Self {
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
        envs.extend_from_slice(extra);
        let coordinator_args: Vec<String> = ["serve", "coordinator", "--workers", &urls]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        let coordinator_envs: Vec<(String, String)> =
            envs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let coordinator = serve_coordinator(&coordinator_args, &coordinator_envs, "127.0.0.1:0");
        let url = coordinator.url("http");
        let c = Self {
            dir,
            workers,
            coordinator,
            url,
            coordinator_args,
            coordinator_envs,
        };
        c.wait_healthy(3);
        c
    }

    /// Another coordinator process with this one's configuration, listening on `listen`.
    fn another_coordinator(&self, listen: &str) -> Served {
        serve_coordinator(&self.coordinator_args, &self.coordinator_envs, listen)
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

fn serve_coordinator(args: &[String], envs: &[(String, String)], listen: &str) -> Served {
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--listen", listen]);
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Served::start(&args, &envs)
}

/// The fencing token of every job in `redis` (1: claimed once, at submission).
fn fencing_tokens(redis: &RedisServer) -> Vec<u64> {
    let mut conn = redis::Client::open(redis.url())
        .expect("redis url")
        .get_connection()
        .expect("redis connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("mip:coord:fence:*")
        .query(&mut conn)
        .expect("KEYS");
    keys.iter()
        .map(|k| redis::cmd("GET").arg(k).query(&mut conn).expect("GET"))
        .collect()
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
    finish_checked(c, submit, out, since, true)
}

/// [`finish`]; with `all_stored` false, jobs that ended before the store lost its data may be missing from it
/// (each one listed must still be DONE with one task done).
fn finish_checked(c: &Cluster, submit: Child, out: &Path, since: Instant, all_stored: bool) -> Duration {
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
    if all_stored {
        assert_eq!(jobs.len(), IMAGES as usize);
    } else {
        assert!(jobs.len() <= IMAGES as usize, "{jobs:?}");
    }
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

#[test]
fn a_killed_coordinator_restarted_on_its_address_finishes_the_batch() {
    let redis = RedisServer::start();
    let mut c = Cluster::start_with(
        "fault-coord-kill",
        Some(&redis.url()),
        &[("MIP_COORDINATOR__LEASE_MS", LEASE_MS)],
    );
    let (mut submit, out) = c.submit(9);
    wait_first_image(&out, &mut submit);
    c.coordinator.kill();
    let killed = Instant::now();
    let addr = c.coordinator.addr.clone();
    let restarted = c.another_coordinator(&addr);
    drop(std::mem::replace(&mut c.coordinator, restarted));
    let took = finish(&c, submit, &out, killed);
    eprintln!("coordinator SIGKILL + restart: the batch finished {took:?} after the kill");
    c.stop();
}

#[test]
fn a_redis_restarted_empty_is_ridden_out() {
    let mut redis = RedisServer::start();
    let c = Cluster::start("fault-redis-empty", Some(&redis.url()));
    let (mut submit, out) = c.submit(3);
    wait_first_image(&out, &mut submit);
    redis.restart();
    let restarted = Instant::now();
    let took = finish_checked(&c, submit, &out, restarted, false);
    eprintln!("redis restarted empty: the batch finished {took:?} after the restart");
    c.stop();
}

#[test]
fn a_frozen_owner_replica_is_taken_over_and_overwrites_nothing_when_thawed() {
    let redis = RedisServer::start();
    let c = Cluster::start_with(
        "fault-stale-owner",
        Some(&redis.url()),
        &[("MIP_COORDINATOR__LEASE_MS", LEASE_MS)],
    );
    let second = c.another_coordinator("127.0.0.1:0");
    let (mut submit, out) = c.submit(9);
    wait_first_image(&out, &mut submit);
    c.coordinator.signal("-STOP");
    let frozen = Instant::now();
    // Three leases: the second replica claims every unfinished job and runs it.
    std::thread::sleep(Duration::from_secs(6));
    c.coordinator.signal("-CONT");
    let took = finish(&c, submit, &out, frozen);
    eprintln!(
        "owner replica frozen 6 s (lease {LEASE_MS} ms) and thawed: the batch finished {took:?} after the freeze"
    );
    let tokens = fencing_tokens(&redis);
    assert_eq!(tokens.len(), IMAGES as usize, "{tokens:?}");
    let taken_over = tokens.iter().filter(|t| **t >= 2).count();
    assert!(taken_over > 0, "the second replica took jobs over: {tokens:?}");
    eprintln!("{taken_over} of {IMAGES} jobs were claimed again by the second replica");
    assert!(second.terminate().success(), "the second replica exits cleanly");
    c.stop();
}
