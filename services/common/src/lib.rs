//! Shared service plumbing for the worker and the coordinator.
//!
//! - [`config`]: one file (YAML or TOML) plus `MIP_…` environment overrides, into a typed struct.
//! - [`errors`]: the table from error kinds to gRPC codes, with a stable `reason` in the status metadata.
//! - [`shutdown`]: a future that resolves on SIGTERM or Ctrl-C.

pub mod config;
pub mod errors;
pub mod shutdown;
