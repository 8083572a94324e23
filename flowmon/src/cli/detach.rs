//! `flowmon detach`: removes the programs and maps `flowmon run --persist`
//! left pinned, ending the kernel-side counting.

use std::path::PathBuf;

use flowmon::kernel;

#[derive(clap::Args, Debug)]
pub struct DetachArgs {
    /// The pin directory `flowmon run --persist --pin-dir` used.
    #[arg(long, value_name = "DIR", default_value = kernel::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

pub fn run(a: DetachArgs) -> anyhow::Result<()> {
    let removed = kernel::detach_pinned(&a.pin_dir)?;
    if removed.is_empty() {
        eprintln!("flowmon: nothing pinned in {}", a.pin_dir.display());
    }
    for r in removed {
        println!("removed {r}");
    }
    Ok(())
}
