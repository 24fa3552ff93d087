//! MIP worker: the weighted-merge (MIP-Adapter) SDXL model core on candle and, on top of it, the worker's serving
//! layers.
//!
//! - [`model`]: candle modules that mirror the published checkpoints (CLIP text and image encoders, image
//!   projection / Resampler, the SDXL UNet with weighted-merge cross-attention, the VAE). Strict loading.
//! - [`pipeline`]: tokenizer, CLIP preprocessing, schedulers, and the generation API the worker serves from.
//! - [`parity`]: comparison against the golden fixtures.

pub mod cache;
pub mod demo;
pub mod error;
pub mod model;
pub mod parity;
pub mod pipeline;

pub use error::{InvalidInput, ModelError, Result};
