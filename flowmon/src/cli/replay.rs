//! `flowmon replay FILE`: a capture through the kernel program, then the
//! same report as `analyze`.

use std::path::PathBuf;

use flowmon::kernel::{Kernel, LoadOptions};

use super::timeouts::TimeoutArgs;

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// A pcap or pcapng file (Ethernet, Linux cooked SLL/SLL2, raw IP, loopback).
    file: PathBuf,
    /// One JSON object per connection instead of a table.
    #[arg(long)]
    json: bool,
    /// Connections the kernel table holds during the replay.
    #[arg(long, default_value_t = 65_536)]
    max_flows: u32,
    #[command(flatten)]
    timeouts: TimeoutArgs,
}

pub fn run(a: ReplayArgs) -> anyhow::Result<()> {
    let mut kernel = Kernel::load(LoadOptions {
        pin: None,
        max_flows: a.max_flows,
        kernel_log: false,
    })?;
    let analysis = flowmon::replay::replay(&mut kernel, &a.file, &a.timeouts.resolve())?;
    analysis.warn();
    super::analyze::print(&analysis, a.json)
}
