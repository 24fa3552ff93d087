//! `scheduler/scheduler_config.json` and the arithmetic the diffusers schedulers share: the training noise
//! table (betas, cumulative alphas, sigmas), the timestep spacings, Karras sigmas and sigma -> timestep
//! interpolation.
//!
//! diffusers builds the training table in float32 tensors (`torch.linspace`, `cumprod` accumulating in double
//! on the CPU, then `((1 - a) / a) ** 0.5` in float32) and hands the inference sigmas over as float32. The
//! functions here reproduce those roundings so that sigmas match to a few ulps of f32; values are returned as
//! f64 holding f32-representable numbers.

use serde::Deserialize;

use crate::error::InvalidInput;

/// How the betas run from `beta_start` to `beta_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    #[default]
    Linear,
    /// Linear in sqrt(beta), as Stable Diffusion trains.
    ScaledLinear,
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    #[default]
    Epsilon,
    VPrediction,
}

/// How the inference timesteps are spread over the training range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// How Euler interpolates sigmas between training timesteps (only `linear` is supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    #[default]
    Linear,
    LogLinear,
}

/// The sigma appended after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    #[default]
    Zero,
    SigmaMin,
}

fn thousand() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.0001
}
fn beta_end() -> f64 {
    0.02
}

/// diffusers `scheduler_config.json` (any scheduler class; unknown fields ignored). Fields whose diffusers
/// default differs between scheduler classes are optional and resolved by each scheduler.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default)]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub steps_offset: usize,
    /// diffusers default: `linspace` for Euler and DPM-Solver, `leading` for DDIM.
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    #[serde(default)]
    pub interpolation_type: InterpolationType,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub final_sigmas_type: Option<FinalSigmasType>,
    /// DDIM: whether the step past t = 0 uses alpha = 1 (else `alphas_cumprod[0]`); SDXL configs say false.
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clip the predicted clean sample to [-1, 1]; SDXL configs say false.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default)]
    pub trained_betas: Option<serde_json::Value>,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`.
    pub fn from_file(path: &std::path::Path) -> crate::error::Result<Self> {
        let cfg: Self = crate::model::weights::read_json(path)?;
        cfg.validate().map_err(|message| crate::error::ModelError::Config {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    /// Rejects settings this implementation does not reproduce.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_train_timesteps < 2 {
            return Err(format!(
                "`num_train_timesteps` must be >= 2, got {}",
                self.num_train_timesteps
            ));
        }
        if self.trained_betas.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("`trained_betas` is not supported".into());
        }
        if self.rescale_betas_zero_snr {
            return Err("`rescale_betas_zero_snr` is not supported".into());
        }
        if self.interpolation_type != InterpolationType::Linear {
            return Err("`interpolation_type` must be \"linear\"".into());
        }
        Ok(())
    }

    /// `steps` must be in `1..=num_train_timesteps`.
    pub fn check_steps(&self, steps: usize) -> Result<(), InvalidInput> {
        if steps == 0 || steps > self.num_train_timesteps {
            return Err(InvalidInput::new(
                "steps",
                format!("must be in 1..={}", self.num_train_timesteps),
                steps,
            ));
        }
        Ok(())
    }

    /// The training table `alphas_cumprod[t]`, t = 0..num_train_timesteps, rounded as diffusers does.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = match self.beta_schedule {
            BetaSchedule::Linear => linspace(self.beta_start, self.beta_end, n).map(|b| b as f32).collect(),
            BetaSchedule::ScaledLinear => linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                .map(|b| {
                    let b = b as f32;
                    b * b
                })
                .collect(),
        };
        let mut acc = 1f64;
        betas
            .iter()
            .map(|b| {
                acc *= f64::from(1f32 - b);
                f64::from(acc as f32)
            })
            .collect()
    }

    /// The training sigmas `sqrt((1 - a) / a)` in f32 arithmetic, ascending in t.
    pub fn train_sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod()
            .iter()
            .map(|&a| {
                let a = a as f32;
                f64::from(((1f32 - a) / a).sqrt())
            })
            .collect()
    }
}

/// `np.linspace(start, end, n)` (f64; the last point is exactly `end`).
pub fn linspace(start: f64, end: f64, n: usize) -> impl DoubleEndedIterator<Item = f64> {
    let step = if n > 1 { (end - start) / (n - 1) as f64 } else { 0.0 };
    (0..n).map(move |i| {
        if i + 1 == n && n > 1 {
            end
        } else {
            start + step * i as f64
        }
    })
}

/// numpy's `round` (half to even).
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.arange(start, stop, -step)` for a positive `step` (descending), as numpy computes it.
pub fn arange_desc(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((start - stop) / step).ceil().max(0.0) as usize;
    (0..len).map(|i| start - i as f64 * step).collect()
}

/// `np.interp(x, 0..table.len(), table)`, clamped at the ends.
pub fn interp(x: f64, table: &[f64]) -> f64 {
    let last = table.len().saturating_sub(1);
    if table.is_empty() {
        return 0.0;
    }
    if x <= 0.0 {
        return table[0];
    }
    if x >= last as f64 {
        return table[last];
    }
    let lo = x.floor() as usize;
    let frac = x - lo as f64;
    (table[lo + 1] - table[lo]) * frac + table[lo]
}

/// Karras et al. (2022) sigmas: `n` values from `sigma_max` down to `sigma_min`, evenly spaced in
/// `sigma^(1/rho)` with rho = 7.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, n)
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers `_sigma_to_t`: the fractional training timestep whose log-sigma (linearly interpolated in the
/// ascending table `log_sigmas`) equals `ln(sigma)`.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // Index of the last table entry <= log_sigma (0 when none), at most n - 2.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Rounds to f32 and back (diffusers keeps sigmas as float32 tensors).
pub fn f32r(x: f64) -> f64 {
    f64::from(x as f32)
}
