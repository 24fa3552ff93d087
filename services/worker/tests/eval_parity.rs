//! Parity of the evaluation with `tests/fixtures/mip-tiny-eval` (written by `scripts/fixtures/eval/generate.py`
//! with torchvision, transformers and Pillow): the preprocessing of odd-sized RGB, RGBA, grey and JPEG images, the
//! CLIP and DINO features, the caption ids, and the CLIP-T, CLIP-I and DINO scores. Tolerances: pixels 1e-6 (PNG),
//! features 1e-4, scores 1e-5.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use mip_worker::eval::metrics::{clip_t, cosine, set_similarity, similarity_matrix};
use mip_worker::eval::preprocess::{EvalTransform, CLIP_EVAL, DINO_EVAL};
use mip_worker::eval::{ClipEval, DinoEval};
use mip_worker::pipeline::image_decode::{decode_rgb_with, Alpha, DEFAULT_MAX_PIXELS};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mip-tiny-eval")
}

fn cases() -> Value {
    let text = std::fs::read_to_string(dir().join("cases.json")).expect("cases.json");
    serde_json::from_str(&text).expect("json")
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &Device::Cpu).expect(name)
}

fn stems(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|s| s.as_str().expect("stem").to_owned())
        .collect()
}

fn image_path(stem: &str) -> PathBuf {
    let png = dir().join("images").join(format!("{stem}.png"));
    if png.is_file() {
        png
    } else {
        dir().join("images").join(format!("{stem}.jpg"))
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).expect("f32") - b.to_dtype(DType::F32).expect("f32"))
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("diff")
}

fn row(t: &Tensor) -> Vec<f32> {
    t.flatten_all().and_then(|t| t.to_vec1()).expect("vec")
}

#[test]
fn preprocessing_matches_torchvision_on_pillow() {
    let want = tensors("preprocess.safetensors");
    for stem in stems(&cases()["images"]) {
        let path = image_path(&stem);
        let bytes = std::fs::read(&path).expect("image");
        let is_png = path.extension().is_some_and(|e| e == "png");
        let rgb = decode_rgb_with(&bytes, "image", DEFAULT_MAX_PIXELS, Alpha::Drop).expect("decode");
        for (name, t) in [("clip", &CLIP_EVAL), ("dino", &DINO_EVAL)] {
            let cropped = t.resize_crop(&rgb).expect("resize");
            let u8_want = &want[&format!("{name}_u8.{stem}")];
            let u8_got = Tensor::from_vec(cropped.data.clone(), (224, 224, 3), &Device::Cpu).expect("u8");
            let levels = max_abs(&u8_got, u8_want);
            let pixels = max_abs(
                &t.to_tensor(&cropped).expect("tensor"),
                &want[&format!("{name}.{stem}")],
            );
            eprintln!("{name} {stem}: resized pixels max {levels} levels, normalised max abs {pixels:e}");
            if is_png {
                assert_eq!(levels, 0.0, "{name} {stem}: resized pixels differ");
                assert!(pixels <= 1e-6, "{name} {stem}: {pixels}");
            } else {
                // JPEG: a decoder difference of a level is allowed.
                assert!(levels <= 1.0, "{name} {stem}: {levels} levels");
            }
            let whole = t.prepare(&bytes, "image", DEFAULT_MAX_PIXELS).expect("prepare");
            assert_eq!(max_abs(&whole, &t.to_tensor(&cropped).expect("tensor")), 0.0);
        }
    }
}

/// Our preprocessing of every image with `t`, batched (N, 3, 224, 224).
fn batch(t: &EvalTransform, stems: &[String]) -> Tensor {
    let xs: Vec<Tensor> = stems
        .iter()
        .map(|s| {
            let bytes = std::fs::read(image_path(s)).expect("image");
            t.prepare(&bytes, "image", DEFAULT_MAX_PIXELS).expect("prepare")
        })
        .collect();
    Tensor::stack(&xs, 0).expect("stack")
}

#[test]
fn features_ids_and_scores_match_transformers() {
    let c = cases();
    let images = stems(&c["images"]);
    let feats = tensors("features.safetensors");
    let pre = tensors("preprocess.safetensors");
    let clip = ClipEval::load(&dir().join("clip"), &Device::Cpu, DType::F32).expect("clip loads strictly");
    let dino = DinoEval::load(&dir().join("dino"), &Device::Cpu, DType::F32).expect("dino loads strictly");

    // Features from the reference pixels: the models alone.
    for stem in &images {
        let x = pre[&format!("clip.{stem}")].unsqueeze(0).expect("batch");
        let got = clip.image_features(&x).expect("clip image");
        let d = max_abs(&got, &feats[&format!("clip_image.{stem}")]);
        eprintln!("clip image features {stem}: max abs {d:e}");
        assert!(d <= 1e-4, "clip image {stem}: {d}");
        let x = pre[&format!("dino.{stem}")].unsqueeze(0).expect("batch");
        let got = dino.features(&x).expect("dino");
        let d = max_abs(&got, &feats[&format!("dino.{stem}")]);
        eprintln!("dino features {stem}: max abs {d:e}");
        assert!(d <= 1e-4, "dino {stem}: {d}");
    }
    let captions: Vec<&str> = c["captions"]
        .as_array()
        .expect("captions")
        .iter()
        .map(|v| v.as_str().expect("caption"))
        .collect();
    let mut text = Vec::new();
    for (i, caption) in captions.iter().enumerate() {
        let want: Vec<u32> = serde_json::from_value(c["input_ids"][i].clone()).expect("ids");
        assert_eq!(clip.caption_ids(caption).expect("ids"), want, "caption {i}");
        let got = clip.text_features(caption).expect("text");
        let d = max_abs(&got, &feats[&format!("clip_text.{i}")]);
        eprintln!("clip text features {i}: max abs {d:e}");
        assert!(d <= 1e-4, "clip text {i}: {d}");
        text.push(row(&got));
    }

    // Scores end to end: our preprocessing, our features, our metrics.
    let clip_rows: Vec<Vec<f32>> = {
        let f = clip.image_features(&batch(&CLIP_EVAL, &images)).expect("clip batch");
        (0..images.len()).map(|i| row(&f.get(i).expect("row"))).collect()
    };
    let dino_rows: Vec<Vec<f32>> = {
        let f = dino.features(&batch(&DINO_EVAL, &images)).expect("dino batch");
        (0..images.len()).map(|i| row(&f.get(i).expect("row"))).collect()
    };
    for (i, img) in clip_rows.iter().enumerate() {
        for (j, cap) in text.iter().enumerate() {
            let want_cos = c["clip_text_cos"][i][j].as_f64().expect("cos");
            let want_t = c["clip_t"][i][j].as_f64().expect("clip_t");
            let (dc, dt) = ((cosine(img, cap) - want_cos).abs(), (clip_t(img, cap) - want_t).abs());
            eprintln!("image {i} caption {j}: cos off by {dc:e}, clip_t off by {dt:e}");
            assert!(dc <= 1e-5, "cos {i} {j}");
            assert!(dt <= 1e-5, "clip_t {i} {j}");
        }
    }
    let pick = |rows: &[Vec<f32>], names: &[String]| -> Vec<Vec<f32>> {
        names
            .iter()
            .map(|n| rows[images.iter().position(|s| s == n).expect("known stem")].clone())
            .collect()
    };
    let (generated, references) = (stems(&c["generated"]), stems(&c["references"]));
    for (rows, matrix, mean) in [
        (&clip_rows, "clip_i_matrix", "clip_i"),
        (&dino_rows, "dino_matrix", "dino"),
    ] {
        let (g, r) = (pick(rows, &generated), pick(rows, &references));
        let m = similarity_matrix(&g, &r);
        for (a, want_row) in m.iter().zip(c[matrix].as_array().expect("matrix")) {
            for (v, w) in a.iter().zip(want_row.as_array().expect("row")) {
                assert!((v - w.as_f64().expect("f64")).abs() <= 1e-5, "{matrix}: {v} vs {w}");
            }
        }
        let got = set_similarity(&g, &r).expect("mean");
        let want = c[mean].as_f64().expect("mean");
        eprintln!("{mean}: {got} vs {want}, off by {:e}", (got - want).abs());
        assert!((got - want).abs() <= 1e-5, "{mean}: {got} vs {want}");
    }
}
