//! The `flowmon` binary: parse arguments, run the subcommand, map the outcome
//! to an exit code.

use std::process::ExitCode;

use clap::Parser as _;

mod cli;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    env_logger::Builder::new()
        .filter_level(args.verbosity())
        .parse_env("FLOWMON_LOG")
        .init();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowmon: {e:#}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
