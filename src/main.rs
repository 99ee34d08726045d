//! The `pollux` command.
//!
//! `pollux check --config FILE` validates a configuration, `pollux run
//! --config FILE` runs the switch on it (pcap and ring ports so far), and
//! `pollux demo` runs the embedded in-process topology. `pktgen` and `ctl`
//! arrive with their issues (see DESIGN.md).

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
