//! `mip bench --sdxl`: the pipeline's stages with random weights in the real SDXL shapes (what the PyTorch anchor
//! benchmark, `anchor_bench.py` packed by `scripts/gpu/build-cuda.sh`, times, so the two run side by side): both
//! text encoders on 6 sequences, the ViT-bigG image encoder on 2 images, one CFG UNet step (batch 2) with the
//! weighted merge of 2 subjects and one without the adapter, the VAE decode of one image (in the bench dtype like
//! the anchor, and in the dtype the pipeline decodes in when that differs), and the whole image estimated as
//! `encoders + steps x merged step + decode` (the anchor's formula). `--tiny` shrinks every model for CPU runs.
//! On CUDA it also reports the peak device memory in use (sampled every 2 ms through the driver) and checks the
//! fused kernels of `mip-kernels` against candle's unfused ops in SDXL shapes (max errors and timings). On every
//! device it also times single ops in SDXL shapes, the `op_profile` (see [`crate::bench_ops`]), and single UNet
//! blocks, the `block_profile` (see [`crate::bench_blocks`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use mip_worker::error::ForwardContext;
use mip_worker::eval::preprocess::{EvalTransform, CLIP_EVAL, DINO_EVAL};
use mip_worker::model::clip::text::ClipTextModel;
use mip_worker::model::clip::vision::ClipVisionModel;
use mip_worker::model::clip::{ClipModel, ClipTextConfig, ClipVisionConfig};
use mip_worker::model::unet::{AdapterWeights, MergeCond, UNet2DConditionModel, UNetCond, UNetConfig};
use mip_worker::model::vae::{AutoencoderKL, VaeConfig};
use mip_worker::model::vit::{VitConfig, VitModel};
use mip_worker::pipeline::generate::{decode_latents, denoise_with, Sampling};
use mip_worker::pipeline::image_decode::RgbImage;
use mip_worker::pipeline::precision::vae_dtype;
use mip_worker::pipeline::scheduler::{SchedulerConfig, SchedulerKind};

use crate::bench_blocks::block_profile;
use crate::bench_ops::{kernel_check, median_ms, op_profile};
use serde_json::{json, Value};

/// Weights drawn on demand: `N(0, 1/fan_in)` for matrices and kernels, ones for norm scales, zeros for biases.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let std = 1.0 / (fan_in.max(1) as f32).sqrt();
            return Tensor::randn(0f32, std, s, dev)?.to_dtype(dtype);
        }
        let leaf = name.rsplit('.').next().unwrap_or(name);
        if leaf == "weight" || leaf == "gamma" {
            Tensor::ones(s, dtype, dev)
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: `{name}` has no known shape")
    }

    /// Optional buffers (`position_ids`) are absent; every weight is present.
    fn contains_tensor(&self, name: &str) -> bool {
        !name.ends_with("position_ids")
    }
}

/// Model configs: the real SDXL ones, or tiny ones of the same layout.
struct Configs {
    unet: Value,
    vae: Value,
    text_l: Value,
    text_g: Value,
    vision: Value,
    pooled: usize,
}

fn configs(tiny: bool) -> Configs {
    let mut unet = json!({"in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": true,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816});
    let mut vae = json!({"in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
        "scaling_factor": 0.13025});
    let mut text_l = json!({"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"});
    let mut text_g = json!({"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
        "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
        "projection_dim": 1280});
    let mut vision = json!({"hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48,
        "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 1280, "hidden_act": "gelu"});
    let mut pooled = 1280;
    if tiny {
        unet["block_out_channels"] = json!([32, 64, 128]);
        unet["attention_head_dim"] = json!([2, 4, 8]);
        unet["transformer_layers_per_block"] = json!([1, 1, 2]);
        unet["cross_attention_dim"] = json!(64);
        unet["addition_time_embed_dim"] = json!(8);
        unet["projection_class_embeddings_input_dim"] = json!(80);
        vae["block_out_channels"] = json!([32, 64, 64, 64]);
        for (cfg, hidden) in [(&mut text_l, 32), (&mut text_g, 32), (&mut vision, 64)] {
            cfg["hidden_size"] = json!(hidden);
            cfg["intermediate_size"] = json!(hidden * 4);
            cfg["num_hidden_layers"] = json!(2);
            cfg["num_attention_heads"] = json!(4);
        }
        text_g["projection_dim"] = json!(32);
        vision["projection_dim"] = json!(32);
        pooled = 32;
    }
    Configs {
        unet,
        vae,
        text_l,
        text_g,
        vision,
        pooled,
    }
}

/// Peak device memory in use while alive (CUDA only), sampled by a thread every 2 ms.
struct MemSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl MemSampler {
    fn start(device: &Device) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let handle = used_bytes_fn(device).map(|used| {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(u) = used() {
                        peak.fetch_max(u, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        });
        Self { stop, peak, handle }
    }

    /// Peak bytes in use on the device, or `None` off CUDA.
    fn finish(mut self) -> Option<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let h = self.handle.take()?;
        h.join().ok()?;
        Some(self.peak.load(Ordering::Relaxed))
    }
}

#[cfg(feature = "cuda")]
fn used_bytes_fn(device: &Device) -> Option<Box<dyn Fn() -> Option<usize> + Send>> {
    let ctx = device.as_cuda_device().ok()?.cuda_stream().context().clone();
    Some(Box::new(move || {
        ctx.mem_get_info().ok().map(|(free, total)| total - free)
    }))
}

#[cfg(not(feature = "cuda"))]
fn used_bytes_fn(_: &Device) -> Option<Box<dyn Fn() -> Option<usize> + Send>> {
    None
}

/// What `--sdxl` runs with.
pub struct SdxlArgs {
    pub device: Device,
    pub dtype: DType,
    pub size: (usize, usize),
    pub steps: usize,
    pub subjects: usize,
    pub iters: usize,
    pub tiny: bool,
}

/// Runs every stage and returns the results as JSON (times in ms).
pub fn run(a: &SdxlArgs) -> Result<Value> {
    let cfg = configs(a.tiny);
    let (dev, dt) = (&a.device, a.dtype);
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dt, dev.clone());
    let mut out = serde_json::Map::new();
    if dev.is_cuda() {
        let check = kernel_check(dev, dt, a.iters).unwrap_or_else(|e| json!(format!("error: {e:#}")));
        out.insert("kernel_check".into(), check);
    }
    let profile = op_profile(dev, dt, a.iters, a.tiny).unwrap_or_else(|e| json!(format!("error: {e:#}")));
    out.insert("op_profile".into(), profile);
    let blocks = block_profile(&vb, dev, dt, a.iters, a.tiny).unwrap_or_else(|e| json!(format!("error: {e:#}")));
    out.insert("block_profile".into(), blocks);
    let sampler = MemSampler::start(dev);

    let text_l: ClipTextConfig = serde_json::from_value(cfg.text_l)?;
    let text_g: ClipTextConfig = serde_json::from_value(cfg.text_g)?;
    let enc_l = ClipTextModel::new(vb.pp("text_encoder"), &text_l, false)?;
    let enc_g = ClipTextModel::new(vb.pp("text_encoder_2"), &text_g, true)?;
    let ids = Tensor::rand(0f32, 49000.0, (6, 77), dev)?.to_dtype(DType::U32)?;
    let text_ms = median_ms(dev, a.iters, || {
        enc_l.forward(&ids)?;
        Ok(enc_g.forward(&ids)?.penultimate)
    })?;
    out.insert("text_encode_ms_6seqs_both".into(), json!(text_ms));

    let vision: ClipVisionConfig = serde_json::from_value(cfg.vision)?;
    let image_size = vision.image_size;
    let enc = ClipVisionModel::new(vb.pp("image_encoder"), &vision)?;
    let px = Tensor::randn(0f32, 1.0, (a.subjects, 3, image_size, image_size), dev)?;
    let image_ms = median_ms(dev, a.iters, || Ok(enc.forward(&px)?.penultimate))?;
    out.insert(format!("image_encode_ms_{}imgs", a.subjects), json!(image_ms));

    let (unet, merged, plain) = unet_and_conds(a, &vb, cfg.unet, cfg.pooled)?;
    let sample = Tensor::randn(0f32, 1.0, (2, 4, a.size.1 / 8, a.size.0 / 8), dev)?;
    let merged_ms = median_ms(dev, a.iters, || Ok(unet.forward(&sample, 500.0, &merged)?))?;
    let plain_ms = median_ms(dev, a.iters, || Ok(unet.forward(&sample, 500.0, &plain)?))?;
    out.insert("unet_step_ms_merge".into(), json!(merged_ms));
    out.insert("unet_step_ms_plain".into(), json!(plain_ms));

    let vae_cfg: VaeConfig = serde_json::from_value(cfg.vae)?;
    let vae = AutoencoderKL::new(vb.pp("vae"), &vae_cfg)?;
    let z = Tensor::randn(0f32, 1.0, (1, 4, a.size.1 / 8, a.size.0 / 8), dev)?;
    let vae_ms = median_ms(dev, a.iters, || Ok(vae.decode(&z)?))?;
    out.insert("vae_decode_ms_1img".into(), json!(vae_ms));
    // The VAE as the pipeline runs it: f32 (TF32 GEMMs on CUDA) for a f16 pipeline, where the line above is the
    // anchor's like-for-like f16 decode.
    let vae_dt = vae_dtype(dt);
    let (pipeline_vae, pipeline_vae_ms) = if vae_dt == dt {
        (vae, vae_ms)
    } else {
        drop(vae);
        let vae = AutoencoderKL::new(vb.clone().set_dtype(vae_dt), &vae_cfg)?;
        let ms = median_ms(dev, a.iters, || Ok(decode_latents(&vae, &z, dt, None)?))?;
        out.insert(
            format!("vae_decode_ms_1img_{vae_dt:?}_pipeline").to_lowercase(),
            json!(ms),
        );
        (vae, ms)
    };

    // The whole image, measured: the encoders, the real sampling loop (Euler, CFG, the merge every step) and the
    // decode in the pipeline's VAE dtype, one after another with every model resident.
    let t0 = Instant::now();
    enc_l.forward(&ids)?;
    enc_g.forward(&ids)?;
    enc.forward(&px)?;
    let sampling = Sampling {
        scheduler: &sdxl_scheduler()?,
        kind: SchedulerKind::Euler,
        steps: a.steps,
        guidance: 5.0,
    };
    let noise = Tensor::randn(0f32, 1.0, (1, 4, a.size.1 / 8, a.size.0 / 8), dev)?;
    let mut step = |x: &Tensor, t: f64| {
        unet.forward(x, t, &merged)
            .and_then(|e| e.to_dtype(DType::F32))
            .stage("unet")
    };
    let latents = denoise_with(&mut step, &sampling, &noise, &mut |_, _| true)?;
    decode_latents(&pipeline_vae, &latents, dt, None)?;
    dev.synchronize()?;
    out.insert(
        format!("whole_image_ms_{}steps_measured", a.steps),
        json!(t0.elapsed().as_secs_f64() * 1e3),
    );
    drop((enc_l, enc_g, enc, unet, pipeline_vae));

    let whole = text_ms + image_ms + a.steps as f64 * merged_ms + vae_ms;
    out.insert(format!("whole_image_ms_{}steps_estimated", a.steps), json!(whole));
    let score = score_ms(a)?;
    out.insert("score_ms_1img".into(), json!(score));
    out.insert(
        "score_share_of_whole_image".into(),
        json!(score / (whole - vae_ms + pipeline_vae_ms)),
    );
    if pipeline_vae_ms != vae_ms {
        out.insert(
            format!("whole_image_ms_{}steps_pipeline_vae_estimated", a.steps),
            json!(whole - vae_ms + pipeline_vae_ms),
        );
    }
    let plain_whole = text_ms + a.steps as f64 * plain_ms + vae_ms;
    out.insert(
        format!("whole_image_ms_{}steps_plain_estimated", a.steps),
        json!(plain_whole),
    );
    if let Some(peak) = sampler.finish() {
        out.insert("peak_gpu_mem_gib".into(), json!(peak as f64 / (1u64 << 30) as f64));
    }
    Ok(Value::Object(out))
}

/// The UNet with adapter weights, and the conditioning of a CFG call (batch 2) with the weighted merge of
/// `subjects` subjects (4 tokens each, names of 1 and 2 tokens alternately) and of one without the adapter.
fn unet_and_conds(
    a: &SdxlArgs,
    vb: &VarBuilder,
    cfg: Value,
    pooled: usize,
) -> Result<(UNet2DConditionModel, UNetCond, UNetCond)> {
    let dev = &a.device;
    let cfg: UNetConfig = serde_json::from_value(cfg).context("sdxl unet config")?;
    let cross = match &cfg.cross_attention_dim {
        mip_worker::model::unet::config::OneOrMany::One(c) => *c,
        mip_worker::model::unet::config::OneOrMany::Many(v) => v.first().copied().unwrap_or(2048),
    };
    let unet = UNet2DConditionModel::new(
        vb.pp("unet"),
        &cfg,
        Some(AdapterWeights::new(vb.pp("adapter").pp("ip_adapter"))),
    )?;
    let (w, h) = a.size;
    let (n, t) = (a.subjects, 4);
    let text = Tensor::randn(0f32, 1.0, (2, 77, cross), dev)?;
    let ip = Tensor::randn(0f32, 1.0, (2, n * t, cross), dev)?;
    let time_ids = Tensor::new(&[[h as f32, w as f32, 0., 0., h as f32, w as f32]; 2], dev)?;
    let text_embeds = Tensor::randn(0f32, 1.0, (2, pooled), dev)?;
    let merged = UNetCond {
        encoder_hidden_states: Tensor::cat(&[&text, &ip], 1)?,
        text_embeds: text_embeds.clone(),
        time_ids: time_ids.clone(),
        merge: Some(MergeCond {
            entity_text_embeds: Tensor::randn(0f32, 1.0, (2, n, 77, cross), dev)?.to_dtype(a.dtype)?,
            entity_token_lens: (0..n).map(|i| 1 + i % 2).collect(),
            num_tokens: t,
            scale: 0.75,
            capture: None,
        }),
    };
    let plain = UNetCond {
        encoder_hidden_states: text,
        text_embeds,
        time_ids,
        merge: None,
    };
    Ok((unet, merged, plain))
}

/// Scoring one generated image of `a.size` as a scoring request does: both evaluation preprocessings (resize,
/// crop, normalise to 224²), CLIP ViT-B/32 image and caption features and DINO ViT-S/16 features, in f32 as the
/// worker runs them, with random weights in their real shapes (`--tiny`: small ones).
fn score_ms(a: &SdxlArgs) -> Result<f64> {
    let (dev, dt) = (&a.device, DType::F32);
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dt, dev.clone());
    let (text, vision, dino) = if a.tiny {
        (json!([32, 64, 2, 4]), json!([32, 64, 2, 4]), json!([32, 64, 2, 4]))
    } else {
        (
            json!([512, 2048, 12, 8]),
            json!([768, 3072, 12, 12]),
            json!([384, 1536, 12, 6]),
        )
    };
    let dims = |v: &Value, i: usize| v[i].as_u64().unwrap_or(1);
    let text: ClipTextConfig = serde_json::from_value(json!({"hidden_size": dims(&text, 0),
        "intermediate_size": dims(&text, 1), "num_hidden_layers": dims(&text, 2), "num_attention_heads": dims(&text, 3),
        "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 512, "eos_token_id": 49407}))?;
    let vision: ClipVisionConfig = serde_json::from_value(json!({"hidden_size": dims(&vision, 0),
        "intermediate_size": dims(&vision, 1), "num_hidden_layers": dims(&vision, 2),
        "num_attention_heads": dims(&vision, 3), "image_size": 224, "patch_size": 32, "projection_dim": 512}))?;
    let dino: VitConfig = serde_json::from_value(json!({"hidden_size": dims(&dino, 0),
        "intermediate_size": dims(&dino, 1), "num_hidden_layers": dims(&dino, 2), "num_attention_heads": dims(&dino, 3),
        "image_size": 224, "patch_size": 16}))?;
    let clip = ClipModel::new(vb.pp("eval_clip"), &text, &vision)?;
    let dino = VitModel::new(vb.pp("eval_dino"), &dino)?;
    let (w, h) = a.size;
    let image = RgbImage {
        width: w,
        height: h,
        data: (0..w * h * 3).map(|i| (i * 31 % 251) as u8).collect(),
    };
    let ids = Tensor::rand(0f32, 49000.0, (1, 77), dev)?.to_dtype(DType::U32)?;
    median_ms(dev, a.iters, || {
        let pixels = |t: &EvalTransform| -> Result<Tensor> {
            Ok(t.tensor_of(&image, "image")?
                .unsqueeze(0)?
                .to_device(dev)?
                .to_dtype(dt)?)
        };
        clip.image_features(&pixels(&CLIP_EVAL)?)?;
        clip.text_features(&ids)?;
        Ok(dino.cls_features(&pixels(&DINO_EVAL)?)?)
    })
}

/// SDXL base's `scheduler_config.json` (EulerDiscreteScheduler): scaled-linear betas 0.00085..0.012 over 1000
/// steps, `leading` spacing with offset 1, epsilon prediction.
fn sdxl_scheduler() -> Result<SchedulerConfig> {
    Ok(serde_json::from_value(json!({
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
        "interpolation_type": "linear", "use_karras_sigmas": false
    }))?)
}
