//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `flowmon/fuzz`, seeded
//! from `shared/testdata` and the saved inputs, and reports executions. An
//! input that crashes a target is copied into `flowmon/fuzz/regressions/`,
//! where a unit test runs it from then on.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{setup, util};

pub const TARGETS: [&str; 3] = ["packet", "capture", "filter"];

#[derive(clap::Args)]
pub struct Options {
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Targets to run (default: all of packet, capture, filter).
    pub targets: Vec<String>,
}

/// What one target's run did.
#[derive(Debug, PartialEq, Eq)]
struct Report {
    target: String,
    executions: u64,
    seconds: u64,
    corpus: u64,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    setup::cargo_fuzz()?;
    let targets: Vec<&str> = if o.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        o.targets.iter().map(String::as_str).collect()
    };
    for t in &targets {
        if !TARGETS.contains(t) {
            bail!(
                "no fuzz target {t:?}: the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let fuzz_dir = util::root().join("flowmon/fuzz");
    let mut reports = Vec::new();
    for t in targets {
        let corpus = util::root().join("target/fuzz-corpus").join(t);
        seed(t, &corpus)?;
        reports.push(fuzz(&fuzz_dir, t, &corpus, o.seconds)?);
    }
    println!(
        "{:<8} {:>12} {:>8} {:>10} {:>8}",
        "target", "executions", "seconds", "exec/s", "corpus"
    );
    for r in &reports {
        println!(
            "{:<8} {:>12} {:>8} {:>10} {:>8}",
            r.target,
            r.executions,
            r.seconds,
            r.executions / r.seconds.max(1),
            r.corpus
        );
    }
    Ok(())
}

/// Fills `corpus` with the saved inputs and, from the Zeek traces, every
/// frame (packet), every capture (capture) and the README's filters.
fn seed(target: &str, corpus: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(corpus)?;
    let saved = util::root().join("flowmon/fuzz/regressions").join(target);
    for e in std::fs::read_dir(&saved).with_context(|| saved.display().to_string())? {
        let e = e?;
        std::fs::copy(e.path(), corpus.join(e.file_name()))?;
    }
    let traces = traces()?;
    match target {
        "capture" => {
            for (i, t) in traces.iter().enumerate() {
                std::fs::copy(t, corpus.join(format!("trace-{i}")))?;
            }
        }
        "packet" => {
            let mut n = 0;
            for t in &traces {
                let Ok(mut r) = pcap_file::pcap::PcapReader::new(std::fs::File::open(t)?) else {
                    continue; // pcapng: seeded as a capture only
                };
                while let Some(Ok(p)) = r.next_packet() {
                    std::fs::write(corpus.join(format!("frame-{n}")), &p.data)?;
                    n += 1;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The capture files under the Zeek test data.
fn traces() -> anyhow::Result<Vec<PathBuf>> {
    let dir = std::env::var_os("FLOWMON_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::root().join("../shared/testdata/zeek"))
        .join("traces");
    let mut out = Vec::new();
    let mut todo = vec![dir.clone()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| {
            format!("{}: the Zeek test data (set FLOWMON_TESTDATA)", d.display())
        })? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "pcap" || x == "pcapng") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn fuzz(fuzz_dir: &Path, target: &str, corpus: &Path, seconds: u64) -> anyhow::Result<Report> {
    let toolchain = util::toolchain()?;
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{toolchain}"))
        .args(["fuzz", "run", target])
        .arg(corpus)
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-print_final_stats=1",
            "-timeout=10",
            "-rss_limit_mb=4096",
        ])
        .current_dir(fuzz_dir);
    eprintln!("xtask: {cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let saved = save_crashes(fuzz_dir, target)?;
        bail!(
            "fuzz target {target} failed ({}); inputs saved as regressions: {saved:?}\n{}",
            out.status,
            tail(&log, 40)
        );
    }
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    // libFuzzer ends with "Done 1234 runs in 60 second(s)".
    let secs = log
        .lines()
        .find_map(|l| {
            l.split_once(" runs in ")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(seconds);
    Ok(Report {
        target: target.into(),
        executions: stat("number_of_executed_units")
            .with_context(|| format!("no execution count in the output:\n{}", tail(&log, 20)))?,
        seconds: secs,
        corpus: std::fs::read_dir(corpus)?.count() as u64,
    })
}

/// Moves the inputs libFuzzer saved for `target` into the regression folder.
fn save_crashes(fuzz_dir: &Path, target: &str) -> anyhow::Result<Vec<PathBuf>> {
    let artifacts = fuzz_dir.join("artifacts").join(target);
    let dest = fuzz_dir.join("regressions").join(target);
    let mut saved = Vec::new();
    for e in std::fs::read_dir(&artifacts)
        .into_iter()
        .flatten()
        .flatten()
    {
        let to = dest.join(e.file_name());
        std::fs::copy(e.path(), &to)?;
        saved.push(to);
    }
    Ok(saved)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
