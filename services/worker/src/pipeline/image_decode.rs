//! Decoding of user-supplied image bytes (PNG, JPEG, BMP, GIF, WebP) into 8-bit RGB the way transformers'
//! `convert_to_rgb` does on a Pillow image: grey is replicated, palettes are expanded, transparency is
//! alpha-composited over white (Pillow's `alpha_composite` arithmetic), 16-bit RGB(A) keeps the high byte
//! (Pillow's `RGB;16B` raw modes) and 16-bit grey is clipped to 255 (Pillow's `I;16` conversion).
//!
//! The dimensions are read from the header and checked against a pixel limit *before* any pixel is decoded (a
//! decompression-bomb guard). Every failure on user bytes is an [`InvalidInput`] naming the field; a panic inside
//! a decoder is caught and reported the same way.

use image::DynamicImage;
use mip_admission::image::{check_header, decode_within};

pub use mip_admission::limits::DEFAULT_MAX_PIXELS;

use crate::error::InvalidInput;

/// An 8-bit RGB image, row-major, 3 bytes per pixel (`data.len() == width * height * 3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// A black image.
    pub fn zeros(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0; width * height * 3],
        }
    }

    /// The three channels of pixel `(x, y)`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// What becomes of transparency when an image turns RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpha {
    /// Composited over white, as transformers' `convert_to_rgb` (the image processors) does.
    OverWhite,
    /// Dropped, as Pillow's `Image.convert("RGB")` (the evaluation scripts) does.
    Drop,
}

/// Decodes `bytes` into RGB after checking, from the header, that the image is non-empty, in a supported format
/// and has at most `max_pixels` pixels (the cluster's shared image rules, `mip_admission::image`).
pub fn decode_rgb(bytes: &[u8], field: &str, max_pixels: u64) -> Result<RgbImage, InvalidInput> {
    decode_rgb_with(bytes, field, max_pixels, Alpha::OverWhite)
}

/// [`decode_rgb`] with a choice of what happens to transparency.
pub fn decode_rgb_with(bytes: &[u8], field: &str, max_pixels: u64, alpha: Alpha) -> Result<RgbImage, InvalidInput> {
    let (w, h) = check_header(bytes, field, max_pixels)?;
    if bytes.starts_with(&[0xFF, 0xD8]) {
        // Baseline JPEGs are decoded exactly as libjpeg-turbo (Pillow) does; others fall through.
        let exact = std::panic::catch_unwind(|| super::jpeg::decode_baseline(bytes))
            .ok()
            .flatten();
        if let Some(img) = exact.filter(|i| (i.width, i.height) == (w as usize, h as usize)) {
            return Ok(img);
        }
    }
    let img = decode_within(bytes, field, w, h)?;
    Ok(match alpha {
        Alpha::OverWhite => to_rgb_like_pillow(&img),
        Alpha::Drop => to_rgb_dropping_alpha(&img),
    })
}

/// Pillow's `convert("RGB")`: alpha dropped, grey replicated, 16-bit as in [`to_rgb_like_pillow`].
pub fn to_rgb_dropping_alpha(img: &DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(b) => b.as_raw().clone(),
        DynamicImage::ImageRgba8(b) => b.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b.as_raw().chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        DynamicImage::ImageLuma16(b) => b.as_raw().iter().map(|&v| clip16(v)).flat_map(|v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA16(b) => b.as_raw().chunks_exact(2).flat_map(|p| [high(p[0]); 3]).collect(),
        DynamicImage::ImageRgb16(b) => b.as_raw().iter().map(|&v| high(v)).collect(),
        DynamicImage::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [high(p[0]), high(p[1]), high(p[2])])
            .collect(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage { width, height, data }
}

/// Converts any decoded image to 8-bit RGB as transformers' `convert_to_rgb` does on the image Pillow would have
/// opened: non-RGB modes go through `convert("RGBA")` and are alpha-composited over opaque white
/// (`Image.alpha_composite`), then `convert("RGB")`; opaque pixels are unchanged.
pub fn to_rgb_like_pillow(img: &DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(b) => b.as_raw().clone(),
        DynamicImage::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| over_white([p[0], p[1], p[2]], p[3]))
            .collect(),
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| over_white([p[0]; 3], p[1]))
            .collect(),
        // Pillow opens 16-bit grey as `I;16`; its conversion to RGB(A) clips instead of scaling.
        DynamicImage::ImageLuma16(b) => b.as_raw().iter().map(|&v| clip16(v)).flat_map(|v| [v, v, v]).collect(),
        // 16-bit LA / RGB / RGBA are unpacked by Pillow keeping the most significant byte.
        DynamicImage::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| over_white([high(p[0]); 3], high(p[1])))
            .collect(),
        DynamicImage::ImageRgb16(b) => b.as_raw().iter().map(|&v| high(v)).collect(),
        DynamicImage::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| over_white([high(p[0]), high(p[1]), high(p[2])], high(p[3])))
            .collect(),
        other => {
            let rgba = other.to_rgba8();
            rgba.as_raw()
                .chunks_exact(4)
                .flat_map(|p| over_white([p[0], p[1], p[2]], p[3]))
                .collect()
        }
    };
    RgbImage { width, height, data }
}

/// Pillow's `ImagingAlphaComposite` of a pixel with alpha `a` over opaque white (7 extra bits of precision,
/// divisions by 255 rounded with `((x >> 8) + x) >> 8`).
fn over_white(rgb: [u8; 3], a: u8) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    if a == 255 {
        return rgb;
    }
    if a == 0 {
        return [255; 3];
    }
    let a = u32::from(a);
    let outa255 = a * 255 + 255 * (255 - a);
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let div255 = |x: u32| ((x >> 8) + x) >> 8;
    rgb.map(|c| {
        let tmp = u32::from(c) * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
        (div255(tmp) >> PRECISION_BITS) as u8
    })
}

fn high(v: u16) -> u8 {
    (v >> 8) as u8
}

fn clip16(v: u16) -> u8 {
    v.min(255) as u8
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn png_bytes(img: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
        out.into_inner()
    }

    #[test]
    fn conversions_follow_pillow() {
        let la = image::GrayAlphaImage::from_raw(2, 1, vec![10, 255, 200, 255]).expect("la");
        let got = decode_rgb(&png_bytes(DynamicImage::ImageLumaA8(la)), "f", 100).expect("decode");
        assert_eq!(got.data, vec![10, 10, 10, 200, 200, 200]);
        let rgba = image::RgbaImage::from_raw(3, 1, vec![1, 2, 3, 0, 1, 2, 3, 255, 0, 100, 200, 128]).expect("rgba");
        let got = decode_rgb(&png_bytes(DynamicImage::ImageRgba8(rgba)), "f", 100).expect("decode");
        assert_eq!(got.data, vec![255, 255, 255, 1, 2, 3, 127, 177, 227]);
        let rgb16 = image::ImageBuffer::from_raw(1, 1, vec![0x12ffu16, 0xff00, 0x0080]).expect("rgb16");
        let got = decode_rgb(&png_bytes(DynamicImage::ImageRgb16(rgb16)), "f", 100).expect("decode");
        assert_eq!(got.data, vec![0x12, 0xff, 0x00]);
    }

    #[test]
    fn garbage_and_empty_bytes_are_invalid_input() {
        let e = decode_rgb(b"definitely not an image", "subjects[0].images[1]", 100).expect_err("garbage");
        assert_eq!(e.field, "subjects[0].images[1]");
        assert!(e.value.contains("23 bytes"), "{e}");
        let e = decode_rgb(&[], "subjects[0].images[0]", 100).expect_err("empty");
        assert_eq!(e.field, "subjects[0].images[0]");
        // A PNG signature followed by a truncated header.
        let e = decode_rgb(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0", "img", 100).expect_err("truncated");
        assert_eq!(e.field, "img");
        // A valid PNG with its pixel data cut off.
        let full = png_bytes(DynamicImage::new_rgb8(64, 64));
        let e = decode_rgb(&full[..full.len() / 2], "img", 1 << 20).expect_err("cut");
        assert_eq!(e.field, "img");
    }

    /// CRC-32 (IEEE) of a PNG chunk's type and data.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let bytes = png_bytes(DynamicImage::new_rgb8(30, 20));
        assert_eq!(check_header(&bytes, "f", 600).expect("dims"), (30, 20));
        let e = decode_rgb(&bytes, "subjects[1].images[0]", 599).expect_err("over limit");
        assert_eq!(e.field, "subjects[1].images[0]");
        assert!(e.rule.contains("599"), "{e}");
        assert!(e.value.contains("600"), "{e}");
        assert!(decode_rgb(&bytes, "f", 600).is_ok());
        // A header claiming 100000 x 100000 pixels is refused before any decoding.
        let mut bomb = bytes.clone();
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode_rgb(&bomb, "f", DEFAULT_MAX_PIXELS).expect_err("bomb");
        assert!(e.to_string().contains("pixels"), "{e}");
    }
}
