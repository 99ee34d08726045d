//! Health probes against real TCP stacks: HTTP servers on smoltcp behind ring
//! ports, a small router in between (answering ARP for the gateway and
//! forwarding by destination IP, as the switch does), all driven in simulated
//! time so every run is the same.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod sim;

use dataplane::pool::{Pool, PoolBuf};
use dataplane::port::ring::RingPort;
use dataplane::wire::MacAddr;
use lb::probe::{FailReason, HealthChange, ProbeKind, ProbeSpec, Prober, Target};
use lb::{Backend, Vip, VipConfig, Vips};
use sim::{Behavior, Router, Server, pool};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::Duration;

struct World {
    router: Router,
    prober: Prober<RingPort<PoolBuf>>,
    servers: Vec<Server>,
    now: Duration,
    changes: Vec<(Duration, HealthChange, u64)>,
}

impl World {
    fn new(pool: Pool) -> Self {
        let mut router = Router::new();
        let prober = sim::prober(&mut router, pool, 7);
        World {
            router,
            prober,
            servers: Vec::new(),
            now: Duration::ZERO,
            changes: Vec::new(),
        }
    }

    fn server(&mut self, pool: Pool, ip: Ipv4Addr, b: Behavior) -> Rc<Cell<Behavior>> {
        let mac = MacAddr([2, 0, 0, 0, 1, ip.octets()[3]]);
        let port = self.router.attach(ip, mac);
        let s = Server::new(port, pool, ip, false, b, self.now);
        let h = s.behavior.clone();
        self.servers.push(s);
        h
    }

    fn run_for(&mut self, d: Duration, step: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += step;
            for _ in 0..4 {
                for c in self.prober.poll(self.now) {
                    let probes = self.prober.health(c.target).unwrap().probes;
                    self.changes.push((self.now, c, probes));
                }
                self.router.run();
                for s in &mut self.servers {
                    s.poll(self.now);
                }
                self.router.run();
            }
        }
    }
}

fn http(port: u16, threshold: u32) -> ProbeSpec {
    ProbeSpec {
        kind: ProbeKind::Http {
            path: "/health".into(),
        },
        port,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        threshold,
    }
}

/// Backends on port 8080 of `ips`, weight 1.
fn backends_8080(ips: &[Ipv4Addr]) -> Vec<Backend> {
    ips.iter()
        .map(|ip| Backend {
            ip: IpAddr::V4(*ip),
            port: 8080,
            weight: 1,
        })
        .collect()
}

fn target(ip: Ipv4Addr, spec: ProbeSpec, backend: usize) -> Target {
    Target {
        vip: ("10.1.0.100".parse().unwrap(), 80, 6),
        backend,
        ip,
        spec,
    }
}

#[test]
fn each_server_ends_in_the_right_state_with_the_right_reason() {
    let pool = pool("probe-states");
    let mut w = World::new(pool);
    let cases = [
        (Ipv4Addr::new(10, 1, 0, 10), Behavior::Ok),
        (Ipv4Addr::new(10, 1, 0, 11), Behavior::Status(500)),
        (Ipv4Addr::new(10, 1, 0, 12), Behavior::Silent),
        (Ipv4Addr::new(10, 1, 0, 13), Behavior::Reset),
        (Ipv4Addr::new(10, 1, 0, 14), Behavior::Garbage),
        (Ipv4Addr::new(10, 1, 0, 15), Behavior::Flap),
        (Ipv4Addr::new(10, 1, 0, 16), Behavior::Refuse),
    ];
    for (i, &(ip, b)) in cases.iter().enumerate() {
        w.server(pool, ip, b);
        w.prober.add(target(ip, http(80, 2), i), Duration::ZERO);
    }
    // A TCP probe: success on a listening server, rst on a refusing one.
    let tcp = |ip| {
        target(
            ip,
            ProbeSpec {
                kind: ProbeKind::Tcp,
                ..http(80, 2)
            },
            9,
        )
    };
    let t_ok = w
        .prober
        .add(tcp(Ipv4Addr::new(10, 1, 0, 10)), Duration::ZERO);
    let t_refused = w
        .prober
        .add(tcp(Ipv4Addr::new(10, 1, 0, 16)), Duration::ZERO);
    // And a DIP nobody answers for at all (the router has no route to it).
    let t_gone = w.prober.add(
        target(Ipv4Addr::new(10, 1, 0, 99), http(80, 2), 8),
        Duration::ZERO,
    );

    w.run_for(Duration::from_secs(20), Duration::from_millis(5));

    let h = |i: usize| w.prober.health(i).unwrap().clone();
    assert!(h(0).up, "{:?}", h(0));
    assert_eq!(h(0).reason(), "ok");
    assert!(h(0).rtt.is_some());
    assert!(h(0).probes >= 18, "one probe per interval: {}", h(0).probes);
    for (i, want) in [
        (1, FailReason::Http(500)),
        (2, FailReason::Timeout),
        (3, FailReason::Rst),
        (4, FailReason::BadResponse),
        (6, FailReason::Rst),
    ] {
        let d = h(i);
        assert!(!d.up, "target {i}: {d:?}");
        assert_eq!(d.last, Some(Err(want)), "target {i}: {d:?}");
        assert!(d.probes >= 18, "target {i}: {d:?}");
    }
    assert_eq!(h(1).reason(), "http 500");
    assert_eq!(h(2).reason(), "timeout");
    assert_eq!(h(4).reason(), "bad response");
    assert!(h(t_ok).up);
    assert!(!h(t_refused).up);
    assert_eq!(h(t_refused).reason(), "rst");
    assert!(!h(t_gone).up);
    assert_eq!(h(t_gone).reason(), "timeout");
    // Never-up DIPs never produced a change.
    for i in [1, 2, 3, 4, 6, t_refused, t_gone] {
        assert!(
            w.changes.iter().all(|(_, c, _)| c.target != i),
            "target {i}"
        );
    }
    // The flapping server (3 x 200, 3 x 500, ...) with threshold 2: up at its
    // first success, down at the 2nd failure (probe 5), up at the 2nd success
    // after that (probe 8), down at probe 11, up at 14, ...
    let flap: Vec<(u64, bool)> = w
        .changes
        .iter()
        .filter(|(_, c, _)| c.target == 5)
        .map(|(_, c, n)| (*n, c.up))
        .collect();
    assert!(flap.len() >= 5, "{flap:?}");
    for (k, &(n, up)) in flap.iter().enumerate() {
        let want = if k == 0 { 1 } else { 2 + 3 * k as u64 };
        assert_eq!((n, up), (want, k % 2 == 0), "change {k}: {flap:?}");
    }
    let downs: Vec<&str> = w
        .changes
        .iter()
        .filter(|(_, c, _)| c.target == 5 && !c.up)
        .map(|(_, c, _)| c.reason.as_str())
        .collect();
    assert!(downs.iter().all(|r| *r == "http 500"), "{downs:?}");
    // Probes of one DIP are spaced by the interval with jitter (0.9 to 1.1 s).
    let ups: Vec<Duration> = w
        .changes
        .iter()
        .filter(|(_, c, _)| c.target == 5)
        .map(|(t, _, _)| *t)
        .collect();
    let gap = ups[1] - ups[0];
    assert!(
        gap >= Duration::from_millis(3 * 900 - 100) && gap <= Duration::from_millis(4 * 1100 + 100),
        "{gap:?}"
    );
}

#[test]
fn a_failing_dip_leaves_the_maglev_table_and_comes_back() {
    let pool = pool("probe-maglev");
    let mut w = World::new(pool);
    let ips = [
        Ipv4Addr::new(10, 1, 0, 20),
        Ipv4Addr::new(10, 1, 0, 21),
        Ipv4Addr::new(10, 1, 0, 22),
    ];
    let mut knobs = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        knobs.push(w.server(pool, *ip, Behavior::Ok));
        w.prober.add(target(*ip, http(80, 3), i), Duration::ZERO);
    }
    let backends = backends_8080(&ips);
    let mut vips = Vips::new();
    // Probed DIPs start down.
    vips.insert(
        Vip::new(
            VipConfig::new("web", "10.1.0.100".parse().unwrap(), 80, 6, backends),
            &[false; 3],
        )
        .unwrap(),
    );
    let share = |vips: &Vips, b: u16| {
        vips.get("10.1.0.100".parse().unwrap(), 80, 6)
            .unwrap()
            .backends()
            .table()
            .share(b)
    };
    let mut applied = 0;
    let mut apply = |w: &World, vips: &mut Vips| {
        for (_, c, _) in &w.changes[applied..] {
            vips.set_health(c.vip, c.backend, c.up).unwrap();
        }
        applied = w.changes.len();
    };
    w.run_for(Duration::from_secs(3), Duration::from_millis(5));
    apply(&w, &mut vips);
    assert!((0..3).all(|b| share(&vips, b) > 20000), "all three up");

    // DIP 1 starts failing: it leaves after exactly 3 failed probes.
    knobs[1].set(Behavior::Status(503));
    let probes_before = w.prober.health(1).unwrap().probes;
    w.run_for(Duration::from_secs(6), Duration::from_millis(5));
    apply(&w, &mut vips);
    assert_eq!(share(&vips, 1), 0);
    assert!(share(&vips, 0) + share(&vips, 2) == 65537);
    let down = w
        .changes
        .iter()
        .find(|(_, c, _)| c.backend == 1 && !c.up)
        .unwrap();
    assert_eq!(down.2, probes_before + 3, "down on the 3rd failure");
    assert_eq!(down.1.reason, "http 503");

    // It recovers: back after exactly 3 successful probes.
    knobs[1].set(Behavior::Ok);
    let probes_before = w.prober.health(1).unwrap().probes;
    w.run_for(Duration::from_secs(6), Duration::from_millis(5));
    apply(&w, &mut vips);
    assert!(share(&vips, 1) > 20000);
    let up = w
        .changes
        .iter()
        .rev()
        .find(|(_, c, _)| c.backend == 1 && c.up)
        .unwrap();
    assert_eq!(up.2, probes_before + 3, "up on the 3rd success");
}

#[test]
fn a_retired_target_is_no_longer_probed_and_its_results_are_ignored() {
    let pool = pool("probe-retire");
    let mut w = World::new(pool);
    let ok = Ipv4Addr::new(10, 1, 0, 10);
    w.server(pool, ok, Behavior::Ok);
    // Two targets on a healthy server; one retired before its first probe
    // (its first is at a random point of the first interval).
    let a = w.prober.add(target(ok, http(80, 2), 0), Duration::ZERO);
    let b = w.prober.add(target(ok, http(80, 2), 1), Duration::ZERO);
    w.prober.retire(a);
    assert!(!w.prober.is_active(a) && w.prober.is_active(b));
    w.run_for(Duration::from_secs(5), Duration::from_millis(5));
    assert_eq!(w.prober.health(a).unwrap().probes, 0);
    assert!(w.prober.health(b).unwrap().up);
    assert!(w.changes.iter().any(|(_, c, _)| c.target == b && c.up));
    assert!(
        w.changes.iter().all(|(_, c, _)| c.target != a),
        "{:?}",
        w.changes
    );
    // Retired while probed: at most the probe in flight completes, and its
    // result is not counted.
    let probes_b = w.prober.health(b).unwrap().probes;
    w.prober.retire(b);
    w.run_for(Duration::from_secs(5), Duration::from_millis(5));
    assert_eq!(w.prober.health(b).unwrap().probes, probes_b);
    // A new target for the same DIP is probed from scratch.
    let c = w.prober.add(target(ok, http(80, 2), 0), Duration::ZERO);
    w.run_for(Duration::from_secs(5), Duration::from_millis(5));
    assert!(w.prober.is_active(c) && w.prober.health(c).unwrap().up);
}

/// The health service: a vnet's prober with typed targets, each change
/// applied to its VIP in place (same `Vip`, its next backend set), targets
/// synced to what is wanted, and changes for a VIP that went away named.
#[test]
fn the_health_service_applies_changes_to_its_vip_in_place() {
    use lb::health::{HealthError, HealthService, ProbeTarget};
    use std::sync::Arc;
    let pool = pool("probe-service");
    let mut router = Router::new();
    let mut service: HealthService<RingPort<PoolBuf>, Pool> = HealthService::new();
    service.add_vnet("a", sim::prober(&mut router, pool, 9));
    let ips = [Ipv4Addr::new(10, 1, 0, 30), Ipv4Addr::new(10, 1, 0, 31)];
    let mut servers = Vec::new();
    let mut knobs = Vec::new();
    for ip in ips {
        let port = router.attach(ip, MacAddr([2, 0, 0, 0, 1, ip.octets()[3]]));
        let s = Server::new(port, pool, ip, false, Behavior::Ok, Duration::ZERO);
        knobs.push(s.behavior.clone());
        servers.push(s);
    }
    let frontend = ("10.1.0.100".parse().unwrap(), 80, 6);
    let backends = backends_8080(&ips);
    let mut vips = Vips::new();
    // Probed backends start down.
    let vip = vips.insert(
        Vip::new(
            VipConfig::new("web", frontend.0, 80, 6, backends),
            &[false; 2],
        )
        .unwrap(),
    );
    let target = |ip: Ipv4Addr, vnet: &str| ProbeTarget {
        vnet: vnet.into(),
        vip: "web".into(),
        frontend,
        backend: (ip, 8080),
        spec: http(80, 2),
    };
    let want = [(target(ips[0], "a"), 0), (target(ips[1], "a"), 1)];
    service.sync(&want, Duration::ZERO).unwrap();
    let now = Cell::new(Duration::ZERO);
    let mut run =
        |service: &mut HealthService<RingPort<PoolBuf>, Pool>, vips: Option<&Vips>, d: Duration| {
            let mut applied = Vec::new();
            let end = now.get() + d;
            while now.get() < end {
                now.set(now.get() + Duration::from_millis(5));
                for _ in 0..4 {
                    applied.extend(service.poll(now.get(), |n| vips.filter(|_| n == "a")));
                    router.run();
                    for s in &mut servers {
                        s.poll(now.get());
                    }
                    router.run();
                }
            }
            applied
        };
    // Both come up: two changes, applied to the same VIP, in place.
    let applied = run(&mut service, Some(&vips), Duration::from_secs(4));
    assert_eq!(applied.len(), 2, "{applied:?}");
    assert!(applied.iter().all(|a| a.up && matches!(a.result, Ok(true))));
    assert_eq!(vip.health(), [true, true]);
    assert_eq!(vip.epoch(), 2);
    assert!(Arc::ptr_eq(&vip, vips.get(frontend.0, 80, 6).unwrap()));
    assert_eq!(service.states().count(), 2);
    // One fails its probes: it leaves the VIP's table, with the reason.
    knobs[0].set(Behavior::Status(500));
    let applied = run(&mut service, Some(&vips), Duration::from_secs(4));
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert_eq!(
        applied[0].target.name(),
        "vip \"web\" backend 10.1.0.30:8080"
    );
    assert_eq!(
        (applied[0].up, applied[0].reason.as_str()),
        (false, "http 500")
    );
    assert_eq!(vip.health(), [false, true]);
    assert_eq!(vip.backends().table().share(0), 0);
    // A successor's service, synced to the same targets, restores what
    // this one learnt: its VIP (all down, as probed backends start) gets
    // the same health at once, and each target its probes and reason.
    let saved = service.export();
    assert_eq!(saved.len(), 2);
    let text = serde_json::to_string(&saved).unwrap();
    let saved: Vec<lb::health::HealthRecord> = serde_json::from_str(&text).unwrap();
    let mut next: HealthService<RingPort<PoolBuf>, Pool> = HealthService::new();
    next.add_vnet("a", sim::prober(&mut Router::new(), pool, 10));
    next.sync(&want, Duration::ZERO).unwrap();
    let mut vips2 = Vips::new();
    let vip2 = vips2.insert(
        Vip::new(
            VipConfig::new("web", frontend.0, 80, 6, backends_8080(&ips)),
            &[false; 2],
        )
        .unwrap(),
    );
    assert_eq!(next.restore(&saved, |n| (n == "a").then_some(&vips2)), 2);
    assert_eq!(vip2.health(), [false, true]);
    let before: Vec<(String, bool, u64, String)> = service
        .states()
        .map(|(t, h)| (t.name(), h.up, h.probes, h.reason()))
        .collect();
    let after: Vec<(String, bool, u64, String)> = next
        .states()
        .map(|(t, h)| (t.name(), h.up, h.probes, h.reason()))
        .collect();
    assert_eq!(after, before);
    // Synced to the second backend only: the first is no longer probed.
    service.sync(&want[1..], now.get()).unwrap();
    let probed: Vec<String> = service.states().map(|(t, _)| t.name()).collect();
    assert_eq!(probed, ["vip \"web\" backend 10.1.0.31:8080"]);
    // A change for a VIP that is gone is named, not applied.
    knobs[1].set(Behavior::Status(503));
    let applied = run(&mut service, None, Duration::from_secs(4));
    assert_eq!(applied.len(), 1, "{applied:?}");
    let e = applied[0].result.as_ref().unwrap_err();
    assert!(matches!(e, HealthError::Gone(_)), "{e}");
    assert_eq!(
        e.to_string(),
        "vip \"web\" backend 10.1.0.31:8080: no longer configured; health change not applied"
    );
    assert_eq!(vip.health(), [false, true], "not applied");
    // A target in a vnet without a prober is refused whole.
    let e = service
        .sync(&[(target(ips[1], "b"), 1)], now.get())
        .unwrap_err();
    assert!(matches!(e, HealthError::NoProber { .. }), "{e}");
    assert_eq!(service.states().count(), 1, "nothing changed");
}
