//! What the query commands share: where the answer comes from (the agent's
//! socket, or a capture file with --pcap) and how it prints.

use std::{
    io::{self, IsTerminal as _, Write as _},
    path::PathBuf,
};

use flowmon::{
    api::{self, DEFAULT_SOCKET},
    offline, render,
    services::Services,
    views::{self, Request, Response, View},
};

use super::timeouts::TimeoutArgs;

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
    match &q.pcap {
        Some(path) => {
            let analysis = offline::analyze(path, &q.timeouts.resolve())?;
            views::run(req, &analysis.records, &Services::system())
                .map_err(|e| UsageError(e.to_string()).into())
        }
        None => api::query(&q.socket, req).map_err(|e| match e {
            api::ApiError::Rejected {
                message,
                usage: true,
            } => UsageError(message).into(),
            e => e.into(),
        }),
    }
}
