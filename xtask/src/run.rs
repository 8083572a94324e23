//! `cargo xtask run`: set up, build, and start `flowmon run`.

use std::{os::unix::process::CommandExt as _, process::Command};

use crate::{build, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Arguments for `flowmon run` (default: the default-route interface).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    setup::run(&setup::Options { no_packages: true })?;
    let bin = build::run()?;
    // exec, so Ctrl-C and SIGTERM reach flowmon itself and it detaches.
    Err(Command::new(bin).arg("run").args(o.args).exec().into())
}
