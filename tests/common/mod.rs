//! Shared helpers for the switch tests: the in-process VMs of `pollux demo`.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub use pollux::demo::vm::{Vm, run_until, vm_port};

pub fn pool(name: &str) -> dataplane::pool::Pool {
    pollux::demo::vm::pool(name).unwrap()
}
pub mod netns;
