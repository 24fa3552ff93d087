//! The coordinator's boundary error, mapped onto the shared error-kind table (`mip_common::errors`).

use mip_common::errors::{status, Kind};
use tonic::Status;

/// Everything a coordinator call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("`{field}` {rule}, got {value}")]
    Invalid { field: String, rule: String, value: String },
    #[error("job `{0}` not found")]
    NotFound(String),
    #[error("queue full: {queued} tasks queued + {asked} asked > coordinator.max_queued_tasks {limit}")]
    QueueFull { queued: usize, asked: usize, limit: usize },
    #[error("job state store: {0}")]
    Store(String),
    #[error("the coordinator is draining (shutting down); submit to another replica or retry")]
    Draining,
    #[error("job `{0}` moved to another coordinator (this one lost its lease); watch it again")]
    Moved(String),
    #[error("worker `{url}`: {message}")]
    WorkerUrl { url: String, message: String },
    #[error("{0}")]
    ScoringUnavailable(String),
    #[error("job `{job_id}` ended {status}: {message}")]
    JobEnded {
        job_id: String,
        status: String,
        code: tonic::Code,
        message: String,
    },
}

impl CoordinatorError {
    /// The `mip-reason` of a refusal at admission (the label of `mip_coord_rejected_total`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ScoringUnavailable(_) => "scoring_unavailable",
            Self::QueueFull { .. } => "queue_full",
            Self::Draining => "draining",
            _ => "invalid_argument",
        }
    }

    pub fn invalid(field: impl Into<String>, rule: impl Into<String>, value: impl ToString) -> Self {
        Self::Invalid {
            field: field.into(),
            rule: rule.into(),
            value: value.to_string(),
        }
    }
}

impl From<mip_admission::InvalidInput> for CoordinatorError {
    fn from(e: mip_admission::InvalidInput) -> Self {
        Self::Invalid {
            field: e.field,
            rule: e.rule,
            value: e.value,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Self {
        let msg = e.to_string();
        match e {
            CoordinatorError::Invalid { .. } | CoordinatorError::WorkerUrl { .. } => {
                status(Kind::InvalidArgument, None, msg)
            }
            CoordinatorError::NotFound(_) => status(Kind::NotFound, None, msg),
            CoordinatorError::ScoringUnavailable(_) => {
                status(Kind::FailedPrecondition, Some("scoring_unavailable"), msg)
            }
            CoordinatorError::QueueFull { .. } => status(Kind::QueueFull, None, msg),
            CoordinatorError::Store(_) => status(Kind::Unavailable, Some("job_store_unavailable"), msg),
            CoordinatorError::Draining => status(Kind::Unavailable, Some("draining"), msg),
            CoordinatorError::Moved(_) => status(Kind::Unavailable, Some("job_moved"), msg),
            CoordinatorError::JobEnded { code, .. } => {
                let mut s = Status::new(code, msg);
                if let Ok(v) = "job_failed".parse() {
                    s.metadata_mut().insert(mip_common::errors::REASON_KEY, v);
                }
                s
            }
        }
    }
}
