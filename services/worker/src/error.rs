//! Errors of the model core: loading, invalid input and forward failures.

use std::path::PathBuf;

/// Everything that can go wrong in the model core.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or parsed.
    #[error("cannot load `{path}`: {message}")]
    Load { path: PathBuf, message: String },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("missing tensor `{key}` in `{file}`")]
    MissingKey { key: String, file: String },
    /// A tensor in the checkpoint that no module of the model uses.
    #[error("unused tensor `{key}` in `{file}` (strict loading)")]
    UnusedKey { key: String, file: String },
    /// A tensor present with the wrong shape.
    #[error("tensor `{key}` in `{file}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        key: String,
        file: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A configuration file is inconsistent or unsupported.
    #[error("config `{path}`: {message}")]
    Config { path: PathBuf, message: String },
    /// A caller-supplied value is out of range or malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// A forward pass failed inside a stage.
    #[error("forward failed in {stage}: {source}")]
    Forward {
        stage: &'static str,
        #[source]
        source: candle_core::Error,
    },
    /// Generation stopped because the caller asked it to.
    #[error("cancelled after {completed_steps} of {total_steps} steps")]
    Cancelled { completed_steps: usize, total_steps: usize },
}

/// A request value that breaks a rule (one type for the whole cluster, in `mip-admission`).
pub use mip_admission::InvalidInput;

/// Shorthand for results of the model core.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Attach a stage name to a candle error.
pub trait ForwardContext<T> {
    fn stage(self, stage: &'static str) -> Result<T>;
}

impl<T> ForwardContext<T> for candle_core::Result<T> {
    fn stage(self, stage: &'static str) -> Result<T> {
        self.map_err(|source| ModelError::Forward { stage, source })
    }
}
