//! The one writer of job state: every transition of a job's state machine ([`JobHandle`]) that must outlive this
//! process goes through [`JobWriter`], which writes it to the [`JobStore`] under the job's fence.
//!
//! - A write the store refuses as fenced means another coordinator claimed the job: the job is abandoned here
//!   (its tasks stop, nothing more is written) and counted in `mip_coord_fenced_writes_total`.
//! - A write that fails (Redis slow, paused, restarted) marks the job dirty; the job keeps running from memory,
//!   and [`JobWriter::rewrite`] writes it in full (spec, every image, the state) once the lease renewal reaches
//!   the store again.
//! - Writes of one job are serialised, so an earlier snapshot never lands after a later one.

use std::sync::Arc;

use mip_proto::v1::{Job, JobImage};

use crate::error::CoordinatorError;
use crate::job::JobHandle;
use crate::metrics::Metrics;
use crate::status::status_label;
use crate::store::{JobStore, Recorded, Write};

/// Writes jobs' state to the store under their fences.
pub struct JobWriter {
    pub store: Arc<dyn JobStore>,
    metrics: Metrics,
}

impl JobWriter {
    pub fn new(store: Arc<dyn JobStore>, metrics: Metrics) -> Self {
        Self { store, metrics }
    }

    /// Writes a new job in full; an error when the store did not take it (the job must not start).
    pub async fn create(&self, job: &JobHandle) -> Result<(), CoordinatorError> {
        let r = &job.record;
        match self
            .store
            .create(&r.fence, &job.snapshot(false), &r.spec, &r.trace)
            .await?
        {
            Write::Done => Ok(()),
            Write::Fenced => Err(CoordinatorError::Store(format!(
                "job `{}` was claimed by another coordinator while being created",
                job.id
            ))),
        }
    }

    /// Writes the job's current state (nothing once it is abandoned).
    pub async fn persist(&self, job: &JobHandle) {
        if job.is_abandoned() {
            return;
        }
        let _order = job.persist_lock.lock().await;
        if job.is_abandoned() {
            return;
        }
        match self.store.write_job(&job.record.fence, &job.snapshot(false)).await {
            Ok(Write::Done) => {}
            Ok(Write::Fenced) => self.fenced(job),
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "storing the job state failed; kept for a re-write");
                job.mark_dirty();
            }
        }
    }

    /// Records an image in the store first (once per task, whichever attempt wins), then in the job, and writes
    /// the job's state.
    pub async fn record(&self, job: &JobHandle, image: JobImage) {
        if !job.task_open(image.task_index) || job.is_abandoned() {
            return;
        }
        let image = match self.store.write_result(&job.record.fence, &image).await {
            Ok(Recorded::New) => image,
            Ok(Recorded::Existing(first)) => *first,
            Ok(Recorded::Fenced) => return self.fenced(job),
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "storing a result failed; kept for a re-write");
                job.mark_dirty();
                image
            }
        };
        if job.deliver(image) {
            self.persist(job).await;
        }
    }

    /// Writes a dirty job's whole state again: spec and trace, every image (write-once, so an image recorded
    /// meanwhile wins), the state, and for an ended job the release of its lease. False (and the job still dirty)
    /// when the store fails again.
    pub async fn rewrite(&self, job: &JobHandle) -> bool {
        if !job.take_dirty() || job.is_abandoned() {
            return true;
        }
        let _order = job.persist_lock.lock().await;
        let result = self.write_all(job).await;
        match result {
            Ok(Write::Done) => {
                tracing::info!(job_id = %job.id, "job state re-written after a store outage");
                true
            }
            Ok(Write::Fenced) => {
                self.fenced(job);
                true
            }
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "re-writing the job state failed");
                job.mark_dirty();
                false
            }
        }
    }

    async fn write_all(&self, job: &JobHandle) -> Result<Write, CoordinatorError> {
        let fence = &job.record.fence;
        for image in job.images() {
            if self.store.write_result(fence, &image).await? == Recorded::Fenced {
                return Ok(Write::Fenced);
            }
        }
        let r = &job.record;
        let written = self
            .store
            .create(fence, &job.snapshot(false), &r.spec, &r.trace)
            .await?;
        if written == Write::Done && job.is_finished() {
            self.store.release(fence).await?;
        }
        Ok(written)
    }

    /// A job ended: persist it, count it and give its lease up.
    pub async fn finished(&self, job: &JobHandle, done: &Job) {
        self.metrics.jobs.with_label_values(&[status_label(done.status)]).inc();
        tracing::info!(parent: &job.span.get(), job_id = %job.id, status = status_label(done.status), "job ended");
        // Ending the span exports it now, not when the handle leaves memory.
        job.span.end();
        self.persist(job).await;
        if job.is_abandoned() {
            return;
        }
        if let Err(e) = self.store.release(&job.record.fence).await {
            tracing::warn!(job_id = %job.id, error = %e, "releasing the job lease failed");
            job.mark_dirty();
        }
    }

    /// The store refused a write of `job` as fenced: another coordinator owns it.
    fn fenced(&self, job: &JobHandle) {
        self.metrics.fenced.inc();
        tracing::warn!(parent: &job.span.get(), job_id = %job.id, token = job.record.fence.token,
            "job claimed by another coordinator (fenced write): stopping its tasks here");
        job.abandon();
    }
}
