//! What loading a model cost, per component: wall time, the bytes of its weights in the dtype they were loaded
//! in, and the peak and final resident host memory of the process while it loaded (see [`super::memory`]).

use std::time::Instant;

use serde::Serialize;

use super::memory;

/// One component's load.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentLoad {
    pub component: &'static str,
    pub seconds: f64,
    /// Bytes of its weights in the dtype loaded (what the device holds for it).
    pub weight_bytes: u64,
    /// Peak resident host memory of the process while this component loaded.
    pub peak_rss_bytes: Option<u64>,
    /// Resident host memory of the process after it loaded.
    pub rss_after_bytes: Option<u64>,
}

/// The whole load, component by component, in load order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub components: Vec<ComponentLoad>,
}

impl LoadReport {
    /// Runs `f` as the load of `component`, recording its time and memory; `f` returns the component and the
    /// bytes of its weights.
    pub fn measure<T, E>(&mut self, component: &'static str, f: impl FnOnce() -> Result<(T, u64), E>) -> Result<T, E> {
        memory::reset_peak_rss();
        let started = Instant::now();
        let (value, weight_bytes) = f()?;
        self.components.push(ComponentLoad {
            component,
            seconds: started.elapsed().as_secs_f64(),
            weight_bytes,
            peak_rss_bytes: memory::peak_rss_bytes(),
            rss_after_bytes: memory::rss_bytes(),
        });
        Ok(value)
    }

    /// Total load time.
    pub fn seconds(&self) -> f64 {
        self.components.iter().map(|c| c.seconds).sum()
    }

    /// Total bytes of the weights loaded.
    pub fn weight_bytes(&self) -> u64 {
        self.components.iter().map(|c| c.weight_bytes).sum()
    }

    /// Highest peak resident memory over the components (the peak of the whole load).
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        self.components.iter().filter_map(|c| c.peak_rss_bytes).max()
    }
}
