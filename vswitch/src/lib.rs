//! # vswitch — the switch
//!
//! Owns: ports and VMs, tenant (vnet) routing, the layered policy (anti-spoofing,
//! ACLs, LB/NAT, routing), the per-core unified flow table, the slow path that
//! compiles a flow's layers into one action, and policy snapshots.
//!
//! Must not touch: port driver internals or `unsafe` code; it drives ports only
//! through the [`dataplane`] `Port` trait and buffers through `PacketBuf`.
//!
//! Status: the switch is the subject of its own issue; this crate only fixes its
//! place in the workspace for now.
