//! # dataplane — pollux's packet engine
//!
//! Owns everything that touches packets as bytes and moves them:
//! - packet buffers ([`PacketBuf`], [`pool::Pool`] of preallocated buffers with
//!   headroom, huge pages when available) and [`Batch`]es of up to 32;
//! - the [`Port`] trait, per-port counters ([`stats`]) and the port drivers
//!   ([`port::ring`], [`port::pcap`], [`port::af_packet`], [`port::af_xdp`],
//!   and with the `dpdk` feature `port::dpdk`: EAL, mempools, mbufs as
//!   packet buffers, ethdev ports);
//! - header views ([`wire`]), one-pass parsing into offsets and a flow key
//!   ([`parse`]) and rewrites with incremental checksums ([`rewrite`]);
//!   the TCP segments a SYN proxy writes ([`synproxy`]);
//! - the bucketed hash [`index`] under the per-core flow and connection
//!   tables (seeded key hash, prefetchable buckets, no tombstones);
//! - the poll-mode [`worker::Worker`], core pinning and the TSC [`clock`];
//! - overlay tunnels (VXLAN, Geneve) in front of frames and ARP requests
//!   for an underlay address ([`tunnel`]);
//! - the traffic generator and latency meter of `pollux pktgen` ([`pktgen`]).
//!
//! Must not touch: policy. It knows nothing of VMs, vnets, ACLs or VIPs; the
//! `filter`, `lb` and `vswitch` crates build on it. `unsafe` is allowed only in
//! port drivers (`af_packet`, `af_xdp`, `dpdk`, and `ring`'s burst ring),
//! each block with its SAFETY argument.
//!
//! Fast-path rules here: no allocation per packet, no locks, bursts of
//! [`BURST`], no `unwrap`/`expect`/`panic` (denied by lints), and no accessor
//! that can panic on a packet once its view is validated.

pub mod batch;
pub mod buf;
pub mod capture;
pub mod clock;
pub mod icmp_error;
pub mod index;
pub mod key;
pub mod parse;
pub mod pktgen;
pub mod pool;
pub mod port;
pub mod rewrite;
pub mod stats;
pub mod synproxy;
pub mod tunnel;
pub mod wire;
pub mod worker;

pub use batch::{BURST, Batch};
pub use buf::{BufAlloc, BufError, PacketBuf};
pub use key::FlowKey;
pub use parse::{L3, Parsed, parse, parse_into};
pub use port::{LinkInfo, Port, PortError};
pub use stats::{DeviceInfo, DropReason, LinkState, PortStats};
pub use wire::{MacAddr, ParseError};
