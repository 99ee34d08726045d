//! # vmsim — in-process VMs
//!
//! Each VM is a smoltcp stack on one end of a ring port pair whose other end
//! is a switch port. Servers answer HTTP GETs with their name (and `/health`
//! with 200, or 500 while `failing`); clients open connections and collect
//! the answers. Used by `pollux demo` and by the switch's tests in
//! `vswitch/tests`. Owns nothing of the switch: it only speaks to ports, as
//! a guest would.
#![forbid(unsafe_code)]

use dataplane::pool::{HugePages, Pool, PoolBuf, PoolConfig};
use dataplane::port::ring::{self, RingPort};
use dataplane::{Batch, LinkInfo, MacAddr, Port};
use lb::probe::device::PortDevice;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Why a VM could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The buffer pool could not be made.
    #[error("pool {name:?}: {source}")]
    Pool {
        /// The pool's name.
        name: String,
        /// Why.
        source: dataplane::pool::PoolError,
    },
    /// The stack refused a setting.
    #[error("vm {vm}: {what}")]
    Stack {
        /// The VM.
        vm: String,
        /// What it refused.
        what: String,
    },
}

/// A pool of 16 384 buffers (normal pages: no privileges needed).
pub fn pool(name: &str) -> Result<Pool, VmError> {
    let mut cfg = PoolConfig::new(name, 16384);
    cfg.huge = HugePages::Never;
    Pool::new(&cfg).map_err(|source| VmError::Pool {
        name: name.to_string(),
        source,
    })
}

/// Packets each way a [`vm_port`] pair holds.
pub const VM_RING: usize = 4096;

/// A VM's port pair: (VM end, switch end), [`VM_RING`] packets each way.
pub fn vm_port(name: &str, mac: MacAddr) -> (RingPort<PoolBuf>, RingPort<PoolBuf>) {
    ring::pair(
        LinkInfo::new(name, mac, "ring"),
        LinkInfo::new(
            &format!("sw-{name}"),
            MacAddr([0x12, 0, 0, 0, 0, 1]),
            "ring",
        ),
        VM_RING,
    )
}

fn now(start: Instant) -> SInstant {
    SInstant::from_micros(start.elapsed().as_micros() as i64)
}

struct Client {
    h: SocketHandle,
    body: Vec<u8>,
    done: bool,
    pending: Option<Vec<u8>>,
}

/// A VM: a smoltcp stack with an optional HTTP server and HTTP clients.
pub struct Vm {
    /// Its name (also what its HTTP server answers with).
    pub name: String,
    iface: Interface,
    dev: PortDevice<RingPort<PoolBuf>>,
    sockets: SocketSet<'static>,
    listeners: Vec<SocketHandle>,
    clients: Vec<Client>,
    /// Requests its server answered.
    pub served: u32,
    /// The client address and port of every request its server answered.
    pub peers: Vec<(Ipv4Addr, u16)>,
    /// When true, the HTTP server answers 500 on /health.
    pub failing: bool,
    next_port: u16,
    start: Instant,
}

impl Vm {
    /// A VM at `ip`/16 with gateway `gw`; `http_port` starts an HTTP server.
    pub fn new(
        name: &str,
        port: RingPort<PoolBuf>,
        pool: Pool,
        ip: Ipv4Addr,
        gw: Ipv4Addr,
        http_port: Option<u16>,
        start: Instant,
    ) -> Result<Self, VmError> {
        let mac = port.info().mac;
        let mut dev = PortDevice::new(port, pool);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(EthernetAddress(mac.0))),
            &mut dev,
            now(start),
        );
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 16));
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(gw)
            .map_err(|e| VmError::Stack {
                vm: name.to_string(),
                what: e.to_string(),
            })?;
        let mut sockets = SocketSet::new(Vec::new());
        let mut listeners = Vec::new();
        if let Some(p) = http_port {
            // Enough listeners for every connection a test opens at once.
            for _ in 0..32 {
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; 4096]),
                    tcp::SocketBuffer::new(vec![0; 4096]),
                );
                s.listen(p).map_err(|e| VmError::Stack {
                    vm: name.to_string(),
                    what: format!("listen {p}: {e}"),
                })?;
                listeners.push(sockets.add(s));
            }
        }
        Ok(Vm {
            name: name.into(),
            iface,
            dev,
            sockets,
            listeners,
            clients: Vec::new(),
            served: 0,
            peers: Vec::new(),
            failing: false,
            next_port: 40000,
            start,
        })
    }

    /// Moves packets and serves/collects HTTP.
    pub fn poll(&mut self) {
        let t = now(self.start);
        self.iface.poll(t, &mut self.dev, &mut self.sockets);
        for &h in &self.listeners {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match s.state() {
                tcp::State::Closed | tcp::State::TimeWait => {
                    let port = s.listen_endpoint().port;
                    s.abort();
                    let _ = s.listen(port);
                }
                tcp::State::Established => {
                    let mut buf = [0u8; 2048];
                    let n = s.peek_slice(&mut buf).unwrap_or(0);
                    if !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    let _ = s.recv_slice(&mut buf);
                    let health = buf[..n].starts_with(b"GET /health");
                    let (code, body) = if health && self.failing {
                        (500, "failing".to_string())
                    } else {
                        (200, self.name.clone())
                    };
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.send_slice(resp.as_bytes());
                    s.close();
                    self.served += 1;
                    if let Some(ep) = s.remote_endpoint()
                        && let IpAddress::Ipv4(a) = ep.addr
                    {
                        self.peers.push((a, ep.port));
                    }
                }
                _ => {}
            }
        }
        for c in &mut self.clients {
            let s = self.sockets.get_mut::<tcp::Socket>(c.h);
            if s.may_send()
                && let Some(req) = c.pending.take()
            {
                let _ = s.send_slice(&req);
            }
            while s.can_recv() {
                let mut buf = [0u8; 2048];
                match s.recv_slice(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => c.body.extend_from_slice(&buf[..n]),
                }
            }
            let closed = matches!(
                s.state(),
                tcp::State::CloseWait
                    | tcp::State::Closed
                    | tcp::State::TimeWait
                    | tcp::State::LastAck
            );
            if closed && !c.done && !c.body.is_empty() {
                c.done = true;
                s.close();
            }
        }
        self.iface.poll(t, &mut self.dev, &mut self.sockets);
        self.dev.flush();
    }

    /// Opens a connection and sends `GET path`; returns its index.
    pub fn get(&mut self, dst: Ipv4Addr, port: u16, path: &str) -> usize {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 8192]),
            tcp::SocketBuffer::new(vec![0; 4096]),
        );
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(40000);
        // Fails only for an unspecified address or port 0: the connection
        // then never opens and `body` stays `None`.
        let _ = s.connect(self.iface.context(), (IpAddress::Ipv4(dst), port), local);
        let req = format!("GET {path} HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n");
        let h = self.sockets.add(s);
        self.clients.push(Client {
            h,
            body: Vec::new(),
            done: false,
            pending: Some(req.into_bytes()),
        });
        self.clients.len() - 1
    }

    /// Opens a connection without sending anything (to test reachability).
    pub fn connect(&mut self, dst: Ipv4Addr, port: u16) -> usize {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 1024]),
            tcp::SocketBuffer::new(vec![0; 1024]),
        );
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(40000);
        // Fails only for an unspecified address or port 0: the connection
        // then never opens and `body` stays `None`.
        let _ = s.connect(self.iface.context(), (IpAddress::Ipv4(dst), port), local);
        let h = self.sockets.add(s);
        self.clients.push(Client {
            h,
            body: Vec::new(),
            done: false,
            pending: None,
        });
        self.clients.len() - 1
    }

    /// The body of a finished response (after the headers), if complete.
    pub fn body(&self, i: usize) -> Option<String> {
        let c = &self.clients[i];
        if !c.done {
            return None;
        }
        let text = String::from_utf8_lossy(&c.body);
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }

    /// Sends raw frames out of the VM's port, beside its stack (to spoof).
    pub fn inject(&mut self, frames: &[Vec<u8>]) {
        let pool = self.dev.pool();
        for chunk in frames.chunks(dataplane::BURST) {
            let mut b = Batch::new();
            for f in chunk {
                if let Ok(buf) = pool.alloc_copy(f) {
                    let _ = b.push(buf);
                }
            }
            self.dev.port_mut().tx_burst(&mut b);
        }
    }

    /// The raw TCP state of client connection `i`.
    pub fn state(&self, i: usize) -> tcp::State {
        self.sockets.get::<tcp::Socket>(self.clients[i].h).state()
    }

    /// Sends `data` on client connection `i` (for long-lived connections).
    pub fn send(&mut self, i: usize, data: &[u8]) -> usize {
        self.sockets
            .get_mut::<tcp::Socket>(self.clients[i].h)
            .send_slice(data)
            .unwrap_or(0)
    }
}

/// Polls every VM until `done` says so or `limit` passes; returns whether done.
pub fn run_until(
    vms: &mut [&mut Vm],
    limit: Duration,
    mut done: impl FnMut(&[&mut Vm]) -> bool,
) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        for v in vms.iter_mut() {
            v.poll();
        }
        if done(vms) {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}
