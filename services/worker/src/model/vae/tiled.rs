//! Tiled VAE decoding, as diffusers' `enable_vae_tiling` does it: the latent is cut into overlapping tiles
//! (`tile` latent pixels a side, a step of 75 % of a tile), each tile is decoded on its own, and neighbouring tiles
//! are blended linearly over a quarter of a tile before each is cropped to its share of the image. Tiles are
//! blended in place in raster order, so a tile blends with its upper and left neighbours as already blended, the
//! same order diffusers uses; the result is what diffusers gives for the same tile size.
//!
//! Each tile computes its own GroupNorm statistics and mid-block attention, so a tiled decode is not equal to the
//! untiled one; the blending hides the seams. [`AutoencoderKL::decode_peak_bytes`] estimates the memory an
//! untiled decode needs, so the pipeline can tile only when that does not fit.

use candle_core::{Device, Tensor};

use super::AutoencoderKL;
use crate::error::{ForwardContext, Result};

/// diffusers' `tile_overlap_factor`.
const OVERLAP: f64 = 0.25;

/// `b` with its first `extent` rows (`dim` 2) or columns (`dim` 3) blended from the last ones of `a`:
/// `a[-extent + y] * (1 - y / extent) + b[y] * (y / extent)`.
fn blend(a: &Tensor, b: &Tensor, dim: usize, extent: usize) -> Result<Tensor> {
    let s = "vae tiled blend";
    let extent = extent.min(a.dim(dim).stage(s)?).min(b.dim(dim).stage(s)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let ramp: Vec<f32> = (0..extent).map(|y| (y as f64 / extent as f64) as f32).collect();
    let inv: Vec<f32> = (0..extent).map(|y| (1.0 - y as f64 / extent as f64) as f32).collect();
    let shape = if dim == 2 { (1, 1, extent, 1) } else { (1, 1, 1, extent) };
    let dev: &Device = b.device();
    let ramp = Tensor::from_vec(ramp, shape, dev)
        .and_then(|t| t.to_dtype(b.dtype()))
        .stage(s)?;
    let inv = Tensor::from_vec(inv, shape, dev)
        .and_then(|t| t.to_dtype(b.dtype()))
        .stage(s)?;
    let tail = a.narrow(dim, a.dim(dim).stage(s)? - extent, extent).stage(s)?;
    let head = b.narrow(dim, 0, extent).stage(s)?;
    let mixed = (tail.broadcast_mul(&inv).stage(s)? + head.broadcast_mul(&ramp).stage(s)?).stage(s)?;
    let rest = b.narrow(dim, extent, b.dim(dim).stage(s)? - extent).stage(s)?;
    Tensor::cat(&[&mixed, &rest], dim).stage(s)
}

impl AutoencoderKL {
    /// diffusers' default latent tile: the config's `sample_size` over the scale factor (128 for SDXL).
    pub fn default_tile(&self) -> usize {
        (self.config.tile_sample_size() / self.config.scale_factor()).max(1)
    }

    /// Latents already divided by the scaling factor -> image, decoded in overlapping tiles of `tile` latent
    /// pixels a side (see the module docs). A latent no larger than one tile is decoded whole.
    pub fn decode_tiled(&self, latents: &Tensor, tile: usize) -> Result<Tensor> {
        let s = "vae tiled decode";
        let (_, _, h, w) = latents.dims4().stage(s)?;
        let tile = tile.max(1);
        if h <= tile && w <= tile {
            return self.decode(latents);
        }
        let f = self.config.scale_factor();
        let step = ((tile as f64 * (1.0 - OVERLAP)) as usize).max(1);
        let sample = tile * f;
        let extent = (sample as f64 * OVERLAP) as usize;
        let limit = sample - extent;
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..h).step_by(step) {
            let mut row: Vec<Tensor> = Vec::new();
            for j in (0..w).step_by(step) {
                let z = latents
                    .narrow(2, i, tile.min(h - i))
                    .and_then(|t| t.narrow(3, j, tile.min(w - j)))
                    .stage(s)?;
                let mut t = self.decode(&z)?;
                if let Some(above) = rows.last() {
                    t = blend(&above[row.len()], &t, 2, extent)?;
                }
                if let Some(left) = row.last() {
                    t = blend(left, &t, 3, extent)?;
                }
                row.push(t);
            }
            rows.push(row);
        }
        let crop = |t: &Tensor| -> Result<Tensor> {
            let (_, _, th, tw) = t.dims4().stage(s)?;
            t.narrow(2, 0, th.min(limit))
                .and_then(|t| t.narrow(3, 0, tw.min(limit)))
                .stage(s)
        };
        let mut bands = Vec::with_capacity(rows.len());
        for row in &rows {
            let parts = row.iter().map(crop).collect::<Result<Vec<_>>>()?;
            bands.push(Tensor::cat(&parts, 3).stage(s)?);
        }
        Tensor::cat(&bands, 2).stage(s)
    }

    /// An estimate of the working memory (bytes) of an untiled decode of one `h` x `w` latent in the model's
    /// dtype: at the decoder's widest stage, the activations alive around one convolution (its input, the
    /// normalised copy and the output, with their temporaries: about three copies of the input and three of the
    /// output). candle's CPU convolution unfolds its input a few hundred pixels at a time, so that is all on the
    /// CPU; on CUDA our convolution unfolds the whole input (9 values per input value for a 3x3 kernel) before its
    /// one GEMM, which is added. For SDXL at 1024x1024 in f32: about 6.4 GB on the CPU (6.1 GB measured), 16 GB on
    /// CUDA.
    pub fn decode_peak_bytes(&self, h: usize, w: usize) -> u64 {
        let ch = &self.config.block_out_channels;
        let n = ch.len();
        let elem = self.dtype.size_in_bytes() as u64;
        let unfolds = self.decoder.conv_in.weight().device().is_cuda();
        let at = |pixels: u64, c_in: u64, c_out: u64| {
            let unfold = if unfolds { pixels * elem * 9 * c_in } else { 0 };
            pixels * elem * 3 * (c_in + c_out) + unfold
        };
        let mut pixels = (h * w) as u64;
        let mut c_in = ch[n - 1] as u64;
        let mut peak = 0u64;
        for i in 0..n {
            let c_out = ch[n - 1 - i] as u64;
            peak = peak.max(at(pixels, c_in, c_out));
            if i + 1 < n {
                pixels *= 4;
                peak = peak.max(at(pixels, c_out, c_out));
            }
            c_in = c_out;
        }
        peak
    }

    /// The largest latent tile (a multiple of 8, at most `max_tile`) whose untiled decode fits `budget` bytes by
    /// [`Self::decode_peak_bytes`]; 8 when even that does not.
    pub fn tile_for_budget(&self, budget: u64, max_tile: usize) -> usize {
        let mut t = (max_tile / 8 * 8).max(8);
        while t > 8 && self.decode_peak_bytes(t, t) > budget {
            t -= 8;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::parity::fixtures_dir;

    fn vae() -> AutoencoderKL {
        let dir = fixtures_dir().expect("fixtures").join("sdxl/vae");
        AutoencoderKL::load(&dir, DType::F32, &Device::Cpu).expect("vae")
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff")
    }

    #[test]
    fn blending_is_diffusers_ramp() {
        let dev = Device::Cpu;
        let a = Tensor::ones((1, 1, 4, 2), DType::F32, &dev).expect("a");
        let b = Tensor::zeros((1, 1, 4, 2), DType::F32, &dev).expect("b");
        let out = blend(&a, &b, 2, 2).expect("blend");
        let rows: Vec<f32> = out.flatten_all().expect("flat").to_vec1().expect("vec");
        // Row 0 is all a, row 1 half a, rows 2.. untouched b.
        assert_eq!(rows, vec![1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn one_tile_is_the_untiled_decode() {
        let vae = vae();
        let z = Tensor::randn(0f32, 1.0, (1, 4, 8, 12), &Device::Cpu).expect("z");
        let whole = vae.decode(&z).expect("decode");
        let tiled = vae.decode_tiled(&z, 16).expect("tiled");
        assert_eq!(max_abs(&whole, &tiled), 0.0);
    }

    #[test]
    fn tiles_are_assembled_as_diffusers_does() {
        let vae = vae();
        let f = vae.config().scale_factor();
        let z = Tensor::randn(0f32, 1.0, (1, 4, 16, 24), &Device::Cpu).expect("z");
        let whole = vae.decode(&z).expect("decode");
        let tiled = vae.decode_tiled(&z, 8).expect("tiled");
        assert_eq!(whole.dims(), tiled.dims());
        // Tile 8, step 6, blend over 2 latent pixels' worth of image: the first tile's image up to where the
        // next tile's blend starts is that tile decoded alone, untouched.
        let (extent, limit) = (8 * f / 4, 8 * f - 8 * f / 4);
        let first = vae
            .decode(&z.narrow(2, 0, 8).and_then(|t| t.narrow(3, 0, 8)).expect("tile"))
            .expect("first tile");
        let crop = |t: &Tensor| t.narrow(2, 0, limit).and_then(|t| t.narrow(3, 0, limit)).expect("crop");
        assert_eq!(max_abs(&crop(&tiled), &crop(&first)), 0.0);
        // The second tile in the first row starts with a blend: its first column is entirely the first tile's.
        let col = |t: &Tensor, c: usize| t.narrow(2, 0, limit).and_then(|t| t.narrow(3, c, 1)).expect("col");
        assert_eq!(max_abs(&col(&tiled, limit), &col(&first, 6 * f)), 0.0);
        assert!(extent > 0);
        // Tiles see their own statistics, so the result differs from the whole decode, but not wildly.
        let diff = max_abs(&whole, &tiled);
        assert!(diff > 0.0 && diff.is_finite(), "{diff}");
    }

    #[test]
    fn tiles_stay_within_the_error_of_their_own_decodes() {
        // Each pixel of a tiled decode is a convex combination (blend weights y/e and 1 - y/e) of the decodes of
        // the tiles covering it, all taken at that pixel. So its distance from the whole decode is at most the
        // largest distance, at that pixel, of a covering tile decoded alone from the whole decode: the error is
        // the method's (a tile's own GroupNorm statistics and attention context), never the assembly's.
        let vae = vae();
        let f = vae.config().scale_factor();
        let (h, w, tile) = (16, 24, 8);
        let step = tile * 3 / 4;
        let z = Tensor::randn(0f32, 1.0, (1, 4, h, w), &Device::Cpu).expect("z");
        let whole = vae.decode(&z).expect("whole");
        let tiled = vae.decode_tiled(&z, tile).expect("tiled");
        let (c, hh, ww) = (whole.dim(1).expect("c"), h * f, w * f);
        let mut bound = vec![0f32; c * hh * ww];
        for i in (0..h).step_by(step) {
            for j in (0..w).step_by(step) {
                let (th, tw) = (tile.min(h - i), tile.min(w - j));
                let alone = vae
                    .decode(&z.narrow(2, i, th).and_then(|t| t.narrow(3, j, tw)).expect("tile"))
                    .expect("tile decode");
                let region = whole
                    .narrow(2, i * f, th * f)
                    .and_then(|t| t.narrow(3, j * f, tw * f))
                    .expect("region");
                let diff: Vec<f32> = (alone - region)
                    .and_then(|d| d.abs()?.flatten_all()?.to_vec1())
                    .expect("diff");
                let (rh, rw) = (th * f, tw * f);
                for ch in 0..c {
                    for y in 0..rh {
                        for x in 0..rw {
                            let at = &mut bound[(ch * hh + i * f + y) * ww + j * f + x];
                            *at = at.max(diff[(ch * rh + y) * rw + x]);
                        }
                    }
                }
            }
        }
        let err: Vec<f32> = (&tiled - &whole)
            .and_then(|d| d.abs()?.flatten_all()?.to_vec1())
            .expect("err");
        let worst = err
            .iter()
            .zip(&bound)
            .map(|(e, b)| e - b)
            .fold(f32::NEG_INFINITY, f32::max);
        assert!(
            worst <= 1e-5,
            "a tiled pixel is further from the whole decode than its tiles: {worst}"
        );
        assert!(
            err.iter().any(|e| *e > 0.0),
            "tiles must differ somewhere, or the check shows nothing"
        );
    }

    #[test]
    fn the_estimate_grows_with_area_and_picks_smaller_tiles_for_smaller_budgets() {
        let vae = vae();
        let big = vae.decode_peak_bytes(64, 64);
        assert!(vae.decode_peak_bytes(32, 32) * 3 < big);
        assert_eq!(vae.tile_for_budget(u64::MAX, 64), 64);
        let t = vae.tile_for_budget(big / 4, 64);
        assert!(t < 64 && vae.decode_peak_bytes(t, t) <= big / 4, "{t}");
    }
}
