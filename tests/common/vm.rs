//! Real QEMU guests on pollux's `net_vhost` ports (testkit::guest): the
//! configuration of such a pollux, the guests' start in parallel, and what
//! a failing test prints about them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::netns::read;
use std::path::{Path, PathBuf};
use std::time::Duration;
use testkit::guest::{Guest, Nic, Spec};

/// What a guest VM test needs from the machine; false (or a failure under
/// CI) when something is missing.
pub fn required() -> bool {
    testkit::require::root_and(&["qemu-system-x86_64", "apt-get", "dpkg-deb", "taskset"])
}

/// Boot deadline of a guest. Generous: under TCG several guests share one
/// core, and CI machines are slower still.
pub const BOOT: Duration = Duration::from_secs(240);

/// One VM: name (also its pollux port and VM name), vnet, address, MAC,
/// security group (or none), memory in MiB.
#[derive(Clone, Copy)]
pub struct Vm {
    pub name: &'static str,
    pub vnet: &'static str,
    pub ip: &'static str,
    pub mac: &'static str,
    pub nsg: Option<&'static str>,
    pub memory_mb: u32,
}

/// A client guest of vnet a.
pub const CLIENT: Vm = Vm {
    name: "client",
    vnet: "a",
    ip: "10.1.0.20",
    mac: "02:00:00:00:00:20",
    nsg: None,
    memory_mb: 160,
};

/// A web guest of vnet a, in no security group.
pub const WEB1: Vm = Vm {
    name: "web1",
    vnet: "a",
    ip: "10.1.0.4",
    mac: "02:00:00:00:00:04",
    nsg: None,
    memory_mb: 224,
};

/// The vhost-user socket of VM `name` in `dir`.
pub fn socket(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.vu"))
}

/// Removes DPDK's runtime directory of pollux's file prefix at the end.
pub struct DpdkDir(pub String);

impl Drop for DpdkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.0));
        // A successor's (`pollux run --takeover`): PREFIX-pidN.
        let ours = format!("{}-pid", self.0);
        for e in std::fs::read_dir("/var/run/dpdk")
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&ours) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// pollux's `[dpdk]`, `[dataplane]`, ports, and `[[vm]]` sections for
/// `vms` (`net_vhost` ports in client mode with `queues` queue pairs, EAL
/// on core 1 without huge pages); the caller adds vnets, groups, VIPs.
pub fn config(dir: &Path, prefix: &str, workers: usize, queues: u16, vms: &[Vm]) -> String {
    let cores = if workers > 1 { "0-1" } else { "1" };
    let mut c = format!(
        "[dataplane]\nworkers = {workers}\n[dpdk]\neal_args = [\"--no-huge\", \"--no-pci\", \"-m\", \"512\", \"-l\", \"{cores}\", \"--log-level=error\", \"--file-prefix={prefix}\"]\n"
    );
    for (i, vm) in vms.iter().enumerate() {
        c += &format!(
            "[[port]]\nname = \"{}\"\ndriver = \"dpdk\"\ndevargs = \"net_vhost{i},iface={},client=1,queues={queues}\"\n",
            vm.name,
            socket(dir, vm.name).display()
        );
    }
    c + &vm_sections(vms)
}

/// The `[[vm]]` sections of `vms`, each on the port of its name.
fn vm_sections(vms: &[Vm]) -> String {
    let mut c = String::new();
    for vm in vms {
        c += &format!(
            "[[vm]]\nname = \"{}\"\nport = \"{}\"\nvnet = \"{}\"\nmac = \"{}\"\nips = [\"{}\"]\n",
            vm.name, vm.name, vm.vnet, vm.mac, vm.ip
        );
        if let Some(n) = vm.nsg {
            c += &format!("nsg = \"{n}\"\n");
        }
    }
    c
}

/// pollux's ports and `[[vm]]` sections for `vms` on pollux's own
/// vhost-user ports (`driver = "vhost_user"`, one queue pair, one worker,
/// no DPDK); the caller adds vnets, groups, VIPs.
pub fn own_config(dir: &Path, vms: &[Vm]) -> String {
    let mut c = String::new();
    for vm in vms {
        c += &format!(
            "[[port]]\nname = \"{}\"\ndriver = \"vhost_user\"\nsocket = \"{}\"\n",
            vm.name,
            socket(dir, vm.name).display()
        );
    }
    c + &vm_sections(vms)
}

/// Starts a QEMU guest for each VM with `cpus` virtual CPUs and a NIC of
/// `queues` queue pairs, with a default route through 10.1.0.1. They run
/// once pollux connects.
pub fn start(dir: &Path, vms: &[Vm], queues: u16, cpus: u32) -> Vec<Guest> {
    vms.iter()
        .map(|vm| {
            let nic = Nic::new(socket(dir, vm.name), vm.mac, &format!("{}/16", vm.ip))
                .gateway("10.1.0.1")
                .queues(queues);
            // Guests of one CPU stay off the core pollux's single worker
            // polls; guests of two share both cores with two workers.
            let host = if cpus > 1 { "0-1" } else { "0" };
            let spec = Spec::new(vm.name)
                .memory(vm.memory_mb)
                .cpus(cpus)
                .host_cpus(host)
                .nic(nic);
            Guest::start(dir, spec).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

/// Waits for every guest to answer on its channel; on failure says what
/// pollux logged.
pub fn wait_all(guests: &mut [Guest], pollux_log: &Path) {
    for g in guests.iter_mut() {
        if let Err(e) = g.wait_ready(BOOT) {
            panic!("{e}\n--- pollux ---\n{}", read(pollux_log));
        }
    }
}

/// The guest named `name`.
pub fn guest<'a>(guests: &'a mut [Guest], name: &str) -> &'a mut Guest {
    guests.iter_mut().find(|g| g.spec.name == name).unwrap()
}

/// Runs `cmd` in `g`; panics (with the guest's console) unless it exits 0.
pub fn ok(g: &mut Guest, cmd: &str, secs: u64) -> String {
    g.ok(cmd, Duration::from_secs(secs))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Hits of rule `rule` of group `nsg` in a `/v1/counters` answer.
pub fn rule_hits(v: &serde_json::Value, nsg: &str, rule: &str) -> u64 {
    v["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["nsg"] == nsg && r["rule"] == rule))
        .and_then(|r| r["hits"].as_u64())
        .unwrap_or(0)
}

/// pollux's log and each guest's console tail, for failure messages.
pub fn context(dir: &Path, guests: &[Guest]) -> String {
    let mut s = String::new();
    for name in ["pollux", "pollux2"] {
        let log = dir.join(format!("{name}.log"));
        if log.exists() {
            s += &format!("--- {name} ---\n{}\n", read(&log));
        }
    }
    for g in guests {
        s += &format!(
            "\n--- {} console ---\n{}",
            g.spec.name,
            g.console_tail(1500)
        );
    }
    s
}

/// The path of host program `name` on `PATH` (iproute2's `ip`, which
/// does what busybox's does not, `ethtool`), for a guest's image: in the
/// guest it is `/usr/local/bin/NAME`.
pub fn host_tool(name: &str) -> String {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .map_or_else(|| name.to_string(), |p| p.display().to_string())
}

/// Starts a one-CPU QEMU guest for each VM, on host CPU 0, that reboots
/// rather than stops when its kernel restarts (the tests reboot them).
pub fn start_rebootable(dir: &Path, vms: &[Vm]) -> Vec<Guest> {
    vms.iter()
        .map(|v| {
            let nic =
                Nic::new(socket(dir, v.name), v.mac, &format!("{}/16", v.ip)).gateway("10.1.0.1");
            let spec = Spec::new(v.name)
                .memory(v.memory_mb)
                .host_cpus("0")
                .nic(nic)
                .rebootable();
            Guest::start(dir, spec).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

/// Port `name` of a `/v1/counters` answer (null if absent).
pub fn port_of<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// Port `name`'s link ("up", "down") and how often it changed.
pub fn link(v: &serde_json::Value, name: &str) -> (String, u64) {
    let p = port_of(v, name);
    (
        p["link"].as_str().unwrap_or("").to_string(),
        p["link_changes"].as_u64().unwrap_or(0),
    )
}

/// Port `name`'s drops for `reason`.
pub fn port_drops(v: &serde_json::Value, name: &str, reason: &str) -> u64 {
    port_of(v, name)["drops"][reason].as_u64().unwrap_or(0)
}

/// Pings `to` from `from` until one gets through (a link just back may
/// lose the first).
pub fn reachable(from: &mut Guest, to: &str) {
    let o = ok(
        from,
        &format!("for i in $(seq 30); do ping -c 1 -W 2 {to} >/dev/null && echo ok && break; done"),
        120,
    );
    assert!(
        o.contains("ok"),
        "{to} unreachable from {}: {o}",
        from.spec.name
    );
}

/// Reboots guest `name` and waits for its port's link to go down and come
/// up again (counted).
pub fn reboot_relinked(
    api: &super::api::Api,
    guests: &mut [Guest],
    name: &str,
    ctx: impl Fn(&[Guest]) -> String,
) {
    let (_, changes) = link(&api.get("/v1/counters").unwrap(), name);
    let g = guest(guests, name);
    let old = g.boot_id.clone();
    g.start_command("reboot -f")
        .unwrap_or_else(|e| panic!("{e}"));
    g.wait_rebooted(&old, BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        &format!("{name}'s link down and up again"),
        |v| {
            let (l, n) = link(v, name);
            l == "up" && n >= changes + 2
        },
        || ctx(guests),
    );
}

/// Kills guest `name`'s QEMU and waits for its port's link to go down;
/// then `from` cannot reach `ip`, and what pollux had for `name` is
/// counted `link_down`. Returns the killed guest's boot id.
pub fn kill_unreachable(
    api: &super::api::Api,
    guests: &mut [Guest],
    name: &str,
    from: &str,
    ip: &str,
    ctx: impl Fn(&[Guest]) -> String,
) -> String {
    let g = guest(guests, name);
    let before = g.boot_id.clone();
    g.kill();
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        &format!("{name}'s link down"),
        |v| link(v, name).0 == "down",
        || ctx(guests),
    );
    let o = guest(guests, from)
        .run(&format!("ping -c 3 -W 1 {ip}"), Duration::from_secs(20))
        .unwrap();
    assert_ne!(
        o.status, 0,
        "{name} answered while its QEMU was gone: {o:?}"
    );
    // The ARP for it is answered by pollux; the pings reach the switch and
    // find its link down.
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(30),
        &format!("link_down drops on {name}"),
        |v| port_drops(v, name, "link_down") > 0,
        || ctx(guests),
    );
    before
}

/// Starts guest `name`'s QEMU again (killed with `kill_unreachable`, boot
/// id `before`) and waits for its port's link to come up.
pub fn restart_relinked(
    api: &super::api::Api,
    guests: &mut [Guest],
    name: &str,
    before: &str,
    ctx: impl Fn(&[Guest]) -> String,
) {
    let g = guest(guests, name);
    g.restart().unwrap_or_else(|e| panic!("{e}"));
    g.wait_rebooted(before, BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    api.wait_for(
        "/v1/counters",
        Duration::from_secs(60),
        &format!("{name}'s link up after its QEMU restarted"),
        |v| link(v, name).0 == "up",
        || ctx(guests),
    );
}
