//! The coordinator's queue: how many tasks wait across jobs (bounded by `coordinator.max_queued_tasks`, checked
//! when a job is admitted), and the order in which waiting tasks take worker slots ([`WaitQueue`]: priority, with
//! optional aging). [`InQueue`] keeps the `mip_coord_queue_depth` gauge in step with one task.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::CoordinatorError;
use crate::metrics::Metrics;

/// Tasks not yet started, across jobs, and the order they start in.
pub struct Queue {
    queued: AtomicUsize,
    limit: usize,
    pub waiting: WaitQueue,
}

impl Queue {
    pub fn new(limit: usize, aging: Option<Duration>) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            limit,
            waiting: WaitQueue::new(aging),
        }
    }

    /// Admits `n` new tasks if the queue has room; the number queued before them.
    pub fn admit(&self, n: usize) -> Result<usize, CoordinatorError> {
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q + n <= self.limit).then_some(q + n)
            })
            .map_err(|q| CoordinatorError::QueueFull {
                queued: q,
                asked: n,
                limit: self.limit,
            })
    }

    /// Counts `n` tasks of a resumed job (they were admitted once already, so no limit applies).
    pub fn readmit(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::SeqCst);
    }

    /// `n` tasks left the queue (started, ended, or their job was never stored).
    pub fn leave(&self, n: usize) {
        let _ = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| Some(q.saturating_sub(n)));
    }
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
pub struct Waiting<'a> {
    queue: &'a WaitQueue,
    ticket: u64,
    priority: i32,
    since: Instant,
}

impl<'a> Waiting<'a> {
    pub fn new(queue: &'a WaitQueue, priority: i32) -> Self {
        Self::since(queue, priority, Instant::now())
    }

    /// A task of `priority` waiting since `since`.
    pub fn since(queue: &'a WaitQueue, priority: i32, since: Instant) -> Self {
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
    pub fn is_first(&self) -> bool {
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
pub struct InQueue<'a> {
    metrics: &'a Metrics,
    priority: i32,
    inside: bool,
}

impl<'a> InQueue<'a> {
    pub fn enter(metrics: &'a Metrics, priority: i32) -> Self {
        metrics.queue(priority, 1);
        Self {
            metrics,
            priority,
            inside: true,
        }
    }

    pub fn set(&mut self, inside: bool) {
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
