//! Watching jobs run by another replica. Several coordinators may share one Redis; a job runs only on the one
//! holding its lease, but WatchJob and CancelJob may reach any of them. (CancelJob of such a job records a cancel
//! request in the store, which the owner applies at its next lease renewal.)
//!
//! - WatchJob of an unfinished job this replica does not run polls the stored job every [`POLL`] (for at most the
//!   job TTL) and emits what the store tells: an Image event per newly recorded image, then Done once the stored
//!   status is final. Queued / Started / Progress events are not stored, so they are not seen from here. The
//!   poll stops when the watcher goes away. For a best-of-N job, the images are those [`crate::best_of::visible`]
//!   shows: a request's kept images once all its samples ended.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use mip_proto::v1::job_event::Event;
use mip_proto::v1::{Job, JobDone, JobEvent};
use tokio::sync::broadcast;
use tokio::time::MissedTickBehavior;

use crate::best_of::KeepBest;
use crate::error::CoordinatorError;
use crate::job::JobWatch;
use crate::status::is_final;
use crate::store::JobStore;

/// How often a watch of another replica's job reads the store.
pub const POLL: Duration = Duration::from_millis(250);

fn event(id: &str, e: Event) -> JobEvent {
    JobEvent {
        job_id: id.to_owned(),
        event: Some(e),
    }
}

/// The watch of a stored job not run here: the images it shows (`job.images`, as [`crate::best_of::visible`] gives
/// them), then (for an unfinished job) the events of a poll of the store; Done at once when it is final. `keep` is
/// the job's best-of-N setting.
pub fn watch_stored(store: Arc<dyn JobStore>, mut job: Job, keep: Option<KeepBest>, ttl: Duration) -> JobWatch {
    let id = job.job_id.clone();
    let images = std::mem::take(&mut job.images);
    let seen: BTreeSet<u32> = images.iter().map(|i| i.task_index).collect();
    let mut replay: Vec<JobEvent> = images.into_iter().map(|i| event(&id, Event::Image(i))).collect();
    if is_final(job.status) {
        replay.push(event(&id, Event::Done(JobDone { job: Some(job) })));
        return JobWatch {
            replay,
            live: None,
            moved: None,
        };
    }
    let capacity = (job.total_tasks as usize + 2).max(16);
    let (tx, rx) = broadcast::channel(capacity);
    let keep = keep.map(|k| (k, k.ended_requests(&job)));
    tokio::spawn(poll_stored(store, id, seen, keep, tx, ttl));
    JobWatch {
        replay,
        live: Some(rx),
        moved: None,
    }
}

/// Sends the stored job's new images and its Done event to `tx` until it ends, vanishes, `ttl` passes or nobody
/// listens any more.
async fn poll_stored(
    store: Arc<dyn JobStore>,
    id: String,
    mut seen: BTreeSet<u32>,
    mut keep: Option<(KeepBest, BTreeSet<u32>)>,
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
        let keep = keep.as_mut().map(|(k, ended)| (&*k, ended));
        match poll_once(store.as_ref(), &id, &mut seen, keep, &tx).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::warn!(job_id = %id, error = %e, "polling a stored job failed"),
        }
    }
}

/// One read of the store; true when the watch is over (Done sent, or the job is gone). The status is read before
/// the images: the owner records every image before it stores a final status, so none is missed before Done.
async fn poll_once(
    store: &dyn JobStore,
    id: &str,
    seen: &mut BTreeSet<u32>,
    keep: Option<(&KeepBest, &mut BTreeSet<u32>)>,
    tx: &broadcast::Sender<JobEvent>,
) -> Result<bool, CoordinatorError> {
    let Some(job) = store.load_job(id, false).await? else {
        return Ok(true);
    };
    let images = match keep {
        None => {
            let all = store.result_indices(id).await?;
            let new: Vec<u32> = all.into_iter().filter(|i| !seen.contains(i)).collect();
            store.load_results(id, &new).await?
        }
        Some((k, ended)) => {
            // A request's kept images appear once its samples all ended: read the images again when one did.
            let now = k.ended_requests(&job);
            if now == *ended {
                Vec::new()
            } else {
                *ended = now;
                let all = store.result_indices(id).await?;
                let mut shown = k.visible(&job, store.load_results(id, &all).await?);
                shown.retain(|i| !seen.contains(&i.task_index));
                shown
            }
        }
    };
    for image in images {
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
