//! MIP worker: the weighted-merge (MIP-Adapter) SDXL model core on candle and, on top of it, the worker's serving
//! layers.
//!
//! - [`model`]: candle modules that mirror the published checkpoints (CLIP text and image encoders, image
//!   projection / Resampler, the SDXL UNet with weighted-merge cross-attention, the VAE). Strict loading.
//! - [`pipeline`]: tokenizer, CLIP preprocessing, schedulers, and the generation API the worker serves from.
//! - [`parity`]: comparison against the golden fixtures.
//! - [`cache`]: the content-addressed embedding cache (in-process LRU in front of Redis, single-flight).
//! - [`demo`]: the built-in demo model writer.
//! - Serving: [`config`] (validated settings), [`limits`] (request limits and edge validation), [`executor`] (the
//!   device thread), [`service`] (domain logic), [`api`] (the tonic adapter), [`server`] (`run`), [`metrics`].
//! - `testing` (feature `testing`): an in-process worker on the fixture model and gRPC helpers, for the tests of
//!   this crate and of the cross-service suite (`tests/`).

pub mod api;
pub mod cache;
pub mod config;
pub mod demo;
pub mod error;
pub mod eval;
pub mod executor;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod parity;
pub mod pipeline;
pub mod server;
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{InvalidInput, ModelError, Result};
