//! Builds the agent (and, through its build.rs, the eBPF programs).

use std::{path::PathBuf, process::Command};

use crate::util;

/// Builds in release mode and returns the path of the `flowmon` binary.
pub fn run() -> anyhow::Result<PathBuf> {
    util::run(
        Command::new("cargo")
            .args(["build", "--release", "--package", "flowmon"])
            .current_dir(util::root()),
    )?;
    Ok(util::root().join("target").join("release").join("flowmon"))
}
