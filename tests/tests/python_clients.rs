//! Clients other than our own: Google's Python grpcio with its reflection client (grpcio-reflection, which speaks
//! `grpc.reflection.v1alpha` only) and no generated stubs, against a real worker and coordinator. It lists both
//! services, describes `mip.v1.Coordinator`, sends a malformed SubmitJob (refused at the door with
//! INVALID_ARGUMENT naming the field) and a valid one built from JSON, whose job then runs to DONE.
//!
//! The Python side is `tests/python/grpc_clients.py`; its packages are pinned in `tests/python/requirements.txt`
//! and installed once into a cached virtual environment by `scripts/pyvenv.sh`.

use std::path::Path;
use std::process::Command;

use mip_proto::v1::JobStatus;
use mip_tests::*;
use serde_json::Value;

/// The interpreter of the cached environment with the pinned gRPC packages.
fn python() -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let reqs = std::fs::read_to_string(repo.join("tests/python/requirements.txt")).expect("requirements.txt");
    let pins: Vec<&str> = reqs
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let o = Command::new("bash")
        .arg(repo.join("scripts/pyvenv.sh"))
        .arg("mip-py-clients")
        .args(&pins)
        .output()
        .expect("scripts/pyvenv.sh runs");
    assert!(
        o.status.success(),
        "setting up the Python client environment failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_grpcio_with_v1alpha_reflection_lists_describes_and_submits() {
    let python = python();
    let redis = RedisServer::start();
    let ws = workers(1).await;
    let mut coord = Coord::start(&ws, &redis, |_| {}).await;
    let dir = tempfile::tempdir().expect("tmp");
    let image = dir.path().join("cat.png");
    std::fs::write(&image, mip_tests::image("cat_0.png")).expect("image");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/grpc_clients.py");
    let (worker, coordinator) = (ws[0].addr.to_string(), coord.addr.to_string());
    let o = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([&worker, &coordinator, image.to_str().expect("utf-8")])
            .output()
            .expect("python runs")
    })
    .await
    .expect("join");
    assert!(
        o.status.success(),
        "grpc_clients.py failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let names = |k: &str| -> Vec<String> {
        out[k]
            .as_array()
            .unwrap_or_else(|| panic!("{k} in {out}"))
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    assert!(names("worker_services").contains(&"mip.v1.Worker".to_owned()), "{out}");
    assert!(
        names("coordinator_services").contains(&"mip.v1.Coordinator".to_owned()),
        "{out}"
    );
    for m in [
        "SubmitJob",
        "WatchJob",
        "GetJob",
        "CancelJob",
        "ListJobs",
        "ListWorkers",
        "Generate",
    ] {
        assert!(names("coordinator_methods").contains(&m.to_owned()), "{m}: {out}");
    }
    assert_eq!(out["malformed"]["code"], "INVALID_ARGUMENT", "{out}");
    let details = out["malformed"]["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("requests[0].width") && details.contains("65"),
        "{details}"
    );

    let job_id = out["submitted"]["job_id"].as_str().expect("job id").to_owned();
    let (_, done) = watch_all(&mut coord.client, &job_id).await;
    assert_eq!(done.status, JobStatus::Done as i32, "{done:?}");
    assert_eq!(stored_results(&redis, &job_id).await, [0]);
    coord.stop().await;
    for w in ws {
        w.stop().await;
    }
}
