//! `flowmon analyze FILE`: connections in a capture, without root.

use std::{
    io::{self, Write as _},
    path::PathBuf,
};

use flowmon::{
    aggregate::{Group, GroupBy, Metrics, aggregate},
    close::Timeouts,
    offline, record,
};

use super::timeouts::TimeoutArgs;

#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    /// A pcap or pcapng file (Ethernet, Linux cooked SLL/SLL2, raw IP, loopback).
    file: PathBuf,
    /// One JSON object per connection instead of a table (schema in README.md).
    #[arg(long)]
    json: bool,
    /// Metrics per client, server or server port instead of connections.
    #[arg(long, value_enum)]
    by: Option<By>,
    #[command(flatten)]
    timeouts: TimeoutArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum By {
    Client,
    Server,
    Port,
}

pub fn run(a: AnalyzeArgs) -> anyhow::Result<()> {
    let t: Timeouts = a.timeouts.resolve();
    let analysis = offline::analyze(&a.file, &t)?;
    analysis.warn();
    match a.by {
        None => print(&analysis, a.json),
        Some(by) => print_metrics(&analysis, by, a.json),
    }
}

/// Prints per-group metrics, busiest group first.
pub fn print_metrics(analysis: &offline::Analysis, by: By, json: bool) -> anyhow::Result<()> {
    let group_by = match by {
        By::Client => GroupBy::Client,
        By::Server => GroupBy::Server,
        By::Port => GroupBy::ServerPort,
    };
    let mut groups: Vec<_> = aggregate(&analysis.records, group_by).into_iter().collect();
    groups.sort_by(|a, b| b.1.conns.cmp(&a.1.conns).then(a.0.cmp(&b.0)));
    let out = if json {
        groups
            .iter()
            .map(|(g, m)| m.to_json(g, group_by).to_string() + "\n")
            .collect()
    } else {
        metrics_table(&groups, group_by)
    };
    write_out(&out)
}

fn metrics_table(groups: &[(Group, Metrics)], by: GroupBy) -> String {
    let who = if by == GroupBy::Client {
        "client"
    } else {
        "server"
    };
    let mut rows = vec![vec![
        who.to_string(),
        "conns".into(),
        "ct".into(),
        "SYN/conn".into(),
        "FIN c/s".into(),
        "RST c/s".into(),
        "RST/conn".into(),
        "closes".into(),
    ]];
    for (g, m) in groups {
        let name = match g.port {
            Some(p) => format!("{}:{p}", g.ip),
            None => g.ip.to_string(),
        };
        let closes: Vec<String> = m
            .closes
            .iter()
            .map(|(c, n)| format!("{} {n}", c.as_str()))
            .collect();
        rows.push(vec![
            name,
            m.conns.to_string(),
            m.ct.to_string(),
            format!("{:.2}", m.syn_per_conn()),
            format!("{}/{}", m.fin_clt, m.fin_srv),
            format!("{}/{}", m.rst_clt, m.rst_srv),
            format!("{:.2}", m.rst_per_conn()),
            closes.join(", "),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
                + "\n"
        })
        .collect()
}

fn write_out(out: &str) -> anyhow::Result<()> {
    match io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
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
    write_out(&out)
}
