//! `flowmon flows`: connections, open and recently closed.

use flowmon::views::{Request, View};

use super::query::{self, QueryArgs};

#[derive(clap::Args, Debug)]
pub struct FlowsArgs {
    /// Only connections matching EXPR, e.g. 'rst.count > 0 and fin.count = 0'.
    #[arg(long, short, value_name = "EXPR")]
    filter: Option<String>,
    /// Sort by FIELD (numbers descending; FIELD:asc or FIELD:desc to choose). Default: last_seen.
    #[arg(long, value_name = "FIELD")]
    sort: Option<String>,
    /// At most N rows.
    #[arg(long, short = 'n', value_name = "N")]
    limit: Option<usize>,
    #[command(flatten)]
    query: QueryArgs,
}

pub fn run(a: FlowsArgs) -> anyhow::Result<()> {
    let req = Request {
        filter: a.filter,
        sort: a.sort,
        limit: a.limit,
        ..Request::new(View::Flows)
    };
    query::run(&req, &a.query)
}
