//! `cargo xtask test`: every test, privileged ones included.
//!
//! The privileged tests are `#[ignore]`d so that a plain `cargo test` by a
//! user without root passes; here they are included, and running without
//! root is an error rather than a silent skip.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::bail;

use crate::{deb, fuzz, setup, util};

#[derive(clap::Args)]
pub struct Options {
    /// Only the tests that need no root.
    #[arg(long)]
    unprivileged: bool,
    /// Seconds each fuzz target runs after the tests (0: no fuzzing).
    #[arg(long, default_value_t = 30)]
    fuzz_seconds: u64,
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
    eprintln!("xtask: {cmd:?}");
    // Echo cargo's output and add up its per-binary "test result" lines, so
    // the run ends on one line that counts every test of every binary.
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let mut totals = Totals::default();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() || totals.failed > 0 {
        bail!("tests failed: {status}");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    // The Debian package: built, its unit analysed, installed and purged.
    if !o.unprivileged && o.args.is_empty() {
        deb::verify(&deb::build_deb(&util::root().join("target/deb"))?)?;
    }
    // A short fuzzing run on top: the saved inputs already ran as unit
    // tests; this looks for new ones, and fails on any crash it finds.
    if !o.unprivileged && o.fuzz_seconds > 0 && o.args.is_empty() {
        fuzz::run(&fuzz::Options {
            seconds: o.fuzz_seconds,
            targets: vec![],
        })?;
    }
    Ok(())
}

#[derive(Default, Debug, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds a libtest summary such as
    /// `test result: ok. 15 passed; 0 failed; 2 ignored; 0 measured; ...`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_up_libtest_summaries() {
        let mut t = Totals::default();
        t.add("test result: ok. 15 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        t.add("test result: FAILED. 4 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.18s");
        t.add("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 19,
                failed: 1,
                ignored: 2
            }
        );
    }
}
