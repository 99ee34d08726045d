//! Test-only helpers shared by every pollux crate (a dev-dependency, never a
//! dependency of the product).
//!
//! It owns two things: [`require`], the single way a test states what it
//! needs from the machine (root, a tool, huge pages) and what happens when
//! that is missing; and [`guest`], real virtual machines (QEMU guests on
//! vhost-user sockets) for the tests and benchmarks that put pollux between
//! VMs. It must not depend on any pollux crate, so every crate's tests,
//! down to `dataplane`'s unit tests, can use it.
#![forbid(unsafe_code)]

pub mod guest;
pub mod require;
