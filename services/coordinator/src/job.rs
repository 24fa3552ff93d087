//! One job in memory: its tasks' states, its images, and the broadcast of its events. The state sits behind a
//! short synchronous lock (never held across an await); events are sent under it, so a watcher that subscribes
//! under the same lock sees a replay of the state and then every later event, with no gap.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use mip_proto::v1::job_event::Event;
use mip_proto::v1::{
    GenerationRequest, Job, JobDone, JobEvent, JobImage, JobQueued, JobStatus, TaskFailed, TaskProgress, TaskStarted,
    TaskState, TaskStatus,
};
use tokio::sync::{broadcast, watch};

/// Events buffered per watcher before it lags.
const EVENT_BUFFER: usize = 1024;

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One task's fixed spec.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub index: u32,
    pub request_index: u32,
    pub sample_index: u32,
    pub request: GenerationRequest,
}

struct State {
    job: Job,
    images: BTreeMap<u32, JobImage>,
    progress: BTreeMap<u32, (u32, u32)>,
    queue_position: u32,
    /// gRPC code of the last final task failure.
    failure_code: i32,
}

/// A job being run (or finished) by this coordinator.
pub struct JobHandle {
    pub id: String,
    pub priority: i32,
    pub tasks: Vec<TaskSpec>,
    /// Tasks not started by then fail with DEADLINE_EXCEEDED.
    pub deadline: Option<(tokio::time::Instant, u64)>,
    state: Mutex<State>,
    events: broadcast::Sender<JobEvent>,
    cancel: watch::Sender<bool>,
}

impl JobHandle {
    /// A queued job; `deadline_ms` (0 = none) counts from now.
    pub fn new(id: String, priority: i32, tasks: Vec<TaskSpec>, queue_position: u32, deadline_ms: u64) -> Self {
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
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (cancel, _) = watch::channel(false);
        let deadline = (deadline_ms > 0).then(|| {
            let at = tokio::time::Instant::now() + std::time::Duration::from_millis(deadline_ms);
            (at, deadline_ms)
        });
        Self {
            id,
            priority,
            tasks,
            deadline,
            state: Mutex::new(State {
                job,
                images: BTreeMap::new(),
                progress: BTreeMap::new(),
                queue_position,
                failure_code: 0,
            }),
            events,
            cancel,
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

    /// The job (with its images when asked).
    pub fn snapshot(&self, include_images: bool) -> Job {
        let s = self.lock();
        let mut job = s.job.clone();
        if include_images {
            job.images = s.images.values().cloned().collect();
        }
        job
    }

    pub fn images(&self) -> Vec<JobImage> {
        self.lock().images.values().cloned().collect()
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
        out.extend(s.images.values().map(|i| ev(Event::Image(i.clone()))));
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
        let mut s = self.lock();
        let idx = image.task_index;
        let open = s
            .job
            .tasks
            .get(idx as usize)
            .is_some_and(|t| t.status == TaskStatus::Running as i32 || t.status == TaskStatus::Queued as i32);
        if !open || is_final(s.job.status) || s.images.contains_key(&idx) {
            return false;
        }
        if let Some(t) = s.job.tasks.get_mut(idx as usize) {
            t.status = TaskStatus::Done as i32;
            t.worker.clone_from(&image.worker);
        }
        s.job.done_tasks += 1;
        s.images.insert(idx, image.clone());
        self.emit(Event::Image(image));
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
        for t in &mut s.job.tasks {
            if t.status != TaskStatus::Done as i32 && t.status != TaskStatus::Failed as i32 {
                t.status = TaskStatus::Cancelled as i32;
            }
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

/// DONE, FAILED or CANCELLED.
pub fn is_final(status: i32) -> bool {
    status == JobStatus::Done as i32 || status == JobStatus::Failed as i32 || status == JobStatus::Cancelled as i32
}
