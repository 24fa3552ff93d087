//! The coordinator's domain API (no gRPC types beyond the messages): submit, watch, get, cancel, list. With Redis
//! every job is owned through a lease (see [`crate::lease`]): a job submitted here is leased to this instance
//! before its tasks start, and jobs of a dead coordinator are resumed here once their lease expires.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mip_proto::v1::{GenerationRequest, Job, JobEvent, JobStatus, ListJobsResponse, SubmitJobRequest, WorkerStatus};
use tokio::sync::broadcast;

use crate::config::ValidConfig;
use crate::dispatch::Dispatcher;
use crate::dispatch::WaitQueue;
use crate::error::CoordinatorError;
use crate::job::{JobHandle, QueuePlace, TaskSpec};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;

/// Jobs kept in memory (running ones always are).
pub const MAX_JOBS_IN_MEMORY: usize = 10_000;

/// The coordinator; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cfg: ValidConfig,
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) jobs: Mutex<HashMap<String, Arc<JobHandle>>>,
    /// Job ids in submission order (ListJobs without Redis).
    pub(crate) order: Mutex<Vec<String>>,
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

/// A watch of one job: the replayed state, then live events (None when the job is only in the store).
pub struct JobWatch {
    pub replay: Vec<JobEvent>,
    pub live: Option<broadcast::Receiver<JobEvent>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Coordinator {
    /// A coordinator with a fresh random instance id; inside a tokio runtime it also starts the lease loop (renewal
    /// of its jobs' leases, resumption of unowned unfinished jobs), which ends when the coordinator is dropped.
    pub fn new(cfg: ValidConfig, registry: Arc<Registry>, store: Arc<Store>, metrics: Metrics) -> Self {
        let dispatcher = Arc::new(Dispatcher {
            registry,
            store,
            max_attempts: cfg.max_attempts,
            metrics,
            queued: Arc::new(AtomicUsize::new(0)),
            waiting: WaitQueue::new(cfg.priority_aging),
            instance: format!("{:032x}", rand::random::<u128>()),
            avg_task_ms: Default::default(),
            watchdog: cfg.watchdog,
        });
        let me = Self {
            inner: Arc::new(Inner {
                cfg,
                dispatcher,
                jobs: Mutex::new(HashMap::new()),
                order: Mutex::new(Vec::new()),
            }),
        };
        if me.inner.dispatcher.store.persistent() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(crate::lease::run(Arc::downgrade(&me.inner)));
            }
        }
        me
    }

    /// This coordinator's instance id (the value of its job leases).
    pub fn instance(&self) -> &str {
        &self.inner.dispatcher.instance
    }

    pub(crate) fn job(&self, id: &str) -> Option<Arc<JobHandle>> {
        lock(&self.inner.jobs).get(id).cloned()
    }

    /// Validates, stores and starts a job; the same idempotency key returns the first job.
    pub async fn submit(&self, req: SubmitJobRequest) -> Result<Job, CoordinatorError> {
        self.submit_with(req, None).await
    }

    /// [`submit`](Self::submit) with the caller's own deadline (a gRPC timeout): a task's deadline is the earlier
    /// of it and `deadline_ms`.
    pub async fn submit_with(
        &self,
        req: SubmitJobRequest,
        rpc_deadline: Option<Duration>,
    ) -> Result<Job, CoordinatorError> {
        let metrics = &self.inner.dispatcher.metrics;
        let tasks = self.split(&req).inspect_err(|_| metrics.reject("invalid_argument"))?;
        crate::admission::check_requests(req.requests.clone(), self.inner.cfg.limits, self.list_workers())
            .await
            .inspect_err(|_| metrics.reject("invalid_argument"))?;
        let id = format!("{:032x}", rand::random::<u128>());
        if !req.idempotency_key.is_empty() {
            let owner = self
                .inner
                .dispatcher
                .store
                .claim_idempotency(
                    &req.idempotency_key,
                    &id,
                    &self.inner.dispatcher.instance,
                    self.inner.cfg.lease,
                )
                .await?;
            if owner != id {
                // The first submission under this key; while it is still being created (or its writes are in
                // doubt) there is nothing to return yet: the caller retries, and once that job's lease lapses
                // without a record the key is taken over (see `Store::claim_idempotency`).
                return match self.get(&owner, false).await {
                    Ok(job) => Ok(job),
                    Err(CoordinatorError::NotFound(_)) => Err(CoordinatorError::Store(format!(
                        "job `{owner}` of idempotency key {:?} is still being created; retry",
                        req.idempotency_key
                    ))),
                    Err(e) => Err(e),
                };
            }
        }
        let n = tasks.len();
        let limit = self.inner.cfg.max_queued_tasks;
        let queued = &self.inner.dispatcher.queued;
        let before = queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q + n <= limit).then_some(q + n)
            })
            .map_err(|q| {
                metrics.reject("queue_full");
                CoordinatorError::QueueFull {
                    queued: q,
                    asked: n,
                    limit,
                }
            })?;
        let deadline = [
            (req.deadline_ms > 0).then(|| Duration::from_millis(req.deadline_ms)),
            rpc_deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        let place = QueuePlace {
            position: before as u32,
            eta_ms: self.inner.dispatcher.eta_ms(before),
        };
        let span = tracing::info_span!(parent: None, "job", job_id = %id, tasks = n, priority = req.priority);
        let trace = crate::lease::trace_fields(&span);
        let job = Arc::new(JobHandle::new(id.clone(), req.priority, tasks, place, deadline, span));
        let snapshot = job.snapshot(false);
        if let Err(e) = self.store_new(&snapshot, &req, &trace).await {
            queued.fetch_sub(n, Ordering::SeqCst);
            return Err(e);
        }
        lock(&self.inner.jobs).insert(id.clone(), job.clone());
        lock(&self.inner.order).push(id.clone());
        self.evict_finished();
        tracing::info!(parent: &job.span, job_id = %id, tasks = n, "job submitted");
        for i in 0..n {
            tokio::spawn(self.inner.dispatcher.clone().run_task(job.clone(), i));
        }
        Ok(snapshot)
    }

    /// Leases a new job to this instance, then stores it.
    async fn store_new(
        &self,
        job: &Job,
        req: &SubmitJobRequest,
        trace: &[(String, String)],
    ) -> Result<(), CoordinatorError> {
        let d = &self.inner.dispatcher;
        if !d
            .store
            .claim_lease(&job.job_id, &d.instance, self.inner.cfg.lease)
            .await?
        {
            return Err(CoordinatorError::Store(format!(
                "job `{}` is leased already",
                job.job_id
            )));
        }
        d.store.save_new_job(job, req, trace).await
    }

    /// Keeps at most [`MAX_JOBS_IN_MEMORY`] jobs in memory by forgetting the oldest finished ones (with Redis they
    /// are still served from there).
    fn evict_finished(&self) {
        let mut jobs = lock(&self.inner.jobs);
        if jobs.len() <= MAX_JOBS_IN_MEMORY {
            return;
        }
        let mut order = lock(&self.inner.order);
        let mut excess = jobs.len() - MAX_JOBS_IN_MEMORY;
        order.retain(|id| {
            if excess > 0 && jobs.get(id).is_none_or(|j| j.is_finished()) {
                jobs.remove(id);
                excess -= 1;
                return false;
            }
            true
        });
    }

    /// One task per image: request × sample; seed = request seed + sample index when a seed is given.
    pub(crate) fn split(&self, req: &SubmitJobRequest) -> Result<Vec<TaskSpec>, CoordinatorError> {
        let cfg = &self.inner.cfg;
        if req.requests.is_empty() || req.requests.len() > cfg.max_requests {
            return Err(CoordinatorError::invalid(
                "requests",
                format!("must hold 1..={} requests", cfg.max_requests),
                req.requests.len(),
            ));
        }
        let samples = req.samples.max(1);
        if samples > cfg.max_samples {
            return Err(CoordinatorError::invalid(
                "samples",
                format!("must be in 0..={}", cfg.max_samples),
                samples,
            ));
        }
        if req.idempotency_key.len() > 256 {
            return Err(CoordinatorError::invalid(
                "idempotency_key",
                "must be at most 256 bytes",
                req.idempotency_key.len(),
            ));
        }
        let mut tasks = Vec::new();
        for (ri, r) in req.requests.iter().enumerate() {
            for s in 0..samples {
                let mut request = r.clone();
                request.seed = r.seed.map(|seed| seed.wrapping_add(u64::from(s)));
                tasks.push(TaskSpec {
                    index: tasks.len() as u32,
                    request_index: ri as u32,
                    sample_index: s,
                    request,
                });
            }
        }
        Ok(tasks)
    }

    /// The job, from memory or (after a restart) from the store.
    pub async fn get(&self, id: &str, include_images: bool) -> Result<Job, CoordinatorError> {
        if let Some(j) = self.job(id) {
            return Ok(j.snapshot(include_images));
        }
        self.inner
            .dispatcher
            .store
            .load_job(id, include_images)
            .await?
            .ok_or_else(|| CoordinatorError::NotFound(id.to_owned()))
    }

    /// Cancels a running job; a finished one is returned as it is. A job run by another replica sharing the
    /// store is cancelled by that replica at its next lease renewal (see [`crate::remote`]); the answer is then the
    /// job as it is stored now.
    pub async fn cancel(&self, id: &str) -> Result<Job, CoordinatorError> {
        match self.job(id) {
            Some(j) => Ok(self.cancel_handle(&j).await),
            None => self.cancel_remote(id).await,
        }
    }

    /// The replay of a job's state and its live events (for a job run by another replica: events polled from the
    /// store, see [`crate::remote`]).
    pub async fn watch(&self, id: &str) -> Result<JobWatch, CoordinatorError> {
        if let Some(j) = self.job(id) {
            let (replay, live) = j.subscribe();
            return Ok(JobWatch {
                replay,
                live: Some(live),
            });
        }
        let job = self.get(id, true).await?;
        Ok(self.watch_stored(job))
    }

    /// Submits one request and waits for its images.
    /// `rpc_deadline` (the caller's gRPC timeout) bounds the task like `deadline_ms` does.
    pub async fn generate(
        &self,
        req: GenerationRequest,
        rpc_deadline: Option<Duration>,
    ) -> Result<(String, Vec<mip_proto::v1::JobImage>), CoordinatorError> {
        let job = self
            .submit_with(
                SubmitJobRequest {
                    requests: vec![req],
                    samples: 1,
                    ..Default::default()
                },
                rpc_deadline,
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
        Ok((done.job_id, handle.images()))
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
        let ids = if self.inner.dispatcher.store.persistent() {
            self.inner.dispatcher.store.list_job_ids(offset, size + 1).await?
        } else {
            lock(&self.inner.order)
                .iter()
                .rev()
                .skip(offset)
                .take(size + 1)
                .cloned()
                .collect()
        };
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
}
