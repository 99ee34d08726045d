//! # pollux — the program around the switch
//!
//! Owns: the configuration file and its validation ([`config`]), running the
//! switch from it ([`run`]), the BGP speaker beside it ([`bgp`]), the control API and metrics ([`control`],
//! [`metrics`]), the embedded demo ([`demo`]), SR-IOV set-up
//! ([`sriov`]) and the traffic generator's front end ([`pktgen`]); the
//! `pollux` binary (`src/main.rs`) is the CLI
//! over them. The packet path lives in the `dataplane`, `filter`, `lb` and
//! `vswitch` crates; this crate wires them together and must not duplicate
//! their logic.
#![forbid(unsafe_code)]

pub mod api;
pub mod bgp;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod metrics;
pub mod pktgen;
pub mod run;
pub mod sriov;
pub mod takeover;
