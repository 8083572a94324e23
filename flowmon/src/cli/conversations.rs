//! `flowmon conversations`: drill-down per client, server and server port,
//! with the port's application name.

use std::net::IpAddr;

use flowmon::views::{Request, View};

use super::query::{self, QueryArgs};

#[derive(clap::Args, Debug)]
pub struct ConversationsArgs {
    /// Only this client.
    #[arg(long, value_name = "IP")]
    client: Option<IpAddr>,
    /// Only this server.
    #[arg(long, value_name = "IP")]
    server: Option<IpAddr>,
    /// Connections or rows matching EXPR.
    #[arg(long, short, value_name = "EXPR")]
    filter: Option<String>,
    /// Sort by FIELD (default: conns).
    #[arg(long, value_name = "FIELD")]
    sort: Option<String>,
    /// At most N rows.
    #[arg(long, short = 'n', value_name = "N")]
    limit: Option<usize>,
    #[command(flatten)]
    query: QueryArgs,
}

pub fn run(a: ConversationsArgs) -> anyhow::Result<()> {
    let req = Request {
        filter: a.filter,
        sort: a.sort,
        limit: a.limit,
        client: a.client,
        server: a.server,
        view: View::Conversations,
    };
    query::run(&req, &a.query)
}
