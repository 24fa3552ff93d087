//! The built-in demo model: a small, deterministic, randomly initialised MIP-Adapter SDXL model written by our own
//! code in the published layouts (diffusers SDXL folder, IP-Adapter image encoder, adapter checkpoint), so the
//! whole pipeline runs offline. Its images are noise; point `--model` at real weights for real pictures.
//!
//! Weights are recorded by building our own modules over [`weights::RandomWeights`], so the written key set is
//! exactly what the strict loader reads back.

pub mod configs;
pub mod full_size;
pub mod published;
pub mod safetensors_out;
pub mod tokenizer;
pub mod torch_pickle;
pub mod weights;

use std::io::Cursor;
use std::path::Path;

use candle_core::DType;
use serde_json::{json, Value};

use crate::error::{ModelError, Result};
use crate::model::clip::{ClipModel, ClipTextConfig, ClipTextModel, ClipVisionConfig, ClipVisionModel};
use crate::model::image_proj::{ImageProjModel, ImageProjModelConfig};
use crate::model::unet::{AdapterWeights, UNet2DConditionModel, UNetConfig};
use crate::model::vae::{AutoencoderKL, VaeConfig};
use crate::model::vit::{VitConfig, VitModel};
use weights::RandomWeights;

/// Bumped whenever the demo model's contents change, so caches of an older one are not reused.
pub const DEMO_VERSION: u32 = 2;

const SEED: u64 = 0x4d49_5044_454d_4f31;

/// Writes the demo bundle (`mip.json`, `sdxl/`, `image_encoder/`, `adapter/`, `eval/`, `refs/`) into `out`.
pub fn write_demo(out: &Path) -> Result<()> {
    let base = out.join("sdxl");
    let vocab = tokenizer::vocab_size();
    write_json(&base.join("model_index.json"), &configs::model_index())?;
    write_json(&base.join("scheduler/scheduler_config.json"), &configs::scheduler())?;
    for (dir, pad) in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")] {
        for (name, text) in tokenizer::tokenizer_files(pad, 0) {
            write(&base.join(dir).join(name), text.as_bytes())?;
        }
    }
    for (dir, act, proj) in [("text_encoder", "quick_gelu", false), ("text_encoder_2", "gelu", true)] {
        let path = base.join(dir).join("config.json");
        write_json(&path, &configs::text_encoder(vocab, act, proj))?;
        let cfg = ClipTextConfig::from_file(&path)?;
        let w = RandomWeights::new(SEED ^ u64::from(proj));
        record(&path, |vb| ClipTextModel::new(vb, &cfg, proj).map(drop), &w)?;
        w.save(&base.join(dir).join("model.safetensors"), DType::F32)?;
    }
    let ie = out.join("image_encoder");
    write_json(&ie.join("config.json"), &configs::image_encoder())?;
    write_json(&ie.join("preprocessor_config.json"), &configs::preprocessor())?;
    let ie_cfg = ClipVisionConfig::from_file(&ie.join("config.json"))?;
    let w = RandomWeights::new(SEED ^ 2);
    record(&ie, |vb| ClipVisionModel::new(vb, &ie_cfg).map(drop), &w)?;
    w.save(&ie.join("model.safetensors"), DType::F32)?;

    let unet_cfg_path = base.join("unet/config.json");
    write_json(&unet_cfg_path, &configs::unet())?;
    let unet_cfg: UNetConfig = crate::model::weights::read_json(&unet_cfg_path)?;
    let unet_w = RandomWeights::new(SEED ^ 3);
    let adapter_w = RandomWeights::new(SEED ^ 4);
    let adapter_vb = adapter_w.var_builder();
    record(
        &unet_cfg_path,
        |vb| UNet2DConditionModel::new(vb, &unet_cfg, Some(AdapterWeights::new(adapter_vb.pp("ip_adapter")))).map(drop),
        &unet_w,
    )?;
    let proj_cfg = ImageProjModelConfig {
        clip_embeddings_dim: configs::PROJECTION_DIM,
        cross_attention_dim: 2 * configs::TEXT_HIDDEN,
        num_tokens: configs::NUM_TOKENS,
    };
    record(
        out,
        |_| ImageProjModel::new(adapter_vb.pp("image_proj"), &proj_cfg).map(drop),
        &adapter_w,
    )?;
    unet_w.save(&base.join("unet/diffusion_pytorch_model.safetensors"), DType::F32)?;
    adapter_w.save(&out.join("adapter/mip_sdxl_demo.safetensors"), DType::F32)?;

    let vae_cfg_path = base.join("vae/config.json");
    write_json(&vae_cfg_path, &configs::vae())?;
    let vae_cfg = VaeConfig::from_file(&vae_cfg_path)?;
    let w = RandomWeights::new(SEED ^ 5);
    record(&vae_cfg_path, |vb| AutoencoderKL::new(vb, &vae_cfg).map(drop), &w)?;
    w.save(&base.join("vae/diffusion_pytorch_model.safetensors"), DType::F32)?;

    write_eval_models(&out.join("eval"))?;

    for (i, name) in ["cat", "jacket"].iter().enumerate() {
        write(&out.join("refs").join(format!("{name}.png")), &example_image(i))?;
    }
    let manifest = json!({
        "base": "sdxl", "image_encoder": "image_encoder", "adapter": "adapter/mip_sdxl_demo.safetensors",
        "default_size": [256, 256], "eval": {"clip": "eval/clip", "dino": "eval/dino"},
    });
    write_json(&out.join(crate::pipeline::spec::MANIFEST), &manifest)
}

/// The tiny evaluation models of the demo bundle: `clip/` (a `CLIPModel` with the demo tokenizer) and `dino/` (a
/// `ViTModel`), in their transformers layouts.
fn write_eval_models(dir: &Path) -> Result<()> {
    let clip = dir.join("clip");
    let vocab = tokenizer::vocab_size();
    write_json(&clip.join("config.json"), &configs::eval_clip(vocab))?;
    for (name, text) in tokenizer::tokenizer_files("<|endoftext|>", 0) {
        write(&clip.join(name), text.as_bytes())?;
    }
    let cfg = clip.join("config.json");
    let (text, vision) = (ClipTextConfig::from_file(&cfg)?, ClipVisionConfig::from_file(&cfg)?);
    let w = RandomWeights::new(SEED ^ 6);
    record(&clip, |vb| ClipModel::new(vb, &text, &vision).map(drop), &w)?;
    w.save(&clip.join("model.safetensors"), DType::F32)?;
    let dino = dir.join("dino");
    write_json(&dino.join("config.json"), &configs::eval_dino())?;
    let cfg = VitConfig::from_file(&dino.join("config.json"))?;
    let w = RandomWeights::new(SEED ^ 7);
    record(&dino, |vb| VitModel::new(vb, &cfg).map(drop), &w)?;
    w.save(&dino.join("model.safetensors"), DType::F32)?;
    Ok(())
}

/// A deterministic 96x96 PNG with a coloured pattern (`i` picks the colours), for examples and benchmarks.
pub fn example_image(i: usize) -> Vec<u8> {
    let palette = [[230u8, 140, 40], [40, 80, 200], [60, 170, 80], [200, 60, 120]];
    let [r, g, b] = palette[i % palette.len()];
    let img = image::RgbImage::from_fn(96, 96, |x, y| {
        let (dx, dy) = (x as i32 - 48, y as i32 - 48);
        if dx * dx + dy * dy < 30 * 30 {
            image::Rgb([r, g, b])
        } else {
            let v = (((x / 12) + (y / 12)) % 2 * 60 + 150) as u8;
            image::Rgb([v, v, v])
        }
    });
    let mut bytes = Vec::new();
    // Encoding an in-memory RGB image to PNG cannot fail short of allocation failure.
    let _ = img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png);
    bytes
}

pub(super) fn record(
    what: &Path,
    build: impl FnOnce(candle_nn::VarBuilder<'static>) -> candle_core::Result<()>,
    w: &RandomWeights,
) -> Result<()> {
    build(w.var_builder()).map_err(|e| ModelError::Load {
        path: what.to_owned(),
        message: format!("demo model: {e}"),
    })
}

pub(super) fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| io_err(path, e))?;
    write(path, text.as_bytes())
}

pub(super) fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err(path, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| io_err(path, e))
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.to_owned(),
        message: format!("cannot write: {e}"),
    }
}
