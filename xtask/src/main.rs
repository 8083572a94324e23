//! `cargo xtask`: a dispatcher to one module per task.

use clap::{Parser, Subcommand};

mod bench;
mod build;
mod deb;
mod fuzz;
mod run;
mod setup;
mod test;
mod util;

#[derive(Parser)]
#[command(name = "xtask", about = "flowmon's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent; seconds when done).
    Setup(setup::Options),
    /// Build the agent and its eBPF programs in release mode.
    Build,
    /// Set up, build, and run `flowmon run` with the given arguments.
    Run(run::Options),
    /// Set up and run every test: unit, eBPF (BPF_PROG_TEST_RUN), network namespaces.
    Test(test::Options),
    /// Run the performance suite and print a table (root).
    Bench(bench::Options),
    /// Build the Debian package (binary, systemd unit, defaults) into target/deb.
    Deb(deb::Options),
    /// Fuzz the packet parser, the capture reader and the filter parser (cargo-fuzz).
    Fuzz(fuzz::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup(o) => setup::run(&o),
        Task::Build => build::run().map(|_| ()),
        Task::Run(o) => run::run(o),
        Task::Test(o) => test::run(&o),
        Task::Bench(o) => bench::run(&o),
        Task::Fuzz(o) => fuzz::run(&o),
        Task::Deb(o) => deb::run(&o),
    }
}
