//! Content-addressed cache keys. A subject keys on the blake3 of its *decoded, preprocessed* pixels (so the same
//! pixels sent as PNG, re-compressed PNG or BMP share a key), plus everything that changes the embedding: the
//! encoder identity (a hash of the image encoder and adapter weights), the variant, the preprocessing version and
//! the dtype. A name keys on the text encoders' identity and its token ids. A subject's reference features (for
//! scoring) key on the evaluation models' identity and the subject's key.

use std::path::Path;

use crate::pipeline::preprocess::PreparedImage;

/// Version of the preprocessing code; bump it when preprocessing output changes.
pub const PREPROCESS_VERSION: u32 = 1;

/// blake3 of a preprocessed image (dimensions and RGB bytes).
pub fn pixel_digest(img: &PreparedImage) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(&(img.width as u64).to_le_bytes());
    h.update(&(img.height as u64).to_le_bytes());
    h.update(&img.data);
    h.finalize()
}

/// `mip:subject:v1:{variant}:{encoder id}:{preprocess version}:{dtype}:{digest of the ordered image digests}`.
pub fn subject_key(variant: &str, encoder_id: &str, dtype: &str, images: &[blake3::Hash]) -> String {
    let mut h = blake3::Hasher::new();
    for d in images {
        h.update(d.as_bytes());
    }
    format!(
        "mip:subject:v1:{variant}:{encoder_id}:p{PREPROCESS_VERSION}:{dtype}:{}",
        h.finalize().to_hex()
    )
}

/// `mip:text:v1:{text encoders id}:{dtype}:{digest of both token id sequences}`.
pub fn text_key(text_id: &str, dtype: &str, ids_1: &[u32], ids_2: &[u32]) -> String {
    let mut h = blake3::Hasher::new();
    for ids in [ids_1, ids_2] {
        h.update(&(ids.len() as u64).to_le_bytes());
        for id in ids {
            h.update(&id.to_le_bytes());
        }
    }
    format!("mip:text:v1:{text_id}:{dtype}:{}", h.finalize().to_hex())
}

/// `mip:refs:v1:{evaluation models id}:{digest of the subject key}`: a subject's reference features for scoring,
/// cached with the subject (the same images give the same subject key).
pub fn references_key(eval_id: &str, subject_key: &str) -> String {
    format!(
        "mip:refs:v1:{eval_id}:{}",
        blake3::hash(subject_key.as_bytes()).to_hex()
    )
}

/// A short identity (16 hex digits of blake3) of a set of files: their contents in order.
pub fn files_identity(files: &[&Path]) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    for f in files {
        let mut file = std::fs::File::open(f)?;
        std::io::copy(&mut file, &mut h)?;
    }
    Ok(h.finalize().to_hex()[..16].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(width: usize, height: usize, fill: u8) -> PreparedImage {
        PreparedImage {
            width,
            height,
            data: vec![fill; width * height * 3],
        }
    }

    fn key_of(images: &[PreparedImage]) -> String {
        let digests: Vec<_> = images.iter().map(pixel_digest).collect();
        subject_key("sdxl", "0123456789abcdef", "f32", &digests)
    }

    #[test]
    fn the_same_pixels_give_the_same_key() {
        assert_eq!(key_of(&[img(4, 2, 7)]), key_of(&[img(4, 2, 7)]));
        assert_eq!(text_key("t", "f16", &[1, 2], &[3]), text_key("t", "f16", &[1, 2], &[3]));
    }

    #[test]
    fn the_key_has_the_documented_layout() {
        let k = key_of(&[img(1, 1, 0)]);
        assert!(k.starts_with("mip:subject:v1:sdxl:0123456789abcdef:p1:f32:"), "{k}");
        assert_eq!(k.rsplit(':').next().map(str::len), Some(64), "{k}");
        assert!(text_key("t", "f16", &[1], &[2]).starts_with("mip:text:v1:t:f16:"));
    }

    #[test]
    fn dimensions_pixels_and_order_change_the_key() {
        let base = key_of(&[img(4, 2, 7)]);
        // Same bytes, other dimensions.
        assert_ne!(base, key_of(&[img(2, 4, 7)]));
        let mut one_pixel_off = img(4, 2, 7);
        one_pixel_off.data[5] ^= 1;
        assert_ne!(base, key_of(&[one_pixel_off]));
        assert_ne!(
            key_of(&[img(1, 1, 1), img(1, 1, 2)]),
            key_of(&[img(1, 1, 2), img(1, 1, 1)])
        );
        assert_ne!(base, key_of(&[img(4, 2, 7), img(4, 2, 7)]));
    }

    #[test]
    fn encoder_variant_and_dtype_change_the_key() {
        let d = [pixel_digest(&img(4, 2, 7))];
        let base = subject_key("sdxl", "enc-a", "f32", &d);
        assert_ne!(base, subject_key("sdxl", "enc-b", "f32", &d));
        assert_ne!(base, subject_key("sdxl_plus", "enc-a", "f32", &d));
        assert_ne!(base, subject_key("sdxl", "enc-a", "f16", &d));
    }

    #[test]
    fn text_keys_separate_encoders_dtypes_and_token_sequences() {
        let base = text_key("t", "f32", &[1, 2], &[3]);
        assert_ne!(base, text_key("u", "f32", &[1, 2], &[3]));
        assert_ne!(base, text_key("t", "bf16", &[1, 2], &[3]));
        assert_ne!(
            base,
            text_key("t", "f32", &[1], &[2, 3]),
            "the split between the sequences counts"
        );
        assert_ne!(base, text_key("t", "f32", &[1, 2], &[4]));
    }

    #[test]
    fn files_identity_follows_contents() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"weights-a")?;
        std::fs::write(&b, b"weights-b")?;
        let id = files_identity(&[&a, &b])?;
        assert_eq!(id.len(), 16);
        assert_eq!(id, files_identity(&[&a, &b])?);
        assert_ne!(id, files_identity(&[&b, &a])?);
        std::fs::write(&b, b"weights-B")?;
        assert_ne!(id, files_identity(&[&a, &b])?);
        Ok(())
    }
}
