//! The `pollux` command.
//!
//! Today it only identifies itself: `run`, `check`, `demo`, `pktgen` and `ctl`
//! arrive with their issues (see DESIGN.md). The core benchmark runs with
//! `cargo bench --bench forward`.

use clap::Parser;

/// pollux: a poll-mode virtual networking dataplane.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    println!(
        "pollux {}: the packet engine is in place; `pollux run/check/demo` are not built yet. \
         Try `cargo bench --bench forward` for the core benchmark.",
        env!("CARGO_PKG_VERSION")
    );
}
