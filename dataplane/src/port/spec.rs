//! What a port is, as configured ([`PortSpec`], a serde enum tagged by
//! `driver`), and the one place ports are opened from it ([`open`], and
//! [`open_dpdk`] for DPDK devices, whose buffers are mbufs).
//!
//! A switch with several workers gives each worker its own queue of every
//! port: the factory returns one queue per worker where the driver has
//! them (ring handles, an AF_PACKET fanout group, DPDK queues) and a single
//! queue, for worker 0, where it has not (pcap, AF_XDP on queue 0).

use super::pcap::PcapPort;
use super::ring::{self, RingPort};
use super::{LinkInfo, Port, PortError};
use crate::pool::{Pool, PoolBuf};
use crate::wire::MacAddr;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A port's driver and its settings (`driver = "..."` and the keys that
/// driver takes; any other key is an error).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "driver", rename_all = "snake_case", deny_unknown_fields)]
pub enum PortSpec {
    /// An in-memory ring pair; the switch holds one end, the other stays
    /// idle (or is handed to an in-process peer).
    Ring {},
    /// Replays `rx_pcap` into the switch and records what the switch sends
    /// to `tx_pcap` (either may be absent, not both).
    Pcap {
        /// Capture to replay.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rx_pcap: Option<PathBuf>,
        /// Capture to write.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tx_pcap: Option<PathBuf>,
    },
    /// A kernel interface through AF_PACKET (TPACKET_V3 rings).
    AfPacket {
        /// The interface.
        iface: String,
    },
    /// A kernel interface through AF_XDP (queue 0).
    AfXdp {
        /// The interface.
        iface: String,
    },
    /// A VM's virtio-net device over vhost-user, served by pollux itself
    /// (no DPDK): the port connects to the front end's (QEMU's) socket,
    /// and again whenever the front end comes back. One queue pair.
    VhostUser {
        /// The front end's unix socket.
        socket: PathBuf,
    },
    /// A DPDK device: a vdev (`devargs`) or a PCI function (`pci`).
    Dpdk {
        /// Device arguments (`net_vhost0,iface=...`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devargs: Option<String>,
        /// PCI address (`0000:00:04.0`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pci: Option<String>,
    },
}

/// How many queues a driver gives a switch with several workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queues {
    /// One per worker.
    PerWorker,
    /// One, polled by worker 0.
    One,
}

impl PortSpec {
    /// The driver's name, as written in the configuration.
    pub fn driver(&self) -> &'static str {
        match self {
            PortSpec::Ring {} => "ring",
            PortSpec::Pcap { .. } => "pcap",
            PortSpec::AfPacket { .. } => "af_packet",
            PortSpec::AfXdp { .. } => "af_xdp",
            PortSpec::VhostUser { .. } => "vhost_user",
            PortSpec::Dpdk { .. } => "dpdk",
        }
    }

    /// How many queues the driver has.
    pub fn queues(&self) -> Queues {
        match self {
            PortSpec::Pcap { .. } | PortSpec::AfXdp { .. } | PortSpec::VhostUser { .. } => {
                Queues::One
            }
            _ => Queues::PerWorker,
        }
    }

    /// True for DPDK devices (opened through the EAL, with mbufs).
    pub fn is_dpdk(&self) -> bool {
        matches!(self, PortSpec::Dpdk { .. })
    }

    /// The device of a `dpdk` port: its devargs, else its PCI address.
    pub fn dpdk_device(&self) -> Option<&str> {
        match self {
            PortSpec::Dpdk { devargs, pci } => devargs.as_deref().or(pci.as_deref()),
            _ => None,
        }
    }

    /// The PCI address of a `dpdk` port's device when it is a PCI
    /// function (given as `pci`, or as devargs with driver options), in
    /// the full lower-case form `dddd:bb:dd.f`.
    pub fn pci_address(&self) -> Option<String> {
        let name = self.dpdk_device()?.split(',').next()?;
        pci_address(name)
    }

    /// Every problem of the settings themselves (what serde's types do not
    /// say: empty names, a pcap port with no file), naming `port`.
    pub fn problems(&self, port: &str) -> Vec<PortError> {
        let bad = |reason: String| PortError::BadConfig {
            port: port.to_string(),
            reason,
        };
        let empty = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
        match self {
            PortSpec::Ring {} => vec![],
            PortSpec::Pcap { rx_pcap, tx_pcap } if rx_pcap.is_none() && tx_pcap.is_none() => {
                vec![bad("a pcap port needs rx_pcap, tx_pcap or both".into())]
            }
            PortSpec::Pcap { .. } => vec![],
            PortSpec::AfPacket { iface } | PortSpec::AfXdp { iface } if iface.is_empty() => {
                vec![bad(format!("an {} port needs iface", self.driver()))]
            }
            PortSpec::AfPacket { .. } | PortSpec::AfXdp { .. } => vec![],
            PortSpec::VhostUser { socket } if socket.as_os_str().is_empty() => {
                vec![bad("a vhost_user port needs socket".into())]
            }
            PortSpec::VhostUser { .. } => vec![],
            PortSpec::Dpdk { devargs, pci } if empty(devargs) && empty(pci) => {
                vec![bad("a dpdk port needs devargs or pci".into())]
            }
            PortSpec::Dpdk { .. } => vec![],
        }
    }
}

/// `name` as a PCI address (`dddd:bb:dd.f` or `bb:dd.f`, hexadecimal) in
/// the full lower-case form, or `None` if it is not one.
pub fn pci_address(name: &str) -> Option<String> {
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    let parts: Vec<&str> = name.split(':').collect();
    let (domain, bus, devfn) = match parts.as_slice() {
        [b, df] => ("0000", *b, *df),
        [d, b, df] => (*d, *b, *df),
        _ => return None,
    };
    let (dev, func) = devfn.split_once('.')?;
    (hex(domain, 4) && hex(bus, 2) && hex(dev, 2) && hex(func, 1))
        .then(|| format!("{domain}:{bus}:{dev}.{func}").to_ascii_lowercase())
}

/// A port opened for a switch: its queues, the first for worker 0, and for
/// a ring port the far end nobody polls yet.
pub struct Opened<B> {
    /// One per worker, or one (see [`Queues`]).
    pub queues: Vec<Box<dyn Port<Buf = B>>>,
    /// The other end of a ring port.
    pub peer: Option<RingPort<B>>,
}

/// Opens `spec` as port `name` for a switch of `workers` workers, with
/// buffers from `pool`; `mac` is the MAC of ports that have none of their
/// own (rings, pcap). AF_PACKET queues of several workers join fanout group
/// `group` (give each interface its own, distinct between processes).
/// DPDK devices open through [`open_dpdk`].
pub fn open(
    spec: &PortSpec,
    name: &str,
    mac: MacAddr,
    workers: usize,
    pool: Pool,
    group: u16,
) -> Result<Opened<PoolBuf>, PortError> {
    let workers = workers.max(1);
    let mut queues: Vec<Box<dyn Port<Buf = PoolBuf>>> = Vec::new();
    let mut peer = None;
    match spec {
        PortSpec::Ring {} => {
            let (sw, far) = ring::pair(
                LinkInfo::new(name, mac, "ring"),
                LinkInfo::new(name, mac, "ring"),
                1024,
            );
            for q in sw.into_handles(workers) {
                queues.push(Box::new(q));
            }
            peer = Some(far);
        }
        PortSpec::Pcap { rx_pcap, tx_pcap } => {
            let p = PcapPort::open(name, mac, rx_pcap.as_deref(), tx_pcap.as_deref(), pool)?;
            queues.push(Box::new(p));
        }
        #[cfg(target_os = "linux")]
        PortSpec::AfPacket { iface } => {
            use super::af_packet::AfPacketPort;
            for _ in 0..workers {
                let p = if workers == 1 {
                    AfPacketPort::open(name, iface, pool)?
                } else {
                    AfPacketPort::open_fanout(name, iface, pool, group)?
                };
                queues.push(Box::new(p));
            }
        }
        #[cfg(target_os = "linux")]
        PortSpec::AfXdp { iface } => {
            queues.push(Box::new(super::af_xdp::AfXdpPort::open(
                name, iface, 0, pool,
            )?));
        }
        #[cfg(target_os = "linux")]
        PortSpec::VhostUser { socket } => {
            queues.push(Box::new(super::vhost_user::VhostUserPort::open(
                name, socket, mac, pool,
            )?));
        }
        #[cfg(not(target_os = "linux"))]
        PortSpec::AfPacket { .. } | PortSpec::AfXdp { .. } | PortSpec::VhostUser { .. } => {
            return Err(PortError::BadConfig {
                port: name.to_string(),
                reason: format!("driver {:?} needs Linux", spec.driver()),
            });
        }
        PortSpec::Dpdk { .. } => {
            return Err(PortError::BadConfig {
                port: name.to_string(),
                reason: "a dpdk port opens through the EAL, with every other port dpdk too".into(),
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = group;
    Ok(Opened { queues, peer })
}

/// Opens a DPDK device `spec` as port `name` with one queue per worker,
/// buffers from `pool`.
#[cfg(feature = "dpdk")]
pub fn open_dpdk(
    spec: &PortSpec,
    name: &str,
    workers: usize,
    eal: &super::dpdk::Eal,
    pool: super::dpdk::Mempool,
) -> Result<Opened<super::dpdk::Mbuf>, PortError> {
    let Some(device) = spec.dpdk_device() else {
        return Err(PortError::BadConfig {
            port: name.to_string(),
            reason: format!(
                "driver {:?} cannot share a DPDK worker (make every port dpdk)",
                spec.driver()
            ),
        });
    };
    let queues =
        super::dpdk::DpdkPort::open_queues(eal, name, device, pool, workers.max(1) as u16)?;
    Ok(Opened {
        queues: queues
            .into_iter()
            .map(|q| Box::new(q) as Box<dyn Port<Buf = super::dpdk::Mbuf>>)
            .collect(),
        peer: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PoolConfig;

    #[test]
    fn pci_addresses_are_told_from_vdevs() {
        assert_eq!(pci_address("0000:01:10.0"), Some("0000:01:10.0".into()));
        assert_eq!(pci_address("01:10.0"), Some("0000:01:10.0".into()));
        assert_eq!(pci_address("0000:0A:1F.7"), Some("0000:0a:1f.7".into()));
        for not in [
            "net_vhost0",
            "net_af_packet0",
            "0000:01:10",
            "x:01:10.0",
            "",
        ] {
            assert_eq!(pci_address(not), None, "{not}");
        }
        let spec = PortSpec::Dpdk {
            devargs: Some("0000:01:10.0,txq_inline=0".into()),
            pci: None,
        };
        assert_eq!(spec.pci_address(), Some("0000:01:10.0".into()));
        let vhost = PortSpec::Dpdk {
            devargs: Some("net_vhost0,iface=/tmp/a".into()),
            pci: None,
        };
        assert_eq!(vhost.pci_address(), None);
    }

    #[test]
    fn every_driver_reads_only_its_own_keys() {
        let json = |s: &str| serde_json::from_str::<PortSpec>(s).map_err(|e| e.to_string());
        assert_eq!(json(r#"{"driver":"ring"}"#), Ok(PortSpec::Ring {}));
        assert_eq!(
            json(r#"{"driver":"af_packet","iface":"veth0"}"#),
            Ok(PortSpec::AfPacket {
                iface: "veth0".into()
            })
        );
        let e = json(r#"{"driver":"ring","iface":"veth0"}"#).unwrap_err();
        assert!(e.contains("unknown field `iface`"), "{e}");
        let e = json(r#"{"driver":"af_xdp"}"#).unwrap_err();
        assert!(e.contains("missing field `iface`"), "{e}");
        let e = json(r#"{"driver":"tap"}"#).unwrap_err();
        assert!(e.contains("unknown variant `tap`"), "{e}");
        // Round trip.
        let d = PortSpec::Dpdk {
            devargs: Some("net_null0".into()),
            pci: None,
        };
        let text = serde_json::to_string(&d).unwrap();
        assert_eq!(text, r#"{"driver":"dpdk","devargs":"net_null0"}"#);
        assert_eq!(json(&text), Ok(d));
    }

    #[test]
    fn problems_name_the_port() {
        let none = PortSpec::Pcap {
            rx_pcap: None,
            tx_pcap: None,
        };
        let p = none.problems("cap");
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].to_string(),
            "port \"cap\": a pcap port needs rx_pcap, tx_pcap or both"
        );
        let dpdk = PortSpec::Dpdk {
            devargs: Some(String::new()),
            pci: None,
        };
        assert_eq!(dpdk.problems("d").len(), 1);
        assert!(PortSpec::Ring {}.problems("r").is_empty());
    }

    #[test]
    fn a_ring_gives_every_worker_a_queue_and_keeps_the_far_end() {
        let pool = Pool::new(&PoolConfig::new("spec-test", 64)).unwrap();
        let o = open(
            &PortSpec::Ring {},
            "r",
            MacAddr([2, 0, 0, 0, 0, 1]),
            3,
            pool,
            0,
        )
        .unwrap();
        assert_eq!(o.queues.len(), 3);
        assert!(o.peer.is_some());
        assert!(o.queues.iter().all(|q| q.info().name == "r"));
        let e = open(
            &PortSpec::Dpdk {
                devargs: Some("net_null0".into()),
                pci: None,
            },
            "d",
            MacAddr::ZERO,
            1,
            pool,
            0,
        )
        .err()
        .unwrap();
        assert!(e.to_string().starts_with("port \"d\": "), "{e}");
    }
}
