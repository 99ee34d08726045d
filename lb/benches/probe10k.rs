//! Measured run: the prober's CPU time for 10 000 simulated DIPs probed over
//! HTTP every 5 s, for one minute of simulated time.
//!
//! Run: `cargo bench -p lb --bench probe10k`. Results go in docs/performance.md.
//!
//! The DIPs are the addresses 10.2.0.0 - 10.2.39.15, all answered (200 on
//! `/health`) by one smoltcp stack in AnyIP mode behind a simulated router;
//! time is simulated in 5 ms steps. Only the time spent inside
//! `Prober::poll` is counted (the simulated servers and router run on the same
//! thread but are not the prober's cost). One thread, so wall time inside
//! `poll` is the prober's CPU time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

#[path = "../tests/sim/mod.rs"]
mod sim;

use dataplane::wire::MacAddr;
use lb::probe::{ProbeKind, ProbeSpec, Target};
use sim::{Behavior, Router, Server, pool};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const DIPS: u32 = 10_000;

fn main() {
    let pool = pool("probe10k");
    let mut router = Router::new();
    let mut prober = sim::prober(&mut router, pool, 11);
    let smac = MacAddr([2, 0, 0, 0, 2, 2]);
    let sport = router.attach_prefix(Ipv4Addr::new(10, 2, 0, 0), 16, smac);
    let mut server = Server::new(
        sport,
        pool,
        Ipv4Addr::new(10, 1, 0, 2),
        true,
        Behavior::Ok,
        Duration::ZERO,
    );
    let spec = ProbeSpec {
        kind: ProbeKind::Http {
            path: "/health".into(),
        },
        port: 80,
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(3),
        threshold: 2,
    };
    for i in 0..DIPS {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + i);
        prober.add(
            Target {
                vip: ("10.9.9.9".parse().unwrap(), 80, 6),
                backend: i as usize,
                ip,
                spec: spec.clone(),
            },
            Duration::ZERO,
        );
    }
    let step = Duration::from_millis(5);
    let end = Duration::from_secs(60);
    let mut now = Duration::ZERO;
    let mut in_poll = Duration::ZERO;
    let mut max_in_flight = 0;
    let wall = Instant::now();
    while now < end {
        now += step;
        for _ in 0..3 {
            let t = Instant::now();
            let _ = prober.poll(now);
            in_poll += t.elapsed();
            max_in_flight = max_in_flight.max(prober.in_flight());
            router.run();
            server.poll(now);
            router.run();
        }
    }
    let probes: u64 = (0..DIPS as usize)
        .map(|i| prober.health(i).unwrap().probes)
        .sum();
    let up = (0..DIPS as usize)
        .filter(|&i| prober.health(i).unwrap().up)
        .count();
    let failed: u64 = (0..DIPS as usize)
        .map(|i| u64::from(prober.health(i).unwrap().last != Some(Ok(()))))
        .sum();
    println!("simulated 60 s, {DIPS} DIPs, HTTP every 5 s");
    println!(
        "probes completed: {probes} (expected about {})",
        DIPS as u64 * 12
    );
    println!("DIPs up at the end: {up}; last probe not ok: {failed}");
    println!("server requests answered: {}", server.requests);
    println!("max probes in flight: {max_in_flight}");
    println!(
        "prober CPU time: {:.3} s = {:.1}% of one core",
        in_poll.as_secs_f64(),
        in_poll.as_secs_f64() / 60.0 * 100.0
    );
    println!(
        "whole simulation wall time: {:.1} s",
        wall.elapsed().as_secs_f64()
    );
    assert!(up as u32 == DIPS, "every simulated DIP answers 200");
}
