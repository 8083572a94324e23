//! `flowmon analyze FILE`: connections in a capture, without root.

use std::{
    io::{self, Write as _},
    path::PathBuf,
};

use flowmon::{close::Timeouts, offline, record};

use super::timeouts::TimeoutArgs;

#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    /// A pcap or pcapng file (Ethernet, Linux cooked SLL/SLL2, raw IP, loopback).
    file: PathBuf,
    /// One JSON object per connection instead of a table (schema in README.md).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    timeouts: TimeoutArgs,
}

pub fn run(a: AnalyzeArgs) -> anyhow::Result<()> {
    let t: Timeouts = a.timeouts.resolve();
    let analysis = offline::analyze(&a.file, &t)?;
    print(&analysis, a.json)
}

/// Prints an analysis as a table with a totals line, or as JSON lines.
pub fn print(analysis: &offline::Analysis, json: bool) -> anyhow::Result<()> {
    let mut out = String::new();
    if json {
        for r in &analysis.records {
            out.push_str(&r.to_json().to_string());
            out.push('\n');
        }
    } else {
        out = record::table(&analysis.records);
        let t = &analysis.totals;
        out.push_str(&format!(
            "{} connections; {} packets: {} TCP, {} non-TCP, {} malformed, {} fragments\n",
            analysis.records.len(),
            t[0],
            t[1],
            t[2],
            t[3],
            t[4]
        ));
    }
    match io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
