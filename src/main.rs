//! The `pollux` command.
//!
//! `pollux check --config FILE` validates a configuration, `pollux run
//! --config FILE` runs the switch on it, `pollux demo` runs the embedded
//! in-process topology, and `pollux sriov` creates and configures SR-IOV
//! virtual functions for DPDK ports, and `pollux pktgen` generates traffic
//! and measures throughput, loss and latency (docs/pktgen.md), and `pollux
//! ctl` talks to a running pollux's control API (docs/control.md).
#![forbid(unsafe_code)]

use pollux::config;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// pollux: a poll-mode virtual networking dataplane.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format on stderr: plain text or one JSON object per event
    /// (RUST_LOG filters them, as `info`, `pollux=debug` or `warn`; default
    /// `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How events are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// `TIME LEVEL target: message field=value ...`.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Events (control-plane only: nothing is logged per packet) go to stderr
/// with a timestamp and a level, filtered by `RUST_LOG`.
fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal (logs in files and journals stay text).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // (A subscriber set already, as in a test harness, is kept.)
    let _ = match format {
        LogFormat::Plain => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration: exit 0, or exit 2 with one line per problem.
    Check {
        /// The configuration file (TOML; see docs/config.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the switch on the configured ports until SIGINT or SIGTERM.
    Run {
        /// The configuration file (TOML; see docs/config.md). With
        /// --takeover: instead of the running pollux's configuration (same
        /// ports and workers).
        #[arg(long, required_unless_present = "takeover")]
        config: Option<PathBuf>,
        /// Take over from the pollux serving this control socket, with its
        /// connections, probe states, counters and port sockets (a hitless
        /// upgrade); it exits once this one runs, and goes on if this one
        /// fails.
        #[arg(long, value_name = "SOCKET")]
        takeover: Option<PathBuf>,
    },
    /// Run the embedded demo: VMs, a VIP, probes, ACLs and tenants on ring
    /// ports in this process (no privileges, no system packages).
    Demo,
    /// Talk to a running pollux's control API (`[control]` in its config).
    Ctl {
        /// The control socket.
        #[arg(long, default_value = "/run/pollux.sock")]
        socket: PathBuf,
        /// A loopback address:port instead of the socket.
        #[arg(long)]
        tcp: Option<String>,
        /// With --tcp: the file holding the control token (`[control]
        /// token_file`; readable only by its owner, who runs this).
        #[arg(long, requires = "tcp")]
        token_file: Option<PathBuf>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        cmd: CtlCmd,
    },
    /// Generate signed traffic and measure throughput, loss, reordering and
    /// latency: one trial, an NDR/PDR search, or a back-to-back calibration
    /// (see docs/pktgen.md).
    Pktgen(Box<PktgenArgs>),
    /// Create SR-IOV virtual functions on a physical function and set a
    /// VF's MAC, VLAN, spoof check and trust (then use the VF, bound to
    /// vfio-pci, as a `dpdk` port with `pci = "..."`).
    Sriov {
        /// The physical function (kernel interface).
        #[arg(long)]
        pf: String,
        /// Number of VFs to create (0 removes them).
        #[arg(long)]
        vfs: Option<u32>,
        /// The VF to configure.
        #[arg(long)]
        vf: Option<u32>,
        /// The VF's MAC address.
        #[arg(long, requires = "vf")]
        mac: Option<dataplane::MacAddr>,
        /// The VF's VLAN (0: none).
        #[arg(long, requires = "vf")]
        vlan: Option<u16>,
        /// Spoof checking on the VF: on or off.
        #[arg(long, value_parser = on_off, requires = "vf")]
        spoofchk: Option<bool>,
        /// Trust the VF (it may change its MAC, go promiscuous): on or off.
        #[arg(long, value_parser = on_off, requires = "vf")]
        trust: Option<bool>,
        /// Bind the VF to this kernel driver (`vfio-pci` for a DPDK port).
        #[arg(long, requires = "vf")]
        bind: Option<String>,
    },
    /// Print the man page (roff), generated from this command line's
    /// definition (the Debian package installs it as pollux(1)).
    #[command(hide = true)]
    Manpage,
    /// Print a shell completion script (the Debian package installs the
    /// bash one).
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `pollux ctl` subcommands.
#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// Policy generation and item counts.
    Status,
    /// List vnets, vms, nsgs or vips, or show one.
    Get {
        /// vnets, vms, nsgs or vips.
        kind: String,
        /// One item's name.
        name: Option<String>,
    },
    /// Create or replace an item from a JSON file (- for stdin).
    Put {
        /// vnets, vms, nsgs or vips.
        kind: String,
        /// The item's name.
        name: String,
        /// JSON file.
        file: String,
    },
    /// Delete an item.
    Delete {
        /// vnets, vms, nsgs or vips.
        kind: String,
        /// The item's name.
        name: String,
    },
    /// Create or replace a rule of a group from a JSON file (- for stdin).
    PutRule {
        /// The group.
        nsg: String,
        /// The rule's name.
        rule: String,
        /// JSON file.
        file: String,
    },
    /// Delete a rule of a group.
    DeleteRule {
        /// The group.
        nsg: String,
        /// The rule's name.
        rule: String,
    },
    /// Drain a backend: no new flows, established ones stay.
    Drain {
        /// The VIP.
        vip: String,
        /// The backend: VM name or address, optionally :port.
        backend: String,
    },
    /// Set a backend's weight (0 drains).
    Weight {
        /// The VIP.
        vip: String,
        /// The backend: VM name or address, optionally :port.
        backend: String,
        /// The weight.
        weight: u32,
    },
    /// Probe state of every probed backend.
    Probes,
    /// The uplink's address and routes, its ARP neighbours, and the tunnels
    /// to remote endpoints.
    Underlay,
    /// Each VIP's Maglev table: backends in it, epoch, and a digest that
    /// is the same on every pollux that picks the same backend for every
    /// flow (compare it between Muxes).
    Maglev,
    /// The BGP speaker: sessions with the routers, the VIPs announced and
    /// those withdrawn (with why).
    Bgp,
    /// Withdraw every VIP this Mux announces, going on forwarding: the
    /// routers move its flows to the other Muxes (`undrain-mux` ends it).
    DrainMux,
    /// Announce the VIPs again after `drain-mux`.
    UndrainMux,
    /// Replace the uplink's default gateway and static routes from a JSON
    /// file (`-`: stdin): `{"gateway": "192.0.2.254", "routes": [{"prefix":
    /// "10.0.0.0/8", "via": "192.0.2.253"}]}`.
    PutRoutes {
        /// JSON file.
        file: String,
    },
    /// List flows; filters: vm=NAME vip=NAME src=IP dst=IP proto=tcp sport=N dport=N limit=N.
    Flows {
        /// key=value filters.
        filters: Vec<String>,
        /// Delete the matching flows instead of listing them.
        #[arg(long)]
        delete: bool,
        /// With --delete: forget their connections too, so that their next
        /// packets are judged by the current rules as new connections.
        #[arg(long, requires = "delete")]
        reset: bool,
    },
    /// Port, worker and rule counters.
    Counters,
    /// Where each worker's cycles went since the last reset: busy share,
    /// cycles per packet for port I/O, fast path and slow path, receive
    /// bursts by size (as OVS's pmd-perf-show).
    Perf {
        /// Start counting afresh (after showing nothing).
        #[arg(long)]
        reset: bool,
    },
    /// The Prometheus metrics text.
    Metrics,
    /// Replace the whole configuration with a TOML file (as SIGHUP does).
    Reload {
        /// TOML file.
        file: String,
    },
    /// Capture a port's frames (both directions; those sent as the switch
    /// rewrote them) into a pcap file, until --count frames or --seconds.
    Capture {
        /// The port (default: every port).
        #[arg(long)]
        port: Option<String>,
        /// Which frames, as tcpdump puts it: host A, src host A, dst host A,
        /// port N, src port N, dst port N, tcp, udp, icmp, icmp6, arp, ip,
        /// ip6, joined by "and".
        #[arg(long)]
        filter: Option<String>,
        /// Frames to capture.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Seconds at most.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Bytes kept of each frame.
        #[arg(long)]
        snaplen: Option<usize>,
        /// The file (default: standard output).
        #[arg(short = 'w', long)]
        write: Option<PathBuf>,
        /// Write pcapng (each port an interface, each frame's direction)
        /// instead of pcap.
        #[arg(long)]
        pcapng: bool,
    },
    /// What the switch decides for a packet arriving on a port, layer by
    /// layer (anti-spoofing, responders, VIP and backend, route, each
    /// group's rule, SNAT, rewrite and output port, or the drop reason),
    /// without changing any state. Describe the packet (the rest defaults
    /// from the port's VM), or give a frame in hex or a pcap file. With
    /// --live: trace the next live packets that match --filter (as VPP's
    /// trace add), printing each as the workers trace it.
    Trace(Box<TraceArgs>),
}

/// `pollux ctl trace` options.
#[derive(clap::Args, Debug)]
struct TraceArgs {
    /// The port the packet arrives on (with --live: the port to trace,
    /// default every port).
    #[arg(long)]
    port: Option<String>,
    /// Trace live packets instead of a described one.
    #[arg(long, conflicts_with_all = ["dst", "src", "proto", "sport", "dport", "flags", "src_mac", "dst_mac", "ttl", "payload", "hex", "pcap"])]
    live: bool,
    /// With --live: which packets, as tcpdump puts it (host A, src host A,
    /// dst host A, port N, src port N, dst port N, tcp, udp, icmp, icmp6,
    /// arp, ip, ip6, joined by "and").
    #[arg(long, requires = "live")]
    filter: Option<String>,
    /// With --live: packets to trace.
    #[arg(long, default_value_t = 10, requires = "live")]
    count: u64,
    /// With --live: seconds at most.
    #[arg(long, default_value_t = 60.0, requires = "live")]
    seconds: f64,
    /// Destination address.
    #[arg(long)]
    dst: Option<String>,
    /// Source address (default: the port's VM's).
    #[arg(long)]
    src: Option<String>,
    /// tcp, udp or icmp (an echo request).
    #[arg(long)]
    proto: Option<String>,
    /// Source port (default 40000; icmp: the echo identifier).
    #[arg(long)]
    sport: Option<u16>,
    /// Destination port.
    #[arg(long)]
    dport: Option<u16>,
    /// TCP flags as letters (S, SA, A, F, R, P; default S).
    #[arg(long)]
    flags: Option<String>,
    /// Source MAC (default: the port's VM's).
    #[arg(long)]
    src_mac: Option<String>,
    /// Destination MAC (default: the vnet gateway's, or the uplink's).
    #[arg(long)]
    dst_mac: Option<String>,
    /// TTL or hop limit (default 64).
    #[arg(long)]
    ttl: Option<u8>,
    /// Payload bytes (zeros).
    #[arg(long)]
    payload: Option<usize>,
    /// The whole Ethernet frame in hex, instead of a description.
    #[arg(long, conflicts_with_all = ["dst", "src", "proto", "sport", "dport", "flags", "src_mac", "dst_mac", "ttl", "payload", "pcap"])]
    hex: Option<String>,
    /// A pcap file: its first frame (or --index's), instead of a description.
    #[arg(long, conflicts_with_all = ["dst", "src", "proto", "sport", "dport", "flags", "src_mac", "dst_mac", "ttl", "payload"])]
    pcap: Option<PathBuf>,
    /// With --pcap: which frame, from 0.
    #[arg(long, default_value_t = 0, requires = "pcap")]
    index: usize,
}

fn ctl(
    socket: &std::path::Path,
    (tcp, token_file): (Option<&str>, Option<&std::path::Path>),
    json: bool,
    cmd: &CtlCmd,
) -> ExitCode {
    use pollux::ctl::{Cmd, Endpoint};
    let token = match token_file.map(pollux::control::auth::Token::read) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            eprintln!("pollux ctl: {e}");
            return ExitCode::from(2);
        }
    };
    let ep = match tcp {
        Some(t) => Endpoint::Tcp(t, token),
        None => Endpoint::Unix(socket),
    };
    let mut filters = Vec::new();
    let c = match cmd {
        CtlCmd::Status => Cmd::Status,
        CtlCmd::Get { kind, name } => Cmd::Get(kind.clone(), name.clone()),
        CtlCmd::Put { kind, name, file } => Cmd::Put(kind.clone(), name.clone(), file.clone()),
        CtlCmd::Delete { kind, name } => Cmd::Delete(kind.clone(), name.clone()),
        CtlCmd::PutRule { nsg, rule, file } => {
            Cmd::PutRule(nsg.clone(), rule.clone(), file.clone())
        }
        CtlCmd::DeleteRule { nsg, rule } => Cmd::DeleteRule(nsg.clone(), rule.clone()),
        CtlCmd::Drain { vip, backend } => Cmd::Drain(vip.clone(), backend.clone()),
        CtlCmd::Weight {
            vip,
            backend,
            weight,
        } => Cmd::Weight(vip.clone(), backend.clone(), *weight),
        CtlCmd::Probes => Cmd::Probes,
        CtlCmd::Underlay => Cmd::Underlay,
        CtlCmd::Maglev => Cmd::Maglev,
        CtlCmd::Bgp => Cmd::Bgp,
        CtlCmd::Perf { reset } => Cmd::Perf(*reset),
        CtlCmd::DrainMux => Cmd::DrainMux(true),
        CtlCmd::UndrainMux => Cmd::DrainMux(false),
        CtlCmd::PutRoutes { file } => Cmd::PutRoutes(file.clone()),
        CtlCmd::Flows {
            filters: f,
            delete,
            reset,
        } => {
            for kv in f {
                match kv.split_once('=') {
                    Some((k, v)) => filters.push((k.to_string(), v.to_string())),
                    None => {
                        eprintln!("pollux ctl: filter {kv:?} is not key=value");
                        return ExitCode::from(2);
                    }
                }
            }
            if *reset {
                filters.push(("reset".into(), "true".into()));
            }
            Cmd::Flows(filters, *delete)
        }
        CtlCmd::Counters => Cmd::Counters,
        CtlCmd::Metrics => Cmd::Metrics,
        CtlCmd::Reload { file } => Cmd::Reload(file.clone()),
        CtlCmd::Capture {
            port,
            filter,
            count,
            seconds,
            snaplen,
            write,
            pcapng,
        } => {
            let format = if *pcapng {
                pollux::ctl::CaptureFormat::PcapNg
            } else {
                pollux::ctl::CaptureFormat::Pcap
            };
            let req = pollux::api::CaptureRequest {
                port: port.clone(),
                filter: filter.clone(),
                count: Some(*count),
                seconds: Some(*seconds),
                snaplen: *snaplen,
            };
            let done = match write {
                Some(path) => match std::fs::File::create(path) {
                    Ok(f) => pollux::ctl::capture(&ep, &req, format, std::io::BufWriter::new(f)),
                    Err(e) => {
                        eprintln!("pollux ctl: {}: {e}", path.display());
                        return ExitCode::from(2);
                    }
                },
                None => pollux::ctl::capture(&ep, &req, format, std::io::stdout().lock()),
            };
            return match done {
                Ok(s) => {
                    eprintln!(
                        "pollux ctl: {} frames captured, {} missed (the reader was behind)",
                        s.written, s.missed
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pollux ctl: {e}");
                    ExitCode::from(2)
                }
            };
        }
        CtlCmd::Trace(a) if a.live => {
            let req = pollux::api::CaptureRequest {
                port: a.port.clone(),
                filter: a.filter.clone(),
                count: Some(a.count),
                seconds: Some(a.seconds),
                snaplen: None,
            };
            return match pollux::ctl::live_trace(&ep, &req, json, |l| println!("{l}")) {
                Ok((traced, missed)) => {
                    eprintln!("pollux ctl: {traced} packets traced, {missed} missed");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pollux ctl: {e}");
                    ExitCode::from(2)
                }
            };
        }
        CtlCmd::Trace(a) => {
            let Some(port) = a.port.clone() else {
                eprintln!("pollux ctl: trace: --port is required (or --live)");
                return ExitCode::from(2);
            };
            let frame = match (&a.hex, &a.pcap) {
                (Some(h), _) => Some(h.clone()),
                (None, Some(p)) => match pollux::ctl::pcap_frame(p, a.index) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        eprintln!("pollux ctl: {e}");
                        return ExitCode::from(2);
                    }
                },
                (None, None) => None,
            };
            Cmd::Trace(pollux::api::TraceRequest {
                port,
                frame,
                src_mac: a.src_mac.clone(),
                dst_mac: a.dst_mac.clone(),
                src: a.src.clone(),
                dst: a.dst.clone(),
                proto: a.proto.clone(),
                sport: a.sport,
                dport: a.dport,
                flags: a.flags.clone(),
                ttl: a.ttl,
                payload: a.payload,
            })
        }
    };
    match pollux::ctl::run(&ep, &c, json) {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            for l in e.to_string().lines() {
                eprintln!("pollux ctl: {l}");
            }
            ExitCode::from(2)
        }
    }
}

/// `pollux pktgen` options.
#[derive(clap::Args, Debug)]
struct PktgenArgs {
    /// Transmit port: ring:NAME (a ring port of --config), af_packet:IFACE,
    /// pcap:FILE (written) or dpdk:DEVARGS.
    #[arg(long)]
    tx: Option<String>,
    /// Receive port, same forms (pcap:FILE is read); default: the tx port.
    #[arg(long)]
    rx: Option<String>,
    /// Run pollux in this process on this configuration; --tx/--rx name
    /// its ring ports, and addresses default to the VMs on them.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Frame size in bytes, FCS included (64 to 1518; 76 for tcp-syn).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Number of flows (source address over --src-ips, then source port,
    /// then destination port, vary).
    #[arg(long, default_value_t = 1)]
    flows: u32,
    /// udp or tcp-syn.
    #[arg(long, default_value = "udp", value_parser = proto)]
    proto: dataplane::pktgen::Proto,
    /// Rate: packets/s (250000, 250k, 1.5M, 2Mpps) or a percentage of the
    /// maximum found first (50%); default: as fast as possible.
    #[arg(long)]
    rate: Option<pollux::pktgen::Rate>,
    /// Measured seconds per trial.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Warm-up seconds before each trial (sent, not measured).
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Source MAC (default: the tx VM's, or the tx port's).
    #[arg(long)]
    src_mac: Option<dataplane::MacAddr>,
    /// Destination MAC (default: the vnet gateway, or the rx port's).
    #[arg(long)]
    dst_mac: Option<dataplane::MacAddr>,
    /// Source IPv4 address (default: the tx VM's, or 10.0.0.1).
    #[arg(long)]
    src_ip: Option<std::net::Ipv4Addr>,
    /// Source addresses: flow i comes from --src-ip + i % N (many clients,
    /// or a spoofed flood from the wire).
    #[arg(long, default_value_t = 1)]
    src_ips: u32,
    /// Destination IPv4 address, e.g. a VIP (default: the rx VM's, or 10.0.0.2).
    #[arg(long)]
    dst_ip: Option<std::net::Ipv4Addr>,
    /// First source port.
    #[arg(long, default_value_t = 1024)]
    sport: u16,
    /// First destination port.
    #[arg(long, default_value_t = 5000)]
    dport: u16,
    /// Find the no-drop and partial-drop rates, then measure latency at 10%,
    /// 50% and 90% of the no-drop rate.
    #[arg(long)]
    search: bool,
    /// Loss ratio the partial-drop rate allows.
    #[arg(long, default_value_t = 0.005)]
    pdr_loss: f64,
    /// Measure the generator back to back (an in-process ring pair, or the
    /// given ports connected to each other).
    #[arg(long)]
    calibrate: bool,
    /// EAL arguments for dpdk ports.
    #[arg(long, allow_hyphen_values = true)]
    eal: Option<String>,
    /// Largest transmit burst (1 to 32).
    #[arg(long, default_value_t = 32)]
    burst: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn proto(s: &str) -> Result<dataplane::pktgen::Proto, String> {
    match s {
        "udp" => Ok(dataplane::pktgen::Proto::Udp),
        "tcp-syn" | "tcp" => Ok(dataplane::pktgen::Proto::TcpSyn),
        other => Err(format!("{other:?} is not udp or tcp-syn")),
    }
}

fn pktgen(a: &PktgenArgs) -> ExitCode {
    let opts = pollux::pktgen::Options {
        tx: a.tx.clone(),
        rx: a.rx.clone(),
        config: a.config.clone(),
        size: a.size,
        flows: a.flows,
        proto: a.proto,
        rate: a.rate,
        duration: a.duration,
        warmup: a.warmup,
        src_mac: a.src_mac,
        dst_mac: a.dst_mac,
        src_ip: a.src_ip,
        src_ips: a.src_ips,
        dst_ip: a.dst_ip,
        sport: a.sport,
        dport: a.dport,
        search: a.search,
        pdr_loss: a.pdr_loss,
        calibrate: a.calibrate,
        eal: a.eal.clone(),
        burst: a.burst,
    };
    match pollux::pktgen::run(&opts) {
        Ok(report) => {
            if a.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("pollux pktgen: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                for l in pollux::pktgen::table(&report) {
                    println!("{l}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            for l in e.to_string().lines() {
                eprintln!("pollux pktgen: {l}");
            }
            ExitCode::from(2)
        }
    }
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?} is not on or off")),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::Config::load(path).and_then(|c| c.validate()) {
        Ok(s) => {
            println!(
                "{}: ok ({} ports, {} vnets, {} vms, {} nsgs with {} rules, {} vips with {} backends)",
                path.display(),
                s.ports,
                s.vnets,
                s.vms,
                s.nsgs,
                s.rules,
                s.vips,
                s.backends
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for p in e.problems() {
                eprintln!("{p}");
            }
            ExitCode::from(2)
        }
    }
}

fn run(path: Option<&std::path::Path>, takeover: Option<&std::path::Path>) -> ExitCode {
    let result = match (path, takeover) {
        (file, Some(socket)) => pollux::run::run_takeover(socket, file),
        (Some(path), None) => config::Config::load(path)
            .map_err(pollux::run::RunError::from)
            .and_then(|c| pollux::run::run_with(&c, Some(path))),
        (None, None) => Err(pollux::run::RunError::Config(config::ConfigError::Invalid(
            vec!["pollux run needs --config or --takeover".into()],
        ))),
    };
    match result {
        Ok(report) => {
            for l in report.lines() {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Why it could not run: printed whatever RUST_LOG filters.
            for l in e.lines() {
                eprintln!("{l}");
            }
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match &cli.command {
        Command::Check { config } => check(config),
        Command::Run { config, takeover } => run(config.as_deref(), takeover.as_deref()),
        Command::Pktgen(a) => pktgen(a),
        Command::Ctl {
            socket,
            tcp,
            token_file,
            json,
            cmd,
        } => ctl(socket, (tcp.as_deref(), token_file.as_deref()), *json, cmd),
        Command::Manpage => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => {
                    use std::io::Write;
                    match std::io::stdout().write_all(&out) {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => {
                            eprintln!("pollux manpage: {e}");
                            ExitCode::FAILURE
                        }
                    }
                }
                Err(e) => {
                    eprintln!("pollux manpage: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "pollux",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Sriov {
            pf,
            vfs,
            vf,
            mac,
            vlan,
            spoofchk,
            trust,
            bind,
        } => {
            let req = pollux::sriov::Request {
                pf: pf.clone(),
                vfs: *vfs,
                vf: *vf,
                mac: mac.map(|m| m.0),
                vlan: *vlan,
                spoofchk: *spoofchk,
                trust: *trust,
                bind: bind.clone(),
            };
            match pollux::sriov::run(&req) {
                Ok(done) => {
                    for l in done {
                        println!("{l}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Demo => {
            match pollux::demo::run(&mut std::io::stdout(), pollux::demo::Options::default()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pollux demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
