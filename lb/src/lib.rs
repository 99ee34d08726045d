//! # lb — load balancing: VIPs, Maglev, connection tracking, NAT
//!
//! Owns: the VIP/DIP model and distribution modes ([`balancer`]), the Maglev
//! lookup table ([`maglev`]), per-core connection tracking ([`conntrack`]),
//! NAT bindings ([`nat`]), SNAT port allocation ([`snat`]) and the SYN
//! proxy's cookies ([`syncookie`]), the state one process hands the next in
//! a hitless upgrade ([`handover`]); the health
//! prober ([`probe`]: HTTP GET and TCP probes over smoltcp) and the health
//! service that runs one per vnet and applies what they learn to the VIPs
//! in place ([`health`]).
//!
//! Must not touch: polling cores or port drivers. Apart from the prober, which
//! runs on the control thread, it is pure logic over parsed headers: health
//! comes in as an input ([`balancer::Vip::set_health`]), and decisions go out
//! as per-direction header rewrites ([`nat::Rewrite`]) the switch compiles
//! into its flow actions.
#![forbid(unsafe_code)]

pub mod balancer;
pub mod conntrack;
pub mod handover;
pub mod health;
pub mod maglev;
pub mod nat;
pub mod probe;
pub mod snat;
pub mod syncookie;

pub use balancer::{
    Backend, Decision, Distribution, LbCore, LbDrop, PickHash, Vip, VipConfig, Vips,
};
pub use conntrack::{ConnRef, ConnTable, Dir, Timeouts};
pub use maglev::MaglevTable;
pub use nat::{NatBinding, Rewrite, SeqShift};
