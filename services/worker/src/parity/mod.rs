//! Comparison of computed tensors against the golden fixtures (the `tests/fixtures/mip-tiny-sdxl` layout), with
//! the tolerances stated in the fixtures' README. Used by `mip parity` and by the tests.

mod cases;

pub use cases::{run_dir, CaseSpec, RunOptions};

use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// Environment variable naming the fixture folder.
pub const FIXTURES_ENV: &str = "MIP_FIXTURES";

/// The fixture folder: `$MIP_FIXTURES`, else the repository's own `tests/fixtures/mip-tiny-sdxl`.
/// Fails with a message saying how to point at it when absent.
pub fn fixtures_dir() -> Result<PathBuf, String> {
    let dir = match std::env::var_os(FIXTURES_ENV) {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mip-tiny-sdxl"),
    };
    if dir.join("index.json").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "fixtures not found at `{}` (no index.json); set {FIXTURES_ENV} to the mip-tiny-sdxl folder",
            dir.display()
        ))
    }
}

/// How a tensor is judged against its reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tolerance {
    /// max abs diff <= rel * max(1, max abs of the reference)
    Scaled(f64),
    /// max abs diff <= max and mean abs diff <= mean
    AbsMean { max: f64, mean: f64 },
    /// every element equal
    Exact,
}

impl Tolerance {
    /// Encoders, projections, text embeddings, single UNet calls.
    pub const MODEL: Tolerance = Tolerance::Scaled(1e-4);
    /// Denoising loop and VAE decode.
    pub const LOOP: Tolerance = Tolerance::Scaled(1e-3);
    /// CLIP preprocessing (Pillow rounding).
    pub const PIXELS: Tolerance = Tolerance::AbsMean { max: 0.03, mean: 0.002 };
    /// Every scaled check of a half-precision (f16/bf16) run.
    pub const HALF: Tolerance = Tolerance::Scaled(1e-2);
}

/// The outcome of one comparison.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub max_abs: f64,
    pub mean_abs: f64,
    pub bound: f64,
    pub ok: bool,
    pub note: Option<String>,
}

impl Check {
    /// A comparison that could not be made (shape mismatch, missing tensor, error).
    pub fn failed(name: impl Into<String>, note: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_abs: f64::INFINITY,
            mean_abs: f64::INFINITY,
            bound: 0.0,
            ok: false,
            note: Some(note.into()),
        }
    }

    /// Exact equality of two values (token ids, timesteps): error 0 or 1.
    pub fn equal<T: PartialEq + std::fmt::Debug>(name: impl Into<String>, got: &T, want: &T) -> Self {
        let ok = got == want;
        Self {
            name: name.into(),
            max_abs: if ok { 0.0 } else { 1.0 },
            mean_abs: if ok { 0.0 } else { 1.0 },
            bound: 0.0,
            ok,
            note: (!ok).then(|| format!("got {got:?}, expected {want:?}")),
        }
    }

    /// One line for humans: `ok   name  max_abs=… bound=…`.
    pub fn line(&self) -> String {
        let status = if self.ok { "ok  " } else { "FAIL" };
        let mut s = format!(
            "{status} {:<48} max_abs={:.3e} mean_abs={:.3e} bound={:.3e}",
            self.name, self.max_abs, self.mean_abs, self.bound
        );
        if let Some(n) = &self.note {
            s.push_str("  ");
            s.push_str(n);
        }
        s
    }
}

/// Compares `got` with `want` (any dtype/device; compared in f64 on the CPU).
pub fn compare(name: &str, got: &Tensor, want: &Tensor, tol: Tolerance) -> Check {
    match compare_inner(name, got, want, tol) {
        Ok(c) => c,
        Err(e) => Check::failed(name, e.to_string()),
    }
}

fn compare_inner(name: &str, got: &Tensor, want: &Tensor, tol: Tolerance) -> candle_core::Result<Check> {
    if got.dims() != want.dims() {
        return Ok(Check::failed(
            name,
            format!("shape {:?}, expected {:?}", got.dims(), want.dims()),
        ));
    }
    let g = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let w = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut max_abs = 0f64;
    let mut sum = 0f64;
    let mut ref_max = 0f64;
    let mut exact = true;
    for (a, b) in g.iter().zip(&w) {
        let d = (a - b).abs();
        // NaN anywhere is a failure, never a pass.
        let d = if d.is_nan() { f64::INFINITY } else { d };
        max_abs = max_abs.max(d);
        sum += d;
        ref_max = ref_max.max(b.abs());
        exact &= a == b;
    }
    let mean_abs = if g.is_empty() { 0.0 } else { sum / g.len() as f64 };
    let (bound, ok) = match tol {
        Tolerance::Scaled(rel) => {
            let bound = rel * ref_max.max(1.0);
            (bound, max_abs <= bound)
        }
        Tolerance::AbsMean { max, mean } => (max, max_abs <= max && mean_abs <= mean),
        Tolerance::Exact => (0.0, exact),
    };
    Ok(Check {
        name: name.to_owned(),
        max_abs,
        mean_abs,
        bound,
        ok,
        note: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn scaled_bound_uses_reference_magnitude() {
        let want = Tensor::new(&[10f32, -20.0], &Device::Cpu).expect("t");
        let got = Tensor::new(&[10.001f32, -20.0], &Device::Cpu).expect("t");
        let c = compare("x", &got, &want, Tolerance::MODEL);
        assert!(c.ok, "{}", c.line());
        let got = Tensor::new(&[10.01f32, -20.0], &Device::Cpu).expect("t");
        assert!(!compare("x", &got, &want, Tolerance::MODEL).ok);
    }

    #[test]
    fn nan_and_shape_mismatch_fail() {
        let want = Tensor::new(&[1f32, 2.0], &Device::Cpu).expect("t");
        let got = Tensor::new(&[f32::NAN, 2.0], &Device::Cpu).expect("t");
        assert!(!compare("x", &got, &want, Tolerance::LOOP).ok);
        let got = Tensor::new(&[1f32], &Device::Cpu).expect("t");
        assert!(!compare("x", &got, &want, Tolerance::Exact).ok);
    }
}
