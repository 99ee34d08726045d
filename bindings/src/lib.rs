//! # dpdk-sys — raw bindings to DPDK
//!
//! Owns: the bindgen-generated declarations for DPDK's public headers (EAL,
//! ethdev, mbuf, mempool, lcore, errno, vdev bus, the vhost PMD's queue
//! events; `rte_*` only) and a small C
//! shim (`shim/shim.c`) that exports DPDK's static-inline fast path as real
//! symbols: `pollux_rx_burst`, `pollux_tx_burst`, mbuf alloc / bulk alloc /
//! free / append / prepend / adj / trim / headroom / tailroom / reset,
//! `pollux_errno` (`rte_errno` is thread-local) and `pollux_lcore_id`.
//!
//! Must not touch: anything above the raw C interface; the safe wrapper lives
//! in `dataplane` behind the `dpdk` feature.
//!
//! Built only with the `link` feature (turned on by the workspace's `dpdk`
//! feature): it needs `libdpdk-dev` >= 22.11 and `libclang-dev`. Without it
//! this crate is empty, so everything else builds with no DPDK installed.

#[cfg(feature = "link")]
#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]
mod raw {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

#[cfg(feature = "link")]
pub use raw::*;
