//! `vae/config.json` of a diffusers `AutoencoderKL`, with the checks of what this implementation supports.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::model::weights::read_json;

fn yes() -> bool {
    true
}
fn three() -> usize {
    3
}
fn silu() -> String {
    "silu".to_owned()
}

/// `vae/config.json` of a diffusers `AutoencoderKL`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub force_upcast: bool,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
    /// Image size the VAE was trained at (an int, or `[h, w]`): diffusers' tile size for tiled decoding.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

impl VaeConfig {
    /// The image-space tile of diffusers' tiled decode: `sample_size` (its first entry when a list), 512 when
    /// the config has none.
    pub fn tile_sample_size(&self) -> usize {
        let v = match &self.sample_size {
            Some(serde_json::Value::Array(a)) => a.first().and_then(serde_json::Value::as_u64),
            Some(v) => v.as_u64(),
            None => None,
        };
        v.map_or(512, |v| v as usize)
    }

    /// Image pixels per latent pixel, per side (8 for SDXL: one upsampler per block but the last).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|message| ModelError::Config {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    /// Checks what this implementation supports; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("`block_out_channels` must not be empty".into());
        }
        if self.norm_num_groups == 0 {
            return Err("`norm_num_groups` must be positive".into());
        }
        if let Some(c) = self.block_out_channels.iter().find(|c| **c % self.norm_num_groups != 0) {
            return Err(format!(
                "`block_out_channels` entry {c} is not a multiple of `norm_num_groups` {}",
                self.norm_num_groups
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!("`act_fn` must be \"silu\", got {:?}", self.act_fn));
        }
        check_blocks("down_block_types", &self.down_block_types, "DownEncoderBlock2D", n)?;
        check_blocks("up_block_types", &self.up_block_types, "UpDecoderBlock2D", n)?;
        for (field, v) in [("latents_mean", &self.latents_mean), ("latents_std", &self.latents_std)] {
            if let Some(v) = v {
                if v.len() != self.latent_channels {
                    return Err(format!(
                        "`{field}` has {} entries, expected `latent_channels` = {}",
                        v.len(),
                        self.latent_channels
                    ));
                }
            }
        }
        Ok(())
    }
}

fn check_blocks(field: &str, types: &Option<Vec<String>>, want: &str, n: usize) -> std::result::Result<(), String> {
    let Some(types) = types else { return Ok(()) };
    if types.len() != n {
        return Err(format!("`{field}` has {} entries, expected {n}", types.len()));
    }
    match types.iter().find(|t| t.as_str() != want) {
        Some(t) => Err(format!("`{field}` entry {t:?} is unsupported (only {want})")),
        None => Ok(()),
    }
}
