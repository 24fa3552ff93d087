//! Running one task: wait for a slot on the best worker (placement order over the registry), stream its
//! `Generate` call (progress and the image go to the job), and on UNAVAILABLE / transport-like failures try
//! another worker, up to `max_attempts`. Cancellation drops the worker stream, which cancels the worker's work.
//! A task whose deadline passed before it got a worker fails with DEADLINE_EXCEEDED without being sent; otherwise
//! the time left is the worker call's gRPC timeout. Every task state change is written to the store; an image is
//! recorded there once (HSETNX) before the job sees it. Each attempt is a `task` span, child of the job's span,
//! whose context travels to the worker in the request metadata.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mip_common::errors::{status, Kind};
use mip_proto::v1::{generate_event, GenerateTask, Job, JobImage, JobStatus};
use tonic::{Code, Status};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::job::JobHandle;
use crate::metrics::Metrics;
use crate::placement;
use crate::registry::{Permit, Registry, WorkerId};
use crate::store::Store;
use crate::watchdog::Watchdog;

/// Longest wait between placement tries (slots released and health changes also wake the waiter).
const RETRY_PLACEMENT: Duration = Duration::from_millis(200);

/// Weight of the newest task duration in the moving average behind `JobQueued.eta_ms`.
const ETA_WEIGHT: f64 = 0.2;

/// What a task runner needs.
pub struct Dispatcher {
    pub registry: Arc<Registry>,
    pub store: Arc<Store>,
    pub max_attempts: u32,
    pub metrics: Metrics,
    /// Tasks not yet started, across jobs.
    pub queued: Arc<AtomicUsize>,
    /// The tasks waiting for a slot: a task takes a slot only while no task of a higher effective priority waits.
    pub waiting: WaitQueue,
    /// This coordinator's instance id (the value of the job leases it holds).
    pub instance: String,
    /// Moving average of a task's run time on a worker, in ms (0 = none finished yet).
    pub avg_task_ms: AtomicU64,
    /// How long a running attempt may stay silent.
    pub watchdog: Watchdog,
}

/// The waiting tasks (ticket → priority and since when), with optional priority aging: a task's effective
/// priority is its priority + 1 per `aging` waited, so low priorities cannot starve.
pub struct WaitQueue {
    aging: Option<Duration>,
    next: AtomicU64,
    entries: Mutex<BTreeMap<u64, (i32, Instant)>>,
}

impl WaitQueue {
    pub fn new(aging: Option<Duration>) -> Self {
        Self {
            aging,
            next: AtomicU64::new(0),
            entries: Mutex::new(BTreeMap::new()),
        }
    }

    /// The effective priority of a task of `priority` waiting since `since`.
    pub fn effective(&self, priority: i32, since: Instant, now: Instant) -> i64 {
        let aged = match self.aging {
            Some(a) if !a.is_zero() => (now.saturating_duration_since(since).as_millis() / a.as_millis()) as i64,
            _ => 0,
        };
        i64::from(priority) + aged
    }

    /// Tasks waiting now.
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A task's place among the waiting ones; removed on drop.
struct Waiting<'a> {
    queue: &'a WaitQueue,
    ticket: u64,
    priority: i32,
    since: Instant,
}

impl<'a> Waiting<'a> {
    fn new(queue: &'a WaitQueue, priority: i32) -> Self {
        Self::since(queue, priority, Instant::now())
    }

    /// A task of `priority` waiting since `since`.
    fn since(queue: &'a WaitQueue, priority: i32, since: Instant) -> Self {
        let ticket = queue.next.fetch_add(1, Ordering::SeqCst);
        lock(&queue.entries).insert(ticket, (priority, since));
        Self {
            queue,
            ticket,
            priority,
            since,
        }
    }

    /// No task of a higher effective priority waits.
    fn is_first(&self) -> bool {
        let now = Instant::now();
        let mine = self.queue.effective(self.priority, self.since, now);
        lock(&self.queue.entries)
            .iter()
            .all(|(&t, &(p, since))| t == self.ticket || self.queue.effective(p, since, now) <= mine)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.queue.entries).remove(&self.ticket);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One task's presence in the `mip_coord_queue_depth` gauge; leaves it on drop.
struct InQueue<'a> {
    metrics: &'a Metrics,
    priority: i32,
    inside: bool,
}

impl<'a> InQueue<'a> {
    fn enter(metrics: &'a Metrics, priority: i32) -> Self {
        metrics.queue(priority, 1);
        Self {
            metrics,
            priority,
            inside: true,
        }
    }

    fn set(&mut self, inside: bool) {
        if inside != self.inside {
            self.metrics.queue(self.priority, if inside { 1 } else { -1 });
            self.inside = inside;
        }
    }
}

impl Drop for InQueue<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
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

/// How a task ended here, the label of `mip_coord_task_duration_seconds`.
#[derive(Clone, Copy)]
enum Outcome {
    Ok,
    Failed,
    Cancelled,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
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

impl Dispatcher {
    /// Runs task `index` of `job` to its end (image, final failure, cancellation or the job's abandonment).
    pub async fn run_task(self: Arc<Self>, job: Arc<JobHandle>, index: usize) {
        let mut cancel = job.cancelled();
        let mut counted_queued = true;
        let mut in_queue = InQueue::enter(&self.metrics, job.priority);
        let mut excluded: Vec<usize> = Vec::new();
        let spec = &job.tasks[index];
        let key = placement::affinity_key(&spec.request, &format!("{}/{}", job.id, index));
        let mut first_placed: Option<Instant> = None;
        let mut outcome = Outcome::Cancelled;
        for attempt in 1..=self.max_attempts {
            let permit = tokio::select! {
                p = self.acquire(&key, &excluded, job.priority) => Ok(p),
                _ = cancel.wait_for(|c| *c) => break,
                ms = until(job.deadline) => Err(ms),
            };
            let permit = match permit {
                Ok(p) => p,
                Err(ms) => {
                    self.expire(&job, index, ms).await;
                    outcome = Outcome::Failed;
                    break;
                }
            };
            let timeout = job.remaining();
            if let (Some(left), Some((_, ms))) = (timeout, job.deadline) {
                if left.is_zero() {
                    drop(permit);
                    self.expire(&job, index, ms).await;
                    outcome = Outcome::Failed;
                    break;
                }
            }
            if std::mem::take(&mut counted_queued) {
                self.queued.fetch_sub(1, Ordering::SeqCst);
            }
            in_queue.set(false);
            first_placed.get_or_insert_with(Instant::now);
            job.started(spec.index, permit.url(), attempt);
            self.persist(&job).await;
            let span = tracing::info_span!(parent: &job.span, "task", job_id = %job.id, task = index, attempt,
                worker = %permit.url());
            let began = Instant::now();
            let result = tokio::select! {
                r = self.call(&job, index, &permit, timeout, &span).instrument(span.clone()) => r,
                _ = cancel.wait_for(|c| *c) => break,
            };
            match result {
                Ok(image) => {
                    self.observe_run(began.elapsed());
                    self.record(&job, image).await;
                    outcome = Outcome::Ok;
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
                    self.persist(&job).await;
                    if !again {
                        outcome = Outcome::Failed;
                        break;
                    }
                    self.metrics.retries.inc();
                    in_queue.set(true);
                }
            }
        }
        if counted_queued {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        drop(in_queue);
        let since = first_placed.unwrap_or_else(Instant::now);
        self.metrics
            .task_duration
            .with_label_values(&[outcome.label()])
            .observe(since.elapsed().as_secs_f64());
        if let Some(done) = job.finish_if_complete() {
            self.finished(&job, &done).await;
        }
    }

    /// Fails a task whose deadline passed before it reached a worker.
    async fn expire(&self, job: &JobHandle, index: usize, deadline_ms: u64) {
        let msg = format!("task {index} did not start within deadline_ms {deadline_ms}");
        self.metrics.reject("deadline_exceeded");
        job.failed(
            job.tasks[index].index,
            &status(Kind::DeadlineExceeded, None, msg),
            false,
        );
        self.persist(job).await;
    }

    /// Records an image in the store first (once per task, whichever attempt wins), then in the job.
    async fn record(&self, job: &JobHandle, image: JobImage) {
        if !job.task_open(image.task_index) || job.is_abandoned() {
            return;
        }
        let image = match self.store.save_result(&job.id, &image).await {
            Ok(None) => image,
            Ok(Some(first)) => first,
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

    /// Writes the job's current state to the store (not once another coordinator owns it).
    pub async fn persist(&self, job: &JobHandle) {
        if !self.store.persistent() || job.is_abandoned() {
            return;
        }
        let _order = job.persist_lock.lock().await;
        if job.is_abandoned() {
            return;
        }
        if let Err(e) = self.store.save_job(&job.snapshot(false)).await {
            tracing::warn!(job_id = %job.id, error = %e, "storing the job state failed; kept for a re-write");
            job.mark_dirty();
        }
    }

    /// Writes a job's whole state again after the store missed writes: every image (write-once, so an image
    /// recorded meanwhile wins), the snapshot, and for an ended job the release of its lease. False (and the job
    /// still dirty) when the store fails again.
    pub async fn rewrite(&self, job: &JobHandle) -> bool {
        if !job.take_dirty() || job.is_abandoned() {
            return true;
        }
        let _order = job.persist_lock.lock().await;
        let mut result = Ok(());
        for image in job.images() {
            result = result.and(self.store.save_result(&job.id, &image).await.map(|_| ()));
        }
        let result = match result {
            Ok(()) => self.store.save_job(&job.snapshot(false)).await,
            Err(e) => Err(e),
        };
        let result = match result {
            Ok(()) if job.is_finished() => self.store.release_lease(&job.id, &self.instance).await,
            other => other,
        };
        if let Err(e) = result {
            tracing::warn!(job_id = %job.id, error = %e, "re-writing the job state failed");
            job.mark_dirty();
            return false;
        }
        tracing::info!(job_id = %job.id, "job state re-written after a store outage");
        true
    }

    /// A job ended: persist it, count it and give its lease up.
    pub async fn finished(&self, job: &JobHandle, done: &Job) {
        self.metrics.jobs.with_label_values(&[status_label(done.status)]).inc();
        tracing::info!(parent: &job.span, job_id = %job.id, status = status_label(done.status), "job ended");
        self.persist(job).await;
        if let Err(e) = self.store.release_lease(&job.id, &self.instance).await {
            tracing::warn!(job_id = %job.id, error = %e, "releasing the job lease failed");
            job.mark_dirty();
        }
    }

    fn observe_run(&self, took: Duration) {
        let ms = took.as_millis() as f64;
        let _ = self
            .avg_task_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
                let new = if old == 0 {
                    ms
                } else {
                    old as f64 * (1.0 - ETA_WEIGHT) + ms * ETA_WEIGHT
                };
                Some(new.max(1.0) as u64)
            });
    }

    /// The wait of a task with `position` tasks ahead: position × the average task time / the worker slots.
    pub fn eta_ms(&self, position: usize) -> u64 {
        let avg = self.avg_task_ms.load(Ordering::SeqCst);
        let slots: u64 = self
            .registry
            .snapshot()
            .iter()
            .filter(|w| w.healthy)
            .map(|w| u64::from(w.limit))
            .sum();
        (position as u64).saturating_mul(avg) / slots.max(1)
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

    /// One Generate call, streamed to the end; `timeout` (the time left before the deadline) bounds it here and
    /// travels as its gRPC timeout, and the attempt's span context as its trace context.
    async fn call(
        &self,
        job: &JobHandle,
        index: usize,
        permit: &Permit,
        timeout: Option<Duration>,
        span: &tracing::Span,
    ) -> Result<JobImage, Status> {
        let spec = &job.tasks[index];
        let task = GenerateTask {
            task_id: format!("{}/{}", job.id, index),
            request: Some(spec.request.clone()),
        };
        let mut req = tonic::Request::new(task);
        mip_common::propagation::inject(&span.context(), req.metadata_mut());
        let stream = async {
            if let Some(t) = timeout {
                req.set_timeout(t);
            }
            let mut clock = self.watchdog.clock();
            let mut stream = permit.client().generate(req).await?.into_inner();
            loop {
                let next = match clock.bound() {
                    None => stream.message().await?,
                    Some(b) => tokio::time::timeout(b, stream.message())
                        .await
                        .map_err(|_| clock.expired(b))??,
                };
                let Some(ev) = next else { break };
                clock.observe();
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
                            timings: img.timings,
                        })
                    }
                    None => {}
                }
            }
            Err(Status::unavailable("the worker stream ended without an image"))
        };
        match timeout {
            None => stream.await,
            Some(t) => tokio::time::timeout(t, stream).await.unwrap_or_else(|_| {
                Err(status(
                    Kind::DeadlineExceeded,
                    None,
                    format!("task {index} ran past its deadline ({t:?} left when it started)"),
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aging_raises_a_waiting_tasks_priority() {
        let q = WaitQueue::new(Some(Duration::from_millis(100)));
        let t0 = Instant::now();
        assert_eq!(q.effective(1, t0, t0), 1);
        assert_eq!(q.effective(1, t0, t0 + Duration::from_millis(250)), 3);
        let flat = WaitQueue::new(None);
        assert_eq!(flat.effective(-2, t0, t0 + Duration::from_secs(3600)), -2);
    }

    #[test]
    fn a_long_waiting_low_task_goes_before_a_new_high_one() {
        let q = WaitQueue::new(Some(Duration::from_secs(10)));
        let low = Waiting::new(&q, 0);
        let high = Waiting::new(&q, 2);
        assert!(high.is_first() && !low.is_first(), "strict priority while nobody aged");
        drop(high);
        let Some(long_ago) = Instant::now().checked_sub(Duration::from_secs(45)) else {
            return; // a clock this close to its origin cannot express the wait
        };
        let old_low = Waiting::since(&q, 0, long_ago);
        let newer = Waiting::new(&q, 2);
        assert!(old_low.is_first() && !newer.is_first(), "aged 4 levels > 2");
        assert_eq!(q.len(), 3);
        drop((low, old_low, newer));
        assert!(q.is_empty());
        let flat = WaitQueue::new(None);
        let old = Waiting::since(&flat, 0, long_ago);
        let new = Waiting::new(&flat, 1);
        assert!(new.is_first() && !old.is_first(), "no aging: strict classes");
    }
}
