//! `flowmon top clients|servers`: per address, connections, SYN per
//! connection, FIN and RST from each side, RST per connection, close mix.

use flowmon::views::{Request, View};

use super::query::{self, QueryArgs};

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// clients or servers.
    #[arg(value_enum)]
    side: Side,
    /// Sort by FIELD, e.g. rst.per_conn, conns, syn.per_conn (default: servers by rst.count.srv, clients by conns).
    #[arg(long, value_name = "FIELD")]
    by: Option<String>,
    /// Connections (rst.count > 0) or rows (rst.per_conn > 0.5) matching EXPR.
    #[arg(long, short, value_name = "EXPR")]
    filter: Option<String>,
    /// At most N rows.
    #[arg(long, short = 'n', value_name = "N", default_value_t = 20)]
    limit: usize,
    #[command(flatten)]
    query: QueryArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Side {
    Clients,
    Servers,
}

pub fn run(a: TopArgs) -> anyhow::Result<()> {
    let view = match a.side {
        Side::Clients => View::TopClients,
        Side::Servers => View::TopServers,
    };
    let req = Request {
        filter: a.filter,
        sort: a.by,
        limit: Some(a.limit),
        ..Request::new(view)
    };
    query::run(&req, &a.query)
}
