//! Where job state lives, behind one trait: [`JobStore`], with a Redis implementation ([`RedisStore`], shared by
//! every replica, survives restarts) and an in-memory one ([`MemoryStore`], one coordinator, gone with it). The
//! coordinator never asks which one it has.
//!
//! Every write of a job's state or of its results is *fenced*: each claim of a job's lease hands out a new fencing
//! token ([`Fence`]), and a write carries the token it was claimed with. The store checks the token in the same
//! atomic step as the write, so a coordinator that lost a job (paused past its lease while another replica took
//! it over) cannot overwrite what the new owner wrote: its write answers [`Write::Fenced`] and it drops the job.

mod memory;
mod redis;

use std::time::Duration;

use mip_proto::v1::{Job, JobImage, SubmitJobRequest};

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;
use crate::error::CoordinatorError;

/// The trace fields kept with a job.
pub const TRACE_FIELDS: [&str; 2] = ["traceparent", "tracestate"];

/// The right to write one job's state: the owner (a coordinator's instance id) and the fencing token it claimed
/// the job's lease with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub job_id: String,
    pub owner: String,
    pub token: u64,
}

/// A stored unfinished job, as needed to resume it.
#[derive(Debug, Clone)]
pub struct StoredJob {
    pub spec: SubmitJobRequest,
    pub job: Job,
    pub images: Vec<JobImage>,
    /// The job span's W3C fields (`traceparent`, `tracestate`), empty when it had none.
    pub trace: Vec<(String, String)>,
}

/// What renewing one lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, extended.
    Held,
    /// It had lapsed (Redis unreachable for longer than the lease, or restarted empty) and nobody took it: ours
    /// again with the same token, and the job's state must be written in full.
    Reclaimed,
    /// Someone else's (a newer token), or the job ended elsewhere.
    Lost,
}

/// What a fenced write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Written.
    Done,
    /// Refused: the job was claimed again with a newer token (another coordinator owns it now).
    Fenced,
}

/// What recording one image did.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// This image is now the task's image.
    New,
    /// The task had an image already (an earlier attempt's): that one stands.
    Existing(Box<JobImage>),
    /// Refused: another coordinator owns the job now.
    Fenced,
}

/// A new job's claim: the lease and token are this coordinator's, or its idempotency key names another job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewClaim {
    Claimed(Fence),
    /// The key was bound to this job first.
    Existing(String),
}

/// Job state storage. Errors are [`CoordinatorError::Store`] (unreachable, slow, or it lost the job's state, as a
/// Redis restarted empty does): the caller keeps the job in memory and writes it in full again later.
#[tonic::async_trait]
pub trait JobStore: Send + Sync {
    /// Claims a new job's lease for `owner` (and binds `idempotency_key`, when given, to it in the same step,
    /// unless the key names a job that exists or is being created).
    async fn claim_new(
        &self,
        job_id: &str,
        idempotency_key: Option<&str>,
        owner: &str,
        lease: Duration,
    ) -> Result<NewClaim, CoordinatorError>;

    /// Claims the lease of a job nobody holds (resuming it) with a new token; None when it is held, by anyone.
    async fn claim(&self, job_id: &str, owner: &str, lease: Duration) -> Result<Option<Fence>, CoordinatorError>;

    /// Extends the leases still held with these fences; takes back a lease that lapsed (store outage) when nobody
    /// claimed the job since and it has not ended elsewhere. One [`Renewal`] per fence.
    async fn renew(&self, fences: &[Fence], lease: Duration) -> Result<Vec<Renewal>, CoordinatorError>;

    /// Gives a lease up (if still held with this fence).
    async fn release(&self, fence: &Fence) -> Result<(), CoordinatorError>;

    /// Writes a new job: its spec, trace fields and state.
    async fn create(
        &self,
        fence: &Fence,
        job: &Job,
        spec: &SubmitJobRequest,
        trace: &[(String, String)],
    ) -> Result<Write, CoordinatorError>;

    /// Writes the job's state (without images); an unfinished job stays in the active set.
    async fn write_job(&self, fence: &Fence, job: &Job) -> Result<Write, CoordinatorError>;

    /// Records one image unless its task has one already.
    async fn write_result(&self, fence: &Fence, image: &JobImage) -> Result<Recorded, CoordinatorError>;

    /// Ids of the unfinished jobs (of any coordinator).
    async fn active_ids(&self) -> Result<Vec<String>, CoordinatorError>;

    /// Drops a job from the active set (its state expired, it ended, or it no longer validates).
    async fn forget_active(&self, job_id: &str) -> Result<(), CoordinatorError>;

    /// Everything needed to resume a job; None when its state is gone.
    async fn load_stored(&self, job_id: &str) -> Result<Option<StoredJob>, CoordinatorError>;

    /// A stored job (with its images when asked).
    async fn load_job(&self, job_id: &str, include_images: bool) -> Result<Option<Job>, CoordinatorError>;

    /// The task indices with a recorded image, in order.
    async fn result_indices(&self, job_id: &str) -> Result<Vec<u32>, CoordinatorError>;

    /// The recorded images of tasks `indices` (those without one are left out).
    async fn load_results(&self, job_id: &str, indices: &[u32]) -> Result<Vec<JobImage>, CoordinatorError>;

    /// Records a cancel request for the replica that runs the job.
    async fn request_cancel(&self, job_id: &str) -> Result<(), CoordinatorError>;

    /// One flag per id: whether a cancel request is recorded for that job.
    async fn cancel_requested(&self, ids: &[String]) -> Result<Vec<bool>, CoordinatorError>;

    /// Job ids, newest first, `count` from `offset`.
    async fn list_job_ids(&self, offset: usize, count: usize) -> Result<Vec<String>, CoordinatorError>;
}

/// Connects the store the configuration names: Redis at `url`, or memory.
pub async fn connect(
    url: Option<&str>,
    ca: Option<&std::path::Path>,
    ttl: Duration,
) -> Result<std::sync::Arc<dyn JobStore>, CoordinatorError> {
    Ok(match url {
        Some(u) => std::sync::Arc::new(RedisStore::connect(u, ca, ttl).await?),
        None => std::sync::Arc::new(MemoryStore::default()),
    })
}
