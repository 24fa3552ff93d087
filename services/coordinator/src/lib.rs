//! The MIP Cluster coordinator: the public `mip.v1.Coordinator` gRPC service. A job (requests × samples) is split
//! into one task per image; each task is placed on a worker (subject affinity by rendezvous hashing, bounded load,
//! a per-worker concurrency limit), streamed from its `Generate` call and retried on another worker when the call
//! fails with UNAVAILABLE or a transport error. Job state lives in memory and in Redis: every task state change and
//! image is stored, and an unfinished job whose coordinator died is resumed by another (or the restarted) one.
//!
//! Layout: [`config`] (file + environment, validated once), [`admission`] (every request checked with the
//! cluster's shared rules before anything is stored or queued), [`error`] (the boundary error enum and its gRPC
//! mapping), [`registry`] (workers, health/Info polling, in-flight permits), [`placement`] (rendezvous hashing and
//! the bounded-load rule), [`store`] (Redis job state), [`job`] (one job's in-memory state and event broadcast),
//! [`dispatch`] (running one task on workers, under the progress [`watchdog`]), [`lease`] (job ownership leases and resumption), [`remote`] (watch and cancel of
//! jobs run by another replica), [`service`] (the
//! domain API), [`api`] (the gRPC adapter), [`auth`] (bearer tokens), [`discovery`] (workers from DNS) and
//! [`server`] (`run(config, listener, shutdown)`).

pub mod admission;
pub mod api;
pub mod auth;
pub mod config;
pub mod discovery;
pub mod dispatch;
pub mod error;
pub mod job;
pub mod lease;
pub mod metrics;
pub mod placement;
pub mod registry;
pub mod remote;
pub mod server;
pub mod service;
pub mod store;
pub mod watchdog;
