//! The cluster commands as a user runs them: `mip serve all` (a child process: coordinator + 2 workers on the
//! fixture model), then `mip submit` on JSONL and YAML manifests (all images, a summary, bad lines reported with
//! their numbers, an interrupted run resumed without duplicate jobs), `mip generate --coordinator`, `mip workers
//! --coordinator`, `mip jobs`, `mip watch` and `mip cancel`; SIGTERM stops the server cleanly.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mip_tests::process::{fixture_setup, item, json_lines, mip, mip_cmd, pngs, summary, text, tmp, Served};
use serde_json::Value;

/// Upper bound of any wait (model load on a slow, busy machine included).
const BOUND: Duration = Duration::from_secs(300);

/// `mip serve all` in a child process.
struct ServeAll {
    served: Served,
    url: String,
}

impl ServeAll {
    fn start(model: &Path, workers: usize) -> Self {
        let model = model.to_str().expect("utf-8");
        let n = workers.to_string();
        let args = [
            "serve",
            "all",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &n,
            "--model",
            model,
        ];
        let served = Served::start(&args, &[]);
        let s = Self {
            url: served.url("http"),
            served,
        };
        s.wait_healthy(workers);
        s
    }

    /// `mip workers --coordinator URL --json`.
    fn workers(&self) -> Vec<Value> {
        let o = mip(&["workers", "--coordinator", &self.url, "--json"]);
        serde_json::from_slice::<Vec<Value>>(&o.stdout).unwrap_or_default()
    }

    fn wait_healthy(&self, n: usize) {
        let start = Instant::now();
        while start.elapsed() < BOUND {
            if self.workers().iter().filter(|w| w["healthy"] == true).count() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{n} workers not healthy in time");
    }

    /// `mip jobs --all --json` → the jobs.
    fn jobs(&self) -> Vec<Value> {
        let o = mip(&[
            "jobs",
            "--coordinator",
            &self.url,
            "--all",
            "--page-size",
            "2",
            "--json",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).expect("jobs json");
        v["jobs"].as_array().cloned().unwrap_or_default()
    }

    /// SIGTERM, then the exit status (bounded wait).
    fn terminate(self) -> std::process::ExitStatus {
        self.served.terminate()
    }
}

#[test]
fn submit_writes_every_image_and_the_other_commands_see_the_jobs() {
    let dir = tmp("submit");
    let model = fixture_setup(&dir);
    let server = ServeAll::start(&model, 2);
    let lines: Vec<String> = (0..6).map(|k| item(100 + k, 2, k % 2 == 0)).collect();
    std::fs::write(dir.join("jobs.jsonl"), lines.join("\n") + "\n").expect("manifest");
    let out = dir.join("out");
    let manifest = dir.join("jobs.jsonl");
    let o = mip(&[
        "submit",
        manifest.to_str().expect("utf-8"),
        "--coordinator",
        &server.url,
        "--out",
        out.to_str().expect("utf-8"),
        "--concurrency",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let events = json_lines(&o);
    let s = summary(&events);
    assert_eq!(
        (s["items"].clone(), s["done"].clone(), s["failed"].clone()),
        (6.into(), 6.into(), 0.into())
    );
    assert_eq!(pngs(&out).len(), 6, "{}", text(&o));
    for png in pngs(&out) {
        let bytes = std::fs::read(&png).expect("png");
        let params = mip_worker::pipeline::png::decode_png_text(&bytes).expect("text chunks");
        let sidecar: Value =
            serde_json::from_slice(&std::fs::read(png.with_extension("json")).expect("sidecar")).expect("sidecar json");
        let seed = params.iter().find(|(k, _)| k == "seed").map(|(_, v)| v.clone());
        assert_eq!(Some(sidecar["seed"].to_string()), seed);
        assert_eq!(sidecar["steps"], 2);
        assert_eq!(sidecar["subjects"][0]["name"], "cat");
    }
    // `mip eval` scores the submitted outputs: their reference images are relative to the manifest, and it runs
    // from another folder here.
    let eval_models = mip_worker::testing::eval_fixtures_dir();
    let o = mip_cmd()
        .current_dir(std::env::temp_dir())
        .args(["eval", out.to_str().expect("utf-8"), "--json", "--clip"])
        .arg(eval_models.join("clip"))
        .arg("--dino")
        .arg(eval_models.join("dino"))
        .output()
        .expect("mip eval runs");
    assert!(o.status.success(), "{}", text(&o));
    let scored: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(scored["aggregate"]["images"], 6, "{scored}");

    // The coordinator's view: 6 jobs done, both workers with counters.
    let jobs = server.jobs();
    assert_eq!(jobs.len(), 6);
    assert!(jobs.iter().all(|j| j["status"] == "done"), "{jobs:?}");
    // The coordinator refreshes each worker's Info (and counters) on its health poll.
    let start = Instant::now();
    loop {
        let workers = server.workers();
        assert_eq!(workers.len(), 2);
        let generated: u64 = workers
            .iter()
            .map(|w| w["counters"]["generations"].as_u64().expect("counters"))
            .sum();
        if generated == 6 {
            break;
        }
        assert!(generated < 6 && start.elapsed() < BOUND, "{workers:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // watch and cancel on a finished job; generate through the coordinator.
    let id = jobs[0]["job_id"].as_str().expect("id");
    let o = mip(&["watch", id, "--coordinator", &server.url, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json_lines(&o).last().expect("final")["job"]["status"], "done");
    let o = mip(&["cancel", id, "--coordinator", &server.url, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let gen_out = dir.join("gen");
    let cat = dir.join("cat_0.png");
    let o = mip(&[
        "generate",
        "--coordinator",
        &server.url,
        "--prompt",
        "a cat",
        "--subject",
        &format!("cat={}", cat.display()),
        "--steps",
        "2",
        "--seed",
        "7",
        "--samples",
        "2",
        "--out",
        gen_out.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        gen_out.join("mip-7-0.png").is_file() && gen_out.join("mip-8-1.json").is_file(),
        "{}",
        text(&o)
    );
    assert!(server.terminate().success(), "SIGTERM stops serve all cleanly");
}

#[test]
fn an_interrupted_submit_resumes_without_duplicate_jobs() {
    let dir = tmp("resume");
    let model = fixture_setup(&dir);
    let server = ServeAll::start(&model, 2);
    let lines: Vec<String> = (0..6).map(|k| item(200 + k, 6, false)).collect();
    let manifest = dir.join("jobs.jsonl");
    std::fs::write(&manifest, lines.join("\n")).expect("manifest");
    let out = dir.join("out");
    let args = [
        "submit",
        manifest.to_str().expect("utf-8"),
        "--coordinator",
        &server.url,
        "--out",
        out.to_str().expect("utf-8"),
        "--concurrency",
        "2",
        "--json",
    ];
    let mut first = mip_cmd()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("submit starts");
    let start = Instant::now();
    while pngs(&out).is_empty() {
        assert!(start.elapsed() < BOUND, "no output appeared");
        assert!(
            first.try_wait().expect("wait").is_none(),
            "submit ended before any output"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().expect("kill submit");
    let _ = first.wait();
    let done_before = pngs(&out).len();
    assert!(done_before < 6, "the first run was not interrupted early enough");

    let o = mip(&args);
    assert!(o.status.success(), "{}", text(&o));
    let events = json_lines(&o);
    let s = summary(&events);
    assert_eq!(s["failed"], 0, "{events:?}");
    assert!(s["skipped"].as_u64().expect("skipped") >= 1, "{events:?}");
    assert_eq!(
        s["done"].as_u64().expect("done") + s["skipped"].as_u64().expect("skipped"),
        6
    );
    assert_eq!(pngs(&out).len(), 6);
    assert_eq!(server.jobs().len(), 6, "re-attached, not resubmitted");

    // A third run has nothing left to do.
    let o = mip(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(summary(&json_lines(&o))["skipped"], 6);
    assert!(server.terminate().success());
}

#[test]
fn bad_lines_are_reported_with_their_numbers_and_the_rest_still_run() {
    let dir = tmp("bad");
    let model = fixture_setup(&dir);
    let server = ServeAll::start(&model, 2);
    let missing = item(301, 2, false).replace("cat_0.png", "missing.png");
    let lines = [
        item(300, 2, false),
        "{\"prompt\": broken".into(),
        item(302, 2, true),
        missing,
        item(303, 2, false),
    ];
    let manifest = dir.join("jobs.jsonl");
    std::fs::write(&manifest, lines.join("\n")).expect("manifest");
    let out = dir.join("out");
    let o = mip(&[
        "submit",
        manifest.to_str().expect("utf-8"),
        "--coordinator",
        &server.url,
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.lines()
            .any(|l| l.starts_with("bad line 2:") && l.contains("invalid JSON")),
        "{t}"
    );
    assert!(
        t.lines()
            .any(|l| l.starts_with("bad line 4:") && l.contains("missing.png")),
        "{t}"
    );
    assert!(t.contains("5 items: 3 done, 0 skipped, 0 failed, 2 bad"), "{t}");
    assert_eq!(pngs(&out).len(), 3);

    // A small YAML manifest, with an unknown field in its last item.
    let yaml = "# two requests\n- prompt: a cat wearing a jacket\n  subjects:\n    - {name: cat, images: [cat_0.png]}\n  steps: 2\n  seed: 400\n  samples: 2\n\n- prompt: a cat\n  subjects: [{name: cat, images: [cat_0.png]}]\n  steps: 2\n  colour: red\n";
    let manifest = dir.join("jobs.yaml");
    std::fs::write(&manifest, yaml).expect("yaml");
    let yaml_out = dir.join("yaml-out");
    let o = mip(&[
        "submit",
        manifest.to_str().expect("utf-8"),
        "--coordinator",
        &server.url,
        "--out",
        yaml_out.to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    let events = json_lines(&o);
    let bad: Vec<&Value> = events.iter().filter(|e| e["event"] == "bad").collect();
    assert_eq!(bad.len(), 1, "{events:?}");
    assert_eq!((bad[0]["index"].clone(), bad[0]["line"].clone()), (1.into(), 9.into()));
    assert!(
        bad[0]["error"].as_str().expect("error").contains("colour"),
        "{events:?}"
    );
    assert_eq!(summary(&events)["done"], 1);
    assert_eq!(pngs(&yaml_out).len(), 2);
    assert!(server.terminate().success());
}

#[test]
fn workers_over_https_are_verified_against_the_tls_ca_or_the_system_roots() {
    let dir = tmp("tls");
    let model = fixture_setup(&dir);
    let pki = mip_common::tls::testing::TestPki::generate(&dir).expect("pki");
    let model = model.to_str().expect("utf-8");
    let worker = Served::start(
        &["serve", "worker", "--listen", "127.0.0.1:0", "--model", model],
        &[
            ("MIP_SERVER__TLS__CERT", pki.server_cert.to_str().expect("utf-8")),
            ("MIP_SERVER__TLS__KEY", pki.server_key.to_str().expect("utf-8")),
        ],
    );
    let url = worker.url("https");
    let ca = pki.ca_cert.to_str().expect("utf-8").to_owned();
    let start = Instant::now();
    let info = loop {
        let o = mip(&[
            "workers",
            "--workers",
            &url,
            "--tls-ca",
            &ca,
            "--token",
            "t0ken",
            "--json",
        ]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if o.status.success() && v[0]["ready"] == true {
            break v;
        }
        assert!(start.elapsed() < BOUND, "{}", text(&o));
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(info[0]["counters"]["generations"], 0, "{info}");
    // Without --tls-ca the system's trust roots decide: a store without our CA refuses the server (and the
    // error says how to name a CA), one that has it (SSL_CERT_FILE, as an administrator would install it) trusts it.
    std::fs::create_dir_all(dir.join("other")).expect("dir");
    let other = mip_common::tls::testing::TestPki::generate(&dir.join("other")).expect("another pki");
    let with_roots = |bundle: &std::path::Path| {
        mip_cmd()
            .args(["workers", "--workers", &url, "--json", "--retry-for", "0"])
            .env("SSL_CERT_FILE", bundle)
            .env_remove("SSL_CERT_DIR")
            .output()
            .expect("mip runs")
    };
    let o = with_roots(&other.ca_cert);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("--tls-ca"), "{}", text(&o));
    let o = with_roots(&pki.ca_cert);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v[0]["ready"], true, "{v}");
    drop(worker);
}
