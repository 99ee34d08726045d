//! `POST /v1/trace`: what the running switch decides for one packet,
//! layer by layer ([`vswitch::switch::Trace`]), without changing any of
//! its state: the packet goes through the slow path of a scratch switch
//! over the live policy. The packet is a hex frame or a description whose
//! missing fields default from the input port's VM. The reply also lists
//! the flows the workers hold for the packet's key on that port now: a
//! packet of a cached flow takes that flow's action instead.

use super::{ApiError, ControlState, Reply, Runtime, body_json, flow_body, reply};
use crate::api::{TraceRequest, TraceStepView, TraceView, from_hex, to_hex};
use dataplane::MacAddr;
use dataplane::pool::{HugePages, Pool, PoolBuf, PoolConfig};
use std::net::IpAddr;
use vswitch::Switch;
use vswitch::switch::TraceEnd;

/// The largest frame a trace takes (it goes in a pool buffer).
const MAX_FRAME: usize = 2048;

/// Flows listed as cached at most.
const CACHED_LIMIT: usize = 16;

/// Answers `POST /v1/trace` with body `body`.
pub(super) fn trace(state: &ControlState, rt: &mut Runtime, body: &str) -> Result<Reply, ApiError> {
    let req: TraceRequest = body_json(body, "trace")?;
    let cfg = state.config();
    let ports: Vec<String> = cfg.port.iter().map(|p| p.name.clone()).collect();
    let port = ports.iter().position(|p| *p == req.port).ok_or_else(|| {
        ApiError::new(
            404,
            format!(
                "trace: no port {:?} (ports: {})",
                req.port,
                ports.join(", ")
            ),
        )
    })?;
    let in_port = u16::try_from(port)
        .map_err(|_| ApiError::new(400, format!("trace: port {:?} has no number", req.port)))?;
    let policy = state.policy().load_full();
    let frame = match &req.frame {
        Some(hex) => {
            let only_frame = TraceRequest {
                port: req.port.clone(),
                frame: req.frame.clone(),
                ..TraceRequest::default()
            };
            if req != only_frame {
                return Err(ApiError::new(
                    400,
                    "trace: give either a frame or the packet's fields, not both",
                ));
            }
            from_hex(hex).map_err(|e| ApiError::new(400, format!("frame: {e}")))?
        }
        None => build(&req, &policy, in_port)?,
    };
    if frame.len() > MAX_FRAME {
        return Err(ApiError::new(
            400,
            format!(
                "trace: the frame has {} bytes, more than {MAX_FRAME}",
                frame.len()
            ),
        ));
    }
    let pool = match rt.trace_pool {
        Some(p) => p,
        None => {
            let p = Pool::new(&PoolConfig {
                huge: HugePages::Never,
                ..PoolConfig::new("trace", 4)
            })
            .map_err(|e| ApiError::new(500, format!("trace: {e}")))?;
            rt.trace_pool = Some(p);
            p
        }
    };
    let buf = pool
        .alloc_copy(&frame)
        .map_err(|e| ApiError::new(503, format!("trace: {e}")))?;
    let mut scratch: Switch<PoolBuf> = Switch::scratch(state.policy().clone(), &rt.switch_cfg);
    let t = scratch.trace(buf, in_port);
    drop(scratch);
    let name = |p: u16| port_name(&ports, &policy, p);
    let cached = match t.key {
        Some(k) => {
            let filter = vswitch::flow::FlowFilter {
                port: Some(in_port),
                src: Some(k.src_ip),
                dst: Some(k.dst_ip),
                proto: Some(k.proto),
                src_port: Some(k.src_port),
                dst_port: Some(k.dst_port),
                vip: None,
            };
            let (flows, ..) = rt.flows(filter, false, false, CACHED_LIMIT)?;
            flows
                .iter()
                .filter(|f| f.in_port == in_port && f.key == k)
                .map(|f| flow_body(f, &ports, &policy))
                .collect()
        }
        None => Vec::new(),
    };
    let mut view = TraceView {
        port: req.port.clone(),
        packet: t.key.map(|_| describe(&frame)),
        frame: to_hex(&frame),
        steps: t
            .steps
            .iter()
            .map(|s| TraceStepView {
                layer: s.layer.to_string(),
                detail: s.detail.clone(),
            })
            .collect(),
        result: String::new(),
        out_port: None,
        reason: None,
        out_packet: None,
        out_frame: None,
        cached,
    };
    match t.end {
        TraceEnd::Forward { out_port, frame } => {
            view.result = "forward".into();
            view.out_port = Some(name(out_port));
            view.out_packet = Some(describe(&frame));
            view.out_frame = Some(to_hex(&frame));
        }
        TraceEnd::Back { frame } => {
            view.result = "answer".into();
            view.out_port = Some(req.port.clone());
            view.out_packet = Some(describe(&frame));
            view.out_frame = Some(to_hex(&frame));
        }
        TraceEnd::Drop(r) => {
            view.result = "drop".into();
            view.reason = Some(r.name().to_string());
        }
        TraceEnd::Malformed(why) => {
            view.result = "malformed".into();
            view.reason = Some(why);
        }
    }
    reply(200, &view)
}

/// The name of switch port `p`: a configured port's, a tunnel's, or the
/// hairpin.
pub(super) fn port_name(ports: &[String], policy: &vswitch::Policy, p: u16) -> String {
    match p {
        vswitch::flow::HAIRPIN_PORT => "hairpin (into the switch again, as from the wire)".into(),
        _ => ports
            .get(usize::from(p))
            .cloned()
            .or_else(|| policy.tunnel(p).map(|t| format!("tunnel {}", t.name)))
            .unwrap_or_else(|| format!("#{p}")),
    }
}

/// The frame a request describes, arriving on port `port`.
fn build(req: &TraceRequest, p: &vswitch::Policy, port: u16) -> Result<Vec<u8>, ApiError> {
    let bad = |what: &str, why: String| ApiError::new(400, format!("{what}: {why}"));
    let vm = p.vm_on_port(port).map(|(_, vm)| vm);
    let uplink = p.uplink.as_ref().filter(|u| u.port == port);
    // An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is no address a
    // packet may carry: the parser drops it.
    let addr = |what: &str, s: &str| match s.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => Err(bad(
            what,
            format!("{s:?} is an IPv4-mapped IPv6 address: write it as IPv4"),
        )),
        Ok(a) => Ok(a),
        Err(_) => Err(bad(what, format!("{s:?} is not an address"))),
    };
    let dst: IpAddr = match &req.dst {
        Some(d) => addr("dst", d)?,
        None => return Err(bad("dst", "required (the destination address)".into())),
    };
    let src: IpAddr = match (&req.src, vm) {
        (Some(s), _) => addr("src", s)?,
        (None, Some(vm)) => *vm
            .ips
            .iter()
            .find(|a| a.is_ipv4() == dst.is_ipv4())
            .ok_or_else(|| {
                bad(
                    "src",
                    format!("VM {} has no address of {dst}'s family: give one", vm.name),
                )
            })?,
        (None, None) => {
            return Err(bad(
                "src",
                format!("required: port {:?} has no VM", req.port),
            ));
        }
    };
    let mac = |given: &Option<String>, what: &str, default: Option<MacAddr>| match given {
        Some(m) => m
            .parse::<MacAddr>()
            .map_err(|_| bad(what, format!("{m:?} is not a MAC address"))),
        None => Ok(default.unwrap_or(MacAddr([2, 0, 0, 0, 0, 1]))),
    };
    let gateway = vm
        .and_then(|vm| p.vnets.get(vm.vnet))
        .map(|v| v.gateway_mac)
        .or(uplink.map(|u| u.mac));
    let src_mac = mac(&req.src_mac, "src_mac", vm.map(|vm| vm.mac))?;
    let dst_mac = mac(&req.dst_mac, "dst_mac", gateway)?;
    let ttl = req.ttl.unwrap_or(64);
    let b = etherparse::PacketBuilder::ethernet2(src_mac.0, dst_mac.0);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s.octets(), d.octets(), ttl),
        _ => {
            return Err(bad(
                "src",
                format!("{src} and {dst} are of different families"),
            ));
        }
    };
    let payload = vec![0u8; req.payload.unwrap_or(0).min(MAX_FRAME)];
    let sport = req.sport.unwrap_or(40000);
    let mut out = Vec::new();
    let proto = req.proto.as_deref().unwrap_or("tcp");
    let dport = || {
        req.dport
            .ok_or_else(|| bad("dport", format!("required for {proto}")))
    };
    let not_for = |field: &str| bad(field, format!("does not apply to {proto}"));
    if req.flags.is_some() && proto != "tcp" {
        return Err(not_for("flags"));
    }
    if req.dport.is_some() && proto == "icmp" {
        return Err(not_for("dport"));
    }
    let written = match proto {
        "tcp" => {
            let mut t = ip.tcp(sport, dport()?, 1, 64240);
            for c in req.flags.as_deref().unwrap_or("S").chars() {
                t = match c.to_ascii_uppercase() {
                    'S' => t.syn(),
                    'A' => t.ack(1),
                    'F' => t.fin(),
                    'R' => t.rst(),
                    'P' => t.psh(),
                    other => {
                        return Err(bad(
                            "flags",
                            format!("{other:?} is not one of S, A, F, R, P"),
                        ));
                    }
                };
            }
            t.write(&mut out, &payload)
        }
        "udp" => ip.udp(sport, dport()?).write(&mut out, &payload),
        "icmp" if dst.is_ipv4() => ip.icmpv4_echo_request(sport, 1).write(&mut out, &payload),
        "icmp" => ip.icmpv6_echo_request(sport, 1).write(&mut out, &payload),
        other => {
            return Err(bad(
                "proto",
                format!("{other:?} is not tcp, udp or icmp (give a frame for others)"),
            ));
        }
    };
    written.map_err(|e| bad("trace", format!("cannot build the packet: {e}")))?;
    Ok(out)
}

/// A frame in words, as tcpdump would put it: MACs, protocol, addresses
/// and ports, TCP flags, TTL and payload length.
pub(super) fn describe(frame: &[u8]) -> String {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return format!("{} bytes that do not parse", frame.len());
    };
    let macs = match &p.link {
        Some(etherparse::LinkSlice::Ethernet2(e)) => {
            format!("{} > {}", MacAddr(e.source()), MacAddr(e.destination()))
        }
        _ => String::new(),
    };
    let (src, dst, ttl): (IpAddr, IpAddr, u8) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            (h.source_addr().into(), h.destination_addr().into(), h.ttl())
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (
                h.source_addr().into(),
                h.destination_addr().into(),
                h.hop_limit(),
            )
        }
        _ => {
            let ethertype = match &p.link {
                Some(etherparse::LinkSlice::Ethernet2(e)) => e.ether_type().0,
                _ => 0,
            };
            return match ethertype {
                0x0806 => format!("{macs}, arp"),
                t => format!("{macs}, ethertype {t:#06x}"),
            };
        }
    };
    let l4 = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let flags: String = [
                (t.syn(), 'S'),
                (t.ack(), 'A'),
                (t.fin(), 'F'),
                (t.rst(), 'R'),
                (t.psh(), 'P'),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, c)| *c)
            .collect();
            format!(
                "tcp {src}:{} > {dst}:{} [{flags}] seq {} ack {}, {} bytes",
                t.source_port(),
                t.destination_port(),
                t.sequence_number(),
                t.acknowledgment_number(),
                t.payload().len()
            )
        }
        Some(TransportSlice::Udp(u)) => format!(
            "udp {src}:{} > {dst}:{}, {} bytes",
            u.source_port(),
            u.destination_port(),
            u.payload().len()
        ),
        Some(TransportSlice::Icmpv4(i)) => {
            format!("icmp {src} > {dst} type {}", i.type_u8())
        }
        Some(TransportSlice::Icmpv6(i)) => {
            format!("icmpv6 {src} > {dst} type {}", i.type_u8())
        }
        Some(TransportSlice::Igmp(_)) => format!("igmp {src} > {dst}"),
        None => format!("ip {src} > {dst} (a fragment, or a protocol not shown)"),
    };
    format!("{macs}, {l4}, ttl {ttl}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_described_packet_reads_back_as_described() {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(
            [2, 0, 0, 0, 0, 0x20],
            [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc],
        )
        .ipv4([10, 1, 0, 20], [10, 1, 0, 100], 64)
        .tcp(40001, 80, 7, 1000)
        .syn()
        .write(&mut f, &[])
        .unwrap();
        assert_eq!(
            describe(&f),
            "02:00:00:00:00:20 > 12:34:56:78:9a:bc, tcp 10.1.0.20:40001 > 10.1.0.100:80 [S] seq 7 ack 0, 0 bytes, ttl 64"
        );
        assert_eq!(describe(&[1, 2, 3]), "3 bytes that do not parse");
    }

    #[test]
    fn an_ipv4_mapped_address_is_refused() {
        let t = vswitch::Topology {
            vnets: vec![vswitch::VnetDef {
                name: "a".into(),
                prefixes: vec!["10.1.0.0/16".parse().unwrap()],
                gateway_mac: dataplane::MacAddr([0x12, 0, 0, 0, 0, 1]),
                snat: None,
                vni: None,
                encap: Default::default(),
            }],
            vms: vec![vswitch::VmDef {
                name: "x".into(),
                port: 0,
                vnet: 0,
                mac: dataplane::MacAddr([2, 0, 0, 0, 0, 1]),
                ips: vec!["10.1.0.4".parse().unwrap()],
                nsg: None,
                internal: false,
            }],
            nsgs: vec![],
            vips: vec![],
            ports: 1,
            uplink: None,
            remotes: Vec::new(),
            neighbours: Vec::new(),
        };
        let p = vswitch::Policy::compile(&t, 1).unwrap();
        let req = |src: Option<&str>, dst: &str| TraceRequest {
            port: "x".into(),
            src: src.map(Into::into),
            dst: Some(dst.into()),
            dport: Some(80),
            ..TraceRequest::default()
        };
        if let Err(e) = build(&req(None, "10.1.0.5"), &p, 0) {
            panic!("{}", e.message);
        }
        for (r, what) in [
            (req(None, "::ffff:10.1.0.5"), "dst"),
            (req(Some("::ffff:10.1.0.4"), "10.1.0.5"), "src"),
        ] {
            let e = build(&r, &p, 0).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.starts_with(&format!("{what}: ")), "{}", e.message);
            assert!(e.message.contains("IPv4-mapped"), "{}", e.message);
        }
    }
}
