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

/// pollux's log (`log`) of its own `vhost_user` ports' front ends: each
/// chose REPLY_ACK, had no request refused, and no connection ended on a
/// refusal: one that dropped did as its socket failed (a front end that
/// exits, a QEMU killed or a pktgen ending, may take a connection and
/// reset it).
pub fn vhost_user_front_ends_refused_nothing(log: &str) {
    assert!(
        log.lines()
            .filter(|l| l.contains("vhost-user connection dropped"))
            .all(|l| l.contains("the socket failed")),
        "{log}"
    );
    assert!(
        log.contains("vhost-user protocol features chosen: 0x8"),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("vhost-user request") && l.contains("refused")),
        "{log}"
    );
}
