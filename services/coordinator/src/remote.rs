//! Jobs run by another replica. Several coordinators may share one Redis; a job runs only on the one holding its
//! lease, but WatchJob and CancelJob may reach any of them.
//!
//! - CancelJob of an unfinished job this replica does not run records `mip:coord:cancel:{id}` (see
//!   [`crate::store`]) and answers the job as it is stored now (not yet CANCELLED). The owner reads the recorded
//!   requests at each lease renewal (every third of `coordinator.lease_ms`) and cancels those jobs exactly as a
//!   local CancelJob would; a replica resuming the job honours the request too.
//! - WatchJob of an unfinished job this replica does not run polls the stored job every [`POLL`] (for at most the
//!   job TTL) and emits what the store tells: an Image event per newly recorded image, then Done once the stored
//!   status is final. Queued / Started / Progress events are not stored, so they are not seen from here. The
//!   poll stops when the watcher goes away.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use mip_proto::v1::job_event::Event;
use mip_proto::v1::{Job, JobDone, JobEvent};
use tokio::sync::broadcast;
use tokio::time::MissedTickBehavior;

use crate::error::CoordinatorError;
use crate::job::{is_final, JobHandle};
use crate::service::{Coordinator, JobWatch};
use crate::store::Store;

/// How often a watch of another replica's job reads the store.
pub const POLL: Duration = Duration::from_millis(250);

fn event(id: &str, e: Event) -> JobEvent {
    JobEvent {
        job_id: id.to_owned(),
        event: Some(e),
    }
}

impl Coordinator {
    /// CancelJob of a job not in this replica's memory: a finished (or memory-only) job is returned as it is; an
    /// unfinished stored one gets a cancel request for its owner and is returned as it is now.
    pub(crate) async fn cancel_remote(&self, id: &str) -> Result<Job, CoordinatorError> {
        let job = self.get(id, false).await?;
        let store = &self.inner.dispatcher.store;
        if is_final(job.status) || !store.persistent() {
            return Ok(job);
        }
        store.request_cancel(id).await?;
        tracing::info!(job_id = %id, "cancel requested for a job run by another replica");
        Ok(job)
    }

    /// Cancels `j` here (its running tasks stop), persists it and gives its lease up; the job as it is after.
    pub(crate) async fn cancel_handle(&self, j: &JobHandle) -> Job {
        if let Some(job) = j.cancel() {
            tracing::info!(parent: &j.span, job_id = %j.id, "job cancelled");
            self.inner.dispatcher.finished(j, &job).await;
            return job;
        }
        j.snapshot(false)
    }

    /// Cancels those of `jobs` (run here) that another replica recorded a cancel request for.
    pub(crate) async fn apply_cancel_requests(&self, jobs: &[Arc<JobHandle>]) {
        if jobs.is_empty() {
            return;
        }
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let flags = match self.inner.dispatcher.store.cancel_requested(&ids).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, jobs = ids.len(), "reading cancel requests failed");
                return;
            }
        };
        for (job, flagged) in jobs.iter().zip(flags) {
            if flagged && !job.is_finished() {
                tracing::info!(parent: &job.span, job_id = %job.id, "cancel requested through another replica");
                self.cancel_handle(job).await;
            }
        }
    }

    /// The watch of a stored job not in memory: its recorded images, then (for an unfinished job) the events of a
    /// poll of the store; Done at once when it is final.
    pub(crate) fn watch_stored(&self, mut job: Job) -> JobWatch {
        let id = job.job_id.clone();
        let images = std::mem::take(&mut job.images);
        let seen: BTreeSet<u32> = images.iter().map(|i| i.task_index).collect();
        let mut replay: Vec<JobEvent> = images.into_iter().map(|i| event(&id, Event::Image(i))).collect();
        let store = &self.inner.dispatcher.store;
        if is_final(job.status) || !store.persistent() {
            if is_final(job.status) {
                replay.push(event(&id, Event::Done(JobDone { job: Some(job) })));
            }
            return JobWatch { replay, live: None };
        }
        let capacity = (job.total_tasks as usize + 2).max(16);
        let (tx, rx) = broadcast::channel(capacity);
        tokio::spawn(poll_stored(store.clone(), id, seen, tx, self.inner.cfg.ttl));
        JobWatch { replay, live: Some(rx) }
    }
}

/// Sends the stored job's new images and its Done event to `tx` until it ends, vanishes, `ttl` passes or nobody
/// listens any more.
async fn poll_stored(
    store: Arc<Store>,
    id: String,
    mut seen: BTreeSet<u32>,
    tx: broadcast::Sender<JobEvent>,
    ttl: Duration,
) {
    let until = tokio::time::Instant::now() + ttl;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tx.receiver_count() == 0 || tokio::time::Instant::now() >= until {
            return;
        }
        match poll_once(&store, &id, &mut seen, &tx).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::warn!(job_id = %id, error = %e, "polling a stored job failed"),
        }
    }
}

/// One read of the store; true when the watch is over (Done sent, or the job is gone). The status is read before
/// the images: the owner records every image before it stores a final status, so none is missed before Done.
async fn poll_once(
    store: &Store,
    id: &str,
    seen: &mut BTreeSet<u32>,
    tx: &broadcast::Sender<JobEvent>,
) -> Result<bool, CoordinatorError> {
    let Some(job) = store.load_job(id, false).await? else {
        return Ok(true);
    };
    let new: Vec<u32> = store
        .result_indices(id)
        .await?
        .into_iter()
        .filter(|i| !seen.contains(i))
        .collect();
    for image in store.load_results(id, &new).await? {
        seen.insert(image.task_index);
        if tx.send(event(id, Event::Image(image))).is_err() {
            return Ok(true);
        }
    }
    if is_final(job.status) {
        let _ = tx.send(event(id, Event::Done(JobDone { job: Some(job) })));
        return Ok(true);
    }
    Ok(false)
}
