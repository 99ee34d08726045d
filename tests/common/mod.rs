//! Shared helpers for the tests of the pollux binary: its control API, network
//! namespaces and DPDK.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub mod api;
pub mod dpdk;
pub mod mux;
pub mod netns;
pub mod takeover;
pub mod vm;

/// A child process killed (if it still runs) when the test ends early; take
/// it out (`.0.take()`) to wait for it normally.
pub struct Running(pub Option<std::process::Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
