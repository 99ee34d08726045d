//! # lb — load balancing: VIPs, Maglev, connection tracking, NAT
//!
//! Owns: the VIP/DIP model, the Maglev lookup table, per-core connection
//! tracking with NAT/SNAT state, and (with its own issue) the health prober.
//!
//! Must not touch: polling cores or port drivers. Apart from the prober, which
//! runs on the control thread, it is pure logic over parsed headers.

pub mod conntrack;
pub mod maglev;
pub mod nat;
