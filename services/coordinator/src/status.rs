//! A job's status as the coordinator reads it: whether it is final, and its metric label.

use mip_proto::v1::JobStatus;

/// DONE, FAILED or CANCELLED.
pub fn is_final(status: i32) -> bool {
    status == JobStatus::Done as i32 || status == JobStatus::Failed as i32 || status == JobStatus::Cancelled as i32
}

/// The label of `mip_coord_jobs_total`.
pub fn status_label(status: i32) -> &'static str {
    match JobStatus::try_from(status) {
        Ok(JobStatus::Done) => "done",
        Ok(JobStatus::Failed) => "failed",
        Ok(JobStatus::Cancelled) => "cancelled",
        Ok(JobStatus::Running) => "running",
        Ok(JobStatus::Queued) => "queued",
        _ => "unspecified",
    }
}
