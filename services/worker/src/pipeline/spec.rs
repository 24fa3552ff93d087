//! Where a model's parts live: a [`ModelSpec`] names the diffusers SDXL folder, the IP-Adapter image encoder folder
//! and the MIP-Adapter checkpoint. A model *bundle* is a folder with a `mip.json` manifest naming them relative to
//! the folder (the demo model is written this way); each path can also be given on its own.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::model::image_proj::ResamplerConfig;
use crate::model::weights::read_json;

/// File name of a bundle's manifest.
pub const MANIFEST: &str = "mip.json";

/// The parts of a MIP-Adapter SDXL model on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Diffusers SDXL folder (`model_index.json`, `unet/`, `vae/`, text encoders, tokenizers, `scheduler/`).
    pub base: PathBuf,
    /// IP-Adapter `image_encoder/` folder (CLIPVisionModelWithProjection).
    pub image_encoder: PathBuf,
    /// Adapter checkpoint: torch pickle (`model_sdxl.bin`) or flat safetensors.
    pub adapter: PathBuf,
    /// Resampler hyper-parameters for `sdxl_plus` checkpoints; `None` = the published ones.
    #[serde(default)]
    pub resampler: Option<ResamplerConfig>,
    /// Default image size `[width, height]` when a request gives none (the demo model's is small).
    #[serde(default)]
    pub default_size: Option<[usize; 2]>,
    /// The evaluation models (`mip eval`, scores), when the bundle has them.
    #[serde(default)]
    pub eval: Option<EvalSpec>,
}

/// Where a bundle's evaluation models live: a transformers `CLIPModel` folder (with its tokenizer) and a
/// `ViTModel` folder (DINO).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub clip: PathBuf,
    pub dino: PathBuf,
}

impl ModelSpec {
    /// Reads `DIR/mip.json`, resolving its paths against `DIR`.
    pub fn from_bundle(dir: &Path) -> Result<Self> {
        let manifest = dir.join(MANIFEST);
        if !manifest.is_file() {
            return Err(ModelError::Load {
                path: manifest,
                message: "not a model bundle (no mip.json); give --base, --image-encoder and --adapter instead".into(),
            });
        }
        let mut spec: ModelSpec = read_json(&manifest)?;
        spec.base = dir.join(&spec.base);
        spec.image_encoder = dir.join(&spec.image_encoder);
        spec.adapter = dir.join(&spec.adapter);
        if let Some(e) = &mut spec.eval {
            e.clip = dir.join(&e.clip);
            e.dino = dir.join(&e.dino);
        }
        Ok(spec)
    }
}
