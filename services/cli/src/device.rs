//! Parsing `--device` and `--dtype` (shared by every command that loads a model) and `--size`.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// Where and in which precision a model runs.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl DeviceArgs {
    /// The parsed device and dtype.
    pub fn resolve(&self) -> Result<(Device, DType)> {
        Ok((parse_device(&self.device)?, parse_dtype(&self.dtype)?))
    }
}

/// `WIDTHxHEIGHT`.
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)));
    parsed.ok_or_else(|| anyhow::anyhow!("`--size` must look like WIDTHxHEIGHT, got {s:?}"))
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::new_cuda(n)?),
            _ => bail!("`--device` must be cpu, cuda or cuda:N, got {s:?}"),
        },
    }
}

/// `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => bail!("`--dtype` must be f32, f16 or bf16, got {s:?}"),
    }
}
