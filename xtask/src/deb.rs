//! `cargo xtask deb`: the Debian package (binary, systemd unit, defaults,
//! docs, maintainer scripts), built with dpkg-deb; and the checks
//! `cargo xtask test` runs on it: contents, the unit's `systemd-analyze`
//! verdicts, and a real install and purge.

use std::{
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use crate::{build, util};

/// The highest `systemd-analyze security` exposure the unit may have
/// (0 to 10; the unit scores 2.1, "OK").
const MAX_EXPOSURE: f64 = 2.5;

#[derive(clap::Args)]
pub struct Options {
    /// Where to write the package.
    #[arg(long, default_value = "target/deb")]
    pub out: PathBuf,
    /// Then check it: contents, systemd-analyze, a real install and purge (root).
    #[arg(long)]
    pub check: bool,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    let deb = build_deb(&util::root().join(&o.out))?;
    if o.check {
        verify(&deb)?;
    }
    println!("{}", deb.display());
    Ok(())
}

/// Builds the release binary and the package; returns its path.
pub fn build_deb(out: &Path) -> anyhow::Result<PathBuf> {
    let bin = build::run()?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = util::output(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg is needed to build the package")?;
    let arch = arch.trim();
    let stage = out.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    let dist = util::root().join("flowmon/dist");
    let put = |rel: &str, from: &Path, mode: u32| -> anyhow::Result<()> {
        let to = stage.join(rel);
        std::fs::create_dir_all(to.parent().expect("a file in a folder"))?;
        std::fs::copy(from, &to).with_context(|| format!("{} -> {rel}", from.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put("usr/bin/flowmon", &bin, 0o755)?;
    util::run(Command::new("strip").arg(stage.join("usr/bin/flowmon")))?;
    put(
        "lib/systemd/system/flowmon.service",
        &dist.join("flowmon.service"),
        0o644,
    )?;
    put("etc/default/flowmon", &dist.join("default"), 0o644)?;
    put(
        "usr/share/doc/flowmon/README.md",
        &util::root().join("README.md"),
        0o644,
    )?;
    put(
        "usr/share/doc/flowmon/copyright",
        &dist.join("copyright"),
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        put(&format!("DEBIAN/{script}"), &dist.join(script), 0o755)?;
    }
    std::fs::write(stage.join("DEBIAN/conffiles"), "/etc/default/flowmon\n")?;
    let size_kib = du_kib(&stage)?;
    let control = format!(
        "Package: flowmon
Version: {version}-1
Architecture: {arch}
Maintainer: flowmon developers <flowmon@example.org>
Installed-Size: {size_kib}
Depends: libc6 (>= 2.34), libgcc-s1
Recommends: iproute2
Section: net
Priority: optional
Homepage: https://example.org/flowmon
Description: kernel-accelerated TCP session-health monitor
 flowmon counts TCP flag events per connection with an XDP program
 (ingress) and a TC classifier (egress), classifies how every session
 ends (FIN, RST, refused, unanswered) and who ended it, and answers
 queries, keeps a history and exports Prometheus metrics and IPFIX.
 .
 The service watches the default-route interface unless
 /etc/default/flowmon names others. Needs Linux 5.8 or later.
"
    );
    std::fs::write(stage.join("DEBIAN/control"), control)?;
    let mut sums = String::new();
    for f in files(&stage)? {
        let rel = f.strip_prefix(&stage)?;
        if rel.starts_with("DEBIAN") {
            continue;
        }
        let sum = util::output(Command::new("md5sum").arg(&f)).context("md5sum")?;
        let _ = writeln!(sums, "{}  {}", &sum[..32], rel.display());
    }
    std::fs::write(stage.join("DEBIAN/md5sums"), sums)?;
    let deb = out.join(format!("flowmon_{version}-1_{arch}.deb"));
    util::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

fn du_kib(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for f in files(dir)? {
        total += std::fs::metadata(&f)?.len().div_ceil(1024);
    }
    Ok(total)
}

/// Every file under `dir`, sorted.
fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What `cargo xtask test` checks of the package, failing on the first
/// thing wrong.
pub fn verify(deb: &Path) -> anyhow::Result<()> {
    let contents = util::output(Command::new("dpkg-deb").arg("--contents").arg(deb))
        .context("dpkg-deb --contents")?;
    for want in [
        "-rwxr-xr-x root/root",
        "./usr/bin/flowmon",
        "./lib/systemd/system/flowmon.service",
        "./etc/default/flowmon",
        "./usr/share/doc/flowmon/copyright",
    ] {
        ensure!(
            contents.contains(want),
            "the package lacks {want}:\n{contents}"
        );
    }
    let info =
        util::output(Command::new("dpkg-deb").arg("--info").arg(deb)).context("dpkg-deb --info")?;
    ensure!(
        info.contains("Package: flowmon") && info.contains("conffiles"),
        "{info}"
    );

    // The unit's sandbox, as systemd scores it.
    let root = tempdir("flowmon-deb-root")?;
    util::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    let unit = root.join("lib/systemd/system/flowmon.service");
    let exposure = exposure(&unit)?;
    println!("package: systemd-analyze security exposure {exposure:.1} (at most {MAX_EXPOSURE})");
    ensure!(
        exposure <= MAX_EXPOSURE,
        "the unit's exposure grew to {exposure}"
    );

    // A real install and purge, unless a flowmon package is already here
    // (never replace what an operator installed).
    let installed =
        util::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", "flowmon"]))
            .is_some_and(|s| s.contains("installed"));
    if installed {
        println!("package: flowmon is installed on this host; install test left out");
        return Ok(());
    }
    if !util::is_root() {
        bail!("installing the package needs root");
    }
    util::run(Command::new("dpkg").arg("-i").arg(deb))?;
    // Verified installed, where its ExecStart exists.
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/lib/systemd/system/flowmon.service"])
        .output()?;
    let said = String::from_utf8_lossy(&verify.stderr).into_owned();
    let version = util::output(Command::new("/usr/bin/flowmon").arg("--version"));
    let conf = std::fs::read_to_string("/etc/default/flowmon").unwrap_or_default();
    util::run(Command::new("dpkg").args(["--purge", "flowmon"]))?;
    ensure!(
        version.as_deref().map(str::trim)
            == Some(&format!("flowmon {}", env!("CARGO_PKG_VERSION"))),
        "the installed flowmon says {version:?}"
    );
    ensure!(
        conf.contains("FLOWMON_ARGS="),
        "/etc/default/flowmon: {conf}"
    );
    ensure!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    ensure!(
        !Path::new("/usr/bin/flowmon").exists() && !Path::new("/etc/default/flowmon").exists(),
        "purge left files behind"
    );
    println!("package: installed, ran and purged cleanly");
    Ok(())
}

/// `systemd-analyze security`'s overall exposure for `unit` (offline).
fn exposure(unit: &Path) -> anyhow::Result<f64> {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let rest = l.split("Overall exposure level for").nth(1)?;
            rest.split(':')
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no exposure in systemd-analyze's output: {text}"))
}

fn tempdir(name: &str) -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
