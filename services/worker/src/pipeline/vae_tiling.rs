//! When the VAE decodes in tiles: `never`, `always` (tiles of the configured size), or `auto` (the default): whole
//! when [`AutoencoderKL::decode_peak_bytes`] fits the budget (the configured one, else the device's free memory at
//! decode time, of which 3/4 is used), otherwise in the largest tiles that fit, no larger than the configured tile.

use std::fmt;
use std::str::FromStr;

use crate::model::vae::AutoencoderKL;

/// The tiling mode of the worker's `model.vae_tiling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TilingMode {
    #[default]
    Auto,
    Always,
    Never,
}

impl FromStr for TilingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err("one of auto, always, never".into()),
        }
    }
}

impl fmt::Display for TilingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Always => "always",
            Self::Never => "never",
        })
    }
}

/// The tiling policy of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VaeTiling {
    pub mode: TilingMode,
    /// Largest tile in image pixels; `None` = the VAE config's `sample_size` (diffusers' tile).
    pub tile_px: Option<usize>,
    /// Memory an untiled decode may use, in bytes; `None` = the device's free memory.
    pub budget_bytes: Option<u64>,
}

impl VaeTiling {
    /// The latent tile to decode an `h` x `w` latent with, or `None` for a whole decode. `free` reads the device's
    /// free memory (only asked in `auto` mode without a configured budget).
    pub fn plan(&self, vae: &AutoencoderKL, h: usize, w: usize, free: impl FnOnce() -> Option<u64>) -> Option<usize> {
        let max_tile = self
            .tile_px
            .map_or_else(|| vae.default_tile(), |px| (px / vae.config().scale_factor()).max(8));
        match self.mode {
            TilingMode::Never => None,
            TilingMode::Always => Some(max_tile),
            TilingMode::Auto => {
                // Free memory is shared with everything else the process allocates meanwhile: use 3/4 of it.
                let budget = self.budget_bytes.or_else(|| free().map(|f| f / 4 * 3))?;
                if vae.decode_peak_bytes(h, w) <= budget {
                    return None;
                }
                Some(vae.tile_for_budget(budget, max_tile.min(h.max(w))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::parity::fixtures_dir;

    fn vae() -> AutoencoderKL {
        let dir = fixtures_dir().expect("fixtures").join("sdxl/vae");
        AutoencoderKL::load(&dir, DType::F32, &Device::Cpu).expect("vae")
    }

    #[test]
    fn modes_and_budgets_decide_the_tile() {
        let vae = vae();
        let f = vae.config().scale_factor();
        let need = vae.decode_peak_bytes(64, 64);
        let no_free = || None;
        let never = VaeTiling {
            mode: TilingMode::Never,
            budget_bytes: Some(1),
            ..Default::default()
        };
        assert_eq!(never.plan(&vae, 64, 64, no_free), None);
        let always = VaeTiling {
            mode: TilingMode::Always,
            tile_px: Some(32 * f),
            ..Default::default()
        };
        assert_eq!(always.plan(&vae, 64, 64, no_free), Some(32));
        let auto = VaeTiling::default();
        // No budget and no reading of free memory: whole.
        assert_eq!(auto.plan(&vae, 64, 64, no_free), None);
        // Enough free memory (3/4 of it is used): whole; too little: a tile whose estimate fits.
        assert_eq!(auto.plan(&vae, 64, 64, || Some(need * 2)), None);
        let tile = auto.plan(&vae, 64, 64, || Some(need / 2)).expect("tiled");
        assert!(tile < 64 && vae.decode_peak_bytes(tile, tile) <= need / 8 * 3, "{tile}");
        // A configured budget wins over free memory.
        let budget = VaeTiling {
            budget_bytes: Some(need),
            ..Default::default()
        };
        assert_eq!(budget.plan(&vae, 64, 64, || Some(1)), None);
        assert!(budget.plan(&vae, 128, 128, || Some(u64::MAX)).is_some());
        assert_eq!(
            "sometimes".parse::<TilingMode>().expect_err("unknown mode"),
            "one of auto, always, never"
        );
        assert_eq!("always".parse::<TilingMode>(), Ok(TilingMode::Always));
    }
}
