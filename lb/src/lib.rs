//! # lb — load balancing: VIPs, Maglev, connection tracking, NAT, health probes
//!
//! Owns: the VIP/DIP model, the Maglev lookup table, per-core connection
//! tracking with NAT/SNAT state, and the health prober (HTTP GET / TCP over
//! smoltcp) that decides which DIPs receive new flows.
//!
//! Must not touch: polling cores or port drivers. Apart from the prober, which
//! runs on the control thread, it is pure logic over parsed headers.
//!
//! Status: the load-balancer core and the prober are the subjects of their own
//! issues; this crate only fixes its place in the workspace for now.
