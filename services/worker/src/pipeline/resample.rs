//! Pillow's `Image.resize(..., Image.BICUBIC)` for 8-bit RGB, reproduced bit for bit (Pillow `Resample.c`):
//!
//! - the filter is the cubic convolution with `a = -0.5` and support 2, stretched by `max(scale, 1)` when
//!   downscaling (antialiasing), with `scale = in / out`;
//! - for output index `i` the centre is `(i + 0.5) * scale`, the taps run from `trunc(center - support + 0.5)`
//!   (clamped to 0) to `trunc(center + support + 0.5)` (clamped to the input size), each weight is
//!   `filter((j - center + 0.5) / filterscale)` and the weights are normalised to sum 1;
//! - the weights become fixed point with `PRECISION_BITS = 32 - 8 - 2` (rounded half away from zero), each sum
//!   starts at `1 << (PRECISION_BITS - 1)` and the result is `sum >> PRECISION_BITS` clipped to `0..=255`;
//! - the horizontal pass runs first into an 8-bit intermediate, then the vertical pass; a pass whose size does
//!   not change is skipped.
//!
//! Only a window of the resized image is computed (each output pixel depends only on its own taps, so this is
//! exact), which keeps the work bounded when a thin image is stretched to a huge long edge before the crop.

use super::image_decode::RgbImage;
use crate::error::InvalidInput;

/// Fixed-point precision of the weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Support of the bicubic filter before stretching.
const BICUBIC_SUPPORT: f64 = 2.0;

/// A rectangle of the resized image to compute: columns `x..x + width`, rows `y..y + height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

/// Keys' cubic convolution kernel with `a = -0.5` (Pillow's `bicubic_filter`).
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one output index: the first input index and the fixed-point weights.
#[derive(Debug, Clone, PartialEq)]
struct Taps {
    start: usize,
    weights: Vec<i64>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for output index `out_index`.
fn taps(in_size: usize, out_size: usize, out_index: usize) -> Taps {
    // Pillow computes `in1 - in0` in single precision (exact for any realistic size), the rest in double.
    let scale = f64::from(in_size as f32) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let center = (out_index as f64 + 0.5) * scale;
    let ss = 1.0 / filterscale;
    // `(int)` truncates toward zero; negative starts are clamped to 0 right after.
    let xmin = ((center - support + 0.5) as i64).max(0);
    let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
    let count = (xmax - xmin).max(0) as usize;
    let mut k: Vec<f64> = (0..count)
        .map(|x| bicubic_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss))
        .collect();
    let ww: f64 = k.iter().fold(0.0, |acc, &w| acc + w);
    if ww != 0.0 {
        for w in &mut k {
            *w /= ww;
        }
    }
    let one = f64::from(1u32 << PRECISION_BITS);
    let weights = k
        .iter()
        .map(|&w| {
            if w < 0.0 {
                (-0.5 + w * one) as i64
            } else {
                (0.5 + w * one) as i64
            }
        })
        .collect();
    Taps {
        start: xmin as usize,
        weights,
    }
}

/// Pillow's `clip8`: the fixed-point sum shifted down and clipped to a byte.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Applies `taps` to the samples `get(start + j)` of one channel.
fn convolve(t: &Taps, get: impl Fn(usize) -> u8) -> u8 {
    let mut sum: i64 = 1 << (PRECISION_BITS - 1);
    for (j, &w) in t.weights.iter().enumerate() {
        sum += i64::from(get(t.start + j)) * w;
    }
    clip8(sum)
}

/// Resizes `src` to `out_width x out_height` exactly as Pillow's BICUBIC does and returns only `window` of the
/// result. Fails when a size is zero or the window does not lie inside the output.
pub fn resize_bicubic_window(
    src: &RgbImage,
    out_width: usize,
    out_height: usize,
    window: Window,
) -> Result<RgbImage, InvalidInput> {
    let inside = window.x + window.width <= out_width && window.y + window.height <= out_height;
    if src.width == 0 || src.height == 0 || out_width == 0 || out_height == 0 || !inside {
        return Err(InvalidInput::new(
            "resize",
            format!("needs non-empty sizes and a window inside {out_width}x{out_height}"),
            format!("{}x{} -> {window:?}", src.width, src.height),
        ));
    }
    let need_horizontal = out_width != src.width;
    let need_vertical = out_height != src.height;
    let vtaps: Vec<Taps> = if need_vertical {
        (window.y..window.y + window.height)
            .map(|i| taps(src.height, out_height, i))
            .collect()
    } else {
        Vec::new()
    };
    // Source rows the vertical pass reads (or the window's rows when there is no vertical pass).
    let (row0, row1) = if need_vertical {
        let first = vtaps.iter().map(|t| t.start).min().unwrap_or(0);
        let last = vtaps.iter().map(|t| t.start + t.weights.len()).max().unwrap_or(0);
        (first, last.max(first))
    } else {
        (window.y, window.y + window.height)
    };
    let temp = horizontal_pass(src, out_width, window, row0, row1, need_horizontal);
    if !need_vertical {
        return Ok(temp);
    }
    Ok(vertical_pass(&temp, &vtaps, row0))
}

/// Resizes the whole image (Pillow BICUBIC).
pub fn resize_bicubic(src: &RgbImage, out_width: usize, out_height: usize) -> Result<RgbImage, InvalidInput> {
    let window = Window {
        x: 0,
        y: 0,
        width: out_width,
        height: out_height,
    };
    resize_bicubic_window(src, out_width, out_height, window)
}

/// The horizontal pass for the window's columns over source rows `row0..row1` (a plain copy of those columns when
/// the width does not change).
fn horizontal_pass(
    src: &RgbImage,
    out_width: usize,
    window: Window,
    row0: usize,
    row1: usize,
    needed: bool,
) -> RgbImage {
    let mut out = RgbImage::zeros(window.width, row1 - row0);
    let htaps: Vec<Taps> = if needed {
        (window.x..window.x + window.width)
            .map(|i| taps(src.width, out_width, i))
            .collect()
    } else {
        Vec::new()
    };
    for (oy, y) in (row0..row1).enumerate() {
        let src_row = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        let out_row = &mut out.data[oy * window.width * 3..(oy + 1) * window.width * 3];
        for ox in 0..window.width {
            for c in 0..3 {
                out_row[ox * 3 + c] = if needed {
                    convolve(&htaps[ox], |x| src_row[x * 3 + c])
                } else {
                    src_row[(window.x + ox) * 3 + c]
                };
            }
        }
    }
    out
}

/// The vertical pass over an intermediate whose first row is source row `row0`.
fn vertical_pass(temp: &RgbImage, vtaps: &[Taps], row0: usize) -> RgbImage {
    let width = temp.width;
    let mut out = RgbImage::zeros(width, vtaps.len());
    for (oy, t) in vtaps.iter().enumerate() {
        let shifted = Taps {
            start: t.start - row0,
            weights: t.weights.clone(),
        };
        for ox in 0..width {
            for c in 0..3 {
                out.data[(oy * width + ox) * 3 + c] = convolve(&shifted, |y| temp.data[(y * width + ox) * 3 + c]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> RgbImage {
        let mut img = RgbImage::zeros(w, h);
        for y in 0..h {
            for x in 0..w {
                let i = (y * w + x) * 3;
                img.data[i] = ((x * 37 + y * 11) % 256) as u8;
                img.data[i + 1] = ((x * x + 3 * y) % 256) as u8;
                img.data[i + 2] = if (x / 3 + y / 2) % 2 == 0 { 255 } else { 0 };
            }
        }
        img
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (inp, out) in [(300, 224), (97, 224), (1000, 224), (50, 224), (224, 224), (5000, 7)] {
            for i in [0, out / 2, out - 1] {
                let t = taps(inp, out, i);
                let sum: i64 = t.weights.iter().sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64,
                    "{inp}->{out} @{i}"
                );
                assert!(t.start + t.weights.len() <= inp);
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_and_identity_is_a_copy() {
        let mut img = RgbImage::zeros(13, 7);
        img.data.iter_mut().for_each(|v| *v = 173);
        let out = resize_bicubic(&img, 40, 3).expect("resize");
        assert!(out.data.iter().all(|&v| v == 173));
        let g = gradient(17, 9);
        assert_eq!(resize_bicubic(&g, 17, 9).expect("same"), g);
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let g = gradient(31, 23);
        for (w, h) in [(64, 47), (10, 8), (31, 50), (80, 23)] {
            let full = resize_bicubic(&g, w, h).expect("full");
            let win = Window {
                x: w / 4,
                y: h / 3,
                width: w / 2,
                height: h / 2,
            };
            let part = resize_bicubic_window(&g, w, h, win).expect("window");
            for y in 0..win.height {
                for x in 0..win.width {
                    assert_eq!(part.pixel(x, y), full.pixel(x + win.x, y + win.y), "{w}x{h} at {x},{y}");
                }
            }
        }
        let bad = Window {
            x: 5,
            y: 0,
            width: 10,
            height: 1,
        };
        assert!(resize_bicubic_window(&g, 12, 4, bad).is_err());
    }
}
