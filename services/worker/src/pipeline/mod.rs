//! The generation pipeline: tokenization, CLIP preprocessing, text and subject encoding, the denoising loop with
//! guidance and the weighted merge, schedulers, VAE decode and PNG output.

pub mod embedding;
pub mod generate;
pub mod image_decode;
pub mod jpeg;
pub mod jpeg_idct;
pub mod load_report;
pub mod memory;
pub mod model;
pub mod noise;
pub mod png;
pub mod precision;
pub mod preprocess;
pub mod request;
pub mod resample;
pub mod scheduler;
pub mod spec;
pub mod tokenizer;
pub mod vae_tiling;

pub use generate::{Conditioning, EncodedSubject, Generated, Progress, Rendered, Timings};
pub use model::{MipPipeline, TextEmbedding};
pub use request::{GenerateRequest, SubjectRequest, ValidRequest};
pub use spec::ModelSpec;
