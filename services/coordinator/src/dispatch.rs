//! Running one task: wait for a slot on the best worker (placement order over the registry), stream its
//! `Generate` call (progress and the image go to the job), and on UNAVAILABLE / transport-like failures try
//! another worker, up to `max_attempts`. Cancellation drops the worker stream, which cancels the worker's work.
//! A task whose deadline passed before it got a worker fails with DEADLINE_EXCEEDED without being sent; otherwise
//! the time left is the worker call's gRPC timeout. Every task state change is written to the store; an image is
//! recorded there once (HSETNX) before the job sees it. Each attempt is a `task` span, child of the job's span,
//! whose context travels to the worker in the request metadata.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mip_common::errors::{status, Kind};
use mip_proto::v1::{generate_event, GenerateTask, JobImage};
use tonic::{Code, Status};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::job::JobHandle;
use crate::metrics::Metrics;
use crate::placement::{self, WorkerId};
use crate::queue::{InQueue, Queue, Waiting};
use crate::registry::{Permit, Registry};
use crate::watchdog::Watchdog;
use crate::writer::JobWriter;

/// Longest wait between placement tries (slots released and health changes also wake the waiter).
const RETRY_PLACEMENT: Duration = Duration::from_millis(200);

/// Weight of the newest task duration in the moving average behind `JobQueued.eta_ms`.
const ETA_WEIGHT: f64 = 0.2;

/// What a task runner needs.
pub struct Dispatcher {
    pub registry: Arc<Registry>,
    pub writer: Arc<JobWriter>,
    pub max_attempts: u32,
    pub metrics: Metrics,
    /// Tasks not yet started, and the order in which they take slots.
    pub queue: Arc<Queue>,
    /// Moving average of a task's run time on a worker, in ms (0 = none finished yet).
    pub avg_task_ms: AtomicU64,
    /// How long a running attempt may stay silent.
    pub watchdog: Watchdog,
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

impl Dispatcher {
    /// Runs task `index` of `job` to its end (image, final failure, cancellation or the job's abandonment).
    pub async fn run_task(self: Arc<Self>, job: Arc<JobHandle>, index: usize) {
        let mut cancel = job.cancelled();
        let mut counted_queued = true;
        let mut in_queue = InQueue::enter(&self.metrics, job.priority);
        let mut excluded: Vec<usize> = Vec::new();
        let spec = &job.tasks[index];
        let key = placement::affinity_key(job.base_request(index), &format!("{}/{}", job.id, index));
        let mut first_placed: Option<Instant> = None;
        let mut outcome = Outcome::Cancelled;
        for attempt in 1..=self.max_attempts {
            let permit = tokio::select! {
                p = self.acquire(&key, &excluded, job.priority, job.needs_scoring(index)) => p.map_err(Err),
                _ = cancel.wait_for(|c| *c) => break,
                ms = until(job.deadline) => Err(Ok(ms)),
            };
            let permit = match permit {
                Ok(p) => p,
                Err(Ok(ms)) => {
                    self.expire(&job, index, ms).await;
                    outcome = Outcome::Failed;
                    break;
                }
                Err(Err(refused)) => {
                    job.failed(spec.index, &refused, false);
                    self.writer.persist(&job).await;
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
                self.queue.leave(1);
            }
            in_queue.set(false);
            first_placed.get_or_insert_with(Instant::now);
            job.started(spec.index, permit.url(), attempt);
            self.writer.persist(&job).await;
            let span = tracing::info_span!(parent: &job.span.get(), "task", job_id = %job.id, task = index, attempt,
                worker = %permit.url());
            let began = Instant::now();
            let result = tokio::select! {
                r = self.call(&job, index, &permit, timeout, &span).instrument(span.clone()) => r,
                _ = cancel.wait_for(|c| *c) => break,
            };
            match result {
                Ok(image) => {
                    self.observe_run(began.elapsed());
                    self.writer.record(&job, image).await;
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
                    self.writer.persist(&job).await;
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
            self.queue.leave(1);
        }
        drop(in_queue);
        let since = first_placed.unwrap_or_else(Instant::now);
        self.metrics
            .task_duration
            .with_label_values(&[outcome.label()])
            .observe(since.elapsed().as_secs_f64());
        if let Some(done) = job.finish_if_complete() {
            self.writer.finished(&job, &done).await;
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
        self.writer.persist(job).await;
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

    /// A slot on the first worker in placement order that has one (and can score, for a task that is scored),
    /// waiting while none has or while a task of a higher priority waits. A scored task fails with
    /// FAILED_PRECONDITION once workers have reported and none of them can score. The chosen worker remembers the task's subjects, and the placement is counted in
    /// `mip_coord_affinity_total` (tasks with subjects only).
    async fn acquire(
        &self,
        key: &[u8; 32],
        excluded: &[WorkerId],
        priority: i32,
        scoring: bool,
    ) -> Result<Permit, Status> {
        let me = Waiting::new(&self.queue.waiting, priority);
        loop {
            if scoring && self.registry.can_score() == Some(false) {
                // Admitted before any worker reported, or the scoring workers were replaced: it can never run.
                let msg = "`score` needs a worker that can score, and no worker has evaluation models";
                return Err(status(Kind::FailedPrecondition, Some("scoring_unavailable"), msg));
            }
            let wake = self.registry.changed();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if me.is_first() {
                let candidates = self.registry.candidates(excluded, key, scoring);
                let placed = placement::order(key, &candidates)
                    .into_iter()
                    .find_map(|i| self.registry.try_acquire(candidates[i].id).map(|p| (i, p)));
                if let Some((chosen, permit)) = placed {
                    if placement::has_subjects(key) {
                        self.metrics.placed(placement::classify(key, &candidates, chosen));
                        permit.remember(key);
                    }
                    return Ok(permit);
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
            request: Some(job.task_request(index)),
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
                            scores: img.scores,
                            rank: 0,
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
