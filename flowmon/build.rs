//! Builds the eBPF programs (flowmon-ebpf) with the pinned nightly, so a plain
//! `cargo build` of the agent can never ship stale kernel code.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../flowmon-ebpf");
    // The programs compile the shared types and parser too: a change there
    // must rebuild them (aya-build watches only the eBPF crate itself).
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../flowmon-common")
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "flowmon-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(TOOLCHAIN),
    )
}

/// Keep in step with rust-toolchain.toml.
const TOOLCHAIN: &str = "nightly-2026-10-29";
