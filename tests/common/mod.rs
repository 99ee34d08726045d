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

/// Resident memory of process `pid` (`VmRSS`), in KiB; `None` when it
/// cannot be read (the process is gone).
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
