//! # dpdk-sys — raw bindings to DPDK
//!
//! Owns: the bindgen-generated declarations for DPDK's headers and a small C
//! shim that exports DPDK's static-inline fast path (rx/tx burst, mbuf alloc and
//! free, `rte_errno`, `rte_lcore_id`). Only built with the workspace feature
//! `dpdk`.
//!
//! Must not touch: anything above the raw C interface; the safe wrapper lives in
//! `dataplane` behind the `dpdk` feature.
//!
//! Status: an empty placeholder until the DPDK issue generates the bindings.
