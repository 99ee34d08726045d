//! # vswitch — the switch
//!
//! Owns: the policy snapshot ([`policy`]: vnets, VMs, compiled security
//! groups, VIPs), the per-core unified flow table ([`flow`]), and the switch
//! pipeline ([`switch`]) that a dataplane worker runs: anti-spoofing, ARP
//! responder, load balancing with NAT, vnet routing with MAC rewrite, ACLs,
//! compiled into one cached action per direction.
//!
//! Must not touch: port driver internals or `unsafe` code; it drives ports only
//! through the `dataplane` `Port` trait (via the worker) and buffers through
//! `PacketBuf`.
#![forbid(unsafe_code)]

pub mod flow;
pub mod flowlog;
pub mod frag;
pub mod hash;
pub mod ipfix;
pub mod neigh;
pub mod placement;
pub mod policy;
pub mod switch;

pub use policy::{
    Policy, PolicyError, RemoteDef, Topology, Underlay, UplinkDef, VipDef, VmDef, VnetDef,
};
pub use switch::{Switch, SwitchConfig, SwitchDrop, SwitchStats};
