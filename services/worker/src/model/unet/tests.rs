//! Golden parity of the UNet (plain and weighted merge) against `mip-tiny-sdxl`, plus shape / invariant checks
//! for other subject counts and non-square latents.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::model::weights::{find_weights, read_json, WeightSet};
use crate::parity::{compare, fixtures_dir, Tolerance};

fn dir() -> PathBuf {
    fixtures_dir().expect("fixtures")
}

/// The device the tests run on: CUDA when built with `--features cuda` on a machine with a GPU, else the CPU.
fn dev() -> Device {
    Device::cuda_if_available(0).expect("device")
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &dev()).expect("fixture tensors")
}

fn get<'a>(t: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    t.get(key).unwrap_or_else(|| panic!("fixture tensor `{key}` missing"))
}

/// The adapter's `ip_adapter.*` tensors alone (the `image_proj.*` ones belong to the projection model).
fn adapter_set(file: &str) -> Arc<WeightSet> {
    let mut ws = WeightSet::from_safetensors(&dir().join("adapter").join(file)).expect("adapter");
    for key in ws.keys() {
        if !key.starts_with("ip_adapter.") {
            ws.remove(&key);
        }
    }
    Arc::new(ws)
}

/// The fixture UNet, optionally with the weighted-merge weights of `adapter` (whose key usage is checked).
fn load_unet(adapter: Option<&Arc<WeightSet>>) -> UNet2DConditionModel {
    load_unet_as(adapter, DType::F32)
}

fn load_unet_as(adapter: Option<&Arc<WeightSet>>, dtype: DType) -> UNet2DConditionModel {
    let unet_dir = dir().join("sdxl/unet");
    let cfg: UNetConfig = read_json(&unet_dir.join("config.json")).expect("config");
    let path = find_weights(&unet_dir, &["diffusion_pytorch_model"]).expect("weights");
    let ws = Arc::new(WeightSet::from_safetensors(&path).expect("unet weights"));
    let avb = adapter.map(|a| a.var_builder(dtype, &dev()));
    let unet = ws
        .build(dtype, &dev(), |vb| {
            UNet2DConditionModel::new(vb, &cfg, avb.map(|v| AdapterWeights::new(v.pp("ip_adapter"))))
        })
        .expect("build unet");
    ws.ensure_all_used().expect("every unet tensor used");
    if let Some(a) = adapter {
        a.ensure_all_used().expect("every adapter tensor used");
    }
    unet
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all().expect("flat").to_vec1::<f32>().expect("vec")[0] as f64
}

#[test]
fn plain_unet_matches_fixture() {
    let t = load_tensors(&dir().join("cases/plain_unet/tensors.safetensors"));
    let unet = load_unet(None);
    let cond = UNetCond {
        encoder_hidden_states: get(&t, "encoder_hidden_states").clone(),
        text_embeds: get(&t, "text_embeds").clone(),
        time_ids: get(&t, "time_ids").clone(),
        merge: None,
    };
    let out = unet
        .forward(get(&t, "sample"), scalar(get(&t, "timestep")), &cond)
        .expect("forward");
    let check = compare("plain_unet.noise_pred", &out, get(&t, "noise_pred"), Tolerance::MODEL);
    println!("{}", check.line());
    assert!(check.ok, "{}", check.line());
}

fn run_case(case: &str, adapter_file: &str) {
    let case_dir = dir().join("cases").join(case);
    let json: serde_json::Value = read_json(&case_dir.join("case.json")).expect("case.json");
    let num_tokens = json["num_tokens"].as_u64().expect("num_tokens") as usize;
    let scale = json["scale"].as_f64().expect("scale");
    let lens: Vec<usize> = json["entity_token_lens"]
        .as_array()
        .expect("lens")
        .iter()
        .map(|v| v.as_u64().expect("len") as usize)
        .collect();
    let t = load_tensors(&case_dir.join("tensors.safetensors"));
    let adapter = adapter_set(adapter_file);
    let unet = load_unet(Some(&adapter));
    assert_eq!(unet.num_attention_processors(), 34);
    let slot: CaptureSlot = Arc::new(Mutex::new(None));
    let cond = UNetCond {
        encoder_hidden_states: get(&t, "unet.encoder_hidden_states").clone(),
        text_embeds: get(&t, "unet.text_embeds").clone(),
        time_ids: get(&t, "unet.time_ids").clone(),
        merge: Some(MergeCond {
            entity_text_embeds: get(&t, "unet.entity_text_embeds").clone(),
            entity_token_lens: lens,
            num_tokens,
            scale,
            capture: Some(slot.clone()),
        }),
    };
    let out = unet
        .forward(get(&t, "unet.sample"), scalar(get(&t, "unet.timestep")), &cond)
        .expect("forward");
    let cap = slot.lock().expect("lock").take().expect("capture filled");
    let checks = [
        compare(
            &format!("{case}.unet.noise_pred"),
            &out,
            get(&t, "unet.noise_pred"),
            Tolerance::MODEL,
        ),
        compare(
            &format!("{case}.layer0.hidden_states"),
            &cap.hidden_states,
            get(&t, "layer0.hidden_states"),
            Tolerance::MODEL,
        ),
        compare(
            &format!("{case}.layer0.object_weights"),
            &cap.object_weights,
            get(&t, "layer0.object_weights"),
            Tolerance::MODEL,
        ),
        compare(
            &format!("{case}.layer0.text_weight"),
            &cap.text_weight,
            get(&t, "layer0.text_weight"),
            Tolerance::MODEL,
        ),
        compare(
            &format!("{case}.layer0.output"),
            &cap.output,
            get(&t, "layer0.output"),
            Tolerance::MODEL,
        ),
    ];
    for c in &checks {
        println!("{}", c.line());
    }
    for c in &checks {
        assert!(c.ok, "{}", c.line());
    }
}

#[test]
fn sdxl_two_objects_matches_fixture() {
    run_case("sdxl_two_objects", "mip_sdxl_2obj.safetensors");
}

#[test]
fn sdxl_plus_two_objects_multi_ref_matches_fixture() {
    run_case("sdxl_plus_two_objects_multi_ref", "mip_sdxl_plus_2obj.safetensors");
}

/// A merge call with `n` subjects derived from the two-object case, on a latent of `h` x `w`.
fn derived_call(unet: &UNet2DConditionModel, n: usize, h: usize, w: usize) -> (Tensor, MergeCapture) {
    let t = load_tensors(&dir().join("cases/sdxl_two_objects/tensors.safetensors"));
    let (tokens, lens) = (4, (0..n).map(|i| 1 + i % 3).collect::<Vec<_>>());
    let ctx = get(&t, "unet.encoder_hidden_states");
    let text = ctx.narrow(1, 0, 77).expect("text");
    let image: Vec<Tensor> = (0..n)
        .map(|i| (ctx.narrow(1, 77 + (i % 2) * tokens, tokens).expect("img") * (1.0 + 0.1 * i as f64)).expect("mul"))
        .collect();
    let mut parts = vec![text];
    parts.extend(image);
    let ents = get(&t, "unet.entity_text_embeds");
    let ents: Vec<Tensor> = (0..n)
        .map(|i| (ents.narrow(1, i % 2, 1).expect("e") - 0.05 * i as f64).expect("sub"))
        .collect();
    let sample = Tensor::randn(0f32, 1.0, (2, 4, h, w), &dev()).expect("randn");
    let slot: CaptureSlot = Arc::new(Mutex::new(None));
    let cond = UNetCond {
        encoder_hidden_states: Tensor::cat(&parts, 1).expect("ctx"),
        text_embeds: get(&t, "unet.text_embeds").clone(),
        time_ids: get(&t, "unet.time_ids").clone(),
        merge: Some(MergeCond {
            entity_text_embeds: Tensor::cat(&ents, 1).expect("ents"),
            entity_token_lens: lens,
            num_tokens: tokens,
            scale: 0.75,
            capture: Some(slot.clone()),
        }),
    };
    let out = unet.forward(&sample, 500.0, &cond).expect("forward");
    let cap = slot.lock().expect("lock").take().expect("capture");
    (out, cap)
}

fn assert_finite(name: &str, t: &Tensor) {
    let v = t
        .flatten_all()
        .expect("flat")
        .to_dtype(DType::F64)
        .expect("f64")
        .to_vec1::<f64>()
        .expect("vec");
    assert!(v.iter().all(|x| x.is_finite()), "{name} has non-finite values");
}

#[test]
fn one_and_three_subjects() {
    let unet = load_unet(Some(&adapter_set("mip_sdxl_2obj.safetensors")));
    for n in [1, 3] {
        let (out, cap) = derived_call(&unet, n, 16, 16);
        assert_eq!(out.dims(), &[2, 4, 16, 16]);
        assert_eq!(cap.object_weights.dims(), &[2, n, 64]);
        assert_eq!(cap.text_weight.dims(), &[2, 64]);
        assert_finite("noise_pred", &out);
        assert_finite("object_weights", &cap.object_weights);
        // The maps are normalised across subjects, so the object weights always sum to the text weight
        // (with one subject, the object weight is the text weight alone).
        let sum = cap.object_weights.sum(1).expect("sum");
        let check = compare(
            &format!("n={n} sum_i w_i == text_weight"),
            &sum,
            &cap.text_weight,
            Tolerance::MODEL,
        );
        println!("{}", check.line());
        assert!(check.ok, "{}", check.line());
        let mean = cap
            .text_weight
            .mean_all()
            .expect("mean")
            .to_scalar::<f32>()
            .expect("scalar");
        assert!((mean - 1.0).abs() < 1e-5, "text weight mean {mean}");
    }
}

#[test]
fn non_square_latents() {
    let unet = load_unet(Some(&adapter_set("mip_sdxl_2obj.safetensors")));
    let (out, cap) = derived_call(&unet, 2, 16, 24);
    assert_eq!(out.dims(), &[2, 4, 16, 24]);
    assert_eq!(cap.object_weights.dims(), &[2, 2, 8 * 12]);
    assert_finite("noise_pred 16x24", &out);
    // Sizes that are not multiples of the total downsampling: upsampling resizes to the skip connection.
    let (out, _) = derived_call(&unet, 2, 10, 14);
    assert_eq!(out.dims(), &[2, 4, 10, 14]);
    assert_finite("noise_pred 10x14", &out);
}

#[test]
fn merge_without_adapter_is_an_error() {
    let unet = load_unet(None);
    let t = load_tensors(&dir().join("cases/sdxl_two_objects/tensors.safetensors"));
    let cond = UNetCond {
        encoder_hidden_states: get(&t, "unet.encoder_hidden_states").clone(),
        text_embeds: get(&t, "unet.text_embeds").clone(),
        time_ids: get(&t, "unet.time_ids").clone(),
        merge: Some(MergeCond {
            entity_text_embeds: get(&t, "unet.entity_text_embeds").clone(),
            entity_token_lens: vec![1, 1],
            num_tokens: 4,
            scale: 0.75,
            capture: None,
        }),
    };
    assert!(unet.forward(get(&t, "unet.sample"), 500.0, &cond).is_err());
}

#[test]
fn missing_adapter_key_is_named() {
    let mut ws = WeightSet::from_safetensors(&dir().join("adapter/mip_sdxl_2obj.safetensors")).expect("adapter");
    ws.remove("ip_adapter.33.to_v_ip.weight");
    let adapter = Arc::new(ws);
    let unet_dir = dir().join("sdxl/unet");
    let cfg: UNetConfig = read_json(&unet_dir.join("config.json")).expect("config");
    let path = find_weights(&unet_dir, &["diffusion_pytorch_model"]).expect("weights");
    let ws = Arc::new(WeightSet::from_safetensors(&path).expect("unet weights"));
    let avb = adapter.var_builder(DType::F32, &Device::Cpu);
    let err = ws
        .build(DType::F32, &Device::Cpu, |vb| {
            UNet2DConditionModel::new(vb, &cfg, Some(AdapterWeights::new(avb.pp("ip_adapter"))))
        })
        .expect_err("missing key");
    assert!(err.to_string().contains("ip_adapter.33.to_v_ip.weight"), "{err}");
}

#[test]
fn half_precision_stays_close_to_f32() {
    let t = load_tensors(&dir().join("cases/sdxl_two_objects/tensors.safetensors"));
    let adapter = adapter_set("mip_sdxl_2obj.safetensors");
    // candle's CPU matmul has no bf16 kernel; bf16 is checked on CUDA.
    let dtypes: &[DType] = if dev().is_cuda() {
        &[DType::BF16, DType::F16]
    } else {
        &[DType::F16]
    };
    for &dtype in dtypes {
        let unet = load_unet_as(Some(&adapter), dtype);
        let cast = |k: &str| get(&t, k).to_dtype(dtype).expect("cast");
        let cond = UNetCond {
            encoder_hidden_states: cast("unet.encoder_hidden_states"),
            text_embeds: cast("unet.text_embeds"),
            time_ids: get(&t, "unet.time_ids").clone(),
            merge: Some(MergeCond {
                entity_text_embeds: cast("unet.entity_text_embeds"),
                entity_token_lens: vec![1, 1],
                num_tokens: 4,
                scale: 0.75,
                capture: None,
            }),
        };
        let out = unet.forward(&cast("unet.sample"), 500.0, &cond).expect("forward");
        assert_eq!(out.dtype(), dtype);
        // Loose bounds (f16 ~1e-3, bf16 ~8e-3 relative per op): a check that the reduced-precision path
        // computes the same function, not a parity bound.
        let rel = if dtype == DType::F16 { 1e-2 } else { 5e-2 };
        let name = format!("{dtype:?}.noise_pred vs f32 reference");
        let check = compare(&name, &out, get(&t, "unet.noise_pred"), Tolerance::Scaled(rel));
        println!("{}", check.line());
        assert!(check.ok, "{}", check.line());
    }
}
