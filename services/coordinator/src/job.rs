//! One job in memory: its tasks' states, its images, and the broadcast of its events. The state sits behind a
//! short synchronous lock (never held across an await); events are sent under it, so a watcher that subscribes
//! under the same lock sees a replay of the state and then every later event, with no gap. A job is either new
//! ([`JobHandle::new`]) or resumed from the store ([`JobHandle::restore`]: tasks with a stored image are DONE); a
//! job whose ownership lease was lost is [abandoned](JobHandle::abandon): its tasks stop here without the job
//! being cancelled.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mip_proto::v1::job_event::Event;
use mip_proto::v1::{
    GenerationRequest, Job, JobDone, JobEvent, JobImage, JobQueued, JobStatus, SubmitJobRequest, TaskFailed,
    TaskProgress, TaskStarted, TaskState, TaskStatus,
};
use tokio::sync::{broadcast, watch};

use crate::best_of::KeepBest;
use crate::status::is_final;
use crate::store::Fence;

/// Events buffered per watcher before it lags.
const EVENT_BUFFER: usize = 1024;

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One task's fixed spec: which request of the job (in [`Record::spec`]) it runs, as which sample, with which
/// seed. Tasks are always split from the spec of the job they belong to.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub index: u32,
    pub request_index: u32,
    pub sample_index: u32,
    /// The request's seed + the sample index (None: the worker draws one).
    pub seed: Option<u64>,
}

struct State {
    job: Job,
    images: BTreeMap<u32, JobImage>,
    progress: BTreeMap<u32, (u32, u32)>,
    queue_position: u32,
    eta_ms: u64,
    /// gRPC code of the last final task failure.
    failure_code: i32,
}

/// What the store needs to write a job in full, and the right to write it.
#[derive(Debug, Clone)]
pub struct Record {
    /// The lease this coordinator holds the job with.
    pub fence: Fence,
    /// The job as submitted.
    pub spec: Arc<SubmitJobRequest>,
    /// The job span's W3C fields.
    pub trace: Vec<(String, String)>,
}

/// A watch of one job: the replayed state, then live events (None when nothing more will come), and a signal
/// that turns true when this coordinator stops running the job (another owns it now; the watcher should watch
/// again).
pub struct JobWatch {
    pub replay: Vec<JobEvent>,
    pub live: Option<broadcast::Receiver<JobEvent>>,
    pub moved: Option<watch::Receiver<bool>>,
}

/// A job's span, held until the job ends rather than until its handle leaves memory: ending it is what exports it,
/// so a tracing backend sees the whole job within moments of its end.
pub struct JobSpan(Mutex<Option<tracing::Span>>);

impl JobSpan {
    pub fn new(span: tracing::Span) -> Self {
        Self(Mutex::new(Some(span)))
    }

    /// The span while the job runs; a disabled span once it ended.
    pub fn get(&self) -> tracing::Span {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(tracing::Span::none)
    }

    /// Ends the span (it closes once its last child closes).
    pub fn end(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// A job being run (or finished) by this coordinator.
pub struct JobHandle {
    pub id: String,
    pub priority: i32,
    pub tasks: Vec<TaskSpec>,
    /// Tasks not started by then fail with DEADLINE_EXCEEDED (the instant, and the limit in ms for messages).
    pub deadline: Option<(tokio::time::Instant, u64)>,
    /// The job's trace span; task attempts are its children.
    pub span: JobSpan,
    pub record: Record,
    /// Best-of-N: which images the job shows (None: all of them).
    keep_best: Option<KeepBest>,
    state: Mutex<State>,
    events: broadcast::Sender<JobEvent>,
    cancel: watch::Sender<bool>,
    abandoned: watch::Sender<bool>,
    /// A write of this job to the store failed (Redis slow, paused or restarted): its whole state (snapshot and
    /// images) is written again once the store answers.
    dirty: AtomicBool,
    /// Serializes writes of the job to the store, so a later snapshot is never overwritten by an earlier one.
    pub persist_lock: tokio::sync::Mutex<()>,
}

/// Where a new job stands in the queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueuePlace {
    pub position: u32,
    pub eta_ms: u64,
}

impl JobHandle {
    /// A queued job; `deadline` (None = none) counts from now.
    pub fn new(
        id: String,
        priority: i32,
        tasks: Vec<TaskSpec>,
        place: QueuePlace,
        deadline: Option<Duration>,
        span: tracing::Span,
        record: Record,
    ) -> Self {
        let job = Job {
            job_id: id.clone(),
            status: JobStatus::Queued as i32,
            priority,
            total_tasks: tasks.len() as u32,
            created_at_ms: now_ms(),
            tasks: tasks
                .iter()
                .map(|t| TaskState {
                    task_index: t.index,
                    status: TaskStatus::Queued as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let deadline = deadline.map(|d| (tokio::time::Instant::now() + d, d.as_millis() as u64));
        Self::build(job, BTreeMap::new(), tasks, place, deadline, span, record)
    }

    /// A job resumed from the store: tasks with an image are DONE, failed ones stay FAILED, the others are queued
    /// again; the deadline is `created_at_ms + deadline_ms` (0 = none).
    pub fn restore(
        mut job: Job,
        images: Vec<JobImage>,
        tasks: Vec<TaskSpec>,
        span: tracing::Span,
        record: Record,
    ) -> Self {
        let deadline_ms = record.spec.deadline_ms;
        let images: BTreeMap<u32, JobImage> = images
            .into_iter()
            .filter(|i| (i.task_index as usize) < tasks.len())
            .map(|i| (i.task_index, i))
            .collect();
        job.total_tasks = tasks.len() as u32;
        job.tasks.resize_with(tasks.len(), TaskState::default);
        for (i, t) in job.tasks.iter_mut().enumerate() {
            t.task_index = i as u32;
            if let Some(img) = images.get(&(i as u32)) {
                t.status = TaskStatus::Done as i32;
                t.worker.clone_from(&img.worker);
            } else if t.status != TaskStatus::Failed as i32 {
                t.status = TaskStatus::Queued as i32;
            }
        }
        job.done_tasks = images.len() as u32;
        job.failed_tasks = job
            .tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Failed as i32)
            .count() as u32;
        job.status = if job.done_tasks + job.failed_tasks > 0 {
            JobStatus::Running
        } else {
            JobStatus::Queued
        } as i32;
        let deadline = (deadline_ms > 0).then(|| {
            let left = (job.created_at_ms + deadline_ms).saturating_sub(now_ms());
            (tokio::time::Instant::now() + Duration::from_millis(left), deadline_ms)
        });
        let handle = Self::build(job, images, tasks, QueuePlace::default(), deadline, span, record);
        if handle.lock().job.failed_tasks > 0 {
            handle.lock().failure_code = tonic::Code::Unknown as i32;
        }
        handle
    }

    fn build(
        job: Job,
        images: BTreeMap<u32, JobImage>,
        tasks: Vec<TaskSpec>,
        place: QueuePlace,
        deadline: Option<(tokio::time::Instant, u64)>,
        span: tracing::Span,
        record: Record,
    ) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (cancel, _) = watch::channel(false);
        let (abandoned, _) = watch::channel(false);
        Self {
            id: job.job_id.clone(),
            priority: job.priority,
            tasks,
            deadline,
            span: JobSpan::new(span),
            keep_best: KeepBest::of(&record.spec),
            record,
            state: Mutex::new(State {
                job,
                images,
                progress: BTreeMap::new(),
                queue_position: place.position,
                eta_ms: place.eta_ms,
                failure_code: 0,
            }),
            events,
            cancel,
            abandoned,
            dirty: AtomicBool::new(false),
            persist_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The job request task `index` comes from (its subjects decide the task's placement).
    pub fn base_request(&self, index: usize) -> &GenerationRequest {
        &self.record.spec.requests[self.tasks[index].request_index as usize]
    }

    /// The request task `index` sends to a worker: its job request with the task's own seed, scored when the
    /// request asks for it or the job keeps the best samples.
    pub fn task_request(&self, index: usize) -> GenerationRequest {
        let base = self.base_request(index);
        GenerationRequest {
            seed: self.tasks[index].seed,
            score: base.score || self.keep_best.is_some(),
            ..base.clone()
        }
    }

    /// Whether task `index` needs a worker that can score.
    pub fn needs_scoring(&self, index: usize) -> bool {
        self.base_request(index).score || self.keep_best.is_some()
    }

    /// Notes that the store missed a write of this job.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::SeqCst);
    }

    /// Whether the store missed a write; clears the flag (set it again if the re-write fails).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::SeqCst)
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::SeqCst)
    }

    /// Indices of the tasks still to run (neither DONE nor FAILED).
    pub fn pending_tasks(&self) -> Vec<usize> {
        let s = self.lock();
        if is_final(s.job.status) {
            return Vec::new();
        }
        let open = |t: &&TaskState| t.status != TaskStatus::Done as i32 && t.status != TaskStatus::Failed as i32;
        s.job.tasks.iter().filter(open).map(|t| t.task_index as usize).collect()
    }

    /// True while task `index` may still deliver an image.
    pub fn task_open(&self, index: u32) -> bool {
        open_in(&self.lock(), index)
    }

    /// Time left before the deadline: None without one, zero once passed.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|(at, _)| at.saturating_duration_since(tokio::time::Instant::now()))
    }

    /// Stops this job's tasks here (another coordinator owns it now, or this one stops) without changing its
    /// state.
    /// Stops the job's work here (another coordinator owns it now, or this one goes away); its span ends.
    pub fn abandon(&self) {
        self.abandoned.send_replace(true);
        let _ = self.cancel.send(true);
        self.span.end();
    }

    pub fn is_abandoned(&self) -> bool {
        *self.abandoned.borrow()
    }

    /// The watch of this job here: its replayed state, live events, and the abandonment signal.
    pub fn watch(&self) -> JobWatch {
        let (replay, live) = self.subscribe();
        JobWatch {
            replay,
            live: Some(live),
            moved: Some(self.abandoned.subscribe()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(JobEvent {
            job_id: self.id.clone(),
            event: Some(event),
        });
    }

    /// The job (with the images it shows when asked).
    pub fn snapshot(&self, include_images: bool) -> Job {
        let s = self.lock();
        let mut job = s.job.clone();
        if include_images {
            job.images = self.shown(&s);
        }
        job
    }

    /// Every recorded image (with best-of-N, the discarded samples too).
    pub fn images(&self) -> Vec<JobImage> {
        self.lock().images.values().cloned().collect()
    }

    /// The images the job shows: all, or with best-of-N the kept ones of the requests whose samples all ended.
    fn shown(&self, s: &State) -> Vec<JobImage> {
        match &self.keep_best {
            None => s.images.values().cloned().collect(),
            Some(k) => k.visible(&s.job, s.images.values().cloned()),
        }
    }

    /// Best-of-N: emits the kept images of `request` (its last sample just ended).
    fn emit_best_of(&self, s: &State, request: u32) {
        let Some(k) = &self.keep_best else { return };
        if !k.request_ended(&s.job, request) {
            return;
        }
        let images = s
            .images
            .values()
            .filter(|i| k.request_of(i.task_index) == request)
            .cloned()
            .collect();
        for img in k.best(images) {
            self.emit(Event::Image(img));
        }
    }

    pub fn failure_code(&self) -> tonic::Code {
        tonic::Code::from_i32(self.lock().failure_code)
    }

    /// The events that describe the current state, and a receiver of every later one.
    pub fn subscribe(&self) -> (Vec<JobEvent>, broadcast::Receiver<JobEvent>) {
        let s = self.lock();
        let rx = self.events.subscribe();
        let mut out = Vec::new();
        let ev = |e| JobEvent {
            job_id: self.id.clone(),
            event: Some(e),
        };
        if s.job.status == JobStatus::Queued as i32 {
            out.push(ev(Event::Queued(JobQueued {
                position: s.queue_position,
                eta_ms: s.eta_ms,
            })));
        }
        for t in &s.job.tasks {
            if t.status == TaskStatus::Running as i32 {
                out.push(ev(Event::Started(TaskStarted {
                    task_index: t.task_index,
                    worker: t.worker.clone(),
                    attempt: t.attempts,
                })));
                if let Some(&(step, total)) = s.progress.get(&t.task_index) {
                    out.push(ev(Event::Progress(TaskProgress {
                        task_index: t.task_index,
                        step,
                        total,
                    })));
                }
            }
        }
        out.extend(self.shown(&s).into_iter().map(|i| ev(Event::Image(i))));
        if is_final(s.job.status) {
            out.push(ev(Event::Done(JobDone {
                job: Some(s.job.clone()),
            })));
        }
        (out, rx)
    }

    /// A receiver that turns true when the job is cancelled.
    pub fn cancelled(&self) -> watch::Receiver<bool> {
        self.cancel.subscribe()
    }

    pub fn is_finished(&self) -> bool {
        is_final(self.lock().job.status)
    }

    /// A task got a worker.
    pub fn started(&self, index: u32, worker: &str, attempt: u32) {
        let mut s = self.lock();
        if is_final(s.job.status) {
            return;
        }
        s.job.status = JobStatus::Running as i32;
        if let Some(t) = s.job.tasks.get_mut(index as usize) {
            t.status = TaskStatus::Running as i32;
            t.worker = worker.to_owned();
            t.attempts = attempt;
        }
        self.emit(Event::Started(TaskStarted {
            task_index: index,
            worker: worker.to_owned(),
            attempt,
        }));
    }

    pub fn progress(&self, index: u32, step: u32, total: u32) {
        let mut s = self.lock();
        s.progress.insert(index, (step, total));
        self.emit(Event::Progress(TaskProgress {
            task_index: index,
            step,
            total,
        }));
    }

    /// Records the image of a task; false (and nothing recorded) when the task already ended.
    pub fn deliver(&self, image: JobImage) -> bool {
        let idx = image.task_index;
        let mut s = self.lock();
        if !open_in(&s, idx) {
            return false;
        }
        if let Some(t) = s.job.tasks.get_mut(idx as usize) {
            t.status = TaskStatus::Done as i32;
            t.worker.clone_from(&image.worker);
        }
        s.job.done_tasks += 1;
        s.images.insert(idx, image.clone());
        match &self.keep_best {
            None => self.emit(Event::Image(image)),
            Some(k) => self.emit_best_of(&s, k.request_of(idx)),
        }
        true
    }

    /// A task attempt failed; with `will_retry` false the task fails for good.
    pub fn failed(&self, index: u32, status: &tonic::Status, will_retry: bool) {
        let mut s = self.lock();
        if is_final(s.job.status) {
            return;
        }
        if let Some(t) = s.job.tasks.get_mut(index as usize) {
            t.error = status.message().to_owned();
            t.status = if will_retry {
                TaskStatus::Queued
            } else {
                TaskStatus::Failed
            } as i32;
        }
        if !will_retry {
            s.job.failed_tasks += 1;
            s.failure_code = status.code() as i32;
            s.job.error = format!("task {index}: {}", status.message());
        }
        self.emit(Event::Failed(TaskFailed {
            task_index: index,
            code: format!("{:?}", status.code()),
            reason: mip_common::errors::reason_of(status).unwrap_or_default(),
            message: status.message().to_owned(),
            will_retry,
        }));
        if let (false, Some(k)) = (will_retry, &self.keep_best) {
            self.emit_best_of(&s, k.request_of(index));
        }
    }

    /// Ends the job when every task ended; returns the final job once (to persist).
    pub fn finish_if_complete(&self) -> Option<Job> {
        let mut s = self.lock();
        if is_final(s.job.status) || s.job.done_tasks + s.job.failed_tasks < s.job.total_tasks {
            return None;
        }
        s.job.status = if s.job.failed_tasks > 0 {
            JobStatus::Failed
        } else {
            JobStatus::Done
        } as i32;
        Some(self.finish(&mut s))
    }

    /// Cancels the job (queued tasks stop, running ones are dropped); None when it already ended.
    pub fn cancel(&self) -> Option<Job> {
        let mut s = self.lock();
        if is_final(s.job.status) {
            return None;
        }
        s.job.status = JobStatus::Cancelled as i32;
        s.job.error = "cancelled by CancelJob".into();
        let mut ending = std::collections::BTreeSet::new();
        for t in &mut s.job.tasks {
            if t.status != TaskStatus::Done as i32 && t.status != TaskStatus::Failed as i32 {
                t.status = TaskStatus::Cancelled as i32;
                if let Some(k) = &self.keep_best {
                    ending.insert(k.request_of(t.task_index));
                }
            }
        }
        // Best-of-N: the requests whose samples end now show the best of what they made.
        for r in ending {
            self.emit_best_of(&s, r);
        }
        let _ = self.cancel.send(true);
        Some(self.finish(&mut s))
    }

    fn finish(&self, s: &mut State) -> Job {
        s.job.finished_at_ms = now_ms();
        let job = s.job.clone();
        self.emit(Event::Done(JobDone { job: Some(job.clone()) }));
        job
    }
}

fn open_in(s: &State, index: u32) -> bool {
    !is_final(s.job.status)
        && !s.images.contains_key(&index)
        && s.job
            .tasks
            .get(index as usize)
            .is_some_and(|t| t.status == TaskStatus::Running as i32 || t.status == TaskStatus::Queued as i32)
}
