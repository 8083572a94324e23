//! Command-line arguments and the dispatch to one module per subcommand.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 bad arguments (clap);
//! 77 missing privilege (BSD EX_NOPERM).

use clap::{Parser, Subcommand};
use flowmon::kernel::KernelError;

mod analyze;
mod replay;
mod run;
mod timeouts;

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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Run(a) => run::run(a.resolve()?),
        Command::Analyze(a) => analyze::run(a),
        Command::Replay(a) => replay::run(a),
    }
}

/// The exit code for an error that ended a command.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<KernelError>() {
        Some(KernelError::Privilege { .. }) => 77,
        _ => 1,
    }
}
