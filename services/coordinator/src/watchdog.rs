//! The per-attempt progress watchdog: a worker that stops sending `Progress` events (a hung device, a frozen
//! process whose connection still looks open) is given up on. Before the first event an attempt may stay silent
//! for `first` (the worker may be queueing it behind others, encoding subjects); once two steps have arrived the
//! allowed silence is `factor` × the longest step seen in this attempt + `slack`, so the bound follows the worker's
//! measured speed (fast GPU or slow CPU) without a global guess.

use std::time::{Duration, Instant};

use mip_common::errors::{status, Kind};
use tonic::Status;

/// The watchdog's settings (`coordinator.watchdog_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watchdog {
    pub factor: f64,
    pub slack: Duration,
    /// The silence allowed before the first event (and after it until a step time is measured); `None`: unbounded.
    pub first: Option<Duration>,
}

impl Watchdog {
    /// A clock for one attempt, started now.
    pub fn clock(&self) -> AttemptClock {
        AttemptClock {
            cfg: *self,
            last: Instant::now(),
            events: 0,
            longest: Duration::ZERO,
        }
    }
}

/// The silence allowed next in one attempt; fed every event the worker sends.
#[derive(Debug, Clone)]
pub struct AttemptClock {
    cfg: Watchdog,
    last: Instant,
    events: u32,
    longest: Duration,
}

impl AttemptClock {
    /// How long the next event may take (`None`: no bound yet).
    pub fn bound(&self) -> Option<Duration> {
        if self.events < 2 {
            return self.cfg.first;
        }
        Some(self.longest.mul_f64(self.cfg.factor) + self.cfg.slack)
    }

    /// An event arrived now.
    pub fn observe(&mut self) {
        let now = Instant::now();
        if self.events >= 1 {
            self.longest = self.longest.max(now - self.last);
        }
        self.events += 1;
        self.last = now;
    }

    /// The status of an attempt given up on after `bound` of silence (retryable, like a lost worker).
    pub fn expired(&self, bound: Duration) -> Status {
        status(
            Kind::Unavailable,
            Some("watchdog"),
            format!(
                "no progress from the worker for {bound:?} after {} events (watchdog: factor {} x the longest step + {:?})",
                self.events, self.cfg.factor, self.cfg.slack
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_follows_the_measured_step_time() {
        let w = Watchdog {
            factor: 4.0,
            slack: Duration::from_millis(100),
            first: Some(Duration::from_secs(60)),
        };
        let mut c = w.clock();
        assert_eq!(c.bound(), Some(Duration::from_secs(60)));
        c.observe();
        assert_eq!(c.bound(), Some(Duration::from_secs(60)), "no step time yet");
        std::thread::sleep(Duration::from_millis(20));
        c.observe();
        let b = c.bound().expect("bounded");
        assert!(b >= Duration::from_millis(180) && b < Duration::from_secs(2), "{b:?}");
        let unbounded = Watchdog { first: None, ..w }.clock();
        assert_eq!(unbounded.bound(), None);
    }
}
