//! `flowmon status`: asks the running agent how it is doing.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use flowmon::{
    api::{self, DEFAULT_SOCKET},
    status::Status,
    views::{Request, View},
};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The agent's API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let resp = api::query(&a.socket, &Request::new(View::Status))?;
    let row = resp
        .rows
        .into_iter()
        .next()
        .context("the agent answered the status request with nothing")?;
    let out = if a.json {
        row.to_string() + "\n"
    } else {
        let status: Status = serde_json::from_value(row)
            .context("the agent's status is not one this flowmon reads: is it another version?")?;
        status.text()
    };
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
