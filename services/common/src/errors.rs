//! The one table from error kinds to gRPC codes. Every error a service returns carries a stable snake_case
//! `reason` in the `mip-reason` metadata key (it also labels the error metric), and its message names the field,
//! the limit and the value where there is one.

use tonic::{Code, Status};

/// Metadata key of the reason.
pub const REASON_KEY: &str = "mip-reason";

/// Error kinds of the services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidArgument,
    NotFound,
    QueueFull,
    Unavailable,
    DeadlineExceeded,
    Cancelled,
    NotReady,
    /// The request needs something this deployment does not have (e.g. scoring without evaluation models).
    FailedPrecondition,
    Unauthenticated,
    Internal,
}

impl Kind {
    /// The gRPC code of the kind.
    pub fn code(self) -> Code {
        match self {
            Kind::InvalidArgument => Code::InvalidArgument,
            Kind::NotFound => Code::NotFound,
            Kind::QueueFull => Code::ResourceExhausted,
            Kind::Unavailable => Code::Unavailable,
            Kind::DeadlineExceeded => Code::DeadlineExceeded,
            Kind::Cancelled => Code::Cancelled,
            Kind::NotReady => Code::FailedPrecondition,
            Kind::FailedPrecondition => Code::FailedPrecondition,
            Kind::Unauthenticated => Code::Unauthenticated,
            Kind::Internal => Code::Internal,
        }
    }

    /// The default reason string of the kind.
    pub fn reason(self) -> &'static str {
        match self {
            Kind::InvalidArgument => "invalid_argument",
            Kind::NotFound => "not_found",
            Kind::QueueFull => "queue_full",
            Kind::Unavailable => "unavailable",
            Kind::DeadlineExceeded => "deadline_exceeded",
            Kind::Cancelled => "cancelled",
            Kind::NotReady => "not_ready",
            Kind::FailedPrecondition => "failed_precondition",
            Kind::Unauthenticated => "unauthenticated",
            Kind::Internal => "internal",
        }
    }
}

/// A status of `kind` with `message`, and `reason` (or the kind's default) in the metadata.
pub fn status(kind: Kind, reason: Option<&str>, message: impl Into<String>) -> Status {
    let mut s = Status::new(kind.code(), message);
    let reason = reason.unwrap_or(kind.reason());
    if let Ok(v) = reason.parse() {
        s.metadata_mut().insert(REASON_KEY, v);
    }
    s
}

/// The reason of a status, if it carries one.
pub fn reason_of(s: &Status) -> Option<String> {
    s.metadata()
        .get(REASON_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_code_and_reason() {
        let s = status(Kind::QueueFull, None, "queue full: 8 of 8");
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(reason_of(&s).as_deref(), Some("queue_full"));
        let s = status(Kind::InvalidArgument, Some("bad_width"), "`width` …");
        assert_eq!(reason_of(&s).as_deref(), Some("bad_width"));
    }
}
