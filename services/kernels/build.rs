//! Compiles `cuda/*.cu` to PTX with nvcc when the `cuda` feature is on (nothing otherwise: the CPU build needs no
//! CUDA toolkit). nvcc is taken from `$NVCC`, else `$CUDA_ROOT/bin/nvcc`, else `PATH`; the architecture from
//! `$CUDA_COMPUTE_CAP` (default 90, the H100). The PTX files land in `$OUT_DIR` and are embedded by `src/ptx.rs`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: [&str; 3] = ["flash_attn", "group_norm", "im2col"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    println!("cargo::rerun-if-env-changed=NVCC");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return Ok(());
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let nvcc = nvcc_path();
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_owned());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    for name in SOURCES {
        let src = Path::new("cuda").join(format!("{name}.cu"));
        let dst = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=sm_{cap}"))
            .arg("-o")
            .arg(&dst)
            .arg(&src)
            .status()
            .map_err(|e| format!("cannot run nvcc `{}`: {e}", nvcc.display()))?;
        if !status.success() {
            return Err(format!("nvcc failed on {} ({status})", src.display()).into());
        }
    }
    Ok(())
}

fn nvcc_path() -> PathBuf {
    if let Some(p) = env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(root) = env::var_os("CUDA_ROOT") {
        let p = Path::new(&root).join("bin").join("nvcc");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("nvcc")
}
