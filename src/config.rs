//! The configuration file (TOML, schema in docs/config.md) and its validation.
//!
//! [`Config::parse`] reads the text; [`Config::validate`] checks every item and
//! every cross-reference and returns *all* problems, one line each, naming the
//! offending item (`vip "web": backend 10.1.0.9 is not in vnet "a"`). Nothing
//! is applied from a configuration with any problem.

use dataplane::port::spec::{PortSpec, Queues};
use filter::{NsgSpec, RuleError};
use ipnet::IpNet;
use lb::balancer::{
    Backend, Distribution, OnUnhealthy, SynProxy, Vip, VipConfig, VipMode, WhenAllDown,
};
use lb::snat::SnatConfig;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

/// The longest idle sleep of a worker (10 ms): longer would make the first
/// packet after a quiet spell wait too long.
pub const MAX_IDLE_SLEEP_US: u64 = 10_000;

/// `[dataplane]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneCfg {
    /// Polling cores (pinned).
    pub workers: usize,
    /// Flow table entries per core.
    pub flow_table_size: usize,
    /// Connections tracked per vnet per core.
    pub conn_table_size: usize,
    /// Commit the flow and connection tables' memory when each worker
    /// starts, on its core, rather than as the dataplane first writes it.
    pub preallocate_tables: bool,
    /// Microseconds a worker sleeps after a run of empty polls (0: never).
    pub idle_sleep_us: u64,
    /// Seconds between two logged summaries of the packets dropped, by
    /// reason (0: none).
    pub drop_summary_s: u64,
}

impl Default for DataplaneCfg {
    fn default() -> Self {
        DataplaneCfg {
            workers: 1,
            flow_table_size: 1 << 20,
            conn_table_size: 1 << 18,
            preallocate_tables: true,
            idle_sleep_us: 0,
            drop_summary_s: 60,
        }
    }
}

/// `[control]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlCfg {
    /// Unix socket of the control API (mode 0600).
    pub socket: PathBuf,
    /// A loopback `address:port` to serve the API on as well.
    pub tcp: Option<String>,
    /// With `tcp`: the file holding the bearer token every request over TCP
    /// must carry (`Authorization: Bearer TOKEN`); owned by the user pollux
    /// runs as, readable by no one else.
    pub token_file: Option<PathBuf>,
    /// With `tcp`: `GET /metrics` is answered over TCP without the token
    /// (for a Prometheus scraper on the host); every other request still
    /// needs it.
    pub metrics_without_token: bool,
}

impl Default for ControlCfg {
    fn default() -> Self {
        ControlCfg {
            socket: PathBuf::from("/run/pollux.sock"),
            tcp: None,
            token_file: None,
            metrics_without_token: false,
        }
    }
}

/// `[dpdk]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DpdkCfg {
    /// EAL arguments, as for any DPDK application.
    pub eal_args: Vec<String>,
}

/// `[[port]]`: a name, an MTU, and the driver with its own settings
/// (`driver = "af_packet"`, `iface = "..."`; [`PortSpec`]). A key another
/// driver takes is an error, naming the port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "RawPort", into = "RawPort")]
pub struct PortCfg {
    /// Port name.
    pub name: String,
    /// MTU (default 1500).
    pub mtu: Option<u16>,
    /// The driver and its settings.
    pub spec: PortSpec,
}

/// A `[[port]]` table as written: the common keys, and the rest for the
/// driver. (serde cannot refuse unknown keys of a flattened enum; read this
/// way, the driver's variant refuses them.)
#[derive(Deserialize, Serialize)]
struct RawPort {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtu: Option<u16>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl TryFrom<RawPort> for PortCfg {
    type Error = String;

    fn try_from(mut r: RawPort) -> Result<PortCfg, String> {
        // A JSON client may send every key, the unused ones as null.
        r.rest.retain(|_, v| !v.is_null());
        let spec = PortSpec::deserialize(serde_json::Value::Object(r.rest))
            .map_err(|e| format!("port {:?}: {e}", r.name))?;
        Ok(PortCfg {
            name: r.name,
            mtu: r.mtu,
            spec,
        })
    }
}

impl From<PortCfg> for RawPort {
    fn from(p: PortCfg) -> RawPort {
        let rest = match serde_json::to_value(&p.spec) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        RawPort {
            name: p.name,
            mtu: p.mtu,
            rest,
        }
    }
}

/// `[[vnet]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VnetCfg {
    /// Vnet name.
    pub name: String,
    /// Address prefixes.
    pub prefixes: Vec<String>,
    /// The MAC pollux answers ARP with.
    pub gateway_mac: String,
    /// Outbound SNAT through the uplink.
    pub snat: Option<SnatCfg>,
    /// Virtual network identifier on the overlay (1-16777215): its
    /// addresses on other hosts (`[[remote]]`) are reached in tunnels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// `vxlan` (default) or `geneve`: the tunnel it sends in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encap: Option<String>,
}

/// `[[remote]]`: addresses of a vnet that live on another host (VFP's
/// customer-address -> provider-address mapping).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteCfg {
    /// Name.
    pub name: String,
    /// Its vnet (which must have a `vni`).
    pub vnet: String,
    /// Its addresses in the vnet.
    pub ips: Vec<String>,
    /// The underlay address of the host it lives on.
    pub host: String,
    /// Its MAC (the inner destination MAC; default: the vnet's gateway MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// `[[uplink.route]]`: a static route of the underlay.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCfg {
    /// Destination prefix (IPv4).
    pub prefix: String,
    /// Next hop, on the uplink's network.
    pub via: String,
}

/// `[vnet.snat]`: the public addresses a vnet's VMs leave from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnatCfg {
    /// Public addresses (outside the vnet).
    pub public_ips: Vec<String>,
    /// Ports handed out, `"lo-hi"` (default `"1024-65535"`).
    pub port_range: Option<String>,
    /// Ports reserved for each VM address, a multiple of 64 (default 1024).
    pub ports_per_vm: Option<u32>,
    /// Mapping behaviour (default endpoint-independent).
    pub mapping: Option<SnatMappingCfg>,
    /// Filtering behaviour (default address-and-port-dependent).
    pub filtering: Option<SnatFilteringCfg>,
    /// Idle timeout of UDP mappings, seconds (default 300).
    pub udp_timeout: Option<u64>,
    /// Idle timeout of established TCP connections, seconds (default 7440).
    pub tcp_established_timeout: Option<u64>,
    /// Idle timeout of TCP connections opening or closing, seconds
    /// (default 240).
    pub tcp_transitory_timeout: Option<u64>,
    /// Idle timeout of ICMP query mappings, seconds (default 60).
    pub icmp_timeout: Option<u64>,
}

/// `mapping` of `[vnet.snat]` (RFC 4787 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnatMappingCfg {
    /// One public address and port per private address and port.
    EndpointIndependent,
    /// A public port per connection.
    AddressAndPortDependent,
}

/// `filtering` of `[vnet.snat]` (RFC 4787 section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnatFilteringCfg {
    /// Anything may enter through a mapping.
    EndpointIndependent,
    /// Anything from an address the mapping has a connection with.
    AddressDependent,
    /// Only replies of the mapping's connections.
    AddressAndPortDependent,
}

/// `[uplink]`: the port towards the wire.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkCfg {
    /// A `[[port]]` with no VM on it.
    pub port: String,
    /// The MAC of the next hop (the router on the wire); with `address`,
    /// next hops are resolved with ARP instead, and this is only the MAC
    /// of destinations no route covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_mac: Option<String>,
    /// The MAC pollux sends from and answers ARP with on the wire
    /// (default 02:50:4c:58:ff:ff).
    pub mac: Option<String>,
    /// The uplink's own IPv4 address with its network's prefix length
    /// (`192.168.100.1/24`): tunnels' outer source, answered to ARP and
    /// ping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The default route's next hop (on-link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Static routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteCfg>,
    /// The load balancer Muxes whose IP in IP a DSR VIP's backends take
    /// (addresses or IPv4 prefixes of their outer sources).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub muxes: Vec<String>,
}

/// The uplink MAC when `[uplink] mac` is not given.
pub const DEFAULT_UPLINK_MAC: &str = "02:50:4c:58:ff:ff";

/// SNAT port blocks are this many ports.
const SNAT_BLOCK: u32 = 64;

/// `[[vm]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmCfg {
    /// VM name.
    pub name: String,
    /// The port it is attached to.
    pub port: String,
    /// Its vnet.
    pub vnet: String,
    /// Its MAC.
    pub mac: String,
    /// Its addresses.
    pub ips: Vec<String>,
    /// Its security group.
    pub nsg: Option<String>,
}

/// One backend of `[[vip]]`: a VM (its first address) or an address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendCfg {
    /// A VM name.
    pub vm: Option<String>,
    /// An address.
    pub ip: Option<String>,
    /// Backend port.
    pub port: u16,
    /// Weight (default 1; 0 drains).
    pub weight: Option<u32>,
}

/// `[vip.probe]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeCfg {
    /// `http` or `tcp`.
    pub kind: String,
    /// Port probed on each backend.
    pub port: u16,
    /// HTTP path (http only, default `/`).
    pub path: Option<String>,
    /// Interval (default 5000).
    pub interval_ms: Option<u64>,
    /// Timeout (default min(interval, 30000)).
    pub timeout_ms: Option<u64>,
    /// Consecutive results that change a DIP's state (default 2).
    pub threshold: Option<u32>,
}

/// `[[vip]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VipCfg {
    /// VIP name.
    pub name: String,
    /// The vnet it serves.
    pub vnet: String,
    /// Frontend address.
    pub address: String,
    /// Frontend port.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `5-tuple` (default), `3-tuple`, `2-tuple`.
    pub distribution: Option<String>,
    /// `keep` (default) or `reset`: established flows of an unhealthy DIP.
    pub on_unhealthy: Option<String>,
    /// `drop-new` (default) or `fail-open`: new flows when no DIP is healthy.
    pub when_all_down: Option<String>,
    /// Most connections to it at once, over all workers (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_conns: Option<u32>,
    /// `off` (default), `auto` (at the connection limit) or `on`: when the
    /// switch answers SYNs itself with cookies (TCP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_proxy: Option<String>,
    /// `local` (default), `mux` (to DIPs on other hosts in IP in IP,
    /// replies not through here) or `dsr` (this host's VMs behind Muxes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The pool.
    pub backends: Vec<BackendCfg>,
    /// Health probe; without it every backend counts as healthy.
    pub probe: Option<ProbeCfg>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[dataplane]`.
    #[serde(default)]
    pub dataplane: DataplaneCfg,
    /// `[control]`: the control API is served only when this section is present.
    pub control: Option<ControlCfg>,
    /// `[dpdk]`.
    pub dpdk: Option<DpdkCfg>,
    /// `[[port]]`.
    #[serde(default)]
    pub port: Vec<PortCfg>,
    /// `[uplink]`.
    pub uplink: Option<UplinkCfg>,
    /// `[[vnet]]`.
    #[serde(default)]
    pub vnet: Vec<VnetCfg>,
    /// `[[vm]]`.
    #[serde(default)]
    pub vm: Vec<VmCfg>,
    /// `[[nsg]]`.
    #[serde(default)]
    pub nsg: Vec<NsgSpec>,
    /// `[[vip]]`.
    #[serde(default)]
    pub vip: Vec<VipCfg>,
    /// `[[remote]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<RemoteCfg>,
    /// `[bgp]`: the Mux VIPs announced through a BGP daemon (BIRD 2)
    /// that pollux runs beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpCfg>,
    /// `[ipfix]`: flow logs exported to an IPFIX collector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipfix: Option<IpfixCfg>,
}

/// `[ipfix]`: a record of every flow the switch forwarded (when it ends,
/// and every `active_timeout_s` while it lasts) and of every first packet
/// the security groups denied, exported over UDP to an IPFIX (RFC 7011)
/// collector.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IpfixCfg {
    /// The collector, `address:port` (UDP; 4739 is IPFIX's port).
    pub collector: String,
    /// The longest a flow goes without a record, seconds (default 60).
    #[serde(default = "default_active_timeout")]
    pub active_timeout_s: u64,
    /// Seconds between two sendings of the templates (default 30;
    /// collectors that start later learn them then).
    #[serde(default = "default_template_interval")]
    pub template_interval_s: u64,
    /// The observation domain ID in every message (default 1).
    #[serde(default = "default_domain")]
    pub domain_id: u32,
    /// The private enterprise number of the security-group elements
    /// (default 32473, the number RFC 5612 sets aside for examples: set
    /// your organisation's).
    #[serde(default = "default_enterprise")]
    pub enterprise: u32,
}

fn default_active_timeout() -> u64 {
    60
}

fn default_template_interval() -> u64 {
    30
}

fn default_domain() -> u32 {
    1
}

fn default_enterprise() -> u32 {
    32473
}

impl IpfixCfg {
    /// What is wrong with it, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut errs = Vec::new();
        match self.collector.parse::<std::net::SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                errs.push(format!("ipfix: collector {:?} has port 0", self.collector))
            }
            Ok(a) if a.ip().is_unspecified() || a.ip().is_multicast() => errs.push(format!(
                "ipfix: collector {:?} is not a unicast address",
                self.collector
            )),
            Ok(_) => {}
            Err(_) => errs.push(format!(
                "ipfix: collector {:?} is not an address:port",
                self.collector
            )),
        }
        if !(1..=86_400).contains(&self.active_timeout_s) {
            errs.push(format!(
                "ipfix: active_timeout_s {} is not within 1-86400",
                self.active_timeout_s
            ));
        }
        if !(1..=3_600).contains(&self.template_interval_s) {
            errs.push(format!(
                "ipfix: template_interval_s {} is not within 1-3600",
                self.template_interval_s
            ));
        }
        if self.enterprise == 0 {
            errs.push("ipfix: enterprise must not be 0".into());
        }
        errs
    }
}

/// `[bgp]`: pollux starts BIRD 2 with a configuration it writes, announces
/// each Mux VIP's address (a /32) to the neighbours while the VIP has a
/// healthy backend, and withdraws it when none is, when the Mux is
/// drained, and before pollux stops.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BgpCfg {
    /// This Mux's AS number.
    pub local_as: u32,
    /// The BGP router ID (default: the `[uplink]` address, the next hop
    /// announced with the VIPs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    /// The hold time offered to neighbours, seconds (3-65535; default 9).
    #[serde(default = "default_hold_time")]
    pub hold_time_s: u16,
    /// Keepalive interval, seconds (default a third of the hold time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_s: Option<u16>,
    /// How long pollux goes on forwarding after withdrawing its VIPs
    /// before it stops, for routers to move the flows to other Muxes
    /// (default 2000).
    #[serde(default = "default_stop_wait")]
    pub stop_wait_ms: u64,
    /// The BIRD 2 binary (default `bird`, found on the PATH).
    #[serde(default = "default_bird")]
    pub bird: String,
    /// Where pollux keeps BIRD's configuration, control socket and log
    /// (default /run/pollux/bgp; one per pollux on a machine).
    #[serde(default = "default_bgp_dir")]
    pub dir: PathBuf,
    /// `[[bgp.neighbor]]`: the routers.
    #[serde(default)]
    pub neighbor: Vec<BgpNeighborCfg>,
}

/// `[[bgp.neighbor]]`: a router pollux announces to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BgpNeighborCfg {
    /// Its address.
    pub address: String,
    /// Its AS number.
    pub remote_as: u32,
}

fn default_hold_time() -> u16 {
    9
}

fn default_stop_wait() -> u64 {
    2000
}

fn default_bird() -> String {
    "bird".into()
}

fn default_bgp_dir() -> PathBuf {
    PathBuf::from("/run/pollux/bgp")
}

impl BgpCfg {
    /// The keepalive interval, seconds.
    pub fn keepalive(&self) -> u16 {
        self.keepalive_s.unwrap_or(self.hold_time_s / 3)
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("config {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// Not TOML, or not of the schema (an unknown key, a wrong type).
    #[error("config{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Syntax {
        /// Where, when known (1-based).
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// Well-formed, with problems: every one, one line each naming its
    /// item.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// Every problem, one line each.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(p) => p.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// Summary of a valid configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Ports.
    pub ports: usize,
    /// Vnets.
    pub vnets: usize,
    /// VMs.
    pub vms: usize,
    /// Security groups.
    pub nsgs: usize,
    /// Rules over all groups.
    pub rules: usize,
    /// VIPs.
    pub vips: usize,
    /// Backends over all VIPs.
    pub backends: usize,
}

fn dups<'a>(
    kind: &str,
    names: impl Iterator<Item = &'a str>,
    out: &mut Vec<String>,
) -> HashSet<&'a str> {
    let mut seen = HashSet::new();
    for n in names {
        if n.is_empty() {
            out.push(format!("{kind} with an empty name"));
        } else if !seen.insert(n) {
            out.push(format!("{kind} {n:?} is defined twice"));
        }
    }
    seen
}

impl Config {
    /// Parses TOML text. A syntax error or an unknown key is one line naming
    /// where it is.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Syntax {
            line: e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1),
            message: e.message().replace('\n', " "),
        })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Config::parse(&text)
    }

    /// Checks everything; returns a summary or every problem, one line each.
    pub fn validate(&self) -> Result<Summary, ConfigError> {
        let (summary, _) = self.check_all()?;
        // What only the whole topology shows (public addresses claimed by
        // two vnets, say), exactly as `run` will compile it.
        vswitch::Policy::compile(&self.topology()?, 0).map_err(|e| ConfigError::Invalid(e.0))?;
        Ok(summary)
    }

    /// `[bgp]`'s problems.
    fn check_bgp(&self, b: &BgpCfg, errs: &mut Vec<String>) {
        let unicast = |what: &str, v: &str, errs: &mut Vec<String>| match v.parse::<Ipv4Addr>() {
            Ok(a) if a.is_unspecified() || a.is_multicast() || a.is_broadcast() => {
                errs.push(format!("bgp: {what} {v:?} is not a unicast address"))
            }
            Ok(_) => {}
            Err(_) => errs.push(format!("bgp: {what} {v:?} is not an IPv4 address")),
        };
        if b.local_as == 0 {
            errs.push("bgp: local_as must not be 0".into());
        }
        if let Some(r) = &b.router_id {
            unicast("router_id", r, errs);
        }
        // The next hop announced is the uplink's address: what pollux
        // answers ARP for.
        if self
            .uplink
            .as_ref()
            .and_then(|u| u.address.as_ref())
            .is_none()
        {
            errs.push(
                "bgp: needs an [uplink] address (the next hop announced with the VIPs)".into(),
            );
        }
        if b.hold_time_s < 3 {
            errs.push(format!(
                "bgp: hold_time_s {} must be at least 3 (RFC 4271)",
                b.hold_time_s
            ));
        }
        if let Some(k) = b.keepalive_s
            && (k == 0 || k >= b.hold_time_s)
        {
            errs.push(format!(
                "bgp: keepalive_s {k} must be above 0 and below hold_time_s {}",
                b.hold_time_s
            ));
        }
        if b.stop_wait_ms > 60_000 {
            errs.push(format!(
                "bgp: stop_wait_ms {} is above 60000",
                b.stop_wait_ms
            ));
        }
        if b.bird.is_empty() {
            errs.push("bgp: bird is empty".into());
        }
        if b.dir.as_os_str().is_empty() || b.dir.is_relative() {
            errs.push(format!("bgp: dir {:?} must be an absolute path", b.dir));
        }
        // BIRD's control socket `dir/bird.ctl`: a unix socket's path holds
        // at most 107 bytes.
        if b.dir.join("bird.ctl").as_os_str().len() > 107 {
            errs.push(format!(
                "bgp: dir {:?} is too long for BIRD's control socket in it (at most 98 bytes)",
                b.dir
            ));
        }
        if b.neighbor.is_empty() {
            errs.push("bgp: no [[bgp.neighbor]] to announce to".into());
        }
        let mut seen = HashSet::new();
        for n in &b.neighbor {
            unicast("neighbor", &n.address, errs);
            if !seen.insert(n.address.as_str()) {
                errs.push(format!("bgp: neighbor {:?} is listed twice", n.address));
            }
            if n.remote_as == 0 {
                errs.push(format!(
                    "bgp: neighbor {:?}: remote_as must not be 0",
                    n.address
                ));
            }
        }
    }

    /// Checks everything; returns the summary and the built VIP configs.
    fn check_all(&self) -> Result<(Summary, Vec<VipConfig>), ConfigError> {
        let mut errs = Vec::new();
        if self.dataplane.workers == 0 {
            errs.push("dataplane: workers must be at least 1".to_string());
        }
        if self.dataplane.flow_table_size == 0 {
            errs.push("dataplane: flow_table_size must be at least 1".to_string());
        }
        if self.dataplane.idle_sleep_us > MAX_IDLE_SLEEP_US {
            errs.push(format!(
                "dataplane: idle_sleep_us {} is above {MAX_IDLE_SLEEP_US}",
                self.dataplane.idle_sleep_us
            ));
        }
        if self.dataplane.drop_summary_s > 86_400 {
            errs.push(format!(
                "dataplane: drop_summary_s {} is above 86400 (a day)",
                self.dataplane.drop_summary_s
            ));
        }
        if !(1..=1 << 24).contains(&self.dataplane.conn_table_size) {
            errs.push(format!(
                "dataplane: conn_table_size {} is outside 1-16777216",
                self.dataplane.conn_table_size
            ));
        }
        if let Some(c) = &self.control {
            if let Some(t) = c.tcp.as_deref() {
                match t.parse::<std::net::SocketAddr>() {
                    Ok(a) if a.ip().is_loopback() => {}
                    Ok(_) => errs.push(format!("control: tcp {t:?} must be a loopback address")),
                    Err(_) => errs.push(format!("control: tcp {t:?} is not an address:port")),
                }
                if c.token_file.is_none() {
                    errs.push(format!(
                        "control: tcp {t:?} needs token_file (any local user can connect to a loopback port: requests over TCP must carry the token)"
                    ));
                }
            } else if c.token_file.is_some() || c.metrics_without_token {
                errs.push(
                    "control: token_file and metrics_without_token apply only with tcp".into(),
                );
            }
        }
        if let Some(b) = &self.bgp {
            self.check_bgp(b, &mut errs);
        }
        if let Some(x) = &self.ipfix {
            errs.extend(x.problems());
        }
        let ports = dups("port", self.port.iter().map(|p| p.name.as_str()), &mut errs);
        for p in &self.port {
            self.check_port(p, &mut errs);
        }
        self.check_workers(&mut errs);
        // Vnets: prefixes and gateway MAC.
        dups("vnet", self.vnet.iter().map(|v| v.name.as_str()), &mut errs);
        let mut vnets: HashMap<&str, Vec<IpNet>> = HashMap::new();
        for v in &self.vnet {
            let mut nets = Vec::new();
            if v.prefixes.is_empty() {
                errs.push(format!("vnet {:?}: prefixes is empty", v.name));
            }
            for p in &v.prefixes {
                match p.parse::<IpNet>() {
                    Ok(n) if n.trunc() == n => nets.push(n),
                    Ok(n) => errs.push(format!(
                        "vnet {:?}: prefix {p:?} has host bits set (did you mean {}?)",
                        v.name,
                        n.trunc()
                    )),
                    Err(e) => errs.push(format!(
                        "vnet {:?}: prefix {p:?} is not a prefix: {e}",
                        v.name
                    )),
                }
            }
            if let Err(e) = v.gateway_mac.parse::<dataplane::MacAddr>() {
                errs.push(format!("vnet {:?}: gateway_mac: {e}", v.name));
            }
            if let Some(e) = &v.encap {
                if encap_of(e).is_none() {
                    errs.push(format!(
                        "vnet {:?}: encap {e:?} is not vxlan or geneve",
                        v.name
                    ));
                }
                if v.vni.is_none() {
                    errs.push(format!("vnet {:?}: encap needs a vni", v.name));
                }
            }
            if let Some(snat) = &v.snat {
                if self.uplink.is_none() {
                    errs.push(format!(
                        "vnet {:?}: snat needs an [uplink] to leave through",
                        v.name
                    ));
                }
                if let Err(e) = snat_config(&v.name, snat, &nets) {
                    errs.extend(e);
                }
            }
            vnets.insert(v.name.as_str(), nets);
        }
        if let Some(u) = &self.uplink {
            if !ports.contains(u.port.as_str()) {
                errs.push(format!("uplink: port {:?} is not defined", u.port));
            }
            if let Some(vm) = self.vm.iter().find(|v| v.port == u.port) {
                errs.push(format!(
                    "uplink: port {:?} is already used by vm {:?}",
                    u.port, vm.name
                ));
            }
            let macs = [
                ("next_hop_mac", u.next_hop_mac.as_ref()),
                ("mac", u.mac.as_ref()),
            ];
            if u.next_hop_mac.is_none() && u.address.is_none() {
                errs.push(
                    "uplink: next_hop_mac is required without an address (whose next hops ARP resolves)"
                        .to_string(),
                );
            }
            if let Err(e) = underlay(u) {
                errs.extend(e);
            }
            for (what, m) in macs {
                match m.map(|m| m.parse::<dataplane::MacAddr>()) {
                    Some(Ok(m)) if m.is_multicast() || m == dataplane::MacAddr::ZERO => {
                        errs.push(format!("uplink: {what} {m} is not a unicast address"))
                    }
                    Some(Err(e)) => errs.push(format!("uplink: {what}: {e}")),
                    _ => {}
                }
            }
        }
        // Groups: every rule, through the filter's own validation.
        let nsgs = dups("nsg", self.nsg.iter().map(|n| n.name.as_str()), &mut errs);
        let mut rules = 0;
        for n in &self.nsg {
            match filter::validate(&n.name, &n.rules) {
                Ok(r) => rules += r.len(),
                Err(es) => errs.extend(es.iter().map(RuleError::to_string)),
            }
        }
        // VMs: references, MAC, addresses inside their vnet, uniqueness.
        dups("vm", self.vm.iter().map(|v| v.name.as_str()), &mut errs);
        let mut port_users: HashMap<&str, &str> = HashMap::new();
        let mut addrs: HashMap<(&str, IpAddr), &str> = HashMap::new();
        let mut vm_ips: HashMap<&str, Vec<IpAddr>> = HashMap::new();
        for vm in &self.vm {
            let name = &vm.name;
            if !ports.contains(vm.port.as_str()) {
                errs.push(format!("vm {name:?}: port {:?} is not defined", vm.port));
            } else if let Some(other) = port_users.insert(vm.port.as_str(), name.as_str()) {
                errs.push(format!(
                    "vm {name:?}: port {:?} is already used by vm {other:?}",
                    vm.port
                ));
            }
            let nets = vnets.get(vm.vnet.as_str());
            if nets.is_none() {
                errs.push(format!("vm {name:?}: vnet {:?} is not defined", vm.vnet));
            }
            if let Some(n) = &vm.nsg
                && !nsgs.contains(n.as_str())
            {
                errs.push(format!("vm {name:?}: nsg {n:?} is not defined"));
            }
            match vm.mac.parse::<dataplane::MacAddr>() {
                Ok(m) if m.is_multicast() || m == dataplane::MacAddr::ZERO => errs.push(format!(
                    "vm {name:?}: mac {} is not a unicast address",
                    vm.mac
                )),
                Ok(_) => {}
                Err(e) => errs.push(format!("vm {name:?}: mac: {e}")),
            }
            if vm.ips.is_empty() {
                errs.push(format!("vm {name:?}: ips is empty"));
            }
            let mut mine = Vec::new();
            for ip in &vm.ips {
                let Ok(a) = ip.parse::<IpAddr>() else {
                    errs.push(format!("vm {name:?}: {ip:?} is not an IP address"));
                    continue;
                };
                if let Some(nets) = nets
                    && !nets.iter().any(|n| n.contains(&a))
                {
                    errs.push(format!("vm {name:?}: {a} is not in vnet {:?}", vm.vnet));
                }
                if let Some(other) = addrs.insert((vm.vnet.as_str(), a), name.as_str()) {
                    errs.push(format!(
                        "vm {name:?}: {a} is already used by vm {other:?} in vnet {:?}",
                        vm.vnet
                    ));
                }
                mine.push(a);
            }
            vm_ips.insert(name.as_str(), mine);
        }
        // Remote endpoints: their vnet on an overlay, addresses in it and
        // no VM's, a host on the underlay.
        dups(
            "remote",
            self.remote.iter().map(|r| r.name.as_str()),
            &mut errs,
        );
        for r in &self.remote {
            let name = &r.name;
            let nets = vnets.get(r.vnet.as_str());
            match self.vnet.iter().find(|v| v.name == r.vnet) {
                None => errs.push(format!("remote {name:?}: vnet {:?} is not defined", r.vnet)),
                Some(v) if v.vni.is_none() => errs.push(format!(
                    "remote {name:?}: vnet {:?} has no vni (it is on no overlay)",
                    r.vnet
                )),
                Some(_) => {}
            }
            if self.uplink.as_ref().is_none_or(|u| u.address.is_none()) {
                errs.push(format!(
                    "remote {name:?}: tunnels need an [uplink] with an address"
                ));
            }
            if r.host.parse::<Ipv4Addr>().is_err() {
                errs.push(format!(
                    "remote {name:?}: host {:?} is not an IPv4 address",
                    r.host
                ));
            }
            if let Some(m) = &r.mac {
                match m.parse::<dataplane::MacAddr>() {
                    Ok(m) if m.is_multicast() || m == dataplane::MacAddr::ZERO => {
                        errs.push(format!("remote {name:?}: mac {m} is not a unicast address"))
                    }
                    Ok(_) => {}
                    Err(e) => errs.push(format!("remote {name:?}: mac: {e}")),
                }
            }
            if r.ips.is_empty() {
                errs.push(format!("remote {name:?}: ips is empty"));
            }
            for ip in &r.ips {
                let Ok(a) = ip.parse::<IpAddr>() else {
                    errs.push(format!("remote {name:?}: {ip:?} is not an IP address"));
                    continue;
                };
                if let Some(nets) = nets
                    && !nets.iter().any(|n| n.contains(&a))
                {
                    errs.push(format!("remote {name:?}: {a} is not in vnet {:?}", r.vnet));
                }
                if let Some(other) = addrs.insert((r.vnet.as_str(), a), name.as_str()) {
                    errs.push(format!(
                        "remote {name:?}: {a} is already used by {other:?} in vnet {:?}",
                        r.vnet
                    ));
                }
            }
        }
        // VIPs.
        dups("vip", self.vip.iter().map(|v| v.name.as_str()), &mut errs);
        let mut frontends = HashSet::new();
        let mut backends = 0;
        let mut vips = Vec::new();
        // A Mux's probe names its DIP and port only: two probed Mux VIPs
        // of a vnet may not share both.
        let mut probed: HashMap<(&str, IpAddr, u16), &str> = HashMap::new();
        for v in &self.vip {
            backends += v.backends.len();
            if let Some(c) = self.check_vip(v, &vnets, &vm_ips, &mut frontends, &mut errs) {
                if c.mode == VipMode::Mux && v.probe.is_some() {
                    for b in &c.backends {
                        if let Some(o) = probed.insert((v.vnet.as_str(), b.ip, c.port), &v.name) {
                            errs.push(format!(
                                "vip {:?}: backend {} on port {} is probed by mux vip {o:?} too (a probe could not be told apart)",
                                v.name, b.ip, c.port
                            ));
                        }
                    }
                }
                vips.push(c);
            }
        }
        if errs.is_empty() {
            Ok((
                Summary {
                    ports: self.port.len(),
                    vnets: self.vnet.len(),
                    vms: self.vm.len(),
                    nsgs: self.nsg.len(),
                    rules,
                    vips: self.vip.len(),
                    backends,
                },
                vips,
            ))
        } else {
            Err(ConfigError::Invalid(errs))
        }
    }

    fn check_port(&self, p: &PortCfg, errs: &mut Vec<String>) {
        let name = &p.name;
        errs.extend(p.spec.problems(name).iter().map(ToString::to_string));
        if p.spec.is_dpdk() && !cfg!(feature = "dpdk") {
            errs.push(format!(
                "port {name:?}: driver \"dpdk\" needs pollux built with the dpdk feature"
            ));
        }
        if let Some(m) = p.mtu
            && !(68..=9000).contains(&m)
        {
            errs.push(format!("port {name:?}: mtu {m} is outside 68-9000"));
        }
        // Without mergeable buffers a guest posts receive buffers for a
        // 1500-byte MTU (Linux: 1518-byte frames); a larger frame would
        // not fit one.
        if let (PortSpec::VhostUser { .. }, Some(m)) = (&p.spec, p.mtu)
            && m > 1500
        {
            errs.push(format!(
                "port {name:?}: a vhost_user port carries an MTU of at most 1500 (no mergeable receive buffers); mtu is {m}"
            ));
        }
    }

    /// What the workers and ports must agree on: the machine's cores, one
    /// queue per worker on every port, and DPDK ports on their own.
    fn check_workers(&self, errs: &mut Vec<String>) {
        let workers = self.dataplane.workers;
        let cores = usable_cores();
        if workers > cores.max(1) {
            errs.push(format!(
                "dataplane: workers = {workers}, but this machine has {cores} cores"
            ));
        }
        for p in &self.port {
            let name = &p.name;
            if p.spec.queues() == Queues::One && workers > 1 {
                errs.push(match p.spec {
                    PortSpec::AfXdp { .. } => format!(
                        "port {name:?}: an af_xdp port binds one queue; with workers = {workers} use af_packet ports"
                    ),
                    PortSpec::VhostUser { .. } => format!(
                        "port {name:?}: a vhost_user port has one queue pair, polled by one worker; with workers = {workers} use dpdk net_vhost ports with queues={workers}"
                    ),
                    _ => format!(
                        "port {name:?}: a {} port has one queue; with workers = {workers} use af_packet or ring ports",
                        p.spec.driver()
                    ),
                });
            }
        }
        // A vhost-user port has as many queue pairs as its devargs say
        // (one by default), each polled by one worker: fewer leave workers
        // without a queue, more leave a guest's queues unpolled.
        for p in &self.port {
            if let PortSpec::Dpdk {
                devargs: Some(d), ..
            } = &p.spec
                && let Some(q) = vhost_queues(d)
                && q != workers
            {
                errs.push(format!(
                    "port {:?}: net_vhost queues={q}, but workers = {workers} (give it queues={workers}: one queue pair per worker)",
                    p.name
                ));
            }
        }
        // A PCI device needs EAL's PCI bus: without it the port would
        // not open, which is better said now.
        let eal = self
            .dpdk
            .as_ref()
            .map(|d| d.eal_args.as_slice())
            .unwrap_or(&[]);
        for p in &self.port {
            if let PortSpec::Dpdk {
                pci: Some(addr), ..
            } = &p.spec
            {
                errs.extend(pci_eal_problems(&p.name, addr, eal));
            }
        }
        // DPDK workers move mbufs end to end: every port carries them.
        if self.port.iter().any(|p| p.spec.is_dpdk()) {
            for p in self.port.iter().filter(|p| !p.spec.is_dpdk()) {
                errs.push(format!(
                    "port {:?}: driver {:?} cannot share a worker with dpdk ports (make every port dpdk)",
                    p.name,
                    p.spec.driver()
                ));
            }
        }
    }

    fn check_vip<'a>(
        &'a self,
        v: &'a VipCfg,
        vnets: &HashMap<&str, Vec<IpNet>>,
        vm_ips: &HashMap<&str, Vec<IpAddr>>,
        frontends: &mut HashSet<(IpAddr, u16, u8)>,
        errs: &mut Vec<String>,
    ) -> Option<VipConfig> {
        let name = &v.name;
        let before = errs.len();
        let nets = vnets.get(v.vnet.as_str());
        if nets.is_none() {
            errs.push(format!("vip {name:?}: vnet {:?} is not defined", v.vnet));
        }
        let addr = match v.address.parse::<IpAddr>() {
            Ok(a) => {
                if let Some(nets) = nets {
                    // Outside the vnet, a VIP is public: reached through the uplink.
                    if !nets.iter().any(|n| n.contains(&a)) && self.uplink.is_none() {
                        errs.push(format!(
                            "vip {name:?}: address {a} is not in vnet {:?} (a public VIP needs an [uplink])",
                            v.vnet
                        ));
                    }
                }
                Some(a)
            }
            Err(_) => {
                errs.push(format!(
                    "vip {name:?}: address {:?} is not an IP address",
                    v.address
                ));
                None
            }
        };
        let proto = match v.protocol.as_str() {
            "tcp" => 6,
            "udp" => 17,
            other => {
                errs.push(format!(
                    "vip {name:?}: protocol {other:?} is not one of tcp, udp"
                ));
                0
            }
        };
        if v.port == 0 {
            errs.push(format!("vip {name:?}: port must not be 0"));
        }
        if let Some(a) = addr
            && proto != 0
            && !frontends.insert((a, v.port, proto))
        {
            errs.push(format!(
                "vip {name:?}: {a}:{}/{} is already another vip's frontend",
                v.port, v.protocol
            ));
        }
        let distribution = match v
            .distribution
            .as_deref()
            .unwrap_or("5-tuple")
            .parse::<Distribution>()
        {
            Ok(d) => d,
            Err(e) => {
                errs.push(format!("vip {name:?}: {e}"));
                Distribution::FiveTuple
            }
        };
        let on_unhealthy = match v.on_unhealthy.as_deref().unwrap_or("keep") {
            "keep" => OnUnhealthy::Keep,
            "reset" => OnUnhealthy::Reset,
            other => {
                errs.push(format!(
                    "vip {name:?}: on_unhealthy {other:?} is not one of keep, reset"
                ));
                OnUnhealthy::Keep
            }
        };
        let when_all_down = match v.when_all_down.as_deref().unwrap_or("drop-new") {
            "drop-new" => WhenAllDown::DropNew,
            "fail-open" => WhenAllDown::FailOpen,
            other => {
                errs.push(format!(
                    "vip {name:?}: when_all_down {other:?} is not one of drop-new, fail-open"
                ));
                WhenAllDown::DropNew
            }
        };
        if v.backends.is_empty() {
            errs.push(format!("vip {name:?}: backends is empty"));
        }
        if v.max_conns == Some(0) {
            errs.push(format!(
                "vip {name:?}: max_conns must be at least 1 (leave it out for no limit)"
            ));
        }
        let syn_proxy = match v.syn_proxy.as_deref().map(str::parse::<SynProxy>) {
            None => SynProxy::Off,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                errs.push(format!("vip {name:?}: {e}"));
                SynProxy::Off
            }
        };
        let mode = match v.mode.as_deref().map(str::parse::<VipMode>) {
            None => VipMode::Local,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                errs.push(format!("vip {name:?}: {e}"));
                VipMode::Local
            }
        };
        if let (VipMode::Mux, Some(p)) = (mode, &v.probe)
            && p.port != v.port
        {
            errs.push(format!(
                "vip {name:?}: a mux vip's probe goes through the vip: its port must be the vip's ({})",
                v.port
            ));
        }
        let mut bs = Vec::new();
        for b in &v.backends {
            let ip = match (&b.vm, &b.ip) {
                (Some(vm), None) => match vm_ips.get(vm.as_str()) {
                    Some(ips) => ips.first().copied(),
                    None => {
                        errs.push(format!("vip {name:?}: backend vm {vm:?} is not defined"));
                        None
                    }
                },
                (None, Some(ip)) => match ip.parse::<IpAddr>() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        errs.push(format!("vip {name:?}: backend {ip:?} is not an IP address"));
                        None
                    }
                },
                _ => {
                    errs.push(format!(
                        "vip {name:?}: a backend needs exactly one of vm, ip"
                    ));
                    None
                }
            };
            let Some(ip) = ip else { continue };
            // (A Mux's backends are on other hosts, anywhere its underlay
            // routes to.)
            if let Some(nets) = nets.filter(|_| mode != VipMode::Mux)
                && !nets.iter().any(|n| n.contains(&ip))
            {
                errs.push(format!(
                    "vip {name:?}: backend {ip} is not in vnet {:?}",
                    v.vnet
                ));
            }
            if b.port == 0 {
                errs.push(format!("vip {name:?}: backend {ip} has port 0"));
            }
            bs.push(Backend {
                ip,
                port: b.port,
                weight: b.weight.unwrap_or(1),
            });
        }
        if let Some(p) = &v.probe {
            if !matches!(p.kind.as_str(), "http" | "tcp") {
                errs.push(format!(
                    "vip {name:?}: probe kind {:?} is not one of http, tcp",
                    p.kind
                ));
            }
            if p.kind == "tcp" && p.path.is_some() {
                errs.push(format!(
                    "vip {name:?}: probe path applies to http probes only"
                ));
            }
            if let Some(path) = &p.path
                && (!path.starts_with('/')
                    || path.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                errs.push(format!(
                    "vip {name:?}: probe path {path:?} must start with / and have no spaces"
                ));
            }
            if p.port == 0 {
                errs.push(format!("vip {name:?}: probe port must not be 0"));
            }
            let interval = p.interval_ms.unwrap_or(5000);
            if interval < 100 {
                errs.push(format!(
                    "vip {name:?}: probe interval_ms {interval} is below 100"
                ));
            }
            if let Some(t) = p.timeout_ms
                && (t == 0 || t > interval)
            {
                errs.push(format!("vip {name:?}: probe timeout_ms {t} must be between 1 and interval_ms ({interval})"));
            }
            if p.threshold == Some(0) {
                errs.push(format!("vip {name:?}: probe threshold must be at least 1"));
            }
            for b in bs.iter().filter(|b| b.ip.is_ipv6()) {
                errs.push(format!(
                    "vip {name:?}: backend {} is IPv6; probes reach IPv4 backends only",
                    b.ip
                ));
            }
        }
        // Whatever the load balancer itself refuses (duplicate backends,
        // family mix, more backends than the table holds).
        if errs.len() != before {
            return None;
        }
        let mut cfg = VipConfig::new(name, addr?, v.port, proto, bs);
        cfg.distribution = distribution;
        cfg.on_unhealthy = on_unhealthy;
        cfg.when_all_down = when_all_down;
        cfg.max_conns = v.max_conns.unwrap_or(0);
        cfg.syn_proxy = syn_proxy;
        cfg.mode = mode;
        match Vip::new(cfg.clone(), &[]) {
            Ok(_) => Some(cfg),
            Err(e) => {
                errs.push(e.to_string());
                None
            }
        }
    }

    /// Validates and builds the switch topology: ports are numbered in file
    /// order. Every problem is returned, one line each.
    pub fn topology(&self) -> Result<vswitch::Topology, ConfigError> {
        let (_, vips) = self.check_all()?;
        let index = |names: &[&str], n: &str| names.iter().position(|x| *x == n);
        let ports: Vec<&str> = self.port.iter().map(|p| p.name.as_str()).collect();
        let vnet_names: Vec<&str> = self.vnet.iter().map(|v| v.name.as_str()).collect();
        let nsg_names: Vec<&str> = self.nsg.iter().map(|n| n.name.as_str()).collect();
        let mut t = vswitch::Topology {
            ports: self.port.len() as u16,
            nsgs: self.nsg.clone(),
            ..Default::default()
        };
        for v in &self.vnet {
            t.vnets.push(vswitch::VnetDef {
                name: v.name.clone(),
                prefixes: v.prefixes.iter().filter_map(|p| p.parse().ok()).collect(),
                gateway_mac: v.gateway_mac.parse().unwrap_or_default(),
                snat: v
                    .snat
                    .as_ref()
                    .and_then(|c| snat_config(&v.name, c, &[]).ok()),
                vni: v.vni,
                encap: v.encap.as_deref().and_then(encap_of).unwrap_or_default(),
            });
        }
        for vm in &self.vm {
            t.vms.push(vswitch::VmDef {
                name: vm.name.clone(),
                port: index(&ports, &vm.port).unwrap_or(0) as u16,
                vnet: index(&vnet_names, &vm.vnet).unwrap_or(0),
                mac: vm.mac.parse().unwrap_or_default(),
                ips: vm.ips.iter().filter_map(|i| i.parse().ok()).collect(),
                nsg: vm.nsg.as_deref().and_then(|n| index(&nsg_names, n)),
                internal: false,
            });
        }
        t.uplink = self.uplink.as_ref().map(|u| vswitch::UplinkDef {
            port: index(&ports, &u.port).unwrap_or(0) as u16,
            mac: u
                .mac
                .as_deref()
                .unwrap_or(DEFAULT_UPLINK_MAC)
                .parse()
                .unwrap_or_default(),
            next_hop_mac: u
                .next_hop_mac
                .as_deref()
                .and_then(|m| m.parse().ok())
                .unwrap_or_default(),
            underlay: underlay(u).ok().flatten(),
        });
        for r in &self.remote {
            t.remotes.push(vswitch::RemoteDef {
                name: r.name.clone(),
                vnet: index(&vnet_names, &r.vnet).unwrap_or(0),
                ips: r.ips.iter().filter_map(|i| i.parse().ok()).collect(),
                host: r.host.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
                mac: r.mac.as_deref().and_then(|m| m.parse().ok()),
            });
        }
        for (v, cfg) in self.vip.iter().zip(vips) {
            t.vips.push(vswitch::VipDef {
                vnet: index(&vnet_names, &v.vnet).unwrap_or(0),
                config: cfg,
                health: Vec::new(),
            });
        }
        Ok(t)
    }
}

/// The tunnel a vnet's `encap` names.
pub fn encap_of(name: &str) -> Option<dataplane::tunnel::Encap> {
    match name {
        "vxlan" => Some(dataplane::tunnel::Encap::Vxlan),
        "geneve" => Some(dataplane::tunnel::Encap::Geneve),
        _ => None,
    }
}

/// The uplink's underlay (`None` without an address), or every problem
/// with its address, gateway and routes.
fn underlay(u: &UplinkCfg) -> Result<Option<vswitch::Underlay>, Vec<String>> {
    let Some(a) = &u.address else {
        let mut errs = Vec::new();
        if u.gateway.is_some() || !u.route.is_empty() {
            errs.push("uplink: gateway and routes need an address".to_string());
        }
        return if errs.is_empty() { Ok(None) } else { Err(errs) };
    };
    let mut errs = Vec::new();
    let address = match a.parse::<ipnet::Ipv4Net>() {
        Ok(n) if n.prefix_len() > 30 => {
            errs.push(format!(
                "uplink: address {a:?} leaves no room for neighbours (at most /30)"
            ));
            n
        }
        Ok(n) if n.addr() == n.network() || n.addr() == n.broadcast() => {
            errs.push(format!("uplink: address {a:?} is not a host address"));
            n
        }
        Ok(n) => n,
        Err(_) => {
            errs.push(format!(
                "uplink: address {a:?} is not an IPv4 address with its prefix length (192.0.2.1/24)"
            ));
            return Err(errs);
        }
    };
    let mut routes = Vec::new();
    let via = |what: &str, v: &str, errs: &mut Vec<String>| match v.parse::<Ipv4Addr>() {
        Ok(h) if address.contains(&h) && h != address.addr() => Some(h),
        Ok(h) => {
            errs.push(format!(
                "uplink: {what}: next hop {h} is not on the uplink's network {}",
                address.trunc()
            ));
            None
        }
        Err(_) => {
            errs.push(format!("uplink: {what}: {v:?} is not an IPv4 address"));
            None
        }
    };
    if let Some(g) = &u.gateway
        && let Some(h) = via("gateway", g, &mut errs)
    {
        routes.push((ipnet::Ipv4Net::default(), h));
    }
    for r in &u.route {
        let what = format!("route {:?}", r.prefix);
        let prefix = match r.prefix.parse::<ipnet::Ipv4Net>() {
            Ok(n) if n.trunc() == n => Some(n),
            Ok(n) => {
                errs.push(format!(
                    "uplink: {what} has host bits set (did you mean {}?)",
                    n.trunc()
                ));
                None
            }
            Err(_) => {
                errs.push(format!("uplink: {what} is not an IPv4 prefix"));
                None
            }
        };
        if let (Some(p), Some(h)) = (prefix, via(&what, &r.via, &mut errs)) {
            if routes.iter().any(|(q, _)| *q == p) {
                errs.push(format!("uplink: {what} is given twice"));
            }
            routes.push((p, h));
        }
    }
    let mut muxes = Vec::new();
    for m in &u.muxes {
        let n = m
            .parse::<ipnet::Ipv4Net>()
            .or_else(|_| m.parse::<std::net::Ipv4Addr>().map(ipnet::Ipv4Net::from));
        match n {
            Ok(n) if n.trunc() == n => muxes.push(n),
            Ok(n) => errs.push(format!(
                "uplink: mux {m:?} has host bits set (did you mean {}?)",
                n.trunc()
            )),
            Err(_) => errs.push(format!(
                "uplink: mux {m:?} is not an IPv4 address or prefix"
            )),
        }
    }
    if errs.is_empty() {
        Ok(Some(vswitch::Underlay {
            address,
            routes,
            muxes,
        }))
    } else {
        Err(errs)
    }
}

/// Builds the SNAT layout of vnet `vnet` (whose prefixes are `nets`), or
/// every problem with it.
fn snat_config(vnet: &str, c: &SnatCfg, nets: &[IpNet]) -> Result<SnatConfig, Vec<String>> {
    let mut errs = Vec::new();
    let what = format!("vnet {vnet:?}: snat");
    if c.public_ips.is_empty() {
        errs.push(format!("{what}: public_ips is empty"));
    }
    let mut public_ips = Vec::new();
    for ip in &c.public_ips {
        match ip.parse::<IpAddr>() {
            Ok(a) if nets.iter().any(|n| n.contains(&a)) => {
                errs.push(format!("{what}: public address {a} is inside the vnet"))
            }
            Ok(a) => public_ips.push(a),
            Err(_) => errs.push(format!("{what}: {ip:?} is not an IP address")),
        }
    }
    let range = c.port_range.as_deref().unwrap_or("1024-65535");
    let (port_lo, port_hi) = match range
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
    {
        Some((lo, hi)) if lo >= 1 && lo <= hi => (lo, hi),
        _ => {
            errs.push(format!(
                "{what}: port_range {range:?} is not \"lo-hi\" with 1 <= lo <= hi <= 65535"
            ));
            (1024, 65535)
        }
    };
    let per_vm = c.ports_per_vm.unwrap_or(1024);
    if per_vm == 0 || !per_vm.is_multiple_of(SNAT_BLOCK) {
        errs.push(format!(
            "{what}: ports_per_vm {per_vm} is not a positive multiple of {SNAT_BLOCK}"
        ));
    }
    let span = u32::from(port_hi) - u32::from(port_lo) + 1;
    if per_vm > span {
        errs.push(format!(
            "{what}: ports_per_vm {per_vm} is more than port_range {range:?} holds ({span})"
        ));
    }
    let mapping = match c.mapping {
        Some(SnatMappingCfg::AddressAndPortDependent) => lb::snat::Mapping::AddressAndPortDependent,
        _ => lb::snat::Mapping::EndpointIndependent,
    };
    let filtering = match c.filtering {
        Some(SnatFilteringCfg::EndpointIndependent) => lb::snat::Filtering::EndpointIndependent,
        Some(SnatFilteringCfg::AddressDependent) => lb::snat::Filtering::AddressDependent,
        _ => lb::snat::Filtering::AddressAndPortDependent,
    };
    if mapping == lb::snat::Mapping::AddressAndPortDependent
        && filtering != lb::snat::Filtering::AddressAndPortDependent
    {
        errs.push(format!(
            "{what}: filtering {:?} needs endpoint-independent mapping (an \
             address-and-port-dependent mapping lets in only its connections' replies)",
            filter_name(filtering)
        ));
    }
    let d = lb::snat::SnatTimeouts::default();
    let mut secs = |key: &str, v: Option<u64>, default: u64| -> u64 {
        let v = v.unwrap_or(default / 1_000_000_000);
        if !(SNAT_MIN_TIMEOUT..=SNAT_MAX_TIMEOUT).contains(&v) {
            errs.push(format!(
                "{what}: {key} {v} is not {SNAT_MIN_TIMEOUT}-{SNAT_MAX_TIMEOUT} seconds"
            ));
        }
        v.clamp(SNAT_MIN_TIMEOUT, SNAT_MAX_TIMEOUT) * 1_000_000_000
    };
    let timeouts = lb::snat::SnatTimeouts {
        udp: secs("udp_timeout", c.udp_timeout, d.udp),
        tcp_established: secs(
            "tcp_established_timeout",
            c.tcp_established_timeout,
            d.tcp_established,
        ),
        tcp_transitory: secs(
            "tcp_transitory_timeout",
            c.tcp_transitory_timeout,
            d.tcp_transitory,
        ),
        icmp: secs("icmp_timeout", c.icmp_timeout, d.icmp),
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(SnatConfig {
        public_ips,
        port_lo,
        port_hi,
        block_size: SNAT_BLOCK as u16,
        blocks_per_member: (per_vm / SNAT_BLOCK) as usize,
        mapping,
        filtering,
        timeouts,
    })
}

/// The SNAT idle timeouts allowed, in seconds: from the conntrack's
/// shortest (what the switch's touches of a connection in use assume) to
/// a week.
const SNAT_MIN_TIMEOUT: u64 = 10;
const SNAT_MAX_TIMEOUT: u64 = 7 * 24 * 3600;

/// The configuration's name of a filtering behaviour.
fn filter_name(f: lb::snat::Filtering) -> &'static str {
    match f {
        lb::snat::Filtering::EndpointIndependent => "endpoint-independent",
        lb::snat::Filtering::AddressDependent => "address-dependent",
        lb::snat::Filtering::AddressAndPortDependent => "address-and-port-dependent",
    }
}

/// The queue pairs of a `net_vhost` device's devargs (`queues=N`, 1 when
/// absent); `None` for other devices, or when `queues` is not a number (the
/// driver then refuses it, naming it).
fn vhost_queues(devargs: &str) -> Option<usize> {
    let mut parts = devargs.split(',');
    let dev = parts.next()?.trim();
    if !dev.starts_with("net_vhost") && !dev.starts_with("eth_vhost") {
        return None;
    }
    match parts.find_map(|kv| kv.trim().strip_prefix("queues=")) {
        Some(q) => q.trim().parse().ok(),
        None => Some(1),
    }
}

/// What in EAL arguments `eal` keeps port `name`'s PCI device `addr`
/// from being opened: without the PCI bus (`--no-pci`) EAL cannot find it.
/// (An allow or block list does not: pollux probes a device EAL left
/// alone, which adds it to the allowed ones.)
fn pci_eal_problems(name: &str, addr: &str, eal: &[String]) -> Vec<String> {
    eal.iter()
        .filter(|a| a.as_str() == "--no-pci")
        .take(1)
        .map(|_| {
            format!(
                "port {name:?}: PCI device {addr} needs the PCI bus, but [dpdk] eal_args has --no-pci"
            )
        })
        .collect()
}

/// The cores this process may run on, as first seen (before DPDK's EAL,
/// if any, pins the main thread to its own lcores): every later check, such
/// as an API change validated on the control thread, sees the same count.
fn usable_cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| core_affinity::get_core_ids().map_or(0, |c| c.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/pollux.toml");

    #[test]
    fn eal_arguments_that_leave_a_pci_port_unopened_are_named() {
        let a = |args: &[&str]| -> Vec<String> {
            let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            pci_eal_problems("wire", "0000:01:10.0", &v)
        };
        assert!(
            a(&[
                "-l",
                "0",
                "-a",
                "0000:01:10.0",
                "--huge-dir",
                "/dev/hugepages"
            ])
            .is_empty()
        );
        assert!(a(&["-a", "0000:02:00.0", "--no-huge"]).is_empty());
        assert!(a(&[]).is_empty());
        let e = a(&["--no-pci", "-m", "512", "--no-pci"]);
        assert_eq!(
            e,
            [
                "port \"wire\": PCI device 0000:01:10.0 needs the PCI bus, but [dpdk] eal_args has --no-pci"
            ]
        );
    }

    #[test]
    fn the_example_is_valid() {
        let c = Config::parse(EXAMPLE).unwrap();
        let s = c.validate().unwrap();
        assert_eq!((s.vms, s.vips, s.nsgs), (5, 1, 2));
        assert!(s.rules >= 3);
    }

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Err(e) => e.problems(),
            Ok(c) => c.validate().err().map(|e| e.problems()).unwrap_or_default(),
        }
    }

    #[test]
    fn ipfix_is_checked() {
        let c = Config::parse("[ipfix]\ncollector = \"127.0.0.1:4739\"\n").unwrap();
        let x = c.ipfix.clone().unwrap();
        assert_eq!(
            (
                x.active_timeout_s,
                x.template_interval_s,
                x.domain_id,
                x.enterprise
            ),
            (60, 30, 1, 32473)
        );
        assert!(c.validate().is_ok());
        assert_eq!(
            problems(
                "[ipfix]\ncollector = \"collector:4739\"\nactive_timeout_s = 0\n\
                 template_interval_s = 7200\nenterprise = 0\n"
            ),
            [
                "ipfix: collector \"collector:4739\" is not an address:port",
                "ipfix: active_timeout_s 0 is not within 1-86400",
                "ipfix: template_interval_s 7200 is not within 1-3600",
                "ipfix: enterprise must not be 0",
            ]
        );
        assert_eq!(
            problems("[ipfix]\ncollector = \"0.0.0.0:4739\"\n"),
            ["ipfix: collector \"0.0.0.0:4739\" is not a unicast address"]
        );
        assert_eq!(
            problems("[ipfix]\ncollector = \"[::1]:0\"\n"),
            ["ipfix: collector \"[::1]:0\" has port 0"]
        );
    }

    #[test]
    fn idle_sleep_and_vhost_queues_are_checked() {
        assert_eq!(
            problems("[dataplane]\ndrop_summary_s = 100000\n"),
            ["dataplane: drop_summary_s 100000 is above 86400 (a day)"]
        );
        let p = problems("[dataplane]\nidle_sleep_us = 20000\n");
        assert_eq!(p, ["dataplane: idle_sleep_us 20000 is above 10000"]);
        assert!(problems("[dataplane]\nidle_sleep_us = 50\n").is_empty());
        assert_eq!(vhost_queues("net_vhost0,iface=/tmp/a,client=1"), Some(1));
        assert_eq!(
            vhost_queues("net_vhost1,iface=/tmp/a,queues=2,client=1"),
            Some(2)
        );
        assert_eq!(vhost_queues("net_ring0"), None);
        assert_eq!(vhost_queues("net_vhost0,queues=two"), None);
        assert_eq!(vhost_queues("eth_vhost0,iface=/tmp/a,queues=4"), Some(4));
        // One worker: the default single queue is right, two are not.
        let one = |q: &str| {
            problems(&format!(
                "[[port]]\nname = \"vm1\"\ndriver = \"dpdk\"\ndevargs = \"net_vhost0,iface=/tmp/vm1.sock{q}\"\n"
            ))
        };
        let queue_problem = |p: &[String]| p.iter().any(|l| l.contains("net_vhost queues="));
        assert!(!queue_problem(&one("")), "{:?}", one(""));
        assert!(queue_problem(&one(",queues=2")), "{:?}", one(",queues=2"));
        if usable_cores() >= 2 {
            let p = problems(
                "[dataplane]\nworkers = 2\n[[port]]\nname = \"vm1\"\ndriver = \"dpdk\"\ndevargs = \"net_vhost0,iface=/tmp/vm1.sock,client=1\"\n",
            );
            // (Without the dpdk feature the port is also refused for that.)
            assert!(
                p.contains(
                    &"port \"vm1\": net_vhost queues=1, but workers = 2 (give it queues=2: one queue pair per worker)"
                        .to_string()
                ),
                "{p:?}"
            );
        }
    }

    #[test]
    fn syntax_errors_and_unknown_keys_name_the_line() {
        let p = problems("[dataplane]\nworkers = 1\ncolour = \"blue\"\n");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("config line 3: unknown field `colour`"),
            "{p:?}"
        );
        let p = problems("[[vm]\nname = 1\n");
        assert!(p[0].starts_with("config line 1:"), "{p:?}");
        // A port's driver decides which keys it takes.
        let port = |rest: &str| problems(&format!("\n[[port]]\nname = \"p1\"\n{rest}"));
        let cases = [
            (
                "driver = \"warp\"\n",
                "config line 2: port \"p1\": unknown variant `warp`, expected one of `ring`, `pcap`, `af_packet`, `af_xdp`, `vhost_user`, `dpdk`",
            ),
            (
                "driver = \"af_packet\"\n",
                "config line 2: port \"p1\": missing field `iface`",
            ),
            (
                "driver = \"ring\"\niface = \"eth0\"\n",
                "config line 2: port \"p1\": unknown field `iface`",
            ),
            (
                "iface = \"eth0\"\n",
                "config line 2: port \"p1\": missing field `driver`",
            ),
        ];
        for (rest, want) in cases {
            let p = port(rest);
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(p[0].starts_with(want), "{rest}: {p:?}");
        }
    }

    #[test]
    fn every_problem_is_one_line_naming_its_item() {
        let text = r#"
[[port]]
name = "p1"
driver = "ring"
[[port]]
name = "p2"
driver = "af_packet"
iface = ""

[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16", "10.2.0.1/16"]
gateway_mac = "12:34:56:78:9a:zz"

[[vm]]
name = "web1"
port = "p9"
vnet = "a"
mac = "ff:ff:ff:ff:ff:ff"
ips = ["10.1.0.4", "192.168.1.1"]
nsg = "nope"

[[vm]]
name = "web2"
port = "p1"
vnet = "b"
mac = "02:00:00:00:00:02"
ips = ["10.1.0.4"]

[[nsg]]
name = "web"
[[nsg.rule]]
priority = 100
direction = "in"
action = "allow"
protocol = "icmp"
dst_ports = ["80"]

[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
distribution = "4-tuple"
max_conns = 0
syn_proxy = "maybe"
backends = [ { vm = "web1", port = 8080 }, { ip = "10.1.0.9", port = 8080, weight = 2 }, { ip = "10.9.0.9", port = 8080 }, { vm = "ghost", port = 1 } ]
[vip.probe]
kind = "http"
port = 8080
path = "health"
interval_ms = 1000
timeout_ms = 2000
threshold = 0
"#;
        let p = problems(text);
        let want = [
            "port \"p2\": an af_packet port needs iface",
            "vnet \"a\": prefix \"10.2.0.1/16\" has host bits set (did you mean 10.2.0.0/16?)",
            "vnet \"a\": gateway_mac: invalid MAC address \"12:34:56:78:9a:zz\"",
            "nsg \"web\" rule #1 (priority 100, in): dst_ports must be \"any\" on an icmp rule",
            "vm \"web1\": port \"p9\" is not defined",
            "vm \"web1\": nsg \"nope\" is not defined",
            "vm \"web1\": mac ff:ff:ff:ff:ff:ff is not a unicast address",
            "vm \"web1\": 192.168.1.1 is not in vnet \"a\"",
            "vm \"web2\": vnet \"b\" is not defined",
            "vip \"web\": distribution \"4-tuple\" is not one of 5-tuple, 3-tuple, 2-tuple",
            "vip \"web\": max_conns must be at least 1 (leave it out for no limit)",
            "vip \"web\": syn_proxy \"maybe\" is not one of off, auto, on",
            "vip \"web\": backend 10.9.0.9 is not in vnet \"a\"",
            "vip \"web\": backend vm \"ghost\" is not defined",
            "vip \"web\": probe path \"health\" must start with /",
            "vip \"web\": probe timeout_ms 2000 must be between 1 and interval_ms (1000)",
            "vip \"web\": probe threshold must be at least 1",
        ];
        for w in want {
            assert!(
                p.iter().any(|l| l.starts_with(w)),
                "missing {w:?} in {p:#?}"
            );
        }
        assert_eq!(p.len(), want.len(), "{p:#?}");
        assert!(p.iter().all(|l| !l.contains('\n')));
    }

    #[test]
    fn duplicates_and_conflicts() {
        let text = r#"
[[port]]
name = "p1"
driver = "ring"
[[port]]
name = "p1"
driver = "ring"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
[[vm]]
name = "x"
port = "p1"
vnet = "a"
mac = "02:00:00:00:00:01"
ips = ["10.1.0.4"]
[[vm]]
name = "y"
port = "p1"
vnet = "a"
mac = "02:00:00:00:00:02"
ips = ["10.1.0.4"]
[[vip]]
name = "v"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ { ip = "10.1.0.4", port = 80 }, { ip = "10.1.0.4", port = 80 } ]
[[vip]]
name = "w"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "tcp"
backends = [ { ip = "10.1.0.5", port = 80 } ]
[[vip]]
name = "dns"
vnet = "a"
address = "10.1.0.100"
port = 53
protocol = "udp"
syn_proxy = "on"
backends = [ { ip = "10.1.0.5", port = 53 } ]
"#;
        let p = problems(text);
        for w in [
            "vip \"dns\": syn_proxy needs a tcp vip",
            "port \"p1\" is defined twice",
            "vm \"y\": port \"p1\" is already used by vm \"x\"",
            "vm \"y\": 10.1.0.4 is already used by vm \"x\" in vnet \"a\"",
            "vip \"v\": backend 10.1.0.4:80 is listed twice",
            "vip \"w\": 10.1.0.100:80/tcp is already another vip's frontend",
        ] {
            assert!(p.iter().any(|l| l == w), "missing {w:?} in {p:#?}");
        }
    }

    const UPLINK: &str = r#"
[[port]]
name = "vm1"
driver = "ring"
[[port]]
name = "wire"
driver = "ring"
[uplink]
port = "wire"
next_hop_mac = "02:00:00:00:00:fe"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
[vnet.snat]
public_ips = ["203.0.113.10"]
ports_per_vm = 256
[[vm]]
name = "web1"
port = "vm1"
vnet = "a"
mac = "02:00:00:00:00:01"
ips = ["10.1.0.4"]
[[vip]]
name = "public"
vnet = "a"
address = "203.0.113.80"
port = 80
protocol = "tcp"
backends = [ { vm = "web1", port = 8080 } ]
"#;

    #[test]
    fn uplink_snat_and_public_vips() {
        let c = Config::parse(UPLINK).unwrap();
        c.validate().unwrap();
        let t = c.topology().unwrap();
        let up = t.uplink.unwrap();
        assert_eq!(up.port, 1);
        assert_eq!(up.mac.to_string(), DEFAULT_UPLINK_MAC);
        assert_eq!(up.next_hop_mac.to_string(), "02:00:00:00:00:fe");
        let snat = t.vnets[0].snat.clone().unwrap();
        assert_eq!(
            snat.public_ips,
            vec!["203.0.113.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            (
                snat.port_lo,
                snat.port_hi,
                snat.block_size,
                snat.blocks_per_member
            ),
            (1024, 65535, 64, 4)
        );
        // The RFC 4787 / 5382 / 5508 behaviour by default.
        assert_eq!(snat.mapping, lb::snat::Mapping::EndpointIndependent);
        assert_eq!(snat.filtering, lb::snat::Filtering::AddressAndPortDependent);
        assert_eq!(snat.timeouts, lb::snat::SnatTimeouts::default());
        // Each key set.
        let set = UPLINK.replace(
            "ports_per_vm = 256",
            "ports_per_vm = 256\nmapping = \"endpoint-independent\"\n\
             filtering = \"address-dependent\"\nudp_timeout = 600\n\
             tcp_established_timeout = 86400\ntcp_transitory_timeout = 300\nicmp_timeout = 90",
        );
        let t = Config::parse(&set).unwrap().topology().unwrap();
        let snat = t.vnets[0].snat.clone().unwrap();
        assert_eq!(snat.filtering, lb::snat::Filtering::AddressDependent);
        let s = 1_000_000_000;
        assert_eq!(
            snat.timeouts,
            lb::snat::SnatTimeouts {
                udp: 600 * s,
                tcp_established: 86400 * s,
                tcp_transitory: 300 * s,
                icmp: 90 * s,
            }
        );
        // Without the uplink: SNAT and the public VIP have nowhere to go.
        let no_uplink = UPLINK.replace(
            "[uplink]\nport = \"wire\"\nnext_hop_mac = \"02:00:00:00:00:fe\"\n",
            "",
        );
        let p = problems(&no_uplink);
        for w in [
            "vnet \"a\": snat needs an [uplink] to leave through",
            "vip \"public\": address 203.0.113.80 is not in vnet \"a\" (a public VIP needs an [uplink])",
        ] {
            assert!(p.iter().any(|l| l == w), "missing {w:?} in {p:#?}");
        }
    }

    #[test]
    fn an_overlay_builds_remotes_routes_and_tunnels() {
        let text = format!(
            "{}\n[[remote]]\nname = \"db\"\nvnet = \"a\"\nips = [\"10.1.0.20\"]\nhost = \"192.168.101.2\"\nmac = \"02:00:00:00:00:50\"\n",
            UPLINK
                .replace(
                    "next_hop_mac = \"02:00:00:00:00:fe\"",
                    "address = \"192.168.100.1/24\"\ngateway = \"192.168.100.254\"\n[[uplink.route]]\nprefix = \"192.168.101.0/24\"\nvia = \"192.168.100.253\"",
                )
                .replace(
                    "gateway_mac = \"12:34:56:78:9a:bc\"\n",
                    "gateway_mac = \"12:34:56:78:9a:bc\"\nvni = 100\n",
                )
        );
        let c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        let t = c.topology().unwrap();
        let ul = t.uplink.as_ref().unwrap().underlay.clone().unwrap();
        assert_eq!(ul.address.to_string(), "192.168.100.1/24");
        let hop = |d: &str| ul.next_hop(d.parse().unwrap()).map(|h| h.to_string());
        // On-link, a static route, the default route.
        assert_eq!(hop("192.168.100.9").as_deref(), Some("192.168.100.9"));
        assert_eq!(hop("192.168.101.2").as_deref(), Some("192.168.100.253"));
        assert_eq!(hop("8.8.8.8").as_deref(), Some("192.168.100.254"));
        assert_eq!(t.remotes.len(), 1);
        assert_eq!(t.vnets[0].vni, Some(100));
        let p = vswitch::Policy::compile(&t, 1).unwrap();
        let tn = &p.tunnels[0];
        assert_eq!(
            (tn.name.as_str(), tn.next_hop.map(|h| h.to_string())),
            ("db", Some("192.168.100.253".to_string()))
        );
        // Not resolved yet: no outer headers.
        assert!(tn.outer.is_none());
        let (_, vm) = p
            .vm_by_addr(0, lb::conntrack::to16("10.1.0.20".parse().unwrap()))
            .unwrap();
        assert!(vm.is_remote());
    }

    #[test]
    fn overlay_problems_name_their_item() {
        let base = UPLINK.replace(
            "next_hop_mac = \"02:00:00:00:00:fe\"",
            "address = \"192.168.100.0/24\"\ngateway = \"10.9.9.9\"\n[[uplink.route]]\nprefix = \"192.168.101.1/24\"\nvia = \"192.168.100.7\"",
        );
        let text = format!(
            "{base}\n[[vnet]]\nname = \"b\"\nprefixes = [\"10.2.0.0/16\"]\ngateway_mac = \"12:34:56:78:9a:bd\"\nencap = \"gre\"\n\
             [[remote]]\nname = \"r1\"\nvnet = \"b\"\nips = [\"10.3.0.1\"]\nhost = \"nowhere\"\n\
             [[remote]]\nname = \"r2\"\nvnet = \"a\"\nips = [\"10.1.0.4\"]\nhost = \"192.168.100.9\"\nmac = \"ff:ff:ff:ff:ff:ff\"\n"
        );
        let p = problems(&text);
        let want = [
            "uplink: address \"192.168.100.0/24\" is not a host address",
            "uplink: gateway: next hop 10.9.9.9 is not on the uplink's network 192.168.100.0/24",
            "uplink: route \"192.168.101.1/24\" has host bits set (did you mean 192.168.101.0/24?)",
            "vnet \"b\": encap \"gre\" is not vxlan or geneve",
            "vnet \"b\": encap needs a vni",
            "remote \"r1\": vnet \"b\" has no vni (it is on no overlay)",
            "remote \"r1\": host \"nowhere\" is not an IPv4 address",
            "remote \"r1\": 10.3.0.1 is not in vnet \"b\"",
            "remote \"r2\": vnet \"a\" has no vni (it is on no overlay)",
            "remote \"r2\": mac ff:ff:ff:ff:ff:ff is not a unicast address",
            "remote \"r2\": 10.1.0.4 is already used by \"web1\" in vnet \"a\"",
        ];
        for w in want {
            assert!(p.iter().any(|l| l == w), "missing {w:?} in {p:#?}");
        }
        assert_eq!(p.len(), want.len(), "{p:#?}");
        // Without an address: next_hop_mac is required, and tunnels have
        // nowhere to leave from.
        let p = problems(&format!(
            "{}\n[[remote]]\nname = \"r\"\nvnet = \"a\"\nips = [\"10.1.0.9\"]\nhost = \"192.0.2.1\"\n",
            UPLINK
                .replace("next_hop_mac = \"02:00:00:00:00:fe\"\n", "")
                .replace(
                    "gateway_mac = \"12:34:56:78:9a:bc\"\n",
                    "gateway_mac = \"12:34:56:78:9a:bc\"\nvni = 7\n"
                )
        ));
        assert_eq!(
            p,
            [
                "uplink: next_hop_mac is required without an address (whose next hops ARP resolves)",
                "remote \"r\": tunnels need an [uplink] with an address",
            ],
            "{p:#?}"
        );
        // Two vnets with one VNI: the whole topology shows it.
        let p = problems(&format!(
            "{}\n[[vnet]]\nname = \"b\"\nprefixes = [\"10.2.0.0/16\"]\ngateway_mac = \"12:34:56:78:9a:bd\"\nvni = 7\n",
            UPLINK.replace(
                "gateway_mac = \"12:34:56:78:9a:bc\"\n",
                "gateway_mac = \"12:34:56:78:9a:bc\"\nvni = 7\n"
            )
        ));
        assert_eq!(p, ["vnet \"b\": vni 7 is already vnet \"a\"'s"], "{p:#?}");
    }

    #[test]
    fn uplink_and_snat_problems_name_their_item() {
        let bad = UPLINK
            .replace(
                "port = \"wire\"\nnext_hop_mac = \"02:00:00:00:00:fe\"",
                "port = \"vm1\"\nnext_hop_mac = \"ff:ff:ff:ff:ff:ff\"\nmac = \"nope\"",
            )
            .replace(
                "public_ips = [\"203.0.113.10\"]\nports_per_vm = 256",
                "public_ips = [\"10.1.0.9\", \"x\"]\nports_per_vm = 100\nport_range = \"9-3\"",
            );
        let p = problems(&bad);
        let want = [
            "uplink: port \"vm1\" is already used by vm \"web1\"",
            "uplink: next_hop_mac ff:ff:ff:ff:ff:ff is not a unicast address",
            "uplink: mac: invalid MAC address \"nope\": expected six hex bytes separated by ':'",
            "vnet \"a\": snat: public address 10.1.0.9 is inside the vnet",
            "vnet \"a\": snat: \"x\" is not an IP address",
            "vnet \"a\": snat: port_range \"9-3\" is not \"lo-hi\" with 1 <= lo <= hi <= 65535",
            "vnet \"a\": snat: ports_per_vm 100 is not a positive multiple of 64",
        ];
        for w in want {
            assert!(p.iter().any(|l| l == w), "missing {w:?} in {p:#?}");
        }
        assert_eq!(p.len(), want.len(), "{p:#?}");
        // Behaviours and timeouts.
        let bad = UPLINK.replace(
            "ports_per_vm = 256",
            "ports_per_vm = 256\nmapping = \"address-and-port-dependent\"\n\
             filtering = \"endpoint-independent\"\nudp_timeout = 5\nicmp_timeout = 999999999",
        );
        let p = problems(&bad);
        let want = [
            "vnet \"a\": snat: filtering \"endpoint-independent\" needs endpoint-independent \
             mapping (an address-and-port-dependent mapping lets in only its connections' replies)",
            "vnet \"a\": snat: udp_timeout 5 is not 10-604800 seconds",
            "vnet \"a\": snat: icmp_timeout 999999999 is not 10-604800 seconds",
        ];
        assert_eq!(p, want, "{p:#?}");
        let p = problems(&UPLINK.replace(
            "ports_per_vm = 256",
            "ports_per_vm = 256\nfiltering = \"full-cone\"",
        ));
        assert!(
            p.iter().any(|l| l.contains("unknown variant `full-cone`")),
            "{p:#?}"
        );
        // Only the whole topology shows a public address claimed twice.
        let twice = format!(
            "{UPLINK}\n[[vnet]]\nname = \"b\"\nprefixes = [\"10.2.0.0/16\"]\ngateway_mac = \"12:34:56:78:9a:bd\"\n[vnet.snat]\npublic_ips = [\"203.0.113.80\"]\n"
        );
        let p = problems(&twice);
        assert_eq!(
            p,
            vec![
                "vip \"public\": public address 203.0.113.80 is already used by vnet \"b\""
                    .to_string()
            ],
        );
    }
}
