//! What the query commands share: where the answer comes from (the agent's
//! socket, or a capture file with --pcap) and how it prints.

use std::{
    io::{self, IsTerminal as _, Write as _},
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flowmon::{
    api::{self, DEFAULT_SOCKET},
    offline, render,
    services::Services,
    store::{self, Store},
    views::{self, Request, Response, View},
};

use super::{run::parse_duration, timeouts::TimeoutArgs};

#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// Answer from a capture file (pcap/pcapng) instead of the running agent; no root needed.
    #[arg(long, value_name = "FILE")]
    pcap: Option<PathBuf>,
    /// The agent's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// One JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
    /// Color the table: auto (on a terminal), always, never.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    color: Color,
    /// Only connections seen in the last DURATION (e.g. 1h, 30m, 7d); finished
    /// ones come from the history, so this reaches back across agent restarts.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    since: Option<Duration>,
    /// The history read with --since when no agent is running.
    #[arg(long, value_name = "PATH", default_value = store::DEFAULT_PATH)]
    db: PathBuf,
    /// Timeouts used to classify the capture's connections (with --pcap).
    #[command(flatten)]
    timeouts: TimeoutArgs,
}

/// Which rows and in what order: shared by `flows` and `conversations`.
#[derive(clap::Args, Debug)]
pub struct SelectArgs {
    /// Only rows matching EXPR, e.g. 'rst.count > 0 and fin.count = 0'.
    #[arg(long, short, value_name = "EXPR")]
    pub filter: Option<String>,
    /// Sort by FIELD (numbers descending; FIELD:asc or FIELD:desc to choose).
    #[arg(long, value_name = "FIELD")]
    pub sort: Option<String>,
    /// At most N rows.
    #[arg(long, short = 'n', value_name = "N")]
    pub limit: Option<usize>,
}

impl SelectArgs {
    pub fn request(self, view: View) -> Request {
        Request {
            filter: self.filter,
            sort: self.sort,
            limit: self.limit,
            ..Request::new(view)
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Color {
    Auto,
    Always,
    Never,
}

/// A query that was wrong in itself (bad filter, unknown sort field): exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs `req` against the agent or the capture and prints the answer.
pub fn run(req: &Request, q: &QueryArgs) -> anyhow::Result<()> {
    let resp = answer(req, q)?;
    let out = if q.json {
        resp.rows.iter().map(|r| r.to_string() + "\n").collect()
    } else {
        let color = match q.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        };
        render::table(&resp, color)
    };
    match io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn answer(req: &Request, q: &QueryArgs) -> anyhow::Result<Response> {
    let since = q.since.map(|d| d.as_secs_f64());
    let local = |records: &[flowmon::record::ConnRecord]| {
        views::run(req, records, &Services::system()).map_err(|e| UsageError(e.to_string()).into())
    };
    match &q.pcap {
        Some(path) => {
            let analysis = offline::analyze(path, &q.timeouts.resolve())?;
            analysis.warn();
            let mut records = analysis.records;
            // A capture's "now" is its last packet.
            if let Some(s) = since {
                let end = records.iter().map(|r| r.last_seen).fold(f64::MIN, f64::max);
                records.retain(|r| r.last_seen >= end - s);
            }
            local(&records)
        }
        None => {
            let req = Request {
                since,
                ..req.clone()
            };
            match api::query(&q.socket, &req) {
                Err(api::ApiError::Rejected {
                    message,
                    usage: true,
                }) => Err(UsageError(message).into()),
                // History outlives the agent: answer from it.
                Err(api::ApiError::NoAgent { .. }) if since.is_some() => {
                    let store = Store::open_read(&q.db)?;
                    eprintln!(
                        "flowmon: no agent is running; answering from the history in {} (finished connections only)",
                        q.db.display()
                    );
                    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
                    local(&store.conns_since(now - since.unwrap_or_default())?)
                }
                r => Ok(r?),
            }
        }
    }
}
