//! Running one task: wait for a slot on the best worker (placement order over the registry), stream its
//! `Generate` call (progress and the image go to the job), and on UNAVAILABLE / transport-like failures try
//! another worker, up to `max_attempts`. Cancellation drops the worker stream, which cancels the worker's work.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mip_common::errors::{status, Kind};
use mip_proto::v1::{generate_event, GenerateTask, JobImage};
use tonic::{Code, Status};

use crate::job::JobHandle;
use crate::metrics::Metrics;
use crate::placement;
use crate::registry::{Permit, Registry, WorkerId};
use crate::store::Store;

/// Longest wait between placement tries (slots released and health changes also wake the waiter).
const RETRY_PLACEMENT: Duration = Duration::from_millis(200);

/// What a task runner needs.
pub struct Dispatcher {
    pub registry: Arc<Registry>,
    pub store: Arc<Store>,
    pub max_attempts: u32,
    pub metrics: Metrics,
    /// Tasks not yet started, across jobs.
    pub queued: Arc<std::sync::atomic::AtomicUsize>,
    /// Priorities of the tasks waiting for a slot (priority → count): a task takes a slot only while no task of a
    /// higher priority waits (strict classes).
    pub waiting: Mutex<BTreeMap<i32, usize>>,
}

/// A task's place among the waiting ones; removed on drop.
struct Waiting<'a> {
    set: &'a Mutex<BTreeMap<i32, usize>>,
    priority: i32,
}

impl<'a> Waiting<'a> {
    fn new(set: &'a Mutex<BTreeMap<i32, usize>>, priority: i32) -> Self {
        *lock(set).entry(priority).or_default() += 1;
        Self { set, priority }
    }

    /// No task of a higher priority waits.
    fn is_first(&self) -> bool {
        lock(self.set)
            .keys()
            .next_back()
            .is_none_or(|&top| top <= self.priority)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut m = lock(self.set);
        if let Some(n) = m.get_mut(&self.priority) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.priority);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Resolves at the deadline (with its `deadline_ms`); never without one.
async fn until(deadline: Option<(tokio::time::Instant, u64)>) -> u64 {
    match deadline {
        Some((at, ms)) => {
            tokio::time::sleep_until(at).await;
            ms
        }
        None => std::future::pending().await,
    }
}

/// Codes after which the task goes to another worker.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Aborted | Code::Cancelled | Code::ResourceExhausted
    )
}

impl Dispatcher {
    /// Runs task `index` of `job` to its end (image, final failure or cancellation).
    pub async fn run_task(self: Arc<Self>, job: Arc<JobHandle>, index: usize) {
        let mut cancel = job.cancelled();
        let mut counted_queued = true;
        let mut excluded: Vec<usize> = Vec::new();
        let spec = &job.tasks[index];
        let key = placement::affinity_key(&spec.request, &format!("{}/{}", job.id, index));
        for attempt in 1..=self.max_attempts {
            let permit = tokio::select! {
                p = self.acquire(&key, &excluded, job.priority) => p,
                _ = cancel.wait_for(|c| *c) => break,
                ms = until(job.deadline) => {
                    let msg = format!("task {index} did not start within deadline_ms {ms}");
                    job.failed(spec.index, &status(Kind::DeadlineExceeded, None, msg), false);
                    break;
                }
            };
            if std::mem::take(&mut counted_queued) {
                self.queued.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
            job.started(spec.index, permit.url(), attempt);
            let outcome = tokio::select! {
                r = self.call(&job, index, &permit) => r,
                _ = cancel.wait_for(|c| *c) => break,
            };
            match outcome {
                Ok(image) => {
                    if job.deliver(image.clone()) {
                        if let Err(e) = self.store.save_result(&job.id, &image).await {
                            tracing::warn!(job_id = %job.id, error = %e, "storing a result failed");
                        }
                    }
                    break;
                }
                Err(status) => {
                    let again = retryable(status.code()) && attempt < self.max_attempts;
                    tracing::warn!(job_id = %job.id, task = index, worker = %permit.url(), code = ?status.code(),
                        message = status.message(), retry = again, "task attempt failed");
                    if status.code() == Code::Unavailable {
                        self.registry.mark_unhealthy(permit.idx, status.message());
                    }
                    excluded.push(permit.idx);
                    job.failed(spec.index, &status, again);
                    if !again {
                        break;
                    }
                }
            }
        }
        if counted_queued {
            self.queued.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(done) = job.finish_if_complete() {
            if let Err(e) = self.store.save_job(&done).await {
                tracing::warn!(job_id = %job.id, error = %e, "storing the finished job failed");
            }
        }
    }

    /// A slot on the first worker in placement order that has one, waiting while none has or while a task of a
    /// higher priority waits. The chosen worker remembers the task's subjects, and the placement is counted in
    /// `mip_coord_affinity_total` (tasks with subjects only).
    async fn acquire(&self, key: &[u8; 32], excluded: &[WorkerId], priority: i32) -> Permit {
        let me = Waiting::new(&self.waiting, priority);
        loop {
            let wake = self.registry.changed();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if me.is_first() {
                let candidates = self.registry.candidates(excluded, key);
                let placed = placement::order(key, &candidates)
                    .into_iter()
                    .find_map(|i| self.registry.try_acquire(candidates[i].id).map(|p| (i, p)));
                if let Some((chosen, permit)) = placed {
                    if placement::has_subjects(key) {
                        self.metrics.placed(placement::classify(key, &candidates, chosen));
                        permit.remember(key);
                    }
                    return permit;
                }
            }
            let _ = tokio::time::timeout(RETRY_PLACEMENT, wake).await;
        }
    }

    /// One Generate call, streamed to the end.
    async fn call(&self, job: &JobHandle, index: usize, permit: &Permit) -> Result<JobImage, Status> {
        let spec = &job.tasks[index];
        let task = GenerateTask {
            task_id: format!("{}/{}", job.id, index),
            request: Some(spec.request.clone()),
        };
        let mut stream = permit.client().generate(task).await?.into_inner();
        while let Some(ev) = stream.message().await? {
            match ev.event {
                Some(generate_event::Event::Progress(p)) => job.progress(spec.index, p.step, p.total),
                Some(generate_event::Event::Image(img)) => {
                    return Ok(JobImage {
                        task_index: spec.index,
                        request_index: spec.request_index,
                        sample_index: spec.sample_index,
                        png: img.png,
                        seed: img.seed,
                        width: img.width,
                        height: img.height,
                        worker: permit.url().to_owned(),
                    })
                }
                None => {}
            }
        }
        Err(Status::unavailable("the worker stream ended without an image"))
    }
}
