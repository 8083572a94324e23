//! Command-line arguments and the dispatch to one module per subcommand.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 bad arguments (clap);
//! 77 missing privilege (BSD EX_NOPERM).

use clap::{Parser, Subcommand};
use flowmon::kernel::KernelError;

mod analyze;
mod conversations;
mod detach;
mod diagnose;
mod flows;
mod graph;
mod query;
mod replay;
mod run;
mod status;
mod timeouts;
mod top;

#[derive(Parser, Debug)]
#[command(
    name = "flowmon",
    version,
    about = "How TCP sessions end, and who ends them: a kernel-accelerated TCP session-health monitor"
)]
pub struct Args {
    /// More log output (-v info, -vv debug, -vvv trace); FLOWMON_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

impl Args {
    pub fn verbosity(&self) -> log::LevelFilter {
        match self.verbose {
            0 => log::LevelFilter::Warn,
            1 => log::LevelFilter::Info,
            2 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Attach to interfaces and print a live summary every interval.
    Run(run::RunArgs),
    /// Connections in a pcap/pcapng file, how each ended and who ended it (no root needed).
    Analyze(analyze::AnalyzeArgs),
    /// Push a capture through the kernel program (BPF_PROG_TEST_RUN) and report like analyze.
    Replay(replay::ReplayArgs),
    /// Connections, open and recently closed (from the agent, or --pcap FILE).
    Flows(flows::FlowsArgs),
    /// Top clients or servers: connections, SYN per connection, FIN/RST per side, RST per connection.
    Top(top::TopArgs),
    /// Drill-down per client, server and server port, with application names.
    Conversations(conversations::ConversationsArgs),
    /// Findings in plain words: refusals, silent drops, RST closers, aborted transfers, RSTs without connections.
    Diagnose(diagnose::DiagnoseArgs),
    /// RST per connection (client and server), SYN per connection or closes over time, from the history.
    Graph(graph::GraphArgs),
    /// The running agent's health: interfaces, table use, evictions, exports, privileges.
    Status(status::StatusArgs),
    /// Remove the programs and maps `flowmon run --persist` left attached and pinned.
    Detach(detach::DetachArgs),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Run(a) => run::run(a.resolve()?),
        Command::Analyze(a) => analyze::run(a),
        Command::Replay(a) => replay::run(a),
        Command::Flows(a) => flows::run(a),
        Command::Top(a) => top::run(a),
        Command::Conversations(a) => conversations::run(a),
        Command::Diagnose(a) => diagnose::run(a),
        Command::Graph(a) => graph::run(a),
        Command::Status(a) => status::run(a),
        Command::Detach(a) => detach::run(a),
    }
}

/// The exit code for an error that ended a command.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<query::UsageError>().is_some() {
        return 2;
    }
    match (
        e.downcast_ref::<KernelError>(),
        e.downcast_ref::<flowmon::api::ApiError>(),
    ) {
        (Some(KernelError::Privilege { .. }), _)
        | (_, Some(flowmon::api::ApiError::Permission { .. })) => 77,
        (_, Some(flowmon::api::ApiError::NoAgent { .. })) => 3,
        _ => 1,
    }
}
