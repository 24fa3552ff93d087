//! Shared harness of the integration tests (`mod support;`): a real `redis-server` on a free loopback port.

#![allow(dead_code)]

pub mod redis;
