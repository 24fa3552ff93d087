//! `mip parity DIR`: runs every case of a fixture folder, prints one line per tensor with its max error, and
//! exits non-zero if any falls outside the tolerances.

use std::path::PathBuf;

use anyhow::{bail, Result};
use mip_worker::parity::{run_dir, RunOptions};

use crate::device::{parse_device, parse_dtype};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Fixture folder (with index.json), e.g. tests/fixtures/mip-tiny-sdxl.
    dir: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = crate::device::device_arg)]
    device: String,
    /// f32 (the fixture tolerances), or f16/bf16 (every scaled check loosened to 1e-2 relative).
    #[arg(long, default_value = "f32", value_parser = crate::device::DTYPES)]
    dtype: String,
    /// Print only failures and the summary.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args) -> Result<()> {
    let opts = RunOptions {
        device: parse_device(&args.device)?,
        dtype: parse_dtype(&args.dtype)?,
    };
    let checks = run_dir(&args.dir, &opts, &mut |c| {
        if !args.quiet || !c.ok {
            println!("{}", c.line());
        }
    })
    .map_err(anyhow::Error::msg)?;
    let failed = checks.iter().filter(|c| !c.ok).count();
    println!("{} passed, {} failed", checks.len() - failed, failed);
    if checks.is_empty() {
        bail!("no checks ran in {}", args.dir.display());
    }
    if failed > 0 {
        bail!("{failed} of {} checks outside tolerance", checks.len());
    }
    Ok(())
}
