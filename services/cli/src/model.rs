//! `mip model demo --out DIR`: writes the built-in demo model (deterministic random weights in the published
//! layouts, plus two example reference images). Also resolves `--model demo|DIR` for the other commands.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use mip_worker::pipeline::ModelSpec;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the demo model bundle into a folder.
    Demo {
        /// Destination folder (created; existing files are overwritten).
        #[arg(long)]
        out: PathBuf,
    },
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
