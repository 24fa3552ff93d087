//! The errors of the worker service and their gRPC kinds and reasons.

use super::*;

/// Errors of the worker service; each maps to one error kind and a stable reason.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("`subjects[{index}].subject_key` {key:?} is not in the cache (encode the subject again)")]
    NotFound { index: usize, key: String },
    #[error(
        "`subjects[{index}].subject_key` {key:?} has no cached reference features for scoring (send the subject's \
         images, or encode it with `score`)"
    )]
    NoReferences { index: usize, key: String },
    #[error(
        "`score` needs evaluation models, and this worker's model bundle names none (`eval` in mip.json: a CLIP \
         ViT-B/32 folder and a DINO ViT-S/16 folder)"
    )]
    ScoringUnavailable,
    #[error("the model is not ready (still loading, or stopped after a device error)")]
    NotReady,
    #[error("the worker is draining")]
    Draining,
    #[error("queue full: {capacity} requests already waiting")]
    QueueFull { capacity: usize },
    #[error("busy: {0}")]
    Busy(String),
    #[error("cancelled")]
    Cancelled,
    #[error("deadline exceeded")]
    DeadlineExceeded,
    #[error("device error: {0}")]
    Device(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl WorkerError {
    /// The error kind (its gRPC code).
    pub fn kind(&self) -> Kind {
        match self {
            Self::Invalid(_) => Kind::InvalidArgument,
            Self::NotFound { .. } | Self::NoReferences { .. } => Kind::NotFound,
            Self::ScoringUnavailable => Kind::FailedPrecondition,
            Self::NotReady => Kind::NotReady,
            Self::Draining => Kind::Unavailable,
            Self::QueueFull { .. } | Self::Busy(_) => Kind::QueueFull,
            Self::Cancelled => Kind::Cancelled,
            Self::DeadlineExceeded => Kind::DeadlineExceeded,
            Self::Device(_) | Self::Internal(_) => Kind::Internal,
        }
    }

    /// The stable reason (metadata and metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::ScoringUnavailable => "scoring_unavailable",
            Self::Device(_) => "device_error",
            other => other.kind().reason(),
        }
    }
}

impl From<ExecError> for WorkerError {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::NotReady => Self::NotReady,
            ExecError::Stopped => Self::Draining,
            ExecError::Cancelled => Self::Cancelled,
            ExecError::QueueFull => Self::Busy("the executor channel stayed full".into()),
            ExecError::Device(m) => Self::Device(m),
            ExecError::Model(m) => m.into(),
        }
    }
}

impl From<ModelError> for WorkerError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Invalid(i) => Self::Invalid(i),
            ModelError::Cancelled { .. } => Self::Cancelled,
            ModelError::Forward { .. } => Self::Device(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}
