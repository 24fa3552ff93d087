//! Candle modules mirroring the published checkpoints: one struct per module, fields named like the weight keys,
//! `new(vb, cfg)` + `forward`. Nothing here knows about gRPC, Redis or jobs.

pub mod clip;
pub mod conv;
pub mod image_proj;
pub mod lazy_file;
pub mod norm;
pub mod unet;
pub mod vae;
pub mod vit;
pub mod weights;
