//! Parity tests of the image projections against the fixtures (plain and plus chains, both adapter formats).

use super::*;
use crate::model::clip::{ClipVisionConfig, ClipVisionModel};
use crate::model::weights::find_weights;
use crate::parity::{compare, fixtures_dir, Check, Tolerance};
use candle_core::Device;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

fn root() -> PathBuf {
    fixtures_dir().expect("fixtures")
}

fn vision(folder: &str) -> ClipVisionModel {
    let dir = root().join(folder);
    let cfg = ClipVisionConfig::from_file(&dir.join("config.json")).expect("config");
    let ws = Arc::new(WeightSet::from_safetensors(&find_weights(&dir, &["model"]).expect("w")).expect("ws"));
    let m = ws
        .build(DType::F32, &Device::Cpu, |vb| ClipVisionModel::new(vb, &cfg))
        .expect("build");
    ws.ensure_all_used().expect("image encoder strict");
    m
}

/// Builds the projection of an adapter strictly: every `image_proj.*` key used; `ip_adapter.*` (UNet's) read
/// through the var builder so that `ensure_all_used` covers the whole file.
fn projection(file: &str, resampler: Option<ResamplerConfig>) -> ImageProj {
    let ws = Arc::new(load_adapter_weights(&root().join("adapter").join(file)).expect("adapter"));
    let cfg = ImageProjConfig::from_adapter(&ws, resampler).expect("config");
    let proj = ws
        .build(DType::F32, &Device::Cpu, |vb| {
            for k in ws.keys().iter().filter(|k| k.starts_with("ip_adapter.")) {
                vb.get_unchecked(k)?;
            }
            ImageProj::new(vb.pp("image_proj"), &cfg)
        })
        .expect("build");
    ws.ensure_all_used().expect("adapter strict");
    proj
}

fn case(name: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let dir = root().join("cases").join(name);
    let json = std::fs::read_to_string(dir.join("case.json")).expect("case");
    let t = candle_core::safetensors::load(dir.join("tensors.safetensors"), &Device::Cpu).expect("tensors");
    (serde_json::from_str(&json).expect("json"), t)
}

/// Per subject, the mean of its images' tokens, in case.json order.
fn per_subject(case: &serde_json::Value, per_image: &Tensor) -> Tensor {
    let mut start = 0;
    let mut out = Vec::new();
    for s in case["subjects"].as_array().expect("subjects") {
        let n = s["images"].as_array().expect("images").len();
        out.push(
            per_image
                .narrow(0, start, n)
                .expect("narrow")
                .mean_keepdim(0)
                .expect("mean"),
        );
        start += n;
    }
    Tensor::cat(&out, 0).expect("cat")
}

fn check_all(checks: &[Check]) {
    for c in checks {
        println!("{}", c.line());
    }
    for c in checks {
        assert!(c.ok, "{}", c.line());
    }
}

#[test]
fn pickle_and_safetensors_agree() {
    for stem in ["mip_sdxl_2obj", "mip_sdxl_plus_2obj"] {
        let dir = root().join("adapter");
        let a = load_adapter_weights(&dir.join(format!("{stem}.safetensors"))).expect("safetensors");
        let b = load_adapter_weights(&dir.join(format!("{stem}.bin"))).expect("pickle");
        assert_eq!(a.keys(), b.keys(), "{stem}: key sets differ");
        assert!(a.keys().iter().any(|k| k.starts_with("image_proj.")), "{stem}");
        assert!(a.keys().iter().any(|k| k.starts_with("ip_adapter.")), "{stem}");
        for k in a.keys() {
            let c = compare(&k, &b.peek(&k).expect("b"), &a.peek(&k).expect("a"), Tolerance::Exact);
            assert!(c.ok, "{stem}: {}", c.line());
        }
    }
}

#[test]
fn variant_detection() {
    let dir = root().join("adapter");
    let plain = load_adapter_weights(&dir.join("mip_sdxl_2obj.safetensors")).expect("plain");
    let plus = load_adapter_weights(&dir.join("mip_sdxl_plus_2obj.bin")).expect("plus");
    assert_eq!(
        ImageProjVariant::detect(&plain).expect("plain"),
        ImageProjVariant::Plain
    );
    assert_eq!(ImageProjVariant::detect(&plus).expect("plus"), ImageProjVariant::Plus);
    let cfg = ImageProjConfig::from_adapter(&plain, None).expect("cfg");
    let want = ImageProjModelConfig {
        clip_embeddings_dim: 32,
        cross_attention_dim: 64,
        num_tokens: 4,
    };
    assert_eq!(cfg, ImageProjConfig::Plain(want));
    let cfg = ImageProjConfig::from_adapter(&plus, None).expect("cfg");
    assert_eq!(cfg, ImageProjConfig::Plus(ResamplerConfig::published(32, 64)));
    assert!(ImageProjVariant::detect(&WeightSet::empty("none")).is_err());
}

#[test]
fn plain_projection_chain() {
    let (case, want) = case("sdxl_two_objects");
    let proj = projection("mip_sdxl_2obj.safetensors", None);
    assert_eq!(proj.num_tokens(), 4);
    let embeds = vision("image_encoder")
        .forward(&want["ref.pixel_values"])
        .expect("encoder")
        .image_embeds;
    let per_image = proj.forward(&embeds).expect("proj");
    let n = case["subjects"].as_array().expect("subjects").len();
    let zeros = Tensor::zeros((n, embeds.dim(1).expect("p")), DType::F32, &Device::Cpu).expect("zeros");
    let uncond = proj.forward(&zeros).expect("uncond");
    let tol = Tolerance::MODEL;
    check_all(&[
        compare("sdxl/ref.image_embeds", &embeds, &want["ref.image_embeds"], tol),
        compare(
            "sdxl/ref.image_tokens_per_image",
            &per_image,
            &want["ref.image_tokens_per_image"],
            tol,
        ),
        compare(
            "sdxl/ref.image_tokens",
            &per_subject(&case, &per_image),
            &want["ref.image_tokens"],
            tol,
        ),
        compare(
            "sdxl/ref.uncond_image_tokens",
            &uncond,
            &want["ref.uncond_image_tokens"],
            tol,
        ),
    ]);
}

#[test]
fn resampler_chain() {
    let (case, want) = case("sdxl_plus_two_objects_multi_ref");
    let rcfg: ResamplerConfig = serde_json::from_value(case["resampler"].clone()).expect("resampler");
    let proj = projection("mip_sdxl_plus_2obj.bin", Some(rcfg));
    assert_eq!(proj.num_tokens(), 16);
    let enc = vision("image_encoder_plus");
    let px = &want["ref.pixel_values"];
    let hidden = enc.penultimate_hidden_states(px).expect("encoder");
    let per_image = proj.forward(&hidden).expect("resampler");
    let n = case["subjects"].as_array().expect("subjects").len();
    let (_, c, h, w) = px.dims4().expect("dims");
    let zeros = Tensor::zeros((n, c, h, w), DType::F32, &Device::Cpu).expect("zeros");
    let uncond_hidden = enc.penultimate_hidden_states(&zeros).expect("uncond encoder");
    let uncond = proj.forward(&uncond_hidden).expect("uncond");
    let tol = Tolerance::MODEL;
    let key = "ref.uncond_penultimate_hidden_states";
    check_all(&[
        compare(
            "plus/ref.penultimate_hidden_states",
            &hidden,
            &want["ref.penultimate_hidden_states"],
            tol,
        ),
        compare(
            "plus/ref.image_tokens_per_image",
            &per_image,
            &want["ref.image_tokens_per_image"],
            tol,
        ),
        compare(
            "plus/ref.image_tokens",
            &per_subject(&case, &per_image),
            &want["ref.image_tokens"],
            tol,
        ),
        compare(&format!("plus/{key}"), &uncond_hidden, &want[key], tol),
        compare(
            "plus/ref.uncond_image_tokens",
            &uncond,
            &want["ref.uncond_image_tokens"],
            tol,
        ),
    ]);
}

#[test]
fn wrong_resampler_split_does_not_match() {
    // heads/dim_head swapped keeps inner width equal, so it loads but must not match the reference.
    let (case, want) = case("sdxl_plus_two_objects_multi_ref");
    let mut rcfg: ResamplerConfig = serde_json::from_value(case["resampler"].clone()).expect("resampler");
    std::mem::swap(&mut rcfg.heads, &mut rcfg.dim_head);
    let proj = projection("mip_sdxl_plus_2obj.safetensors", Some(rcfg));
    let hidden = &want["ref.penultimate_hidden_states"];
    let got = proj.forward(hidden).expect("resampler");
    let c = compare("swapped", &got, &want["ref.image_tokens_per_image"], Tolerance::MODEL);
    assert!(!c.ok, "a wrong heads/dim_head split should not match: {}", c.line());
}

#[test]
fn half_precision_resampler_stays_close() {
    let (case, want) = case("sdxl_plus_two_objects_multi_ref");
    let rcfg: ResamplerConfig = serde_json::from_value(case["resampler"].clone()).expect("resampler");
    let path = root().join("adapter/mip_sdxl_plus_2obj.safetensors");
    let ws = Arc::new(load_adapter_weights(&path).expect("adapter"));
    let cfg = ImageProjConfig::Plus(rcfg);
    for dtype in [DType::F16, DType::BF16] {
        let proj = ws
            .build(dtype, &Device::Cpu, |vb| ImageProj::new(vb.pp("image_proj"), &cfg))
            .expect("build");
        let x = want["ref.penultimate_hidden_states"].to_dtype(dtype).expect("cast");
        let got = proj.forward(&x).expect("forward");
        assert_eq!(got.dtype(), dtype);
        let c = compare(
            &format!("{dtype:?} tokens"),
            &got,
            &want["ref.image_tokens_per_image"],
            Tolerance::Scaled(5e-2),
        );
        println!("{}", c.line());
        assert!(c.ok, "{}", c.line());
    }
}
