//! `cargo xtask bench`: the performance suite (as root), printing a table.

use std::process::Command;

use anyhow::bail;

use crate::{setup, util};

#[derive(clap::Args)]
pub struct Options {
    /// Smaller tables and fewer repetitions: a few minutes on 2 cores.
    #[arg(long)]
    quick: bool,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    if !util::is_root() {
        bail!(
            "the benchmarks load eBPF programs and need root (CAP_BPF, CAP_PERFMON): run as root"
        );
    }
    setup::run(&setup::Options { no_packages: false })?;
    let installed = setup::install(setup::BENCH_PACKAGES)?;
    if installed.contains(&"pmacct") && std::path::Path::new("/run/systemd/system").exists() {
        // Under systemd the package starts a pmacctd of its own on the host's
        // interfaces; the benchmark runs its own in a namespace, and a second
        // one would only add noise.
        util::run(Command::new("systemctl").args(["disable", "--now", "pmacctd.service"]))?;
    }
    let mut cmd = Command::new("cargo");
    cmd.args(["bench", "--package", "flowmon", "--bench", "perf", "--"])
        .current_dir(util::root());
    if o.quick {
        cmd.arg("--quick");
    }
    util::run(&mut cmd)
}
