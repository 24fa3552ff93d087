//! Loading a whole MIP-Adapter SDXL model from its [`ModelSpec`] and the per-stage entry points the worker serves
//! from: text encoding, subject encoding (preprocess → image encoder → projection → average), UNet calls and
//! VAE decoding. Strict loading: every tensor of every checkpoint must be used.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use super::image_decode::DEFAULT_MAX_PIXELS;
use super::load_report::LoadReport;
use super::preprocess::{ClipPreprocessor, PreparedImage, PreprocessConfig};
use super::scheduler::SchedulerConfig;
use super::spec::ModelSpec;
use super::tokenizer::ClipTokenizer;
use super::vae_tiling::VaeTiling;
use crate::error::{ForwardContext, InvalidInput, ModelError, Result};
use crate::model::clip::{ClipTextConfig, ClipTextModel, ClipVisionConfig, ClipVisionModel};
use crate::model::image_proj::{load_adapter_weights, ImageProj, ImageProjConfig, ImageProjVariant as Variant};
use crate::model::unet::{AdapterWeights, UNet2DConditionModel, UNetConfig};
use crate::model::vae::AutoencoderKL;
use crate::model::weights::{find_weights, read_json, WeightSet};

/// A text encoded for the UNet: `hidden` (1, 77, C1 + C2) and the pooled vector (1, P) of the second encoder.
#[derive(Debug, Clone)]
pub struct TextEmbedding {
    pub hidden: Tensor,
    pub pooled: Tensor,
}

/// The fields of `model_index.json` the pipeline reads.
#[derive(Debug, Clone, Deserialize)]
struct ModelIndex {
    #[serde(default = "yes")]
    force_zeros_for_empty_prompt: bool,
}

fn yes() -> bool {
    true
}

/// A loaded MIP-Adapter SDXL model on one device.
pub struct MipPipeline {
    pub(crate) spec: ModelSpec,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    pub(crate) tokenizer_1: ClipTokenizer,
    pub(crate) tokenizer_2: ClipTokenizer,
    pub(crate) text_encoder_1: ClipTextModel,
    pub(crate) text_encoder_2: ClipTextModel,
    pub(crate) image_encoder: ClipVisionModel,
    pub(crate) image_proj: ImageProj,
    pub(crate) preprocess: ClipPreprocessor,
    pub(crate) unet: UNet2DConditionModel,
    pub(crate) unet_config: UNetConfig,
    pub(crate) vae: AutoencoderKL,
    pub(crate) scheduler: SchedulerConfig,
    pub(crate) force_zeros_for_empty_prompt: bool,
    pub(crate) uncond_tokens: Tensor,
    /// When the VAE decodes in tiles (the worker sets it from its config).
    pub vae_tiling: VaeTiling,
    pub(crate) load_report: LoadReport,
}

impl MipPipeline {
    /// Loads every part named by `spec` onto `device`, computing in `dtype` (the VAE in
    /// [`super::precision::vae_dtype`]: f32 unless `dtype` is bf16, the SDXL VAE overflows in f16).
    pub fn load(spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Self> {
        let base = &spec.base;
        let mut report = LoadReport::default();
        let index: ModelIndex = read_json(&base.join("model_index.json"))?;
        let tokenizer_1 = ClipTokenizer::from_dir(base.join("tokenizer"))?;
        let tokenizer_2 = ClipTokenizer::from_dir(base.join("tokenizer_2"))?;
        let text_encoder_1 = report.measure("text_encoder", || {
            load_text_encoder(&base.join("text_encoder"), false, dtype, device)
        })?;
        let text_encoder_2 = report.measure("text_encoder_2", || {
            load_text_encoder(&base.join("text_encoder_2"), true, dtype, device)
        })?;

        let ie_dir = &spec.image_encoder;
        let image_encoder = report.measure("image_encoder", || {
            let ie_cfg = ClipVisionConfig::from_file(&ie_dir.join("config.json"))?;
            let ie_ws = Arc::new(WeightSet::from_safetensors(&find_weights(
                ie_dir,
                &["model", "pytorch_model"],
            )?)?);
            let image_encoder = ie_ws.build(dtype, device, |vb| ClipVisionModel::new(vb, &ie_cfg))?;
            ie_ws.ensure_all_used()?;
            Ok::<_, ModelError>((image_encoder, ie_ws.bytes_in(dtype)))
        })?;
        let pp_path = ie_dir.join("preprocessor_config.json");
        let preprocess = if pp_path.is_file() {
            ClipPreprocessor::from_config_file(&pp_path)?
        } else {
            ClipPreprocessor::new(PreprocessConfig::default(), DEFAULT_MAX_PIXELS)
        };

        let unet_dir = base.join("unet");
        let unet_config: UNetConfig = read_json(&unet_dir.join("config.json"))?;
        let (unet, image_proj) = report.measure("unet+adapter", || {
            let unet_ws = Arc::new(WeightSet::from_safetensors(&find_weights(
                &unet_dir,
                &["diffusion_pytorch_model"],
            )?)?);
            let adapter_ws = Arc::new(load_adapter_weights(&spec.adapter)?);
            let proj_cfg = ImageProjConfig::from_adapter(&adapter_ws, spec.resampler)?;
            let image_proj = adapter_ws.build(dtype, device, |vb| ImageProj::new(vb.pp("image_proj"), &proj_cfg))?;
            let adapter_vb = adapter_ws.var_builder(dtype, device);
            let unet = unet_ws
                .build(dtype, device, |vb| {
                    UNet2DConditionModel::new(vb, &unet_config, Some(AdapterWeights::new(adapter_vb.pp("ip_adapter"))))
                })
                .map_err(|e| adapter_ws.take_error().unwrap_or(e))?;
            unet_ws.ensure_all_used()?;
            adapter_ws.ensure_all_used()?;
            let bytes = unet_ws.bytes_in(dtype) + adapter_ws.bytes_in(dtype);
            Ok::<_, ModelError>(((unet, image_proj), bytes))
        })?;

        let vae_dtype = super::precision::vae_dtype(dtype);
        let vae = report.measure("vae", || {
            AutoencoderKL::load_with_bytes(&base.join("vae"), vae_dtype, device)
        })?;
        let scheduler = SchedulerConfig::from_file(&base.join("scheduler").join("scheduler_config.json"))?;
        for c in &report.components {
            tracing::info!(
                component = c.component,
                seconds = c.seconds,
                weight_bytes = c.weight_bytes,
                peak_rss_bytes = c.peak_rss_bytes,
                "component loaded"
            );
        }

        let mut pipeline = Self {
            spec: spec.clone(),
            device: device.clone(),
            dtype,
            tokenizer_1,
            tokenizer_2,
            text_encoder_1,
            text_encoder_2,
            image_encoder,
            image_proj,
            preprocess,
            unet,
            unet_config,
            vae,
            scheduler,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            uncond_tokens: Tensor::zeros(1, DType::F32, &Device::Cpu).stage("load")?,
            vae_tiling: VaeTiling::default(),
            load_report: report,
        };
        pipeline.uncond_tokens = pipeline.compute_uncond_tokens()?;
        Ok(pipeline)
    }

    /// Time and memory of the load, per component.
    pub fn load_report(&self) -> &LoadReport {
        &self.load_report
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `sdxl` (pooled embeds, ImageProjModel) or `sdxl_plus` (penultimate states, Resampler).
    pub fn variant(&self) -> Variant {
        self.image_proj.variant()
    }

    /// Image tokens per subject.
    pub fn num_tokens(&self) -> usize {
        self.image_proj.num_tokens()
    }

    /// Channels of the latents (the UNet's `in_channels`).
    pub fn latent_channels(&self) -> usize {
        self.unet_config.in_channels
    }

    /// The image-prompt scale the published pipeline uses for this variant.
    pub fn default_scale(&self) -> f64 {
        match self.variant() {
            Variant::Plain => 0.75,
            Variant::Plus => 0.65,
        }
    }

    /// The paths the model was loaded from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Encodes a prompt with both text encoders (penultimate states concatenated; pooled from the second).
    pub fn encode_text(&self, text: &str) -> Result<TextEmbedding> {
        let ids_1 = self.tokenizer_1.encode_padded(text)?;
        let ids_2 = self.tokenizer_2.encode_padded(text)?;
        let ids_1 = Tensor::new(ids_1.as_slice(), &self.device)
            .and_then(|t| t.unsqueeze(0))
            .stage("text")?;
        let ids_2 = Tensor::new(ids_2.as_slice(), &self.device)
            .and_then(|t| t.unsqueeze(0))
            .stage("text")?;
        let out_1 = self.text_encoder_1.forward(&ids_1).stage("text_encoder")?;
        let out_2 = self.text_encoder_2.forward(&ids_2).stage("text_encoder_2")?;
        let hidden = Tensor::cat(&[&out_1.penultimate, &out_2.penultimate], D::Minus1).stage("text")?;
        let pooled = out_2.pooled.ok_or_else(|| ModelError::Config {
            path: self.spec.base.join("text_encoder_2"),
            message: "text_encoder_2 has no text_projection".into(),
        })?;
        Ok(TextEmbedding { hidden, pooled })
    }

    /// Zero embeddings shaped like an encoded text (SDXL's `force_zeros_for_empty_prompt`).
    pub fn zero_text(&self, like: &TextEmbedding) -> Result<TextEmbedding> {
        Ok(TextEmbedding {
            hidden: like.hidden.zeros_like().stage("text")?,
            pooled: like.pooled.zeros_like().stage("text")?,
        })
    }

    /// Whether an absent negative prompt means zero embeddings.
    pub fn zeros_for_absent_negative(&self) -> bool {
        self.force_zeros_for_empty_prompt
    }

    /// Number of tokens of a subject name under tokenizer 1 (without BOS/EOS); zero is an error on `field`.
    pub fn name_token_len(&self, name: &str, field: &str) -> Result<usize> {
        let n = self.tokenizer_1.count_tokens(name);
        let limit = self.tokenizer_1.max_length().saturating_sub(2);
        if n == 0 || n > limit {
            return Err(
                InvalidInput::new(field, format!("must have 1..={limit} tokens"), format!("{n} tokens")).into(),
            );
        }
        Ok(n)
    }

    /// Decodes and preprocesses one reference image; `field` names it in errors.
    pub fn prepare_image(&self, bytes: &[u8], field: &str) -> Result<PreparedImage> {
        self.preprocess.prepare(bytes, field)
    }

    /// Preprocessed pixel values (B, 3, H, W) of prepared images.
    pub fn pixel_values(&self, images: &[PreparedImage]) -> Result<Tensor> {
        self.preprocess.batch(images, &self.device)
    }

    /// Image tokens (B, T, C) for preprocessed pixels (B, 3, 224, 224).
    pub fn encode_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pixels = pixel_values
            .to_device(&self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .stage("image_encoder")?;
        let out = self.image_encoder.forward(&pixels).stage("image_encoder")?;
        let features = match self.variant() {
            Variant::Plain => out.image_embeds,
            Variant::Plus => out.penultimate,
        };
        self.image_proj.forward(&features).stage("image_proj")
    }

    /// A subject's tokens (T, C): each image projected, then averaged over the images.
    pub fn encode_subject(&self, images: &[PreparedImage]) -> Result<Tensor> {
        let pixels = self.preprocess.batch(images, &self.device)?;
        let tokens = self.encode_pixels(&pixels)?;
        tokens.mean(0).and_then(|t| t.to_dtype(DType::F32)).stage("image_proj")
    }

    /// The unconditional image tokens (T, C).
    pub fn uncond_tokens(&self) -> &Tensor {
        &self.uncond_tokens
    }

    fn compute_uncond_tokens(&self) -> Result<Tensor> {
        let tokens = match self.variant() {
            Variant::Plain => {
                let dim = self.image_encoder.config().projection_dim;
                let zeros = Tensor::zeros((1, dim), self.dtype, &self.device).stage("uncond")?;
                self.image_proj.forward(&zeros).stage("uncond")?
            }
            Variant::Plus => {
                let cfg = self.image_encoder.config();
                let zeros =
                    Tensor::zeros((1, 3, cfg.image_size, cfg.image_size), DType::F32, &self.device).stage("uncond")?;
                self.encode_pixels(&zeros)?
            }
        };
        tokens.squeeze(0).and_then(|t| t.to_dtype(DType::F32)).stage("uncond")
    }
}

/// A text encoder and the bytes of its weights in `dtype`.
fn load_text_encoder(dir: &Path, with_projection: bool, dtype: DType, device: &Device) -> Result<(ClipTextModel, u64)> {
    let cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
    let ws = Arc::new(WeightSet::from_safetensors(&find_weights(
        dir,
        &["model", "pytorch_model"],
    )?)?);
    let model = ws.build(dtype, device, |vb| ClipTextModel::new(vb, &cfg, with_projection))?;
    ws.ensure_all_used()?;
    Ok((model, ws.bytes_in(dtype)))
}
