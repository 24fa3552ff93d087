//! The real-scale tools on the published layout at the demo model's size: `mip model random --small` writes the
//! files and formats of the full-size checkpoint (fp16 variants, a sharded UNet, the adapter as a torch pickle,
//! `mip.json`); `mip bench --cold` loads it with a per-component report and makes the first image stage by stage,
//! and compares a tiled VAE decode with the whole one; `mip serve worker` on it turns SERVING.

use std::time::{Duration, Instant};

use mip_tests::process::{mip, text, tmp, Served};
use mip_tests::BOUND;
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn write_small(name: &str) -> std::path::PathBuf {
    let dir = tmp(name);
    let model = dir.join("model");
    let o = mip(&[
        "model",
        "random",
        "--small",
        "--unet-shard-mib",
        "4",
        "--out",
        model.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    for component in [
        "text_encoder",
        "text_encoder_2",
        "image_encoder",
        "unet",
        "adapter",
        "vae",
        "total",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(component)),
            "{component} missing:\n{out}"
        );
    }
    assert!(model.join("MIP-Adapter/model_sdxl.bin").is_file());
    assert!(model
        .join("stable-diffusion-xl-base-1.0/unet/diffusion_pytorch_model.safetensors.index.fp16.json")
        .is_file());
    model
}

#[test]
fn cold_bench_reports_the_load_the_first_image_and_the_tiling_difference() {
    let model = write_small("cold-bench");
    let o = mip(&[
        "bench",
        "--cold",
        "--model",
        model.to_str().expect("utf-8"),
        "--size",
        "128x128",
        "--steps",
        "1",
        "--tiling-check",
        "128x128",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    let components: Vec<_> = r["load"]
        .as_array()
        .expect("load")
        .iter()
        .map(|c| c["component"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(
        components,
        ["text_encoder", "text_encoder_2", "image_encoder", "unet+adapter", "vae"]
    );
    for c in r["load"].as_array().expect("load") {
        assert!(c["weight_bytes"].as_u64().expect("weights") > 0, "{c}");
        assert!(c["peak_rss_bytes"].as_u64().expect("peak") > 0, "{c}");
    }
    let stages: Vec<_> = r["first_image"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["stage"].as_str().expect("stage").to_owned())
        .collect();
    assert_eq!(
        stages,
        ["text_encode", "subject_encode", "denoise", "vae_decode", "png_encode"]
    );
    assert!(r["first_image_seconds"].as_f64().expect("latency") >= r["load_seconds"].as_f64().expect("load"));
    assert!(r["png_bytes"].as_u64().expect("png") > 0);
    // The small VAE fits whole; the check decodes in tiles of half the side and reports the difference.
    assert!(r["vae_tile"].is_null(), "{}", r["vae_tile"]);
    let check = &r["tiling_check"];
    assert_eq!(check["tile_latent"], 8);
    // Blended tiles normalise with their own statistics: different from the whole decode, and measured.
    let max = check["max_abs"].as_f64().expect("max");
    let mean = check["mean_abs"].as_f64().expect("mean");
    assert!(max > 0.0 && max.is_finite() && mean <= max, "{check}");
}

#[tokio::test]
async fn a_worker_on_the_published_layout_turns_serving() {
    let model = write_small("serve");
    let worker = Served::start(
        &[
            "serve",
            "worker",
            "--model",
            model.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let channel = tonic::transport::Channel::from_shared(worker.url("http"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let started = Instant::now();
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: "mip.v1.Worker".into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            break;
        }
        assert!(started.elapsed() < BOUND, "not SERVING after {BOUND:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.terminate();
}
