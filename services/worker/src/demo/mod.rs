//! The built-in demo model: a small, deterministic, randomly initialised MIP-Adapter SDXL model written by our own
//! code in the published layouts (diffusers SDXL folder, IP-Adapter image encoder, adapter checkpoint), so the
//! whole pipeline runs offline. Its images are noise; point `--model` at real weights for real pictures.

pub mod tokenizer;
pub mod weights;
