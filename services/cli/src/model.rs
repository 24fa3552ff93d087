//! `mip model demo --out DIR`: writes the built-in demo model (deterministic random weights in the published
//! layouts, plus two example reference images). `mip model random --out DIR`: a full-size random checkpoint in the
//! published layouts and sizes (about 11 GB). Also resolves `--model demo|DIR` for the other commands.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Subcommand;
use mip_worker::demo::full_size::{write_full_size, AdapterKind, FullSizeOptions};
use mip_worker::pipeline::ModelSpec;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the demo model bundle into a folder.
    Demo {
        /// Destination folder (created; existing files are overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a full-size random checkpoint in the published layouts (SDXL base fp16 variant with a sharded UNet,
    /// the IP-Adapter image encoder, the MIP-Adapter torch pickle, mip.json): about 11 GB, for real-scale tests.
    Random {
        /// Destination folder (created; existing files are overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Which published adapter to imitate: `sdxl` (ViT-bigG/14, 4 tokens) or `sdxl-plus` (ViT-H/14, Resampler).
        #[arg(long, value_enum, default_value = "sdxl")]
        adapter: Adapter,
        /// Largest UNet shard, in MiB.
        #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
        unet_shard_mib: u64,
        /// The same files and formats with the demo model's sizes (a few MB), to try the layout quickly.
        #[arg(long)]
        small: bool,
    },
}

/// `--adapter` of `mip model random`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Adapter {
    Sdxl,
    SdxlPlus,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Demo { out } => {
            mip_worker::demo::write_demo(&out)
                .with_context(|| format!("writing the demo model to {}", out.display()))?;
            println!("demo model written to {}", out.display());
            println!("example subjects: {0}/refs/cat.png {0}/refs/jacket.png", out.display());
            Ok(())
        }
        Command::Random {
            out,
            adapter,
            unet_shard_mib,
            small,
        } => {
            let opts = FullSizeOptions {
                adapter: match adapter {
                    Adapter::Sdxl => AdapterKind::Sdxl,
                    Adapter::SdxlPlus => AdapterKind::SdxlPlus,
                },
                unet_shard_bytes: unet_shard_mib << 20,
                small,
            };
            let started = Instant::now();
            let mut report = |component: &str, values: usize| {
                eprintln!(
                    "[{:>6.1} s] writing {component}: {:.1} M values",
                    started.elapsed().as_secs_f64(),
                    values as f64 / 1e6
                );
            };
            let parts = write_full_size(&out, &opts, &mut report)
                .with_context(|| format!("writing the random checkpoint to {}", out.display()))?;
            let total: u64 = parts.iter().map(|p| p.bytes).sum();
            for p in &parts {
                println!(
                    "{:<16} {:>9.3} GB  {}",
                    p.component,
                    p.bytes as f64 / 1e9,
                    p.path.display()
                );
            }
            println!(
                "{:<16} {:>9.3} GB  written in {:.1} s to {}",
                "total",
                total as f64 / 1e9,
                started.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(())
        }
    }
}

/// Where `--model demo` lives: `$MIP_DEMO_DIR`, else `$XDG_CACHE_HOME|~/.cache/mip/demo-vN`.
pub fn demo_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MIP_DEMO_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache
        .join("mip")
        .join(format!("demo-v{}", mip_worker::demo::DEMO_VERSION))
}

/// The folder a config's `model.path: demo` stands for. Serving (`write`) writes the demo model there first when it
/// is missing; a configuration check only needs the path.
pub fn demo_path(write: bool) -> Result<PathBuf> {
    if write {
        Ok(resolve("demo")?.1)
    } else {
        Ok(demo_dir())
    }
}

/// Resolves `--model`: `demo` (written on first use) or a bundle folder with `mip.json`.
pub fn resolve(model: &str) -> Result<(ModelSpec, PathBuf)> {
    let dir = if model == "demo" {
        let dir = demo_dir();
        if !dir.join(mip_worker::pipeline::spec::MANIFEST).is_file() {
            mip_worker::demo::write_demo(&dir)
                .with_context(|| format!("writing the demo model to {}", dir.display()))?;
        }
        dir
    } else {
        PathBuf::from(model)
    };
    let spec = ModelSpec::from_bundle(Path::new(&dir))?;
    Ok((spec, dir))
}
