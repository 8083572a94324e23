//! `cargo xtask test`: every test, privileged ones included.
//!
//! The privileged tests are `#[ignore]`d so that a plain `cargo test` by a
//! user without root passes; here they are included, and running without
//! root is an error rather than a silent skip.

use std::process::Command;

use anyhow::bail;

use crate::{setup, util};

#[derive(clap::Args)]
pub struct Options {
    /// Only the tests that need no root.
    #[arg(long)]
    unprivileged: bool,
    /// Extra arguments for the test harness (e.g. a test name filter).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    if !o.unprivileged && !util::is_root() {
        bail!(
            "the eBPF and network-namespace tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN for namespaces): run as root, or pass --unprivileged for the rest"
        );
    }
    setup::run(&setup::Options {
        no_packages: o.unprivileged,
    })?;
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--no-fail-fast"])
        .current_dir(util::root())
        .arg("--");
    if !o.unprivileged {
        cmd.arg("--include-ignored");
    }
    cmd.args(&o.args);
    util::run(&mut cmd)
}
