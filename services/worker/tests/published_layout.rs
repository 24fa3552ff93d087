//! The real-scale file formats at a small size: `mip model random`'s layout (fp16 variant files, a sharded UNet
//! with a `…index.fp16.json`, the adapter as a torch pickle, `mip.json`) written with the demo model's sizes loads
//! strictly, reports its load per component, and generates; a key missing from a shard or an extra key in the
//! pickle is named with its file.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mip_worker::demo::full_size::{write_full_size, AdapterKind, FullSizeOptions};
use mip_worker::demo::safetensors_out::write_safetensors;
use mip_worker::demo::torch_pickle::{write_torch_checkpoint, StateDict};
use mip_worker::model::image_proj::load_adapter_weights;
use mip_worker::pipeline::{GenerateRequest, MipPipeline, ModelSpec, SubjectRequest};
use mip_worker::ModelError;

fn write(dir: &Path, adapter: AdapterKind) -> ModelSpec {
    let opts = FullSizeOptions {
        adapter,
        // Small enough that the small UNet spans several shards.
        unet_shard_bytes: 1 << 20,
        small: true,
    };
    let parts = write_full_size(dir, &opts, &mut |_, _| {}).expect("write");
    let names: Vec<_> = parts.iter().map(|p| p.component).collect();
    assert_eq!(
        names,
        [
            "text_encoder",
            "text_encoder_2",
            "image_encoder",
            "unet",
            "adapter",
            "vae"
        ]
    );
    ModelSpec::from_bundle(dir).expect("mip.json")
}

/// The UNet's shard files, in order.
fn shards(unet: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(unet)
        .expect("unet dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with("diffusion_pytorch_model.fp16-") && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    files
}

fn generate(p: &MipPipeline) -> Vec<u8> {
    let subject = |name: &str, i| SubjectRequest {
        name: name.into(),
        images: vec![mip_worker::demo::example_image(i)],
    };
    let req = GenerateRequest {
        prompt: "a cat wearing a jacket".into(),
        subjects: vec![subject("cat", 0), subject("jacket", 1)],
        width: 128,
        height: 128,
        steps: 2,
        seed: Some(3),
        ..Default::default()
    }
    .validate(p.default_scale())
    .expect("valid");
    p.generate(&req, &mut |_| true).expect("generates").png
}

#[test]
fn both_adapters_load_strictly_report_and_generate() {
    for adapter in [AdapterKind::Sdxl, AdapterKind::SdxlPlus] {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = write(dir.path(), adapter);
        let unet = spec.base.join("unet");
        assert!(unet
            .join("diffusion_pytorch_model.safetensors.index.fp16.json")
            .is_file());
        assert!(shards(&unet).len() > 1, "the small UNet spans several 1 MiB shards");
        assert!(spec.base.join("text_encoder/model.fp16.safetensors").is_file());
        assert_eq!(spec.adapter.extension().and_then(|e| e.to_str()), Some("bin"));

        let p = MipPipeline::load(&spec, &Device::Cpu, DType::F32).expect("strict load");
        let report = p.load_report();
        let components: Vec<_> = report.components.iter().map(|c| c.component).collect();
        assert_eq!(
            components,
            ["text_encoder", "text_encoder_2", "image_encoder", "unet+adapter", "vae"]
        );
        // Stored in f16, loaded in f32: the report counts the loaded bytes.
        let te = &report.components[0];
        let file = std::fs::metadata(spec.base.join("text_encoder/model.fp16.safetensors"))
            .expect("file")
            .len();
        assert!(
            te.weight_bytes > file && te.weight_bytes < 2 * file,
            "{} vs {file}",
            te.weight_bytes
        );
        assert!(report.components.iter().all(|c| c.seconds >= 0.0 && c.weight_bytes > 0));
        if cfg!(target_os = "linux") {
            assert!(report.peak_rss_bytes().expect("peak") > 0);
        }
        let png = generate(&p);
        assert_eq!(&png[1..4], b"PNG");
    }
}

#[test]
fn a_key_missing_from_a_shard_and_an_extra_pickle_key_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write(dir.path(), AdapterKind::Sdxl);

    // Drop one tensor from the first UNet shard.
    let unet = spec.base.join("unet");
    let shard = shards(&unet).remove(0);
    let mut tensors = candle_core::safetensors::load(&shard, &Device::Cpu).expect("shard");
    let mut keys: Vec<_> = tensors.keys().cloned().collect();
    keys.sort();
    let dropped = keys[0].clone();
    tensors.remove(&dropped);
    let entries: Vec<(String, Vec<usize>)> = tensors.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    let values = |name: &str, _: &[usize]| -> candle_core::Result<Tensor> { Ok(tensors[name].clone()) };
    write_safetensors(&shard, DType::F16, &entries, &values).expect("rewrite shard");
    match MipPipeline::load(&spec, &Device::Cpu, DType::F32) {
        Err(ModelError::MissingKey { key, .. }) => assert_eq!(key, dropped),
        Err(e) => panic!("expected the missing key {dropped}, got {e}"),
        Ok(_) => panic!("a shard without {dropped} must not load"),
    }

    // Fresh model; add an unused tensor to the adapter pickle.
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write(dir.path(), AdapterKind::Sdxl);
    let ws = load_adapter_weights(&spec.adapter).expect("adapter");
    let dicts: Vec<StateDict> = ["image_proj", "ip_adapter"]
        .into_iter()
        .map(|key| {
            let mut entries: Vec<(String, Vec<usize>)> = ws
                .keys()
                .into_iter()
                .filter_map(|k| {
                    let dims = ws.dims(&k)?;
                    Some((k.strip_prefix(&format!("{key}."))?.to_owned(), dims))
                })
                .collect();
            if key == "ip_adapter" {
                entries.push(("99.to_k_ip.weight".into(), vec![4, 4]));
            }
            StateDict {
                key: key.into(),
                entries,
            }
        })
        .collect();
    let values = |name: &str, shape: &[usize]| -> candle_core::Result<Tensor> {
        match ws.peek(name) {
            Some(t) => Ok(t),
            None => Tensor::zeros(shape, DType::F32, &Device::Cpu),
        }
    };
    write_torch_checkpoint(&spec.adapter, &dicts, DType::F16, &values).expect("rewrite adapter");
    match MipPipeline::load(&spec, &Device::Cpu, DType::F32) {
        Err(ModelError::UnusedKey { key, file }) => {
            assert_eq!(key, "ip_adapter.99.to_k_ip.weight");
            assert!(file.ends_with("model_sdxl.bin"), "{file}");
        }
        Err(e) => panic!("expected the unused key, got {e}"),
        Ok(_) => panic!("an adapter with an extra key must not load"),
    }
}
