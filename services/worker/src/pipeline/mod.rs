//! The generation pipeline: tokenization, CLIP preprocessing, text and subject encoding, the denoising loop with
//! guidance and the weighted merge, schedulers, VAE decode and PNG output.

pub mod image_decode;
pub mod jpeg;
pub mod jpeg_idct;
pub mod png;
pub mod preprocess;
pub mod resample;
pub mod scheduler;
pub mod tokenizer;
