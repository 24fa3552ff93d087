//! CLIP image preprocessing identical to transformers' `CLIPImageProcessor` on its PIL path: decode and convert to
//! RGB like Pillow ([`super::image_decode`]), resize so the shortest edge is `size.shortest_edge` with the long
//! edge `floor(shortest * long / short)` using Pillow's BICUBIC ([`super::resample`]), centre crop at
//! `floor((n - crop) / 2)` (zero padding, as transformers, when the crop is larger), rescale in f64 then cast to
//! f32, and normalise `(x - mean) / std` in f32.
//!
//! The decoded + resized + cropped 8-bit pixels ([`PreparedImage`]) are exposed separately because the subject
//! cache is keyed on them; [`ClipPreprocessor::to_tensor`] turns them into the `(3, H, W)` f32 pixel values.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

pub use super::image_decode::{decode_rgb, RgbImage, DEFAULT_MAX_PIXELS};
use super::resample::{resize_bicubic_window, Window};
use crate::error::{ForwardContext, InvalidInput, ModelError, Result};

/// CLIP's normalisation mean (OpenAI CLIP).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66_f64 as f32, 0.457_827_5_f64 as f32, 0.408_210_73_f64 as f32];
/// CLIP's normalisation standard deviation (OpenAI CLIP).
pub const CLIP_STD: [f32; 3] = [
    0.268_629_54_f64 as f32,
    0.261_302_58_f64 as f32,
    0.275_777_11_f64 as f32,
];
/// Largest resize / crop edge accepted from a config (guards against absurd configs).
const MAX_EDGE: usize = 8192;

/// How the image is resized before the crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Shortest edge to this length, aspect ratio kept (CLIP).
    ShortestEdge(usize),
    /// Exactly this size.
    Exact { height: usize, width: usize },
}

/// The settings of `preprocessor_config.json` that CLIP preprocessing uses.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    pub do_resize: bool,
    pub size: ResizeTarget,
    pub do_center_crop: bool,
    pub crop_height: usize,
    pub crop_width: usize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for PreprocessConfig {
    /// OpenAI CLIP at 224 px.
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(224),
            do_center_crop: true,
            crop_height: 224,
            crop_width: 224,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }
}

/// The raw JSON, every field optional (CLIP defaults), sizes as an int or an object.
#[derive(Debug, Deserialize)]
struct RawConfig {
    do_resize: Option<bool>,
    size: Option<Value>,
    do_center_crop: Option<bool>,
    crop_size: Option<Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Value>,
    image_std: Option<Value>,
}

impl PreprocessConfig {
    /// Reads `preprocessor_config.json`; absent keys keep the CLIP defaults. Unreadable or malformed files give
    /// [`ModelError::Load`], inconsistent values [`ModelError::Config`], both naming the path.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let load = |message: String| ModelError::Load {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| load(e.to_string()))?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|e| load(e.to_string()))?;
        Self::from_raw(raw).map_err(|message| ModelError::Config {
            path: path.to_path_buf(),
            message,
        })
    }

    fn from_raw(raw: RawConfig) -> std::result::Result<Self, String> {
        let d = Self::default();
        let size = match &raw.size {
            None => d.size,
            Some(v) => parse_size(v)?,
        };
        let (crop_height, crop_width) = match &raw.crop_size {
            None => (d.crop_height, d.crop_width),
            Some(v) => parse_crop(v)?,
        };
        let image_std = raw
            .image_std
            .as_ref()
            .map_or(Ok(d.image_std), |v| triple(v, "image_std"))?;
        if image_std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(format!("image_std must be finite and non-zero, got {image_std:?}"));
        }
        let rescale_factor = raw.rescale_factor.unwrap_or(d.rescale_factor);
        if !rescale_factor.is_finite() {
            return Err(format!("rescale_factor must be finite, got {rescale_factor}"));
        }
        Ok(Self {
            do_resize: raw.do_resize.unwrap_or(true),
            size,
            do_center_crop: raw.do_center_crop.unwrap_or(true),
            crop_height,
            crop_width,
            do_rescale: raw.do_rescale.unwrap_or(true),
            rescale_factor,
            do_normalize: raw.do_normalize.unwrap_or(true),
            image_mean: raw
                .image_mean
                .as_ref()
                .map_or(Ok(d.image_mean), |v| triple(v, "image_mean"))?,
            image_std,
        })
    }
}

fn edge(v: &Value, what: &str) -> std::result::Result<usize, String> {
    match v.as_u64() {
        Some(n) if n >= 1 && n as usize <= MAX_EDGE => Ok(n as usize),
        _ => Err(format!("{what} must be an integer in 1..={MAX_EDGE}, got {v}")),
    }
}

/// `size`: an int (shortest edge), `{"shortest_edge": n}` or `{"height": h, "width": w}`.
fn parse_size(v: &Value) -> std::result::Result<ResizeTarget, String> {
    if v.is_number() {
        return Ok(ResizeTarget::ShortestEdge(edge(v, "size")?));
    }
    if let Some(s) = v.get("shortest_edge") {
        return Ok(ResizeTarget::ShortestEdge(edge(s, "size.shortest_edge")?));
    }
    match (v.get("height"), v.get("width")) {
        (Some(h), Some(w)) => Ok(ResizeTarget::Exact {
            height: edge(h, "size.height")?,
            width: edge(w, "size.width")?,
        }),
        _ => Err(format!(
            "size must be an int, {{shortest_edge}} or {{height, width}}, got {v}"
        )),
    }
}

/// `crop_size`: an int (square) or `{"height": h, "width": w}`.
fn parse_crop(v: &Value) -> std::result::Result<(usize, usize), String> {
    if v.is_number() {
        let n = edge(v, "crop_size")?;
        return Ok((n, n));
    }
    match (v.get("height"), v.get("width")) {
        (Some(h), Some(w)) => Ok((edge(h, "crop_size.height")?, edge(w, "crop_size.width")?)),
        _ => Err(format!("crop_size must be an int or {{height, width}}, got {v}")),
    }
}

/// A per-channel value: a list of three numbers or one number for all channels.
fn triple(v: &Value, what: &str) -> std::result::Result<[f32; 3], String> {
    let bad = || format!("{what} must be a number or a list of 3 numbers, got {v}");
    if let Some(x) = v.as_f64() {
        return Ok([x as f32; 3]);
    }
    let list = v.as_array().filter(|a| a.len() == 3).ok_or_else(bad)?;
    let mut out = [0f32; 3];
    for (o, x) in out.iter_mut().zip(list) {
        *o = x.as_f64().ok_or_else(bad)? as f32;
    }
    Ok(out)
}

/// transformers' `get_resize_output_image_size(..., default_to_square=False)`: `(height, width)` with the
/// shortest edge at `short_target` and the long edge `int(short_target * long / short)`.
pub fn shortest_edge_size(width: usize, height: usize, short_target: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = ((short_target as f64 * long as f64) / short as f64) as usize;
    if width <= height {
        (new_long, short_target)
    } else {
        (short_target, new_long)
    }
}

/// One axis of transformers' `center_crop`: the window `(offset, len)` of the input and where it lands in the crop.
fn crop_axis(n: usize, crop: usize) -> (usize, usize, usize) {
    if crop <= n {
        ((n - crop) / 2, crop, 0)
    } else {
        (0, n, (crop - n).div_ceil(2))
    }
}

/// The 8-bit RGB pixels after decode, resize and centre crop: what the pixel values are computed from.
pub type PreparedImage = RgbImage;

/// CLIP preprocessing with a decompression-bomb guard.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocessor {
    pub config: PreprocessConfig,
    /// Largest accepted `width * height` of an input image, checked from its header before decoding.
    pub max_pixels: u64,
}

impl ClipPreprocessor {
    pub fn new(config: PreprocessConfig, max_pixels: u64) -> Self {
        Self { config, max_pixels }
    }

    /// Reads `preprocessor_config.json` with the default pixel limit.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::new(PreprocessConfig::from_file(path)?, DEFAULT_MAX_PIXELS))
    }

    /// Decodes `bytes` (errors name `field`, e.g. `subjects[0].images[1]`), resizes and crops them.
    pub fn prepare(&self, bytes: &[u8], field: &str) -> Result<PreparedImage> {
        let rgb = decode_rgb(bytes, field, self.max_pixels)?;
        Ok(self.resize_and_crop(&rgb)?)
    }

    /// Resize (Pillow BICUBIC) then centre crop of an RGB image; only the cropped window is resampled.
    pub fn resize_and_crop(&self, rgb: &RgbImage) -> Result<PreparedImage, InvalidInput> {
        let c = &self.config;
        let (rh, rw) = match (c.do_resize, c.size) {
            (false, _) => (rgb.height, rgb.width),
            (true, ResizeTarget::ShortestEdge(s)) => shortest_edge_size(rgb.width, rgb.height, s),
            (true, ResizeTarget::Exact { height, width }) => (height, width),
        };
        if rh == 0 || rw == 0 {
            return Err(InvalidInput::new(
                "image",
                "must resize to a non-empty size",
                format!("{rw}x{rh}"),
            ));
        }
        let (ch, cw) = if c.do_center_crop {
            (c.crop_height, c.crop_width)
        } else {
            (rh, rw)
        };
        let (y0, hy, dy) = crop_axis(rh, ch);
        let (x0, wx, dx) = crop_axis(rw, cw);
        let window = Window {
            x: x0,
            y: y0,
            width: wx,
            height: hy,
        };
        let part = resize_bicubic_window(rgb, rw, rh, window)?;
        if (dx, dy, wx, hy) == (0, 0, cw, ch) {
            return Ok(part);
        }
        let mut out = RgbImage::zeros(cw, ch);
        for y in 0..hy {
            let src = &part.data[y * wx * 3..(y + 1) * wx * 3];
            let at = ((y + dy) * cw + dx) * 3;
            out.data[at..at + wx * 3].copy_from_slice(src);
        }
        Ok(out)
    }

    /// The `(3, H, W)` f32 pixel values: `x * rescale_factor` in f64 cast to f32, then `(x - mean) / std` in f32.
    pub fn pixel_values(&self, img: &PreparedImage) -> Vec<f32> {
        let c = &self.config;
        let plane = img.width * img.height;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for ch in 0..3 {
                let mut v = if c.do_rescale {
                    (f64::from(px[ch]) * c.rescale_factor) as f32
                } else {
                    f32::from(px[ch])
                };
                if c.do_normalize {
                    v = (v - c.image_mean[ch]) / c.image_std[ch];
                }
                out[ch * plane + i] = v;
            }
        }
        out
    }

    /// [`Self::pixel_values`] as a `(3, H, W)` f32 tensor on `device`.
    pub fn to_tensor(&self, img: &PreparedImage, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.pixel_values(img), (3, img.height, img.width), device).stage("preprocess")
    }

    /// Decode, resize, crop and normalise: a `(3, H, W)` f32 tensor.
    pub fn preprocess(&self, bytes: &[u8], field: &str, device: &Device) -> Result<Tensor> {
        let img = self.prepare(bytes, field)?;
        self.to_tensor(&img, device)
    }

    /// Stacks prepared images into an `(N, 3, H, W)` f32 batch.
    pub fn batch(&self, images: &[PreparedImage], device: &Device) -> Result<Tensor> {
        let tensors = images
            .iter()
            .map(|img| self.to_tensor(img, device))
            .collect::<Result<Vec<_>>>()?;
        if tensors.is_empty() {
            return Err(InvalidInput::new("images", "must hold at least one image", 0).into());
        }
        Tensor::stack(&tensors, 0).stage("preprocess")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::{compare, fixtures_dir, Tolerance};

    fn preprocessor(encoder: &str) -> ClipPreprocessor {
        let dir = fixtures_dir().expect("fixtures");
        let p = ClipPreprocessor::from_config_file(dir.join(encoder).join("preprocessor_config.json")).expect("config");
        assert_eq!(p.config, PreprocessConfig::default());
        p
    }

    #[test]
    fn preprocess_cases_match_pillow() {
        let dir = fixtures_dir().expect("fixtures").join("cases/preprocess");
        let names: Vec<String> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("images.json")).expect("images.json"))
                .expect("parse images.json");
        let want =
            candle_core::safetensors::load(dir.join("pixel_values.safetensors"), &Device::Cpu).expect("pixel_values");
        let p = preprocessor("image_encoder");
        let mut failures = Vec::new();
        for name in &names {
            let bytes = std::fs::read(dir.join(name)).expect("image");
            let got = p.preprocess(&bytes, name, &Device::Cpu).expect("preprocess");
            let check = compare(name, &got, &want[name], Tolerance::PIXELS);
            println!("{}", check.line());
            if !check.ok {
                failures.push(check.line());
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    fn check_case(case: &str, encoder: &str) {
        let dir = fixtures_dir().expect("fixtures").join("cases").join(case);
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).expect("case")).expect("json");
        let subjects = json["subjects"].as_array().expect("subjects");
        let p = preprocessor(encoder);
        let mut prepared = Vec::new();
        for (i, s) in subjects.iter().enumerate() {
            for (j, img) in s["images"].as_array().expect("images").iter().enumerate() {
                let bytes = std::fs::read(dir.join(img.as_str().expect("path"))).expect("ref image");
                let field = format!("subjects[{i}].images[{j}]");
                prepared.push(p.prepare(&bytes, &field).expect("prepare"));
            }
        }
        let got = p.batch(&prepared, &Device::Cpu).expect("batch");
        let want = candle_core::safetensors::load(dir.join("tensors.safetensors"), &Device::Cpu).expect("tensors");
        let check = compare(
            &format!("{case} ref.pixel_values"),
            &got,
            &want["ref.pixel_values"],
            Tolerance::PIXELS,
        );
        println!("{}", check.line());
        assert!(check.ok, "{}", check.line());
    }

    #[test]
    fn two_objects_ref_pixel_values() {
        check_case("sdxl_two_objects", "image_encoder");
    }

    #[test]
    fn plus_multi_ref_pixel_values() {
        check_case("sdxl_plus_two_objects_multi_ref", "image_encoder_plus");
    }

    #[test]
    fn resize_size_follows_transformers() {
        assert_eq!(shortest_edge_size(300, 200, 224), (224, 336));
        assert_eq!(shortest_edge_size(97, 131, 224), (302, 224));
        assert_eq!(shortest_edge_size(1000, 225, 224), (224, 995));
        assert_eq!(shortest_edge_size(50, 50, 224), (224, 224));
    }

    #[test]
    fn prepared_pixels_are_the_crop_and_padding_is_centred() {
        let dir = fixtures_dir().expect("fixtures").join("cases/preprocess");
        let bytes = std::fs::read(dir.join("img2_1000x225_RGB.png")).expect("image");
        let p = ClipPreprocessor::new(PreprocessConfig::default(), DEFAULT_MAX_PIXELS);
        let img = p.prepare(&bytes, "x").expect("prepare");
        assert_eq!((img.width, img.height, img.data.len()), (224, 224, 224 * 224 * 3));
        let cfg = PreprocessConfig {
            crop_width: 230,
            ..PreprocessConfig::default()
        };
        let padded = ClipPreprocessor::new(cfg, DEFAULT_MAX_PIXELS)
            .resize_and_crop(&img)
            .expect("crop");
        assert_eq!((padded.width, padded.height), (230, 224));
        assert_eq!(padded.pixel(2, 5), [0, 0, 0]);
        assert_eq!(padded.pixel(3, 5), img.pixel(0, 5));
        assert_eq!(padded.pixel(226, 7), img.pixel(223, 7));
        assert_eq!(padded.pixel(227, 7), [0, 0, 0]);
    }

    #[test]
    fn bad_bytes_and_limits_name_the_field() {
        let p = ClipPreprocessor::new(PreprocessConfig::default(), 1000);
        for (bytes, what) in [(&b"GIF89a garbage"[..], "garbage"), (&[][..], "empty")] {
            match p.preprocess(bytes, "subjects[0].images[1]", &Device::Cpu) {
                Err(ModelError::Invalid(e)) => {
                    assert_eq!(e.field, "subjects[0].images[1]", "{what}")
                }
                other => panic!("{what}: expected InvalidInput, got {other:?}"),
            }
        }
        let dir = fixtures_dir().expect("fixtures").join("cases/preprocess");
        let bytes = std::fs::read(dir.join("img0_300x200_RGB.png")).expect("image");
        match p.prepare(&bytes, "subjects[2].images[0]") {
            Err(ModelError::Invalid(e)) => {
                assert_eq!(e.field, "subjects[2].images[0]");
                assert!(e.rule.contains("1000") && e.value.contains("60000"), "{e}");
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn config_variants_and_errors() {
        let raw = |s: &str| PreprocessConfig::from_raw(serde_json::from_str(s).expect("json"));
        let c = raw(r#"{"size": 336, "crop_size": 336, "image_mean": 0.5}"#).expect("int sizes");
        assert_eq!(
            (c.size, c.crop_height, c.image_mean),
            (ResizeTarget::ShortestEdge(336), 336, [0.5; 3])
        );
        assert!(raw(r#"{"size": {"shortest_edge": 0}}"#).is_err());
        assert!(raw(r#"{"image_std": [1, 0, 1]}"#).is_err());
        assert!(raw(r#"{"image_mean": [1, 2]}"#).is_err());
        let missing = std::env::temp_dir().join("mip-no-such-preprocessor_config.json");
        match PreprocessConfig::from_file(&missing) {
            Err(ModelError::Load { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected Load, got {other:?}"),
        }
    }
}
