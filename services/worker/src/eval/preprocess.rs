//! The evaluation's image preprocessing, as torchvision's transforms do it on a Pillow image opened with
//! `Image.open(path).convert("RGB")` (alpha dropped): `Resize(short)` with bicubic (the short side to `short`, the
//! long side `int(short * long / short_side)`, truncated; Pillow's resampling, ours being Pillow-exact),
//! `CenterCrop(crop)` (offsets `int(round((side - crop) / 2))`, Python's round half to even), `ToTensor` (x / 255)
//! and `Normalize(mean, std)`, all in f32.
//!
//! - [`CLIP_EVAL`]: short side 224, crop 224, CLIP's mean and std.
//! - [`DINO_EVAL`]: short side 256, crop 224, ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).

use candle_core::{Device, Tensor};

use crate::error::{ForwardContext, InvalidInput, Result};
use crate::pipeline::image_decode::{decode_rgb_with, Alpha, RgbImage};
use crate::pipeline::resample::{resize_bicubic_window, Window};

/// One torchvision pipeline `Resize(short) → CenterCrop(crop) → ToTensor → Normalize(mean, std)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalTransform {
    pub short: usize,
    pub crop: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The CLIP-T / CLIP-I preprocessing.
pub const CLIP_EVAL: EvalTransform = EvalTransform {
    short: 224,
    crop: 224,
    mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
    std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
};

/// The DINO preprocessing.
pub const DINO_EVAL: EvalTransform = EvalTransform {
    short: 256,
    crop: 224,
    mean: [0.485, 0.456, 0.406],
    std: [0.229, 0.224, 0.225],
};

/// torchvision's `_compute_resized_output_size` for an int size: `(width, height)`.
pub fn resized_size(width: usize, height: usize, short: usize) -> (usize, usize) {
    let (s, l) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let long = ((short * l) as f64 / s as f64) as usize;
    if width <= height {
        (short, long)
    } else {
        (long, short)
    }
}

/// Python's `int(round(x / 2.0))` for an integer `x`: half to even.
fn half_round_even(x: usize) -> usize {
    let (q, r) = (x / 2, x % 2);
    if r == 1 && q % 2 == 1 {
        q + 1
    } else {
        q
    }
}

impl EvalTransform {
    /// The resized and cropped 8-bit image (`crop` x `crop`).
    pub fn resize_crop(&self, img: &RgbImage) -> std::result::Result<RgbImage, InvalidInput> {
        let (w, h) = resized_size(img.width, img.height, self.short);
        if w < self.crop || h < self.crop {
            return Err(InvalidInput::new(
                "image",
                format!("must resize to at least {0}x{0}", self.crop),
                format!("{}x{} -> {w}x{h}", img.width, img.height),
            ));
        }
        let window = Window {
            x: half_round_even(w - self.crop),
            y: half_round_even(h - self.crop),
            width: self.crop,
            height: self.crop,
        };
        resize_bicubic_window(img, w, h, window)
    }

    /// `Normalize(ToTensor(img))`: (3, H, W) f32.
    pub fn to_tensor(&self, img: &RgbImage) -> Result<Tensor> {
        let (w, h) = (img.width, img.height);
        let mut data = vec![0f32; 3 * w * h];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * w * h + i] = (f32::from(px[c]) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Tensor::from_vec(data, (3, h, w), &Device::Cpu).stage("eval preprocess")
    }

    /// The normalised (3, crop, crop) tensor of a decoded image; `field` names it in errors.
    pub fn tensor_of(&self, img: &RgbImage, field: &str) -> Result<Tensor> {
        let img = self
            .resize_crop(img)
            .map_err(|e| InvalidInput::new(field, e.rule, e.value))?;
        self.to_tensor(&img)
    }

    /// Decodes `bytes` (alpha dropped, as `convert("RGB")`) and returns its [`Self::tensor_of`].
    pub fn prepare(&self, bytes: &[u8], field: &str, max_pixels: u64) -> Result<Tensor> {
        self.tensor_of(&decode_rgb_with(bytes, field, max_pixels, Alpha::Drop)?, field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_offsets_follow_torchvision() {
        assert_eq!(resized_size(300, 200, 224), (336, 224));
        assert_eq!(resized_size(181, 257, 224), (224, 318));
        assert_eq!(resized_size(257, 311, 256), (256, 309));
        assert_eq!(resized_size(100, 80, 224), (280, 224));
        // round(0.5) = 0, round(1.5) = 2, round(2.5) = 2, round(3.5) = 4.
        assert_eq!([1, 3, 5, 7, 8].map(half_round_even), [0, 2, 2, 4, 4]);
    }
}
