//! `flowmon conversations`: drill-down per client, server and server port,
//! with the port's application name.

use std::net::IpAddr;

use flowmon::views::View;

use super::query::{self, QueryArgs, SelectArgs};

#[derive(clap::Args, Debug)]
pub struct ConversationsArgs {
    /// Only this client.
    #[arg(long, value_name = "IP")]
    client: Option<IpAddr>,
    /// Only this server.
    #[arg(long, value_name = "IP")]
    server: Option<IpAddr>,
    #[command(flatten)]
    select: SelectArgs,
    #[command(flatten)]
    query: QueryArgs,
}

pub fn run(a: ConversationsArgs) -> anyhow::Result<()> {
    let mut req = a.select.request(View::Conversations);
    (req.client, req.server) = (a.client, a.server);
    query::run(&req, &a.query)
}
