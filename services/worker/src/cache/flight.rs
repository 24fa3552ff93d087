//! Single-flight: concurrent lookups of one missing key elect one leader that looks in Redis and computes; the
//! others wait on a `watch` channel for its value. A leader that fails or is dropped (its future cancelled) closes
//! the channel without a value, and each waiter then starts over (and may lead itself), so nobody hangs on it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

/// What waiters see on a flight's channel.
#[derive(Debug, Clone)]
pub(crate) enum FlightState {
    Pending,
    Done(Arc<[u8]>),
}

/// The flights in progress, by key.
#[derive(Default)]
pub(crate) struct Flights {
    map: HashMap<String, (u64, watch::Receiver<FlightState>)>,
    next_id: u64,
}

/// The caller's part in a key's flight.
pub(crate) enum Join {
    /// Nobody is working on the key: the caller must, and publish through the sender.
    Lead { id: u64, tx: watch::Sender<FlightState> },
    /// Another caller is working on the key.
    Wait(watch::Receiver<FlightState>),
}

impl Flights {
    /// Joins the flight of `key`, or starts one with the caller as leader.
    pub(crate) fn join(&mut self, key: &str) -> Join {
        if let Some((_, rx)) = self.map.get(key) {
            // A closed channel is a flight whose leader is gone (its guard removes it; this is only a safety net).
            if rx.has_changed().is_ok() {
                return Join::Wait(rx.clone());
            }
        }
        let (tx, rx) = watch::channel(FlightState::Pending);
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.map.insert(key.to_owned(), (id, rx));
        Join::Lead { id, tx }
    }

    /// Ends flight `id` of `key` (a newer flight of the same key is left alone).
    pub(crate) fn end(&mut self, key: &str, id: u64) {
        if self.map.get(key).is_some_and(|(cur, _)| *cur == id) {
            self.map.remove(key);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// Waits for the leader's value; `None` when the leader failed or was dropped.
pub(crate) async fn wait(mut rx: watch::Receiver<FlightState>) -> Option<Arc<[u8]>> {
    match rx.wait_for(|s| matches!(s, FlightState::Done(_))).await {
        Ok(state) => match &*state {
            FlightState::Done(v) => Some(v.clone()),
            FlightState::Pending => None,
        },
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_get_the_leaders_value() {
        let mut f = Flights::default();
        let Join::Lead { id, tx } = f.join("k") else {
            panic!("first caller leads")
        };
        let Join::Wait(rx) = f.join("k") else {
            panic!("second caller waits")
        };
        let waiter = tokio::spawn(wait(rx));
        f.end("k", id);
        tx.send_replace(FlightState::Done(vec![7u8; 3].into()));
        let got = waiter.await.expect("waiter task");
        assert_eq!(got.as_deref(), Some(&[7u8; 3][..]));
        assert_eq!(f.len(), 0);
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_waiters_and_the_key() {
        let mut f = Flights::default();
        let Join::Lead { id, tx } = f.join("k") else {
            panic!("first caller leads")
        };
        let Join::Wait(rx) = f.join("k") else {
            panic!("second caller waits")
        };
        drop(tx);
        assert!(wait(rx).await.is_none());
        // Even without `end`, the closed flight is replaced by a new one.
        assert!(matches!(f.join("k"), Join::Lead { .. }));
        // Ending the old flight id leaves the new one.
        f.end("k", id);
        assert_eq!(f.len(), 1);
    }
}
