//! Image output: a decoded image tensor in [-1, 1] -> 8-bit RGB -> PNG bytes with the generation parameters in
//! text chunks (tEXt for Latin-1 text, iTXt otherwise), and the reverse for the text (tests, tooling).
//!
//! Pixel values follow diffusers: `round((clamp(x, -1, 1) / 2 + 0.5) * 255)` in f32, rounding half to even as
//! numpy does.

use std::io::Cursor;

use candle_core::{DType, Device, Tensor};

use crate::error::{ForwardContext, InvalidInput, ModelError, Result};

/// Image (3, H, W) or (1, 3, H, W) in [-1, 1], any dtype or device -> (interleaved RGB bytes, width, height).
pub fn tensor_to_rgb8(img: &Tensor) -> Result<(Vec<u8>, u32, u32)> {
    let img = match img.dims() {
        [3, _, _] => img.clone(),
        [1, 3, _, _] => img.squeeze(0).stage("png")?,
        dims => {
            return Err(InvalidInput::new(
                "image",
                "must have shape (3, H, W) or (1, 3, H, W)",
                format!("{dims:?}"),
            )
            .into())
        }
    };
    let (_, h, w) = img.dims3().stage("png")?;
    let to_u32 = |field: &str, v: usize| {
        u32::try_from(v).map_err(|_| ModelError::from(InvalidInput::new(field, "must fit in u32", v)))
    };
    let (wu, hu) = (to_u32("width", w)?, to_u32("height", h)?);
    // (3, H, W) -> (H, W, 3), on the CPU in f32.
    let hwc = img
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.permute((1, 2, 0)))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .stage("png")?;
    let bytes = hwc.iter().map(|&x| to_level(x)).collect();
    Ok((bytes, wu, hu))
}

/// One channel value in [-1, 1] -> 0..=255 (NaN -> 0).
fn to_level(x: f32) -> u8 {
    let v = ((x.clamp(-1.0, 1.0) / 2.0 + 0.5) * 255.0).round_ties_even();
    if v.is_nan() {
        0
    } else {
        v.clamp(0.0, 255.0) as u8
    }
}

/// Checks a text-chunk keyword: 1..=79 Latin-1 characters, no NUL, no leading/trailing/double spaces (PNG spec).
fn check_keyword(key: &str) -> std::result::Result<(), InvalidInput> {
    let n = key.chars().count();
    let latin1 = key.chars().all(|c| (c as u32) <= 0xFF && c != '\0');
    if n == 0 || n > 79 || !latin1 || key.starts_with(' ') || key.ends_with(' ') || key.contains("  ") {
        return Err(InvalidInput::new(
            "png text keyword",
            "must be 1..=79 Latin-1 characters without NUL or leading, trailing or double spaces",
            format!("{key:?}"),
        ));
    }
    Ok(())
}

fn encode_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Forward {
        stage: "png encode",
        source: candle_core::Error::Msg(e.to_string()),
    }
}

/// Encodes 8-bit RGB (`w * h * 3` bytes, row-major) as PNG with one text chunk per `(keyword, text)` pair.
pub fn encode_png(rgb: &[u8], w: u32, h: u32, text: &[(String, String)]) -> Result<Vec<u8>> {
    if w == 0 || h == 0 {
        return Err(InvalidInput::new("image size", "must be at least 1x1", format!("{w}x{h}")).into());
    }
    let want = w as usize * h as usize * 3;
    if rgb.len() != want {
        return Err(InvalidInput::new("rgb", format!("must hold {w}x{h}x3 = {want} bytes"), rgb.len()).into());
    }
    for (key, _) in text {
        check_keyword(key)?;
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            let latin1 = value.chars().all(|c| (c as u32) <= 0xFF);
            let added = if latin1 {
                enc.add_text_chunk(key.clone(), value.clone())
            } else {
                enc.add_itxt_chunk(key.clone(), value.clone())
            };
            added.map_err(encode_err)?;
        }
        let mut writer = enc.write_header().map_err(encode_err)?;
        writer.write_image_data(rgb).map_err(encode_err)?;
        writer.finish().map_err(encode_err)?;
    }
    Ok(out)
}

/// The text chunks (tEXt, zTXt, iTXt) of a PNG, in that order; an error for bytes that are not a PNG.
pub fn decode_png_text(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let bad = |e: png::DecodingError| ModelError::from(InvalidInput::new("png", "must be a valid PNG", e));
    let mut reader = png::Decoder::new(Cursor::new(bytes)).read_info().map_err(bad)?;
    // Text after the image data is only seen once the image is read.
    let size = reader.output_buffer_size().ok_or_else(|| {
        ModelError::from(InvalidInput::new(
            "png",
            "must fit in memory",
            "the image is too large to decode",
        ))
    })?;
    let mut buf = vec![0; size];
    reader.next_frame(&mut buf).map_err(bad)?;
    reader.finish().map_err(bad)?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.compressed_latin1_text {
        out.push((c.keyword.clone(), c.get_text().map_err(bad)?));
    }
    for c in &info.utf8_text {
        out.push((c.keyword.clone(), c.get_text().map_err(bad)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::fixtures_dir;

    fn fixture_check(case: &str) {
        let dir = fixtures_dir().expect("fixtures").join(case);
        let t = candle_core::safetensors::load(dir.join("tensors.safetensors"), &Device::Cpu).expect("tensors");
        let (rgb, w, h) = tensor_to_rgb8(&t["vae.decoded"]).expect("rgb");
        let want = image::open(dir.join("expected.png")).expect("expected.png").to_rgb8();
        assert_eq!((w, h), want.dimensions());
        let diffs: Vec<i32> = rgb
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let exact = diffs.iter().filter(|d| **d == 0).count();
        let status = if max <= 2 { "ok  " } else { "FAIL" };
        let line = format!(
            "{status} {case} expected.png max_level_diff={max} exact={exact}/{} bound=2",
            diffs.len()
        );
        println!("{line}");
        assert!(max <= 2, "{line}");
        // Encoded and decoded again, the pixels are unchanged.
        let bytes = encode_png(&rgb, w, h, &[]).expect("encode");
        let back = image::load_from_memory(&bytes).expect("decode").to_rgb8();
        assert_eq!(back.as_raw(), &rgb);
    }

    #[test]
    fn decoded_fixture_matches_expected_png() {
        fixture_check("cases/sdxl_two_objects");
        fixture_check("cases/sdxl_plus_two_objects_multi_ref");
    }

    /// The whole output path: our VAE decode of the fixture's final latents, then 8-bit RGB.
    #[test]
    fn vae_decode_to_rgb_matches_expected_png() {
        let root = fixtures_dir().expect("fixtures");
        let vae =
            crate::model::vae::AutoencoderKL::load(&root.join("sdxl/vae"), DType::F32, &Device::Cpu).expect("vae");
        for case in ["cases/sdxl_two_objects", "cases/sdxl_plus_two_objects_multi_ref"] {
            let dir = root.join(case);
            let t = candle_core::safetensors::load(dir.join("tensors.safetensors"), &Device::Cpu).expect("tensors");
            let img = vae.decode_scaled(&t["loop.final_latents"]).expect("decode");
            let (rgb, _, _) = tensor_to_rgb8(&img).expect("rgb");
            let want = image::open(dir.join("expected.png")).expect("expected.png").to_rgb8();
            let max = rgb
                .iter()
                .zip(want.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            println!(
                "{} {case} vae -> rgb vs expected.png max_level_diff={max} bound=2",
                if max <= 2 { "ok  " } else { "FAIL" }
            );
            assert!(max <= 2, "{case}: max level diff {max}");
        }
    }

    #[test]
    fn levels_follow_the_diffusers_formula() {
        let x = Tensor::new(&[[[-2f32, -1.0, 0.0, 1.0, 3.0, f32::NAN]]], &Device::Cpu)
            .and_then(|t| t.broadcast_as((3, 1, 6)))
            .and_then(|t| t.contiguous())
            .expect("t");
        let (rgb, w, h) = tensor_to_rgb8(&x).expect("rgb");
        assert_eq!((w, h), (6, 1));
        // 0.0 -> 127.5 -> 128 (half to even).
        assert_eq!(
            &rgb[..18],
            &[0, 0, 0, 0, 0, 0, 128, 128, 128, 255, 255, 255, 255, 255, 255, 0, 0, 0]
        );
        let bad = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).expect("zeros");
        assert!(tensor_to_rgb8(&bad).is_err());
    }

    #[test]
    fn text_chunks_round_trip() {
        let text = vec![
            (
                "prompt".to_owned(),
                "A cat wearing a jacket, Boston in the background".to_owned(),
            ),
            (
                "parameters".to_owned(),
                r#"{"seed":42,"steps":30,"scheduler":"euler"}"#.to_owned(),
            ),
            ("Comment".to_owned(), "café ünïcödé ✓ 猫".to_owned()),
        ];
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7) as u8).collect();
        let bytes = encode_png(&rgb, 4, 3, &text).expect("encode");
        let got = decode_png_text(&bytes).expect("decode");
        assert_eq!(got, text);
        let img = image::load_from_memory(&bytes).expect("image").to_rgb8();
        assert_eq!(img.as_raw(), &rgb);
    }

    #[test]
    fn bad_inputs_are_rejected() {
        assert!(encode_png(&[0; 11], 2, 2, &[]).is_err());
        assert!(encode_png(&[], 0, 0, &[]).is_err());
        let long = "k".repeat(80);
        assert!(encode_png(&[0; 12], 2, 2, &[(long, "v".into())]).is_err());
        assert!(encode_png(&[0; 12], 2, 2, &[(String::new(), "v".into())]).is_err());
        assert!(decode_png_text(b"not a png").is_err());
    }
}
