//! Image bytes at the door: the byte limit, the format (PNG, JPEG, BMP, GIF or WebP, sniffed from the content),
//! the dimensions read from the header against the pixel limit *before* any pixel is decoded (a decompression-bomb
//! guard), and optionally a full decode within those bounds, so truncated or corrupt data is refused too.

use std::io::Cursor;

use image::{DynamicImage, ImageReader};

use crate::{InvalidInput, Limits};

/// How deeply [`check_image`] looks at the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageCheck {
    /// Size, format and header dimensions: cheap; for a service that decodes the image itself right after.
    Header,
    /// The header checks, then a full decode within the header's dimensions (truncated or corrupt data fails).
    Decode,
}

/// Checks one reference image of a request against `limits`; returns its `(width, height)`.
pub fn check_image(bytes: &[u8], field: &str, limits: &Limits, check: ImageCheck) -> Result<(u32, u32), InvalidInput> {
    if bytes.len() > limits.max_image_bytes {
        return Err(InvalidInput::new(
            field,
            format!("must be at most {} bytes", limits.max_image_bytes),
            format!("{} bytes", bytes.len()),
        ));
    }
    let (w, h) = check_header(bytes, field, limits.max_image_pixels)?;
    if check == ImageCheck::Decode {
        decode_within(bytes, field, w, h)?;
    }
    Ok((w, h))
}

/// The dimensions from the header of a non-empty image in a supported format, with at most `max_pixels` pixels.
pub fn check_header(bytes: &[u8], field: &str, max_pixels: u64) -> Result<(u32, u32), InvalidInput> {
    if bytes.is_empty() {
        return Err(InvalidInput::new(field, "must be a non-empty image file", "0 bytes"));
    }
    let (w, h) = reader(bytes, field)?
        .into_dimensions()
        .map_err(|e| undecodable(field, bytes, &e))?;
    if w == 0 || h == 0 {
        return Err(InvalidInput::new(
            field,
            "must have a non-zero width and height",
            format!("{w}x{h}"),
        ));
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(InvalidInput::new(
            field,
            format!("must have at most {max_pixels} pixels"),
            format!("{w}x{h} = {pixels} pixels"),
        ));
    }
    Ok((w, h))
}

/// Decodes an image whose header said `w` x `h` (see [`check_header`]), allocating no more than that size needs;
/// a decoder failure or panic, or a result of another size, is an [`InvalidInput`].
pub fn decode_within(bytes: &[u8], field: &str, w: u32, h: u32) -> Result<DynamicImage, InvalidInput> {
    let mut reader = reader(bytes, field)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // Room for 16-bit RGBA output plus decoder scratch.
    let pixels = u64::from(w) * u64::from(h);
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let decoded = std::panic::catch_unwind(move || reader.decode())
        .map_err(|_| InvalidInput::new(field, "must be a decodable image", "a file the decoder rejected"))?
        .map_err(|e| undecodable(field, bytes, &e))?;
    if decoded.width() != w || decoded.height() != h {
        return Err(InvalidInput::new(
            field,
            format!("must decode to its header size {w}x{h}"),
            format!("{}x{}", decoded.width(), decoded.height()),
        ));
    }
    Ok(decoded)
}

fn reader<'a>(bytes: &'a [u8], field: &str) -> Result<ImageReader<Cursor<&'a [u8]>>, InvalidInput> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| undecodable(field, bytes, &e))
}

fn undecodable(field: &str, bytes: &[u8], e: &dyn std::fmt::Display) -> InvalidInput {
    InvalidInput::new(
        field,
        "must be a PNG, JPEG, BMP, GIF or WebP image",
        format!("{} bytes that cannot be decoded ({e})", bytes.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("encode");
        out
    }

    #[test]
    fn a_valid_png_passes_both_checks() {
        let b = png(5, 3);
        for check in [ImageCheck::Header, ImageCheck::Decode] {
            assert_eq!(check_image(&b, "f", &Limits::default(), check), Ok((5, 3)));
        }
    }

    #[test]
    fn bad_bytes_are_refused_naming_the_field() {
        let l = Limits::default();
        let b = png(5, 3);
        let truncated = &b[..b.len() - 20];
        let small = Limits {
            max_image_bytes: 10,
            ..l
        };
        let few_pixels = Limits {
            max_image_pixels: 14,
            ..l
        };
        let cases: Vec<(&[u8], &Limits, ImageCheck, &str)> = vec![
            (b"", &l, ImageCheck::Header, "non-empty"),
            (b"not an image at all", &l, ImageCheck::Header, "PNG, JPEG"),
            (&b[..20], &l, ImageCheck::Header, "PNG, JPEG"),
            (truncated, &l, ImageCheck::Decode, "PNG, JPEG"),
            (&b, &small, ImageCheck::Header, "at most 10 bytes"),
            (&b, &few_pixels, ImageCheck::Header, "at most 14 pixels"),
        ];
        for (bytes, limits, check, rule) in cases {
            let e = check_image(bytes, "subjects[0].images[1]", limits, check).expect_err(rule);
            assert_eq!(e.field, "subjects[0].images[1]");
            assert!(e.rule.contains(rule), "{e}");
        }
        // A truncated body passes the header check alone: that is what `Decode` is for.
        assert!(check_image(truncated, "f", &l, ImageCheck::Header).is_ok());
    }
}
