//! Riding out short outages of the coordinator: a call refused with UNAVAILABLE (the coordinator cannot persist
//! jobs, is draining, or cannot be reached) or RESOURCE_EXHAUSTED (its queue is full), or cut by a transport error,
//! is tried again with exponential backoff and jitter until `--retry-for` has passed. Safe for `SubmitJob`:
//! every submission of `mip submit` and `mip generate` carries an idempotency key.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::{Code, Status};

/// The first wait; each later one doubles, up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(100);
const MAX_WAIT: Duration = Duration::from_secs(5);

/// How long transient failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub total: Duration,
}

/// Whether a failed call may succeed if tried again.
pub fn transient(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::ResourceExhausted => true,
        // This client never cancels a call it still waits for, so CANCELLED means the connection was cut under it
        // (a coordinator killed mid-call: hyper reports "operation was canceled").
        Code::Cancelled => true,
        // A connection cut mid-call (h2 / transport error) surfaces as UNKNOWN with the transport error as source.
        Code::Unknown => std::error::Error::source(s).is_some(),
        _ => false,
    }
}

impl Retry {
    /// Runs `call` until it succeeds, fails for good, or the total time would pass during the next wait.
    pub async fn call<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut backoff = self.backoff();
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(s) if transient(&s) => match backoff.next() {
                    Some(wait) => {
                        tracing::warn!(what, code = ?s.code(), message = s.message(), ?wait, "retrying");
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(s),
                },
                Err(s) => return Err(s),
            }
        }
    }

    /// The waits of one retried operation, ending once the total is spent.
    pub fn backoff(&self) -> Backoff {
        let now = Instant::now();
        Backoff {
            until: now + self.total,
            wait: FIRST_WAIT,
            planned: now,
        }
    }
}

/// Exponential backoff with "equal jitter": each wait is half the current step plus a random part of the other half.
#[derive(Debug, Clone)]
pub struct Backoff {
    until: Instant,
    wait: Duration,
    /// When the last wait given out ends (so waits add up even when nobody sleeps them).
    planned: Instant,
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let half = self.wait / 2;
        let wait = half + half.mul_f64(rand::random::<f64>());
        let ends = Instant::now().max(self.planned) + wait;
        if ends > self.until {
            return None;
        }
        self.planned = ends;
        self.wait = (self.wait * 2).min(MAX_WAIT);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_jitter_and_stop_at_the_total() {
        let waits: Vec<Duration> = Retry {
            total: Duration::from_secs(20),
        }
        .backoff()
        .collect();
        assert!(waits.len() >= 5, "{waits:?}");
        for (i, w) in waits.iter().enumerate() {
            let step = (FIRST_WAIT * 2u32.pow(i as u32)).min(MAX_WAIT);
            assert!(*w >= step / 2 && *w <= step, "wait {i}: {w:?} vs step {step:?}");
        }
        let total: Duration = waits.iter().sum();
        assert!(total <= Duration::from_secs(20), "{total:?}");
        assert_eq!(Retry { total: Duration::ZERO }.backoff().next(), None);
    }

    #[test]
    fn only_transient_codes_are_retried() {
        assert!(transient(&Status::unavailable("store")));
        assert!(transient(&Status::resource_exhausted("queue")));
        assert!(!transient(&Status::invalid_argument("bad")));
        assert!(!transient(&Status::unknown("no source")));
        assert!(transient(&Status::cancelled("operation was canceled")));
    }
}
