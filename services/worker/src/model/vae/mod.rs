//! The SDXL VAE: diffusers `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D` blocks, built from
//! `vae/config.json` and loaded strictly (encoder and decoder both, so every key of the checkpoint is used).
//!
//! - [`VaeConfig`]: the published config (unknown fields ignored).
//! - [`Encoder`] / [`Decoder`]: conv_in, blocks, mid block, GroupNorm + SiLU + conv_out.
//! - [`AutoencoderKL`]: `encode` -> diagonal-Gaussian `(mean, logvar)`, `decode` (post_quant_conv + decoder),
//!   `decode_scaled` (undoes the latent scaling first).
//! - `config`: the config struct; `blocks`: resnets, up/down samplers, the mid-block attention; `tiled`: diffusers'
//!   tiled decode and the memory estimate that decides when to use it.
//!
//! The dtype is the caller's: build with f32 or bf16 (the SDXL VAE overflows in f16, `force_upcast` says so);
//! inputs are cast to the weights' dtype and outputs come back in it.

mod blocks;
mod config;
mod tiled;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::model::conv::{conv2d, Conv2d};
use crate::model::norm::{group_norm, GroupNormAct};

pub use blocks::{Downsample2D, MidBlock, ResnetBlock2D, Upsample2D, VaeAttention, VAE_NORM_EPS};
pub use config::VaeConfig;

use crate::error::{ForwardContext, Result};
use crate::model::weights::{find_weights, WeightSet};

fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    conv2d(cin, cout, 3, 1, 1, vb)
}

fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    conv2d(cin, cout, 1, 1, 0, vb)
}

/// One `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then an optional resampler.
#[derive(Debug, Clone)]
struct Stage<S> {
    resnets: Vec<ResnetBlock2D>,
    sampler: Option<S>,
}

impl<S: Module> Module for Stage<S> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        match &self.sampler {
            Some(s) => s.forward(&h),
            None => Ok(h),
        }
    }
}

fn resnets(vb: &VarBuilder, n: usize, cin: usize, cout: usize, g: usize) -> candle_core::Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|j| ResnetBlock2D::new(vb.pp(format!("resnets.{j}")), if j == 0 { cin } else { cout }, cout, g))
        .collect()
}

/// The VAE encoder: image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Stage<Downsample2D>>,
    mid_block: MidBlock,
    conv_norm_out: GroupNormAct,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let last = ch[ch.len() - 1];
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vbi = vb.pp(format!("down_blocks.{i}"));
            let sampler = if i + 1 < ch.len() {
                Some(Downsample2D::new(vbi.pp("downsamplers.0"), cout)?)
            } else {
                None
            };
            down_blocks.push(Stage {
                resnets: resnets(&vbi, cfg.layers_per_block, cin, cout, g)?,
                sampler,
            });
            cin = cout;
        }
        Ok(Self {
            conv_in: conv3x3(cfg.in_channels, ch[0], vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            conv_norm_out: group_norm(g, last, VAE_NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(last, 2 * cfg.latent_channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

/// The VAE decoder: latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f), roughly in [-1, 1].
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<Stage<Upsample2D>>,
    conv_norm_out: GroupNormAct,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = ch.len();
        let last = ch[n - 1];
        let mut up_blocks = Vec::with_capacity(n);
        let mut cin = last;
        for i in 0..n {
            let cout = ch[n - 1 - i];
            let vbi = vb.pp(format!("up_blocks.{i}"));
            let sampler = if i + 1 < n {
                Some(Upsample2D::new(vbi.pp("upsamplers.0"), cout)?)
            } else {
                None
            };
            up_blocks.push(Stage {
                resnets: resnets(&vbi, cfg.layers_per_block + 1, cin, cout, g)?,
                sampler,
            });
            cin = cout;
        }
        Ok(Self {
            conv_in: conv3x3(cfg.latent_channels, last, vb.pp("conv_in"))?,
            mid_block: MidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: group_norm(g, ch[0], VAE_NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(ch[0], cfg.out_channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid_block.forward(&h)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

/// diffusers `AutoencoderKL`: encoder, `quant_conv`, `post_quant_conv`, decoder.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
    dtype: DType,
}

impl AutoencoderKL {
    /// Builds the whole model (encoder and decoder) from `vb`, whose dtype becomes the compute dtype.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let lc = cfg.latent_channels;
        let quant_conv = match cfg.use_quant_conv {
            true => Some(conv1x1(2 * lc, 2 * lc, vb.pp("quant_conv"))?),
            false => None,
        };
        let post_quant_conv = match cfg.use_post_quant_conv {
            true => Some(conv1x1(lc, lc, vb.pp("post_quant_conv"))?),
            false => None,
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` strictly (every key used).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_bytes(dir, dtype, device).map(|(vae, _)| vae)
    }

    /// [`Self::load`], also returning the bytes of the weights in `dtype`.
    pub fn load_with_bytes(dir: &Path, dtype: DType, device: &Device) -> Result<(Self, u64)> {
        let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
        let ws = Arc::new(WeightSet::from_safetensors(&find_weights(
            dir,
            &["diffusion_pytorch_model"],
        )?)?);
        let vae = ws.build(dtype, device, |vb| Self::new(vb, &cfg))?;
        ws.ensure_all_used()?;
        Ok((vae, ws.bytes_in(dtype)))
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The compute dtype (that of the weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Image (B, 3, H, W) in [-1, 1] -> the diagonal Gaussian's `(mean, logvar)`, each (B, latent_channels,
    /// H/8, W/8) for SDXL; `logvar` clamped to [-30, 20] as diffusers does. Unscaled (multiply a sample by
    /// `scaling_factor` for the UNet).
    pub fn encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = image.to_dtype(self.dtype).stage("vae encode")?;
        let h = self.encoder.forward(&x).stage("vae encoder")?;
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&h).stage("vae quant_conv")?,
            None => h,
        };
        let lc = self.config.latent_channels;
        let mean = moments.narrow(1, 0, lc).stage("vae encode")?;
        let logvar = moments
            .narrow(1, lc, lc)
            .and_then(|l| l.clamp(-30f32, 20f32))
            .stage("vae encode")?;
        Ok((mean, logvar))
    }

    /// Latents already divided by the scaling factor -> image (B, 3, H, W), roughly in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = latents.to_dtype(self.dtype).stage("vae decode")?;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(&z).stage("vae post_quant_conv")?,
            None => z,
        };
        self.decoder.forward(&z).stage("vae decoder")
    }

    /// UNet-space latents -> image: undoes the scaling (`x * std / scaling_factor + mean` when the config has
    /// `latents_mean`/`latents_std`, else `x / scaling_factor + shift_factor`), then [`Self::decode`].
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.unscale_latents(latents)?;
        self.decode(&z)
    }

    /// The latent un-scaling of [`Self::decode_scaled`], computed in f32 and returned in the model dtype.
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let x = latents.to_dtype(DType::F32).stage("vae unscale")?;
        let z = match (&cfg.latents_mean, &cfg.latents_std) {
            (Some(mean), Some(std)) => {
                let per_channel = |v: &[f64]| {
                    let v: Vec<f32> = v.iter().map(|x| *x as f32).collect();
                    Tensor::from_vec(v, (1, cfg.latent_channels, 1, 1), x.device())
                };
                let std = (per_channel(std).stage("vae unscale")? / cfg.scaling_factor).stage("vae unscale")?;
                let mean = per_channel(mean).stage("vae unscale")?;
                x.broadcast_mul(&std).and_then(|x| x.broadcast_add(&mean))
            }
            _ => (x / cfg.scaling_factor).and_then(|x| x + cfg.shift_factor.unwrap_or(0.0)),
        };
        z.and_then(|z| z.to_dtype(self.dtype)).stage("vae unscale")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ModelError;
    use crate::parity::{compare, fixtures_dir, Tolerance};
    use candle_core::safetensors::load;

    fn vae_dir() -> std::path::PathBuf {
        fixtures_dir().expect("fixtures").join("sdxl/vae")
    }

    fn fixture_set() -> Arc<WeightSet> {
        let path = find_weights(&vae_dir(), &["diffusion_pytorch_model"]).expect("weights");
        Arc::new(WeightSet::from_safetensors(&path).expect("load"))
    }

    fn decode_case(case: &str) {
        let vae = AutoencoderKL::load(&vae_dir(), DType::F32, &Device::Cpu).expect("strict load");
        let t = load(
            fixtures_dir().expect("fixtures").join(case).join("tensors.safetensors"),
            &Device::Cpu,
        )
        .expect("tensors");
        let got = vae.decode_scaled(&t["loop.final_latents"]).expect("decode");
        let check = compare(&format!("{case} vae.decoded"), &got, &t["vae.decoded"], Tolerance::LOOP);
        println!("{}", check.line());
        assert!(check.ok, "{}", check.line());
    }

    #[test]
    fn vae_decode_matches_fixture_two_objects() {
        decode_case("cases/sdxl_two_objects");
    }

    #[test]
    fn vae_decode_matches_fixture_plus() {
        decode_case("cases/sdxl_plus_two_objects_multi_ref");
    }

    /// Half-precision plumbing (weights, GroupNorm upcast, f32 attention). candle's CPU matmul has no bf16
    /// kernel, so the CPU runs this in f16 (the tiny model does not overflow); on CUDA the same path runs bf16.
    #[test]
    fn vae_decode_half_is_close_to_f32() {
        let t = load(
            fixtures_dir()
                .expect("fixtures")
                .join("cases/sdxl_two_objects/tensors.safetensors"),
            &Device::Cpu,
        )
        .expect("tensors");
        let vae = AutoencoderKL::load(&vae_dir(), DType::F16, &Device::Cpu).expect("load f16");
        let got = vae.decode_scaled(&t["loop.final_latents"]).expect("decode");
        assert_eq!(got.dtype(), DType::F16);
        let check = compare("vae.decoded f16", &got, &t["vae.decoded"], Tolerance::Scaled(2e-2));
        println!("{}", check.line());
        assert!(check.ok, "{}", check.line());
    }

    /// The real SDXL VAE config (weights zero, shapes only): the architecture builds and round-trips shapes.
    #[test]
    fn vae_builds_with_real_sdxl_config() {
        let cfg: VaeConfig = serde_json::from_str(
            r#"{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                "DownEncoderBlock2D"], "force_upcast": true, "in_channels": 3, "latent_channels": 4,
                "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
                "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D",
                "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
        )
        .expect("config");
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let vae = AutoencoderKL::new(vb, &cfg).expect("build");
        let z = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).expect("z");
        assert_eq!(vae.decode_scaled(&z).expect("decode").dims(), &[1, 3, 32, 32]);
        let img = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).expect("img");
        let (mean, logvar) = vae.encode(&img).expect("encode");
        assert_eq!((mean.dims(), logvar.dims()), (&[1, 4, 4, 4][..], &[1, 4, 4, 4][..]));
    }

    #[test]
    fn vae_encode_shapes() {
        let vae = AutoencoderKL::load(&vae_dir(), DType::F32, &Device::Cpu).expect("load");
        let img = Tensor::randn(0f32, 0.5, (2, 3, 64, 48), &Device::Cpu).expect("randn");
        let (mean, logvar) = vae.encode(&img).expect("encode");
        assert_eq!(mean.dims(), &[2, 4, 8, 6]);
        assert_eq!(logvar.dims(), &[2, 4, 8, 6]);
        let lv = logvar.flatten_all().and_then(|l| l.to_vec1::<f32>()).expect("vec");
        assert!(lv.iter().all(|v| (-30.0..=20.0).contains(v)));
        let back = vae.decode(&mean).expect("decode");
        assert_eq!(back.dims(), &[2, 3, 64, 48]);
    }

    #[test]
    fn vae_legacy_attention_keys_load() {
        let ws = fixture_set();
        let mut legacy = WeightSet::empty("legacy");
        for key in ws.keys() {
            let renamed = key
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            legacy.insert(renamed, ws.peek(&key).expect("key"));
        }
        let legacy = Arc::new(legacy);
        let cfg = VaeConfig::from_file(&vae_dir().join("config.json")).expect("cfg");
        let a = ws
            .build(DType::F32, &Device::Cpu, |vb| AutoencoderKL::new(vb, &cfg))
            .expect("new keys");
        let b = legacy
            .build(DType::F32, &Device::Cpu, |vb| AutoencoderKL::new(vb, &cfg))
            .expect("legacy keys");
        legacy.ensure_all_used().expect("all legacy keys used");
        let z = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).expect("randn");
        let check = compare(
            "legacy vs new keys",
            &b.decode(&z).expect("b"),
            &a.decode(&z).expect("a"),
            Tolerance::Exact,
        );
        assert!(check.ok, "{}", check.line());
    }

    #[test]
    fn vae_strict_loading_names_keys() {
        let cfg = VaeConfig::from_file(&vae_dir().join("config.json")).expect("cfg");
        let ws = fixture_set();
        let mut missing = WeightSet::empty("mem");
        for key in ws.keys().into_iter().filter(|k| k != "encoder.conv_in.bias") {
            missing.insert(key.clone(), ws.peek(&key).expect("key"));
        }
        missing.insert(
            "extra.weight",
            Tensor::zeros(1, DType::F32, &Device::Cpu).expect("zeros"),
        );
        let missing = Arc::new(missing);
        let err = missing
            .build(DType::F32, &Device::Cpu, |vb| AutoencoderKL::new(vb, &cfg))
            .expect_err("missing key");
        assert!(
            matches!(err, ModelError::MissingKey { ref key, .. } if key == "encoder.conv_in.bias"),
            "{err}"
        );
        ws.build(DType::F32, &Device::Cpu, |vb| AutoencoderKL::new(vb, &cfg))
            .expect("build");
        ws.ensure_all_used().expect("every fixture key is used");
    }

    #[test]
    fn vae_attention_chunking_is_exact_enough() {
        let ws = fixture_set();
        let attn = ws
            .build(DType::F32, &Device::Cpu, |vb| {
                VaeAttention::new(vb.pp("decoder.mid_block.attentions.0"), 64, 32)
            })
            .expect("attn");
        let x = Tensor::randn(0f32, 1.0, (2, 64, 9, 7), &Device::Cpu).expect("randn");
        let full = attn.forward(&x).expect("full");
        let chunked = attn.forward_chunked(&x, 2 * 63 * 5).expect("chunked");
        let check = compare("attention chunked", &chunked, &full, Tolerance::Scaled(1e-6));
        println!("{}", check.line());
        assert!(check.ok, "{}", check.line());
    }
}
