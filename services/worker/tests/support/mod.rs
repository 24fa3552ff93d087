//! Shared harness of the integration tests (`mod support;`): a real `redis-server` on a free loopback port, and
//! an in-process worker on the fixture model.

#![allow(dead_code)]

pub mod redis;
pub mod worker;
