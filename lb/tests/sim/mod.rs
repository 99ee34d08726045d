//! Simulated network for prober tests and the prober benchmark: a router that
//! answers every ARP request with the gateway MAC and forwards IPv4 by
//! destination address (as the switch does), and HTTP servers on smoltcp.
#![allow(dead_code)]

use dataplane::pool::{HugePages, Pool, PoolBuf, PoolConfig};
use dataplane::port::ring::{self, RingPort};
use dataplane::wire::{MacAddr, arp};
use dataplane::{Batch, L3, LinkInfo, PacketBuf, Port, parse, rewrite};
use lb::probe::device::PortDevice;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use std::cell::Cell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::Duration;

pub fn sinstant(t: Duration) -> SInstant {
    SInstant::from_micros(t.as_micros() as i64)
}

pub const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// The gateway address on the prober's side (the switch answers ARP for it).
pub const PROBE_GW: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 1);
pub const GW_MAC: MacAddr = MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);

/// A pool of 8192 normal-page buffers.
pub fn pool(name: &str) -> Pool {
    let mut cfg = PoolConfig::new(name, 8192);
    cfg.huge = HugePages::Never;
    Pool::new(&cfg).unwrap()
}

/// The switch in miniature: answers every ARP request with the gateway MAC
/// and forwards IPv4 by destination address (exact host, else a prefix).
pub struct Router {
    ports: Vec<RingPort<PoolBuf>>,
    hosts: HashMap<Ipv4Addr, (usize, MacAddr)>,
    prefixes: Vec<(u32, u32, usize, MacAddr)>,
}

impl Router {
    pub fn new() -> Self {
        Router {
            ports: Vec::new(),
            hosts: HashMap::new(),
            prefixes: Vec::new(),
        }
    }

    /// Adds a host port; returns the host-side end.
    pub fn attach(&mut self, ip: Ipv4Addr, mac: MacAddr) -> RingPort<PoolBuf> {
        let (host, sw) = ring::pair(
            LinkInfo::new(&format!("h-{ip}"), mac, "ring"),
            LinkInfo::new(&format!("sw-{ip}"), GW_MAC, "ring"),
            4096,
        );
        self.hosts.insert(ip, (self.ports.len(), mac));
        self.ports.push(sw);
        host
    }

    /// Adds a port that receives a whole prefix.
    pub fn attach_prefix(&mut self, net: Ipv4Addr, len: u32, mac: MacAddr) -> RingPort<PoolBuf> {
        let (host, sw) = ring::pair(
            LinkInfo::new("h-prefix", mac, "ring"),
            LinkInfo::new("sw-prefix", GW_MAC, "ring"),
            65536,
        );
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        self.prefixes
            .push((u32::from(net) & mask, mask, self.ports.len(), mac));
        self.ports.push(sw);
        host
    }

    pub fn run(&mut self) -> usize {
        let mut moved = 0;
        for i in 0..self.ports.len() {
            let mut rx = Batch::new();
            self.ports[i].rx_burst(&mut rx);
            for mut pkt in rx.drain() {
                let Ok(p) = parse(pkt.data(), i as u16) else {
                    continue;
                };
                match p.l3 {
                    L3::Arp => {
                        let l3 = usize::from(p.l3_off);
                        let a = arp::Packet::new_checked(&pkt.data()[l3..]).unwrap();
                        if a.operation() != arp::OP_REQUEST {
                            continue;
                        }
                        rewrite::arp_reply(pkt.data_mut(), &p, GW_MAC).unwrap();
                        let mut b = Batch::new();
                        b.push(pkt).unwrap();
                        self.ports[i].tx_burst(&mut b);
                    }
                    L3::Ipv4 => {
                        let Some(IpAddr::V4(dst)) = Some(p.key.dst()) else {
                            continue;
                        };
                        let out = self.hosts.get(&dst).copied().or_else(|| {
                            self.prefixes
                                .iter()
                                .find(|(n, m, _, _)| u32::from(dst) & m == *n)
                                .map(|&(_, _, port, mac)| (port, mac))
                        });
                        let Some((port, mac)) = out else { continue };
                        let f = pkt.data_mut();
                        rewrite::set_dst_mac(f, mac).unwrap();
                        rewrite::set_src_mac(f, GW_MAC).unwrap();
                        let mut b = Batch::new();
                        b.push(pkt).unwrap();
                        moved += self.ports[port].tx_burst(&mut b);
                    }
                    _ => {}
                }
            }
        }
        moved
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Behavior {
    Ok,
    Status(u16),
    /// Accepts, reads the request, never answers.
    Silent,
    /// Accepts, reads the request, resets.
    Reset,
    /// Answers with something that is not HTTP.
    Garbage,
    /// Three requests answered 200, three 500, and so on.
    Flap,
    /// No listener: the SYN gets a RST.
    Refuse,
}

/// An HTTP server on its own smoltcp stack.
pub struct Server {
    iface: Interface,
    dev: PortDevice<RingPort<PoolBuf>>,
    sockets: SocketSet<'static>,
    listeners: Vec<SocketHandle>,
    pub behavior: Rc<Cell<Behavior>>,
    pub requests: u32,
}

impl Server {
    pub fn new(
        port: RingPort<PoolBuf>,
        pool: Pool,
        ip: Ipv4Addr,
        any_ip: bool,
        behavior: Behavior,
        now: Duration,
    ) -> Self {
        let mac = port.info().mac;
        let mut dev = PortDevice::new(port, pool);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(EthernetAddress(mac.0))),
            &mut dev,
            sinstant(now),
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(ip), 16)).unwrap();
        });
        iface.routes_mut().add_default_ipv4_route(GW_IP).unwrap();
        if any_ip {
            // Accept every 10.2.0.0/16 address: many simulated DIPs, one stack.
            iface.set_any_ip(true);
            iface.routes_mut().update(|r| {
                r.push(smoltcp::iface::Route {
                    cidr: IpCidr::new(IpAddress::v4(10, 2, 0, 0), 16),
                    via_router: IpAddress::Ipv4(ip),
                    preferred_until: None,
                    expires_at: None,
                })
                .unwrap();
            });
        }
        let mut sockets = SocketSet::new(Vec::new());
        let mut listeners = Vec::new();
        if behavior != Behavior::Refuse {
            for _ in 0..if any_ip { 256 } else { 4 } {
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; 2048]),
                    tcp::SocketBuffer::new(vec![0; 2048]),
                );
                s.listen(80).unwrap();
                listeners.push(sockets.add(s));
            }
        }
        Server {
            iface,
            dev,
            sockets,
            listeners,
            behavior: Rc::new(Cell::new(behavior)),
            requests: 0,
        }
    }

    pub fn poll(&mut self, now: Duration) {
        self.iface
            .poll(sinstant(now), &mut self.dev, &mut self.sockets);
        for &h in &self.listeners {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match s.state() {
                tcp::State::Closed | tcp::State::TimeWait => {
                    s.abort();
                    s.listen(80).unwrap();
                }
                tcp::State::Established => {
                    let mut buf = [0u8; 1024];
                    let n = s.peek_slice(&mut buf).unwrap_or(0);
                    if !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    s.recv_slice(&mut buf).unwrap();
                    self.requests += 1;
                    let b = self.behavior.get();
                    let b = match b {
                        Behavior::Flap if (self.requests - 1) % 6 < 3 => Behavior::Ok,
                        Behavior::Flap => Behavior::Status(500),
                        other => other,
                    };
                    match b {
                        Behavior::Ok => {
                            s.send_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").unwrap();
                            s.close();
                        }
                        Behavior::Status(c) => {
                            s.send_slice(format!("HTTP/1.1 {c} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
                            s.close();
                        }
                        Behavior::Garbage => {
                            s.send_slice(b"hello there\r\n").unwrap();
                            s.close();
                        }
                        Behavior::Reset => s.abort(),
                        Behavior::Silent | Behavior::Flap | Behavior::Refuse => {}
                    }
                }
                _ => {}
            }
        }
        self.iface
            .poll(sinstant(now), &mut self.dev, &mut self.sockets);
        self.dev.flush();
    }
}

/// A prober at 168.63.129.16/24 (gateway 168.63.129.1) attached to `router`.
pub fn prober(router: &mut Router, pool: Pool, seed: u64) -> lb::probe::Prober<RingPort<PoolBuf>> {
    let src = lb::probe::DEFAULT_SOURCE;
    let mac = MacAddr([2, 0, 0, 0, 0, 0xfe]);
    let port = router.attach(src, mac);
    let cfg = lb::probe::ProberConfig {
        source: src,
        prefix_len: 24,
        mac: mac.0,
        gateway: PROBE_GW,
        seed,
    };
    lb::probe::Prober::new(PortDevice::new(port, pool), &cfg, Duration::ZERO)
}
