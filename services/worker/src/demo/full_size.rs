//! `mip model random`: a full-size MIP-Adapter SDXL checkpoint with random weights, in the layouts and sizes the
//! published artefacts have, so the real-scale path (multi-gigabyte files, f16 variants, a sharded UNet, the
//! adapter as a torch pickle) can be exercised without downloading anything:
//!
//! - `stable-diffusion-xl-base-1.0/`: `model_index.json`, `scheduler/`, `tokenizer{,_2}/` (a CLIP-layout BPE of
//!   the published vocabulary size), `text_encoder{,_2}/model.fp16.safetensors`, `vae/…fp16.safetensors`,
//!   `unet/diffusion_pytorch_model.fp16-0000i-of-0000n.safetensors` with `…safetensors.index.fp16.json`;
//! - `IP-Adapter/sdxl_models/image_encoder/` (ViT-bigG/14) or, for `sdxl_plus`, `IP-Adapter/models/image_encoder/`
//!   (ViT-H/14): `config.json`, `model.safetensors` stored in f16 as published;
//! - `MIP-Adapter/model_sdxl.bin` (or `model_sdxl_plus.bin`): `{"image_proj": …, "ip_adapter": …}` in f16;
//! - `mip.json` naming the three.
//!
//! Keys and shapes are recorded by building our own modules from the published configs (so they are exactly what
//! the strict loader reads); values are drawn per tensor while writing ([`super::weights`]). With
//! [`FullSizeOptions::small`] the same layout is written with the demo model's sizes (a few MB), so tests exercise
//! every file format of the real-scale path.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::json;

use super::safetensors_out::Sharding;
use super::torch_pickle::{write_torch_checkpoint, StateDict};
use super::weights::RandomWeights;
use super::{configs, published};
use super::{record, write, write_json};
use crate::error::Result;
use crate::model::clip::{ClipTextConfig, ClipTextModel, ClipVisionConfig, ClipVisionModel};
use crate::model::image_proj::{ImageProj, ImageProjConfig, ImageProjModelConfig, ResamplerConfig};
use crate::model::unet::{AdapterWeights, UNet2DConditionModel, UNetConfig};
use crate::model::vae::{AutoencoderKL, VaeConfig};
use crate::pipeline::spec::MANIFEST;

const SEED: u64 = 0x4d49_5046_554c_4c31;

/// Which published adapter to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// `model_sdxl.bin`: `ImageProjModel` (4 tokens) over the ViT-bigG/14 image embedding.
    Sdxl,
    /// `model_sdxl_plus.bin`: the Resampler (16 tokens) over ViT-H/14 hidden states.
    SdxlPlus,
}

/// Options of [`write_full_size`].
#[derive(Debug, Clone)]
pub struct FullSizeOptions {
    pub adapter: AdapterKind,
    /// Largest UNet shard in bytes (the published single file is 5.14 GB; shards exercise the index path).
    pub unet_shard_bytes: u64,
    /// The demo model's sizes instead of the published ones (same files and formats; for tests).
    pub small: bool,
}

impl Default for FullSizeOptions {
    fn default() -> Self {
        Self {
            adapter: AdapterKind::Sdxl,
            unet_shard_bytes: 2 << 30,
            small: false,
        }
    }
}

/// The configs written: the published ones, or the demo model's.
struct Sizes {
    text: [serde_json::Value; 2],
    image_encoder: serde_json::Value,
    unet: serde_json::Value,
    vae: serde_json::Value,
    vocab: usize,
    default_size: usize,
    /// The Resampler of a small `sdxl_plus` model (recorded in `mip.json`); `None` = the published one.
    resampler: Option<ResamplerConfig>,
}

fn sizes(opts: &FullSizeOptions) -> Sizes {
    let plus = opts.adapter == AdapterKind::SdxlPlus;
    if !opts.small {
        return Sizes {
            text: [published::text_encoder(false), published::text_encoder(true)],
            image_encoder: published::image_encoder(plus),
            unet: published::unet(),
            vae: published::vae(),
            vocab: published::CLIP_VOCAB,
            default_size: 1024,
            resampler: None,
        };
    }
    let vocab = super::tokenizer::vocab_size();
    let context = 2 * configs::TEXT_HIDDEN;
    Sizes {
        text: [
            configs::text_encoder(vocab, "quick_gelu", false),
            configs::text_encoder(vocab, "gelu", true),
        ],
        image_encoder: configs::image_encoder(),
        unet: configs::unet(),
        vae: configs::vae(),
        vocab: 0,
        default_size: 256,
        resampler: plus.then_some(ResamplerConfig {
            dim: 64,
            depth: 2,
            dim_head: 16,
            heads: 4,
            num_queries: 8,
            embedding_dim: configs::image_encoder()["hidden_size"].as_u64().unwrap_or(32) as usize,
            output_dim: context,
            ff_mult: 2,
        }),
    }
}

/// One component written: its name, its main file and the bytes of its weights.
#[derive(Debug, Clone)]
pub struct WrittenPart {
    pub component: &'static str,
    pub path: PathBuf,
    pub bytes: u64,
}

/// Writes the full-size random checkpoint into `out`, calling `progress` before each component (name, number of
/// values to draw) and collecting what was written. About 11.3 GB for `sdxl`, 10.2 GB for `sdxl_plus`.
pub fn write_full_size(
    out: &Path,
    opts: &FullSizeOptions,
    progress: &mut dyn FnMut(&str, usize),
) -> Result<Vec<WrittenPart>> {
    let mut parts = Vec::new();
    let sizes = sizes(opts);
    let base = out.join("stable-diffusion-xl-base-1.0");
    write_json(&base.join("model_index.json"), &published::model_index())?;
    write_json(&base.join("scheduler/scheduler_config.json"), &published::scheduler())?;
    for (dir, pad) in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")] {
        for (name, text) in super::tokenizer::tokenizer_files(pad, sizes.vocab) {
            write(&base.join(dir).join(name), text.as_bytes())?;
        }
    }
    for (i, (dir, component)) in [("text_encoder", "text_encoder"), ("text_encoder_2", "text_encoder_2")]
        .into_iter()
        .enumerate()
    {
        let second = i == 1;
        let cfg_path = base.join(dir).join("config.json");
        write_json(&cfg_path, &sizes.text[i])?;
        let cfg = ClipTextConfig::from_file(&cfg_path)?;
        let w = RandomWeights::new(SEED ^ i as u64);
        record(&cfg_path, |vb| ClipTextModel::new(vb, &cfg, second).map(drop), &w)?;
        progress(component, w.num_values());
        let path = base.join(dir).join("model.fp16.safetensors");
        let bytes = w.save(&path, DType::F16)?;
        parts.push(WrittenPart { component, path, bytes });
    }

    let (ie_rel, adapter_rel) = match opts.adapter {
        AdapterKind::Sdxl => ("IP-Adapter/sdxl_models/image_encoder", "MIP-Adapter/model_sdxl.bin"),
        AdapterKind::SdxlPlus => ("IP-Adapter/models/image_encoder", "MIP-Adapter/model_sdxl_plus.bin"),
    };
    let ie = out.join(ie_rel);
    write_json(&ie.join("config.json"), &sizes.image_encoder)?;
    let ie_cfg = ClipVisionConfig::from_file(&ie.join("config.json"))?;
    let w = RandomWeights::new(SEED ^ 2);
    record(&ie, |vb| ClipVisionModel::new(vb, &ie_cfg).map(drop), &w)?;
    progress("image_encoder", w.num_values());
    let path = ie.join("model.safetensors");
    let bytes = w.save(&path, DType::F16)?;
    parts.push(WrittenPart {
        component: "image_encoder",
        path,
        bytes,
    });

    let unet_dir = base.join("unet");
    write_json(&unet_dir.join("config.json"), &sizes.unet)?;
    let unet_cfg: UNetConfig = crate::model::weights::read_json(&unet_dir.join("config.json"))?;
    let unet_w = RandomWeights::new(SEED ^ 3);
    let adapter_w = RandomWeights::new(SEED ^ 4);
    let adapter_vb = adapter_w.var_builder();
    record(
        &unet_dir,
        |vb| UNet2DConditionModel::new(vb, &unet_cfg, Some(AdapterWeights::new(adapter_vb.pp("ip_adapter")))).map(drop),
        &unet_w,
    )?;
    // SDXL's context width: the two text encoders' hidden sizes side by side.
    let context = sizes
        .text
        .iter()
        .map(|t| t["hidden_size"].as_u64().unwrap_or(0) as usize)
        .sum();
    let proj_cfg = match opts.adapter {
        AdapterKind::Sdxl => ImageProjConfig::Plain(ImageProjModelConfig {
            clip_embeddings_dim: ie_cfg.projection_dim,
            cross_attention_dim: context,
            num_tokens: 4,
        }),
        AdapterKind::SdxlPlus => ImageProjConfig::Plus(
            sizes
                .resampler
                .unwrap_or_else(|| ResamplerConfig::published(ie_cfg.hidden_size, context)),
        ),
    };
    let adapter_path = out.join(adapter_rel);
    record(
        &adapter_path,
        |_| ImageProj::new(adapter_vb.pp("image_proj"), &proj_cfg).map(drop),
        &adapter_w,
    )?;
    progress("unet", unet_w.num_values());
    let sharding = Sharding {
        dir: unet_dir.clone(),
        stem: "diffusion_pytorch_model".into(),
        variant: Some("fp16".into()),
        max_bytes: opts.unet_shard_bytes,
    };
    let bytes = unet_w.save_sharded(&sharding, DType::F16)?;
    parts.push(WrittenPart {
        component: "unet",
        path: sharding.index_path(),
        bytes,
    });

    progress("adapter", adapter_w.num_values());
    let dicts: Vec<StateDict> = ["image_proj", "ip_adapter"]
        .into_iter()
        .map(|key| StateDict {
            key: key.to_owned(),
            entries: adapter_w
                .entries()
                .into_iter()
                .filter_map(|(name, shape)| Some((name.strip_prefix(&format!("{key}."))?.to_owned(), shape)))
                .collect(),
        })
        .collect();
    let bytes = write_torch_checkpoint(&adapter_path, &dicts, DType::F16, &|name, shape| {
        adapter_w.values(name, shape)
    })?;
    parts.push(WrittenPart {
        component: "adapter",
        path: adapter_path,
        bytes,
    });

    let vae_dir = base.join("vae");
    write_json(&vae_dir.join("config.json"), &sizes.vae)?;
    let vae_cfg = VaeConfig::from_file(&vae_dir.join("config.json"))?;
    let w = RandomWeights::new(SEED ^ 5);
    record(&vae_dir, |vb| AutoencoderKL::new(vb, &vae_cfg).map(drop), &w)?;
    progress("vae", w.num_values());
    let path = vae_dir.join("diffusion_pytorch_model.fp16.safetensors");
    let bytes = w.save(&path, DType::F16)?;
    parts.push(WrittenPart {
        component: "vae",
        path,
        bytes,
    });

    let mut manifest = json!({
        "base": "stable-diffusion-xl-base-1.0", "image_encoder": ie_rel, "adapter": adapter_rel,
        "default_size": [sizes.default_size, sizes.default_size],
    });
    if let Some(r) = sizes.resampler {
        manifest["resampler"] = serde_json::to_value(r).map_err(|e| crate::error::ModelError::Config {
            path: out.join(MANIFEST),
            message: e.to_string(),
        })?;
    }
    write_json(&out.join(MANIFEST), &manifest)?;
    Ok(parts)
}
