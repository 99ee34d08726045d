//! The `pollux` command.
//!
//! `pollux check --config FILE` validates a configuration, `pollux run
//! --config FILE` runs the switch on it, `pollux demo` runs the embedded
//! in-process topology, and `pollux sriov` creates and configures SR-IOV
//! virtual functions for DPDK ports. `pktgen` and `ctl` arrive with their
//! issues (see DESIGN.md).

use pollux::config;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// pollux: a poll-mode virtual networking dataplane.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// The configuration file (TOML; see docs/config.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the embedded demo: VMs, a VIP, probes, ACLs and tenants on ring
    /// ports in this process (no privileges, no system packages).
    Demo,
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
        #[arg(long)]
        mac: Option<dataplane::MacAddr>,
        /// The VF's VLAN (0: none).
        #[arg(long)]
        vlan: Option<u16>,
        /// Spoof checking on the VF: on or off.
        #[arg(long, value_parser = on_off)]
        spoofchk: Option<bool>,
        /// Trust the VF (it may change its MAC, go promiscuous): on or off.
        #[arg(long, value_parser = on_off)]
        trust: Option<bool>,
    },
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?} is not on or off")),
    }
}

fn check(path: &PathBuf) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("config {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let problems = match config::Config::parse(&text) {
        Err(e) => vec![e],
        Ok(c) => match c.validate() {
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
                return ExitCode::SUCCESS;
            }
            Err(p) => p,
        },
    };
    for p in &problems {
        eprintln!("{p}");
    }
    ExitCode::from(2)
}

fn run(path: &PathBuf) -> ExitCode {
    let parsed = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("config {}: {e}", path.display())])
        .and_then(|t| config::Config::parse(&t).map_err(|e| vec![e]));
    let result = parsed.and_then(|c| pollux::run::run(&c));
    match result {
        Ok(report) => {
            for l in report {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for p in problems {
                eprintln!("{p}");
            }
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Check { config } => check(config),
        Command::Run { config } => run(config),
        Command::Sriov {
            pf,
            vfs,
            vf,
            mac,
            vlan,
            spoofchk,
            trust,
        } => {
            let req = pollux::sriov::Request {
                pf: pf.clone(),
                vfs: *vfs,
                vf: *vf,
                mac: mac.map(|m| m.0),
                vlan: *vlan,
                spoofchk: *spoofchk,
                trust: *trust,
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
