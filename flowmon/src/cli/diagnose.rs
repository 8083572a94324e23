//! `flowmon diagnose`: findings in plain words with their evidence.

use flowmon::views::{Request, View};

use super::query::{self, QueryArgs};

#[derive(clap::Args, Debug)]
pub struct DiagnoseArgs {
    /// Only connections matching EXPR.
    #[arg(long, short, value_name = "EXPR")]
    filter: Option<String>,
    #[command(flatten)]
    query: QueryArgs,
}

pub fn run(a: DiagnoseArgs) -> anyhow::Result<()> {
    let req = Request {
        filter: a.filter,
        ..Request::new(View::Diagnose)
    };
    query::run(&req, &a.query)
}
