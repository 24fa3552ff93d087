//! Content-addressed cache keys. A subject keys on the blake3 of its *decoded, preprocessed* pixels (so the same
//! pixels sent as PNG, re-compressed PNG or BMP share a key), plus everything that changes the embedding: the
//! encoder identity (a hash of the image encoder and adapter weights), the variant, the preprocessing version and
//! the dtype. A name keys on the text encoders' identity and its token ids.

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

/// A short identity (16 hex digits of blake3) of a set of files: their contents in order.
pub fn files_identity(files: &[&Path]) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    for f in files {
        let mut file = std::fs::File::open(f)?;
        std::io::copy(&mut file, &mut h)?;
    }
    Ok(h.finalize().to_hex()[..16].to_owned())
}
