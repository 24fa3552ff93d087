//! The request rules of MIP Cluster, in one place for both services: the coordinator runs them on `SubmitJob` and
//! `Generate` before anything is queued, the worker on `Generate` and `EncodeSubjects`, so the two can never
//! disagree about what is valid. A proto request becomes a [`ValidGeneration`] (defaults filled, every field in
//! range, image bytes checked) or an [`InvalidInput`] naming the field, the rule and the value.
//!
//! - [`limits`]: the hard maxima of the pipeline and the configurable [`Limits`] within them.
//! - [`image`]: image bytes at the door — size, format, header dimensions against the pixel limit, and
//!   optionally a full decode (truncated or corrupt data).
//! - [`generation`]: a whole [`GenerationRequest`](mip_proto::v1::GenerationRequest), its subjects and the
//!   per-field rules the pipeline's own API reuses.
//! - [`scheduler`]: the samplers a request may name.

pub mod error;
pub mod generation;
pub mod image;
pub mod limits;
pub mod scheduler;

pub use error::InvalidInput;
pub use generation::{validate_generation, validate_subjects, Defaults, SubjectInput, SubjectSpec, ValidGeneration};
pub use image::ImageCheck;
pub use limits::{Limits, LimitsConfig};
pub use scheduler::SchedulerKind;
