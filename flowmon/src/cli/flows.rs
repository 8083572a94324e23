//! `flowmon flows`: connections, open and recently closed, newest first
//! unless `--sort` says otherwise.

use flowmon::views::View;

use super::query::{self, QueryArgs, SelectArgs};

#[derive(clap::Args, Debug)]
pub struct FlowsArgs {
    #[command(flatten)]
    select: SelectArgs,
    #[command(flatten)]
    query: QueryArgs,
}

pub fn run(a: FlowsArgs) -> anyhow::Result<()> {
    query::run(&a.select.request(View::Flows), &a.query)
}
