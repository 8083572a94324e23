//! Builds the eBPF programs (flowmon-ebpf) with the pinned nightly, so a plain
//! `cargo build` of the agent can never ship stale kernel code.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../flowmon-ebpf");
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
