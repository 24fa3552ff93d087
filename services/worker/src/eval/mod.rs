//! Measuring quality: the evaluation models (CLIP ViT-B/32 as a `CLIPModel`, DINO ViT-S/16 as a `ViTModel`, both
//! loaded strictly from local folders in their transformers layouts), the evaluation's exact preprocessing
//! ([`preprocess`]) and the published metrics ([`metrics`]).

pub mod metrics;
pub mod preprocess;
pub mod scorer;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{ForwardContext, Result};
use crate::model::clip::{ClipModel, ClipTextConfig, ClipVisionConfig};
use crate::model::vit::{VitConfig, VitModel};
use crate::model::weights::{find_weights, WeightSet};
use crate::pipeline::tokenizer::ClipTokenizer;

/// The CLIP model of the evaluation with its tokenizer.
pub struct ClipEval {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    device: Device,
}

impl ClipEval {
    /// Loads `dir` (`config.json` of a `CLIPConfig`, `model.safetensors`, the tokenizer files) strictly.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = dir.join("config.json");
        let text = ClipTextConfig::from_file(&cfg)?;
        let vision = ClipVisionConfig::from_file(&cfg)?;
        let ws = Arc::new(WeightSet::from_safetensors(&find_weights(dir, &["model"])?)?);
        let model = ws.build(dtype, device, |vb| ClipModel::new(vb, &text, &vision))?;
        ws.ensure_all_used()?;
        Ok(Self {
            model,
            tokenizer: ClipTokenizer::from_dir(dir)?,
            device: device.clone(),
        })
    }

    /// The caption's ids as the evaluation tokenises it (`truncation=True`, padded to the context length).
    pub fn caption_ids(&self, caption: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_padded(caption)
    }

    /// Text features (1, P) of a caption, f32, not normalised.
    pub fn text_features(&self, caption: &str) -> Result<Tensor> {
        let ids = self.caption_ids(caption)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)
            .and_then(|t| t.unsqueeze(0))
            .stage("clip text")?;
        self.model
            .text_features(&ids)
            .and_then(|t| t.to_dtype(DType::F32))
            .stage("clip text")
    }

    /// Image features (B, P) of preprocessed pixels (B, 3, 224, 224), f32, not normalised.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = pixels.to_device(&self.device).stage("clip image")?;
        self.model
            .image_features(&x)
            .and_then(|t| t.to_dtype(DType::F32))
            .stage("clip image")
    }
}

/// The DINO model of the evaluation.
pub struct DinoEval {
    model: VitModel,
    device: Device,
}

impl DinoEval {
    /// Loads `dir` (`config.json` of a `ViTConfig`, `model.safetensors`) strictly.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = VitConfig::from_file(&dir.join("config.json"))?;
        let ws = Arc::new(WeightSet::from_safetensors(&find_weights(dir, &["model"])?)?);
        let model = ws.build(dtype, device, |vb| VitModel::new(vb, &cfg))?;
        ws.ensure_all_used()?;
        Ok(Self {
            model,
            device: device.clone(),
        })
    }

    /// DINO features (B, H) of preprocessed pixels (B, 3, 224, 224), f32, not normalised.
    pub fn features(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = pixels.to_device(&self.device).stage("dino")?;
        self.model
            .cls_features(&x)
            .and_then(|t| t.to_dtype(DType::F32))
            .stage("dino")
    }
}
