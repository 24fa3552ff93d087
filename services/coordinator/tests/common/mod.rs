//! The one helper module of the coordinator's integration tests (`mod common;`): coordinators on 127.0.0.1:0 with
//! an optional real redis-server, TLS and bearer-token clients ([`coord`]); in-process workers on the fixture
//! model (the worker crate's harness, re-exported); request and job builders and bounded waits ([`jobs`]).

#![allow(dead_code)]

pub mod coord;
pub mod jobs;
#[path = "../../../worker/tests/support/redis.rs"]
pub mod redis_support;
#[path = "../../../worker/tests/support/worker.rs"]
pub mod worker_support;

pub use coord::*;
pub use jobs::*;
pub use redis_support::RedisServer;
pub use worker_support::{image, subject, TestWorker, BOUND};

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
