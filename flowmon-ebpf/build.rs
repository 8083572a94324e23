//! Rebuilds the programs when bpf-linker changes (a new LLVM can change the code).
fn main() {
    let linker = which::which("bpf-linker")
        .expect("bpf-linker is not on PATH: run `./x setup` (it builds bpf-linker against the pinned toolchain's LLVM)");
    println!("cargo:rerun-if-changed={}", linker.display());
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
