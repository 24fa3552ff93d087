//! The MIP Cluster coordinator: the public `mip.v1.Coordinator` gRPC service. A job (requests × samples) is split
//! into one task per image; each task is placed on a worker (subject affinity by rendezvous hashing, bounded load,
//! a per-worker concurrency limit), streamed from its `Generate` call and retried on another worker when the call
//! fails with UNAVAILABLE, a transport error or a silent stream. Job state lives in a store (Redis, or memory):
//! every task state change and image is written under the job's lease and fencing token, and an unfinished job
//! whose coordinator died or stopped is resumed by another (or the restarted) one.
//!
//! Layout, one owner per part of a job's life:
//! - [`config`] (file + environment, validated once) and [`error`] (the boundary error and its gRPC mapping);
//! - [`admission`]: every request checked with the cluster's shared rules before anything is stored or queued,
//!   and split into tasks;
//! - [`job`]: one job's state machine in memory and its event broadcast, [`status`] (final or not, labels),
//!   [`best_of`] (which images a `keep_best` job shows);
//! - [`store`]: the [`store::JobStore`] trait and its Redis and memory implementations, fenced writes;
//! - [`writer`]: the one writer of job state (fenced, re-written in full after store outages);
//! - [`leases`]: the instance id, lease renewal and the resumption of unowned jobs;
//! - [`queue`]: queued-task accounting and the order waiting tasks take slots;
//! - [`registry`] (workers, health/Info polling, in-flight permits), [`placement`] (rendezvous hashing, bounded
//!   load), [`dispatch`] (running one task on workers, under the progress [`watchdog`]);
//! - [`remote`] (watching jobs run by another replica), [`trace`] (a job's stored trace context);
//! - [`service`] (the domain API, the `Coordinator`), [`api`] (the gRPC adapter), [`auth`] (bearer tokens),
//!   [`discovery`] (workers from DNS), [`metrics`] and [`server`] (`run(config, listener, shutdown)`, with the
//!   drain).

pub mod admission;
pub mod api;
pub mod auth;
pub mod best_of;
pub mod config;
pub mod discovery;
pub mod dispatch;
pub mod error;
pub mod job;
pub mod leases;
pub mod metrics;
pub mod placement;
pub mod queue;
pub mod registry;
pub mod remote;
pub mod server;
pub mod service;
pub mod status;
pub mod store;
pub mod trace;
pub mod watchdog;
pub mod writer;
