//! Installs what the build and the tests need, idempotently: bpf-linker built
//! against the pinned nightly's own LLVM, and the Debian packages the tests
//! start for real (tshark, tcpdump, nftables, ethtool, iproute2, bpftool, setpriv). Each step
//! first checks whether it is already done, so a second run costs seconds.

use std::{os::unix::fs::symlink, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{self, output};

/// The bpf-linker release the build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The cargo-fuzz release `cargo xtask fuzz` runs.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages the tests run, netbase for /etc/services (the
/// application names `conversations` shows) and a font for `flowmon graph`.
const PACKAGES: &[&str] = &[
    "netbase",
    "iproute2",
    "tcpdump",
    "tshark",
    "nftables",
    "ethtool",
    "bpftool",
    "util-linux",
    "prometheus",
    "nfdump",
    "fonts-dejavu-core",
];

#[derive(clap::Args)]
pub struct Options {
    /// Skip the Debian packages (enough for building and running).
    #[arg(long)]
    pub no_packages: bool,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    bpf_linker()?;
    if !o.no_packages {
        packages()?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let have = output(Command::new("bpf-linker").arg("--version"));
    if have
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    let toolchain = util::toolchain()?;
    let sysroot =
        output(Command::new("rustup").args(["run", &toolchain, "rustc", "--print", "sysroot"]))
            .context("the pinned toolchain is missing: run ./x, which installs it")?;
    let sysroot = std::path::PathBuf::from(sysroot.trim());
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .context("the pinned toolchain ships no libLLVM.so.*")?;
    // bpf-linker's build looks for libLLVM.so under $LLVM_PREFIX/lib and
    // records that folder as its run path, so it must outlive `cargo clean`:
    // keep it beside the installed binary, under CARGO_HOME.
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = cargo_home.join("flowmon-llvm").join(&toolchain);
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".to_string(), lib.clone()] {
        let link = prefix_lib.join(&name);
        let _ = std::fs::remove_file(&link);
        symlink(sysroot.join("lib").join(&lib), &link)?;
    }
    util::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// Installs cargo-fuzz unless this version is already there.
pub fn cargo_fuzz() -> anyhow::Result<()> {
    let have = output(Command::new("cargo").args(["fuzz", "--version"]));
    if have
        .as_deref()
        .is_some_and(|v| v.contains(CARGO_FUZZ_VERSION))
    {
        return Ok(());
    }
    util::run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--force",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// What `cargo xtask bench` adds: the traffic source of its live section,
/// the per-flow libpcap peer it is compared with (pmacctd), and perf, which
/// samples every monitor's kernel side.
pub const BENCH_PACKAGES: &[&str] = &["tcpreplay", "pmacct", "linux-perf"];

fn packages() -> anyhow::Result<()> {
    install(PACKAGES).map(drop)
}

/// Installs the Debian packages of `list` that are missing (root only), and
/// returns those it installed.
pub fn install<'a>(list: &[&'a str]) -> anyhow::Result<Vec<&'a str>> {
    let missing: Vec<&str> = list
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    if !util::is_root() {
        bail!(
            "Debian packages {} are missing and only root can install them: run as root",
            missing.join(" ")
        );
    }
    util::run(Command::new("apt-get").args(["update", "-q"]))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(missing)
}
