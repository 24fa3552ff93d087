//! The coordinator's domain API (no gRPC types beyond the messages): submit, watch, get, cancel, list, and the
//! drain on shutdown. Every job is owned through a lease ([`crate::leases`]): a job submitted here is claimed (with
//! its fencing token) before it is stored and its tasks start, and a job of a dead or stopped coordinator is
//! resumed here once nobody holds its lease ([`LeaseHolder::resume`]). Its state changes reach the store only
//! through the [`JobWriter`]. Jobs run by another replica are watched and cancelled through the store
//! ([`crate::remote`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mip_proto::v1::{GenerationRequest, Job, JobStatus, ListJobsResponse, SubmitJobRequest, WorkerStatus};
use tokio::sync::broadcast;

use crate::admission;
use crate::best_of::KeepBest;
use crate::config::ValidConfig;
use crate::dispatch::Dispatcher;
use crate::error::CoordinatorError;
use crate::job::{JobHandle, JobWatch, QueuePlace, Record};
use crate::leases::{LeaseHolder, Leases};
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::registry::Registry;
use crate::status::is_final;
use crate::store::{Fence, JobStore, NewClaim};
use crate::writer::JobWriter;

/// Job handles kept in memory (running ones always are; finished ones are then read from the store).
pub const MAX_JOBS_IN_MEMORY: usize = 10_000;

/// How often a drain looks whether the jobs run here have ended.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// The coordinator; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ValidConfig,
    dispatcher: Arc<Dispatcher>,
    leases: Arc<Leases>,
    jobs: Mutex<HashMap<String, Arc<JobHandle>>>,
    /// Job ids in the order they came into memory (eviction of finished handles).
    order: Mutex<VecDeque<String>>,
    /// Set by a drain: no new jobs.
    draining: AtomicBool,
}

impl Drop for Inner {
    /// The coordinator goes away: its unfinished jobs stop here (their leases expire and another coordinator, or
    /// a restarted one, resumes them).
    fn drop(&mut self) {
        for job in lock(&self.jobs).values() {
            if !job.is_finished() {
                job.abandon();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a call brings besides its message: the caller's own deadline (a gRPC timeout) and trace context.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub deadline: Option<Duration>,
    pub trace: opentelemetry::Context,
}

impl Caller {
    /// The deadline and trace context in a request's metadata.
    pub fn of(metadata: &tonic::metadata::MetadataMap) -> Self {
        Self {
            deadline: mip_common::deadline::grpc_timeout(metadata),
            trace: mip_common::propagation::extract(metadata),
        }
    }
}

impl Coordinator {
    /// A coordinator with a fresh random instance id. Its leases are kept by [`Leases::run`], which the caller
    /// starts with [`Self::leases`] (the server does, with its shutdown signal).
    pub fn new(cfg: ValidConfig, registry: Arc<Registry>, store: Arc<dyn JobStore>, metrics: Metrics) -> Self {
        let writer = Arc::new(JobWriter::new(store.clone(), metrics.clone()));
        let dispatcher = Arc::new(Dispatcher {
            registry,
            writer,
            max_attempts: cfg.max_attempts,
            metrics,
            queue: Arc::new(Queue::new(cfg.max_queued_tasks, cfg.priority_aging)),
            avg_task_ms: Default::default(),
            watchdog: cfg.watchdog,
        });
        Self {
            inner: Arc::new(Inner {
                leases: Arc::new(Leases::new(store, cfg.lease)),
                cfg,
                dispatcher,
                jobs: Mutex::new(HashMap::new()),
                order: Mutex::new(VecDeque::new()),
                draining: AtomicBool::new(false),
            }),
        }
    }

    /// This coordinator's instance id (the value of its job leases).
    pub fn instance(&self) -> &str {
        self.inner.leases.instance()
    }

    /// The leases of this coordinator's jobs.
    pub fn leases(&self) -> Arc<Leases> {
        self.inner.leases.clone()
    }

    fn store(&self) -> &Arc<dyn JobStore> {
        &self.inner.dispatcher.writer.store
    }

    fn job(&self, id: &str) -> Option<Arc<JobHandle>> {
        lock(&self.inner.jobs).get(id).cloned()
    }

    /// Validates, stores and starts a job; the same idempotency key returns the first job.
    pub async fn submit(&self, req: SubmitJobRequest) -> Result<Job, CoordinatorError> {
        self.submit_with(req, Caller::default()).await
    }

    /// [`submit`](Self::submit) for a caller: a task's deadline is the earlier of the caller's own (a gRPC
    /// timeout) and `deadline_ms`, and the job's span is a child of the caller's trace context.
    pub async fn submit_with(&self, req: SubmitJobRequest, caller: Caller) -> Result<Job, CoordinatorError> {
        let rpc_deadline = caller.deadline;
        let d = &self.inner.dispatcher;
        if self.inner.draining.load(Ordering::SeqCst) {
            d.metrics.reject("draining");
            return Err(CoordinatorError::Draining);
        }
        let tasks = admission::split(&req, &self.inner.cfg).inspect_err(|_| d.metrics.reject("invalid_argument"))?;
        admission::check_requests(&req, self.inner.cfg.limits, self.list_workers())
            .await
            .inspect_err(|e| d.metrics.reject(e.reason()))?;
        let n = tasks.len();
        let before = d.queue.admit(n).inspect_err(|_| d.metrics.reject("queue_full"))?;
        let id = format!("{:032x}", rand::random::<u128>());
        let fence = match self.inner.leases.claim_new(&id, &req.idempotency_key).await {
            Ok(NewClaim::Claimed(f)) => f,
            Ok(NewClaim::Existing(first)) => {
                d.queue.leave(n);
                return self.first_of_key(&first, &req.idempotency_key).await;
            }
            Err(e) => {
                d.queue.leave(n);
                return Err(e);
            }
        };
        let deadline = [
            (req.deadline_ms > 0).then(|| Duration::from_millis(req.deadline_ms)),
            rpc_deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        let place = QueuePlace {
            position: before as u32,
            eta_ms: d.eta_ms(before),
        };
        let span = tracing::info_span!(parent: None, "job", job_id = %id, tasks = n, priority = req.priority);
        mip_common::propagation::set_parent(&span, caller.trace);
        let record = Record {
            fence,
            trace: crate::trace::trace_fields(&span),
            spec: Arc::new(req),
        };
        let job = Arc::new(JobHandle::new(
            id.clone(),
            record.spec.priority,
            tasks,
            place,
            deadline,
            span,
            record,
        ));
        if let Err(e) = d.writer.create(&job).await {
            d.queue.leave(n);
            let _ = self.store().release(&job.record.fence).await;
            return Err(e);
        }
        self.keep(job.clone());
        tracing::info!(parent: &job.span.get(), job_id = %id, tasks = n, "job submitted");
        for i in 0..n {
            tokio::spawn(d.clone().run_task(job.clone(), i));
        }
        Ok(job.snapshot(false))
    }

    /// The job an idempotency key was bound to first. While it is still being created (or its writes are in
    /// doubt) there is nothing to return yet: the caller retries, and once that job's lease lapses without a
    /// record the key is taken over.
    async fn first_of_key(&self, first: &str, key: &str) -> Result<Job, CoordinatorError> {
        match self.get(first, false).await {
            Err(CoordinatorError::NotFound(_)) => Err(CoordinatorError::Store(format!(
                "job `{first}` of idempotency key {key:?} is still being created; retry"
            ))),
            other => other,
        }
    }

    /// Puts a job in memory, forgetting the oldest finished handles beyond [`MAX_JOBS_IN_MEMORY`].
    fn keep(&self, job: Arc<JobHandle>) {
        let mut jobs = lock(&self.inner.jobs);
        let mut order = lock(&self.inner.order);
        order.push_back(job.id.clone());
        jobs.insert(job.id.clone(), job);
        let mut excess = jobs.len().saturating_sub(MAX_JOBS_IN_MEMORY);
        order.retain(|id| match jobs.get(id) {
            None => false,
            Some(j) if excess > 0 && j.is_finished() && !j.is_dirty() => {
                jobs.remove(id);
                excess -= 1;
                false
            }
            Some(_) => true,
        });
    }

    /// The job, from memory or from the store.
    pub async fn get(&self, id: &str, include_images: bool) -> Result<Job, CoordinatorError> {
        if let Some(j) = self.job(id) {
            return Ok(j.snapshot(include_images));
        }
        if !include_images {
            return self
                .store()
                .load_job(id, false)
                .await?
                .ok_or_else(|| CoordinatorError::NotFound(id.to_owned()));
        }
        Ok(self.stored_with_images(id).await?.0)
    }

    /// A job from the store with the images it shows (see [`crate::best_of`]), and its best-of-N setting.
    async fn stored_with_images(&self, id: &str) -> Result<(Job, Option<KeepBest>), CoordinatorError> {
        let stored = self
            .store()
            .load_stored(id)
            .await?
            .ok_or_else(|| CoordinatorError::NotFound(id.to_owned()))?;
        let keep = KeepBest::of(&stored.spec);
        let mut job = stored.job;
        job.images = crate::best_of::visible(&stored.spec, &job, stored.images);
        Ok((job, keep))
    }

    /// Cancels a running job; a finished one is returned as it is. A job run by another replica sharing the
    /// store gets a cancel request its owner applies at its next lease renewal; the answer is then the job as it
    /// is stored now.
    pub async fn cancel(&self, id: &str) -> Result<Job, CoordinatorError> {
        if let Some(j) = self.job(id) {
            return Ok(self.cancel_handle(&j).await);
        }
        let job = self.get(id, false).await?;
        if !is_final(job.status) {
            self.store().request_cancel(id).await?;
            tracing::info!(job_id = %id, "cancel requested for a job run by another replica");
        }
        Ok(job)
    }

    /// Cancels `j` here (its running tasks stop), persists it and gives its lease up; the job as it is after.
    async fn cancel_handle(&self, j: &JobHandle) -> Job {
        if let Some(job) = j.cancel() {
            tracing::info!(parent: &j.span.get(), job_id = %j.id, "job cancelled");
            self.inner.dispatcher.writer.finished(j, &job).await;
            return job;
        }
        j.snapshot(false)
    }

    /// Cancels those of `jobs` (run here) that another replica recorded a cancel request for.
    async fn apply_cancel_requests(&self, jobs: &[Arc<JobHandle>]) {
        if jobs.is_empty() {
            return;
        }
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let flags = match self.store().cancel_requested(&ids).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, jobs = ids.len(), "reading cancel requests failed");
                return;
            }
        };
        for (job, flagged) in jobs.iter().zip(flags) {
            if flagged && !job.is_finished() {
                tracing::info!(parent: &job.span.get(), job_id = %job.id, "cancel requested through another replica");
                self.cancel_handle(job).await;
            }
        }
    }

    /// The replay of a job's state and its live events (for a job run by another replica: events polled from the
    /// store).
    pub async fn watch(&self, id: &str) -> Result<JobWatch, CoordinatorError> {
        if let Some(j) = self.job(id) {
            return Ok(j.watch());
        }
        let (job, keep) = self.stored_with_images(id).await?;
        Ok(crate::remote::watch_stored(
            self.store().clone(),
            job,
            keep,
            self.inner.cfg.ttl,
        ))
    }

    /// Submits one request and waits for its images. `rpc_deadline` (the caller's gRPC timeout) bounds the task
    /// like `deadline_ms` does.
    pub async fn generate(
        &self,
        req: GenerationRequest,
        caller: Caller,
    ) -> Result<(String, Vec<mip_proto::v1::JobImage>), CoordinatorError> {
        let job = self
            .submit_with(
                SubmitJobRequest {
                    requests: vec![req],
                    samples: 1,
                    ..Default::default()
                },
                caller,
            )
            .await?;
        let handle = self
            .job(&job.job_id)
            .ok_or_else(|| CoordinatorError::NotFound(job.job_id.clone()))?;
        let mut cancel_rx = handle.cancelled();
        let (_, mut live) = handle.subscribe();
        while !handle.is_finished() {
            tokio::select! {
                r = live.recv() => if let Err(broadcast::error::RecvError::Closed) = r { break },
                _ = cancel_rx.wait_for(|c| *c) => break,
            }
        }
        if handle.is_abandoned() && !handle.is_finished() {
            return Err(CoordinatorError::Moved(job.job_id));
        }
        let done = handle.snapshot(false);
        if done.status != JobStatus::Done as i32 {
            return Err(CoordinatorError::JobEnded {
                job_id: done.job_id,
                status: format!(
                    "{:?}",
                    JobStatus::try_from(done.status).unwrap_or(JobStatus::Unspecified)
                ),
                code: handle.failure_code(),
                message: done.error,
            });
        }
        Ok((done.job_id, handle.snapshot(true).images))
    }

    /// Jobs, newest first; the page token is the offset.
    pub async fn list_jobs(&self, page_size: u32, page_token: &str) -> Result<ListJobsResponse, CoordinatorError> {
        let size = match page_size {
            0 => 50,
            n => n.min(500) as usize,
        };
        let offset: usize = if page_token.is_empty() {
            0
        } else {
            page_token
                .parse()
                .map_err(|_| CoordinatorError::invalid("page_token", "must come from ListJobsResponse", page_token))?
        };
        let ids = self.store().list_job_ids(offset, size + 1).await?;
        let more = ids.len() > size;
        let mut jobs = Vec::new();
        for id in ids.iter().take(size) {
            if let Ok(j) = self.get(id, false).await {
                jobs.push(j);
            }
        }
        Ok(ListJobsResponse {
            jobs,
            next_page_token: if more {
                (offset + size).to_string()
            } else {
                String::new()
            },
        })
    }

    pub fn list_workers(&self) -> Vec<WorkerStatus> {
        self.inner.dispatcher.registry.snapshot()
    }

    /// Stops taking jobs and waits (at most `wait`) for the jobs running here to end; true when they all did.
    pub async fn drain(&self, wait: Duration) -> bool {
        self.inner.draining.store(true, Ordering::SeqCst);
        let until = tokio::time::Instant::now() + wait;
        loop {
            if self.running().is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Stops the unfinished jobs here and gives their leases up, so another replica (or this one restarted)
    /// resumes them at its next scan instead of after the lease lapses; their stored state stays as written.
    pub async fn hand_over(&self) {
        for job in self.running() {
            tracing::info!(parent: &job.span.get(), job_id = %job.id, "job handed over");
            job.abandon();
            lock(&self.inner.jobs).remove(&job.id);
            if !job.is_dirty() {
                if let Err(e) = self.store().release(&job.record.fence).await {
                    tracing::warn!(job_id = %job.id, error = %e, "releasing a handed-over job's lease failed");
                }
            }
        }
    }

    /// The unfinished jobs run here.
    fn running(&self) -> Vec<Arc<JobHandle>> {
        lock(&self.inner.jobs)
            .values()
            .filter(|j| !j.is_abandoned() && !j.is_finished())
            .cloned()
            .collect()
    }
}

#[tonic::async_trait]
impl LeaseHolder for Coordinator {
    /// The unfinished jobs, and the ended ones whose final state the store has not taken yet.
    fn held(&self) -> Vec<Arc<JobHandle>> {
        lock(&self.inner.jobs)
            .values()
            .filter(|j| !j.is_abandoned() && (!j.is_finished() || j.is_dirty()))
            .cloned()
            .collect()
    }

    /// Writes the dirty jobs again (an ended job's too: its final state is the truth while its fence holds), drops
    /// the jobs fenced out meanwhile, and applies recorded cancel requests.
    async fn renewed(&self, kept: Vec<Arc<JobHandle>>) {
        for job in &kept {
            self.inner.dispatcher.writer.rewrite(job).await;
        }
        lock(&self.inner.jobs).retain(|_, j| !j.is_abandoned());
        let running: Vec<Arc<JobHandle>> = kept.into_iter().filter(|j| !j.is_finished()).collect();
        self.apply_cancel_requests(&running).await;
    }

    fn lost(&self, job: &Arc<JobHandle>) {
        lock(&self.inner.jobs).remove(&job.id);
        job.abandon();
    }

    fn runs(&self, id: &str) -> bool {
        self.job(id).is_some()
    }

    /// Resumes a job from the store: tasks with a stored image are DONE, the others run again, and the job span
    /// continues the stored trace. A job that ended, vanished or no longer validates is dropped from the active
    /// set.
    async fn resume(&self, fence: Fence) -> Result<(), CoordinatorError> {
        let d = &self.inner.dispatcher;
        let id = fence.job_id.clone();
        if self.inner.draining.load(Ordering::SeqCst) {
            return self.store().release(&fence).await;
        }
        let stored = self.store().load_stored(&id).await?;
        let tasks = stored
            .as_ref()
            .filter(|s| !is_final(s.job.status))
            .map(|s| admission::split(&s.spec, &self.inner.cfg));
        let (stored, tasks) = match (stored, tasks) {
            (Some(s), Some(Ok(t))) => (s, t),
            (_, Some(Err(e))) => {
                tracing::warn!(job_id = %id, error = %e, "a stored job no longer validates; dropping it");
                self.store().forget_active(&id).await?;
                return self.store().release(&fence).await;
            }
            _ => {
                self.store().forget_active(&id).await?;
                return self.store().release(&fence).await;
            }
        };
        let span = tracing::info_span!(parent: None, "job", job_id = %id, resumed = true, token = fence.token);
        crate::trace::continue_trace(&span, &stored.trace);
        let record = Record {
            fence,
            spec: Arc::new(stored.spec),
            trace: stored.trace,
        };
        let job = Arc::new(JobHandle::restore(stored.job, stored.images, tasks, span, record));
        let pending = job.pending_tasks();
        tracing::info!(parent: &job.span.get(), job_id = %id, pending = pending.len(), "job resumed");
        self.keep(job.clone());
        if self.store().cancel_requested(std::slice::from_ref(&id)).await?.first() == Some(&true) {
            tracing::info!(parent: &job.span.get(), job_id = %id, "cancel requested through another replica");
            self.cancel_handle(&job).await;
            return Ok(());
        }
        d.queue.readmit(pending.len());
        d.writer.persist(&job).await;
        if pending.is_empty() {
            if let Some(done) = job.finish_if_complete() {
                d.writer.finished(&job, &done).await;
            }
            return Ok(());
        }
        for i in pending {
            tokio::spawn(d.clone().run_task(job.clone(), i));
        }
        Ok(())
    }
}
