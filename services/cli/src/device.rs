//! Parsing `--device` and `--dtype` (shared by every command that loads a model), `--size` and `--scheduler`.
//! The `*_arg` functions and lists are clap value parsers: a bad value is refused while the arguments are parsed,
//! with the flag's name, and `--help` lists the values.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// The values of `--dtype`.
pub const DTYPES: [&str; 3] = ["f32", "f16", "bf16"];

/// The values of `--scheduler`.
pub fn schedulers() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(mip_worker::pipeline::scheduler::SchedulerKind::ALL.map(|k| k.as_str()))
}

/// `--device`: cpu, cuda or cuda:N (the device itself is opened later).
pub fn device_arg(s: &str) -> std::result::Result<String, String> {
    let ok = s == "cpu" || s == "cuda" || s.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
    if ok {
        Ok(s.to_owned())
    } else {
        Err("expected cpu, cuda or cuda:N".to_owned())
    }
}

/// `--size`: WIDTHxHEIGHT.
pub fn size_arg(s: &str) -> std::result::Result<String, String> {
    parse_size(s)
        .map(|_| s.to_owned())
        .map_err(|_| "expected WIDTHxHEIGHT, e.g. 1024x1024".to_owned())
}

/// Where and in which precision a model runs.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = device_arg)]
    pub device: String,
    /// The weights' precision.
    #[arg(long, default_value = "f32", value_parser = DTYPES)]
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
