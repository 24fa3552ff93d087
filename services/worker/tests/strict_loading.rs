//! Strict loading at the level of a whole model: a checkpoint with a tensor removed or a tensor added fails to
//! load with an error naming the key and the file.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mip_worker::pipeline::MipPipeline;
use mip_worker::ModelError;

/// A copy of the fixture layout in a temp folder: every part linked, except `unet/` and the adapter, which are
/// rewritten by `edit_unet` / `edit_adapter`.
fn model_with(
    tmp: &Path,
    edit_unet: impl FnOnce(&mut HashMap<String, Tensor>),
    edit_adapter: impl FnOnce(&mut HashMap<String, Tensor>),
) -> mip_worker::pipeline::ModelSpec {
    let fx = common::fixtures();
    let base = tmp.join("sdxl");
    std::fs::create_dir_all(base.join("unet")).expect("mkdir");
    for entry in std::fs::read_dir(fx.join("sdxl")).expect("read fixture") {
        let entry = entry.expect("entry");
        if entry.file_name() != "unet" {
            std::os::unix::fs::symlink(entry.path(), base.join(entry.file_name())).expect("link");
        }
    }
    std::os::unix::fs::symlink(fx.join("sdxl/unet/config.json"), base.join("unet/config.json")).expect("link");
    let load = |p: &Path| candle_core::safetensors::load(p, &Device::Cpu).expect("fixture tensors");
    let mut unet = load(&fx.join("sdxl/unet/diffusion_pytorch_model.safetensors"));
    edit_unet(&mut unet);
    candle_core::safetensors::save(&unet, base.join("unet/diffusion_pytorch_model.safetensors")).expect("save");
    let mut adapter = load(&fx.join("adapter/mip_sdxl_2obj.safetensors"));
    edit_adapter(&mut adapter);
    let adapter_path = tmp.join("adapter.safetensors");
    candle_core::safetensors::save(&adapter, &adapter_path).expect("save");
    let mut spec = common::sdxl_spec(&fx);
    spec.base = base;
    spec.adapter = adapter_path;
    spec
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mip-strict-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    dir
}

fn load_err(spec: &mip_worker::pipeline::ModelSpec) -> ModelError {
    match MipPipeline::load(spec, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading must fail"),
        Err(e) => e,
    }
}

#[test]
fn unedited_copy_loads() {
    let dir = tmp("ok");
    let spec = model_with(&dir, |_| {}, |_| {});
    MipPipeline::load(&spec, &Device::Cpu, DType::F32).expect("an unedited copy loads");
}

#[test]
fn removed_unet_key_is_named() {
    let dir = tmp("removed-unet");
    let key = "down_blocks.1.attentions.0.transformer_blocks.0.norm2.bias";
    let spec = model_with(&dir, |m| assert!(m.remove(key).is_some()), |_| {});
    let err = load_err(&spec);
    assert!(
        matches!(&err, ModelError::MissingKey { key: k, .. } if k == key),
        "{err}"
    );
    assert!(err.to_string().contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn extra_unet_key_is_named() {
    let dir = tmp("extra-unet");
    let key = "add_embedding.linear_3.weight";
    let spec = model_with(
        &dir,
        |m| drop(m.insert(key.into(), Tensor::zeros(4, DType::F32, &Device::Cpu).expect("t"))),
        |_| {},
    );
    let err = load_err(&spec);
    assert!(
        matches!(&err, ModelError::UnusedKey { key: k, .. } if k == key),
        "{err}"
    );
    assert!(err.to_string().contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn removed_adapter_key_is_named() {
    let dir = tmp("removed-adapter");
    let key = "ip_adapter.11.text_to_weight.weight";
    let spec = model_with(&dir, |_| {}, |m| assert!(m.remove(key).is_some()));
    let err = load_err(&spec);
    assert!(
        matches!(&err, ModelError::MissingKey { key: k, .. } if k == key),
        "{err}"
    );
    assert!(err.to_string().contains("adapter.safetensors"), "{err}");
}

#[test]
fn extra_adapter_key_is_named() {
    let dir = tmp("extra-adapter");
    let key = "ip_adapter.99.to_k_ip.weight";
    let spec = model_with(
        &dir,
        |_| {},
        |m| drop(m.insert(key.into(), Tensor::zeros((4, 4), DType::F32, &Device::Cpu).expect("t"))),
    );
    let err = load_err(&spec);
    assert!(
        matches!(&err, ModelError::UnusedKey { key: k, .. } if k == key),
        "{err}"
    );
    assert!(err.to_string().contains("adapter.safetensors"), "{err}");
}
