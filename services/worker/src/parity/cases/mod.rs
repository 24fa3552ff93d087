//! Runs the cases of a fixture folder (`index.json` + `cases/*`, `tokenizer_cases.json`, `scheduler_cases.json`)
//! against our implementation and reports one [`Check`] per tensor. Works on any folder of the same layout, with
//! other model sizes and subject counts: everything is read from the folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{compare, Check, Tolerance};
use crate::model::image_proj::ResamplerConfig;

mod pipeline_case;
mod simple_cases;

/// The request recorded in a case's `case.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct CaseSpec {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    pub subjects: Vec<CaseSubject>,
    pub entity_token_lens: Vec<usize>,
    pub scale: f64,
    pub guidance_scale: f64,
    pub num_inference_steps: usize,
    pub height: usize,
    pub width: usize,
    #[serde(default = "euler")]
    pub scheduler: String,
    pub unet_forward_timestep: f64,
    pub model: PathBuf,
    pub image_encoder: PathBuf,
    pub adapter: PathBuf,
    #[serde(default)]
    pub adapter_bin: Option<PathBuf>,
    #[serde(default)]
    pub resampler: Option<ResamplerConfig>,
}

/// One subject of a case.
#[derive(Debug, Clone, Deserialize)]
pub struct CaseSubject {
    pub name: String,
    pub images: Vec<PathBuf>,
}

fn euler() -> String {
    "euler".to_owned()
}

#[derive(Debug, Deserialize)]
struct Index {
    cases: Vec<PathBuf>,
}

/// Where and in which precision the run happens. In half precision (f16/bf16) every scaled tolerance is
/// replaced by [`Tolerance::HALF`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: Device,
    pub dtype: DType,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

impl RunOptions {
    /// Whether the run is in f16 or bf16.
    pub fn is_half(&self) -> bool {
        matches!(self.dtype, DType::F16 | DType::BF16)
    }
}

/// Runs everything in `dir`, calling `report` with each check as it is made; returns all checks.
pub fn run_dir(dir: &Path, opts: &RunOptions, report: &mut dyn FnMut(&Check)) -> Result<Vec<Check>, String> {
    let index_path = dir.join("index.json");
    let text =
        std::fs::read_to_string(&index_path).map_err(|e| format!("cannot read `{}`: {e}", index_path.display()))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| format!("bad `{}`: {e}", index_path.display()))?;
    let mut checks = Vec::new();
    let mut push = |c: Check| {
        report(&c);
        checks.push(c);
    };
    let base = dir.join("sdxl");
    let tok_cases = dir.join("tokenizer_cases.json");
    if tok_cases.is_file() {
        simple_cases::tokenizer(&tok_cases, &base, &mut push);
    }
    let sched_cases = dir.join("scheduler_cases.json");
    if sched_cases.is_file() {
        simple_cases::scheduler(&sched_cases, &base, &mut push);
    }
    for case in &index.cases {
        let case_dir = dir.join(case);
        let name = case
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if case_dir.join("case.json").is_file() {
            pipeline_case::run(&case_dir, &name, opts, &mut push);
        } else if case_dir.join("images.json").is_file() {
            simple_cases::preprocess(&case_dir, &name, &mut push);
        } else if case_dir.join("tensors.safetensors").is_file() {
            simple_cases::plain_unet(&case_dir, &name, &base, opts, &mut push);
        } else {
            push(Check::failed(
                name,
                "unknown case layout (no case.json, images.json or tensors.safetensors)",
            ));
        }
    }
    Ok(checks)
}

/// Tensors of a fixture file by name, on the run's device (in their stored dtype).
pub(crate) struct Golden {
    tensors: HashMap<String, Tensor>,
    file: PathBuf,
    half: bool,
}

impl Golden {
    pub(crate) fn load(file: &Path, opts: &RunOptions) -> Result<Self, String> {
        let tensors = candle_core::safetensors::load(file, &opts.device)
            .map_err(|e| format!("cannot read `{}`: {e}", file.display()))?;
        Ok(Self {
            tensors,
            file: file.to_owned(),
            half: opts.is_half(),
        })
    }

    /// Whether the run is in half precision.
    pub(crate) fn is_half(&self) -> bool {
        self.half
    }

    /// `tol`, loosened to [`Tolerance::HALF`] for scaled tolerances in a half-precision run.
    pub(crate) fn tol(&self, tol: Tolerance) -> Tolerance {
        match tol {
            Tolerance::Scaled(_) if self.half => Tolerance::HALF,
            t => t,
        }
    }

    pub(crate) fn get(&self, key: &str) -> Result<&Tensor, String> {
        self.tensors
            .get(key)
            .ok_or_else(|| format!("`{key}` absent from `{}`", self.file.display()))
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Compares `got` with the tensor `key`, named `{prefix}/{key}`.
    pub(crate) fn check(&self, prefix: &str, key: &str, got: &Tensor, tol: Tolerance) -> Check {
        let name = format!("{prefix}/{key}");
        match self.get(key) {
            Ok(want) => compare(&name, got, want, self.tol(tol)),
            Err(e) => Check::failed(name, e),
        }
    }
}
