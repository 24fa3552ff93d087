//! MIP Cluster's cross-service test suite: the sandbox in which real services meet. Everything runs on loopback
//! on this machine: a real `redis-server` on a free port, workers on the fixture model (in this process, or as
//! `mip serve` child processes), coordinators, and the `mip` binary as a user runs it.
//!
//! Layout of the `tests/` folder:
//! - `src/` (this library): the harness — [`coord`] (coordinators in the test's runtime or in a runtime of their
//!   own that can be killed at once, clients with TLS and bearer tokens), [`jobs`] (request builders, watch
//!   streams, bounded waits, the Redis records of a job), [`process`] (the `mip` binary: runs, `mip serve` child
//!   processes, fixture bundles), plus the workers of `mip_worker::testing` and the Redis server of
//!   `mip_common::testing`, re-exported here.
//! - `tests/`: the suites (cluster behaviour, durability, replicas, tracing, transport security, the CLI against a
//!   served cluster, worker processes sharing Redis).
//! - `fixtures/mip-tiny-sdxl/`: the golden parity fixtures every crate's tests read (see its README).
//!
//! Suites that drive the `mip` binary need it built: `cargo test --workspace` builds it (it is the test command of
//! the README); `cargo test -p mip-tests` alone needs `cargo build -p mip-cli` first (see [`process::mip_bin`]).

pub mod coord;
pub mod jobs;
pub mod process;

pub use coord::*;
pub use jobs::*;
pub use mip_common::testing::RedisServer;
pub use mip_worker::testing::{image, subject, TestWorker, BOUND};

/// Workers on the fixture model, each after `edit`, once all of them serve.
pub async fn workers_with(n: usize, edit: impl Fn(&mut mip_worker::config::WorkerConfig)) -> Vec<TestWorker> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestWorker::start(&edit).await);
    }
    for w in &out {
        w.wait_serving().await;
    }
    out
}

/// Workers on the fixture model with their defaults, once all of them serve.
pub async fn workers(n: usize) -> Vec<TestWorker> {
    workers_with(n, |_| {}).await
}

/// The URL a coordinator knows `w` by (`http` or `https`).
pub fn url(w: &TestWorker, scheme: &str) -> String {
    format!("{scheme}://{}", w.addr)
}

/// A worker config edit: no drain on stop, so stopping a worker cuts what it runs at once.
pub fn no_drain(c: &mut mip_worker::config::WorkerConfig) {
    c.server.drain_seconds = 0;
}

/// A loopback address nothing listens on right now.
pub fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A path as a config string.
pub fn path_str(p: &std::path::Path) -> String {
    p.display().to_string()
}
