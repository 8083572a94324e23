//! `flowmon graph`: RST per connection (or SYN per connection, or closes)
//! over time from the history, in the terminal or as an SVG or PNG file.

use std::{
    io::Write as _,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::bail;
use flowmon::{
    graph::{Graph, Metric, rows_from_conns},
    store::{self, Store},
};

use super::run::parse_duration;

#[derive(clap::Args, Debug)]
pub struct GraphArgs {
    /// What to draw.
    #[arg(long, value_enum, default_value_t = Metric::RstPerConn)]
    metric: Metric,
    /// How far back (e.g. 30m, 1h, 7d).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    since: Duration,
    /// Only connections to this server.
    #[arg(long, value_name = "IP")]
    server: Option<IpAddr>,
    /// Only this interface.
    #[arg(long, value_name = "IF", conflicts_with = "server")]
    iface: Option<String>,
    /// Write an SVG image to FILE instead of drawing in the terminal.
    #[arg(long, value_name = "FILE", conflicts_with = "png")]
    svg: Option<PathBuf>,
    /// Write a PNG image to FILE instead of drawing in the terminal.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// The history database the agent writes.
    #[arg(long, value_name = "PATH", default_value = store::DEFAULT_PATH)]
    db: PathBuf,
    /// Columns of the terminal graph.
    #[arg(long, default_value_t = 72)]
    width: usize,
    /// Rows of the terminal graph.
    #[arg(long, default_value_t = 12)]
    height: usize,
}

pub fn run(a: GraphArgs) -> anyhow::Result<()> {
    let store = Store::open_read(&a.db)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let cutoff = now - a.since.as_secs_f64();
    let (rows, scope) = match (&a.server, &a.iface) {
        (Some(ip), _) => {
            let key = ip.to_string();
            let mut rows = store.intervals_since(cutoff, "server", Some(&key))?;
            if rows.is_empty() {
                // Not among any interval's busiest: compute from its connections.
                let len = store
                    .intervals_since(cutoff, "global", None)?
                    .first()
                    .and_then(|r| Some(r["end"].as_f64()? - r["start"].as_f64()?))
                    .unwrap_or(10.0);
                let conns: Vec<_> = store
                    .conns_since(cutoff)?
                    .into_iter()
                    .filter(|r| r.conn.server().0 == *ip)
                    .collect();
                rows = rows_from_conns(&conns, len);
            }
            (rows, format!("server {ip}"))
        }
        (None, Some(i)) => (
            store.intervals_since(cutoff, "iface", Some(i))?,
            format!("interface {i}"),
        ),
        (None, None) => (
            store.intervals_since(cutoff, "global", None)?,
            "all connections".to_string(),
        ),
    };
    let graph = Graph::new(a.metric, &rows, &scope);
    if graph.series.iter().all(|s| s.points.is_empty()) && (a.svg.is_some() || a.png.is_some()) {
        bail!(
            "no history to draw for {scope} in the last {}: is the agent running with history (flowmon run, see --db)?",
            humantime(a.since)
        );
    }
    match (&a.svg, &a.png) {
        (Some(path), _) => std::fs::write(path, graph.svg()?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
        (_, Some(path)) => graph.png(path)?,
        (None, None) => {
            std::io::stdout().write_all(graph.text(a.width, a.height).as_bytes())?;
        }
    }
    Ok(())
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
