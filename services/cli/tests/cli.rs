//! Drives the `mip` binary as a user would: parity on the fixtures (and on a corrupted copy, which must fail),
//! the demo model, an embedded generation, and one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mip"))
        .args(args)
        .output()
        .expect("mip runs")
}

fn fixtures() -> PathBuf {
    mip_worker::parity::fixtures_dir().unwrap_or_else(|e| panic!("{e}"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mip-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    dir
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn parity_passes_on_the_fixtures() {
    let dir = fixtures();
    let out = mip(&["parity", dir.to_str().expect("utf-8 path")]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(" 0 failed"), "{t}");
    assert!(t.lines().filter(|l| l.starts_with("ok ")).count() >= 100, "{t}");
}

/// Links every entry of `src` into `dst`, except the names in `except`.
fn link_tree(src: &Path, dst: &Path, except: &[&str]) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        let name = e.file_name();
        if !except.iter().any(|x| name == *x) {
            std::os::unix::fs::symlink(e.path(), dst.join(&name)).expect("symlink");
        }
    }
}

#[test]
fn parity_fails_on_a_perturbed_reference() {
    let fx = fixtures();
    let dir = tmp("perturbed");
    link_tree(&fx, &dir, &["cases"]);
    link_tree(&fx.join("cases"), &dir.join("cases"), &["sdxl_two_objects"]);
    let case = dir.join("cases/sdxl_two_objects");
    link_tree(&fx.join("cases/sdxl_two_objects"), &case, &["tensors.safetensors"]);
    let mut tensors = candle_core::safetensors::load(
        fx.join("cases/sdxl_two_objects/tensors.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("tensors");
    let pred = tensors.get("unet.noise_pred").expect("noise_pred");
    let bumped = (pred + 0.01).expect("add");
    tensors.insert("unet.noise_pred".into(), bumped);
    candle_core::safetensors::save(&tensors, case.join("tensors.safetensors")).expect("save");

    let out = mip(&["parity", dir.to_str().expect("utf-8"), "--quiet"]);
    let t = text(&out);
    assert!(!out.status.success(), "a perturbed reference must fail: {t}");
    assert!(
        t.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("sdxl_two_objects/unet.noise_pred")),
        "{t}"
    );
    assert!(t.contains(" 1 failed"), "{t}");
}

#[test]
fn demo_model_generates_pngs_with_parameters() {
    let dir = tmp("demo");
    let model = dir.join("model");
    let out_dir = dir.join("out");
    let o = mip(&["model", "demo", "--out", model.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", text(&o));
    let cat = model.join("refs/cat.png");
    let jacket = model.join("refs/jacket.png");
    let o = mip(&[
        "generate",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt",
        "a cat wearing a jacket",
        "--subject",
        &format!("cat={}", cat.display()),
        "--subject",
        &format!("jacket={},{}", jacket.display(), cat.display()),
        "--steps",
        "2",
        "--size",
        "96x64",
        "--samples",
        "2",
        "--seed",
        "5",
        "--out",
        out_dir.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for (k, seed) in [(0, 5), (1, 6)] {
        let png = out_dir.join(format!("mip-{seed}-{k}.png"));
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}\n{}", png.display(), text(&o)));
        let img = image::load_from_memory(&bytes).expect("png");
        assert_eq!((img.width(), img.height()), (96, 64));
        let params = mip_worker::pipeline::png::decode_png_text(&bytes).expect("text");
        assert!(
            params.iter().any(|(k, v)| k == "seed" && v == &seed.to_string()),
            "{params:?}"
        );
        let sidecar: serde_json::Value =
            serde_json::from_slice(&std::fs::read(png.with_extension("json")).expect("sidecar")).expect("json");
        assert_eq!(sidecar["seed"], seed);
        assert_eq!(sidecar["subjects"][1]["name"], "jacket");
    }
}

#[test]
fn errors_are_one_line_with_a_non_zero_exit() {
    let o = mip(&["generate", "--prompt", "a cat", "--subject", "cat=/nonexistent/cat.png"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/cat.png"), "{err}");
    let o = mip(&["generate", "--prompt", "a cat", "--subject", "no-equals-sign"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("NAME=IMG"));
}
