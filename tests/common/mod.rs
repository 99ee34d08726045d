//! Shared helpers for the tests of the pollux binary: its control API, network
//! namespaces and DPDK.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub mod api;
pub mod dpdk;
pub mod mux;
pub mod netns;
pub mod takeover;
pub mod vm;
