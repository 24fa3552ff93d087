//! diffusers `EulerDiscreteScheduler` (deterministic: `s_churn = 0`), as SDXL configures it.
//!
//! Latents live in "sigma space": `x = x0 + sigma * eps`. The loop starts from `noise * init_noise_sigma`, feeds
//! the UNet `x / sqrt(sigma_i^2 + 1)` and steps `x += eps * (sigma_{i+1} - sigma_i)`. Sigmas are the training
//! sigmas interpolated at the inference timesteps (optionally re-spaced after Karras), kept as float32 like
//! diffusers.

use candle_core::{DType, Tensor};

use super::config::{
    arange_desc, f32r, interp, karras_sigmas, np_round, sigma_to_t, FinalSigmasType, PredictionType, SchedulerConfig,
    TimestepSpacing,
};
use super::{check_index, Scheduler, SchedulerKind};
use crate::error::{ForwardContext, Result};

/// Euler discrete sampler state for one generation.
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    timesteps: Vec<f64>,
    /// One more than `timesteps`: the last is the final sigma (0 for `final_sigmas_type = zero`).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
}

impl EulerDiscrete {
    /// Schedules `steps` inference steps (validated by the caller).
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        cfg.check_steps(steps)?;
        let n_train = cfg.num_train_timesteps;
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let mut timesteps: Vec<f64> = match spacing {
            TimestepSpacing::Linspace => {
                let top = (n_train - 1) as f64;
                super::config::linspace(0.0, top, steps).map(f32r).rev().collect()
            }
            TimestepSpacing::Leading => {
                let ratio = n_train / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                arange_desc(n_train as f64, 0.0, ratio)
                    .into_iter()
                    .map(|t| np_round(t) - 1.0)
                    .collect()
            }
        };
        let train = cfg.train_sigmas();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| f32r(interp(t, &train))).collect();
        if cfg.use_karras_sigmas {
            let log_sigmas: Vec<f64> = train.iter().map(|s| f64::from((*s as f32).ln())).collect();
            let (min, max) = (sigmas[sigmas.len() - 1], sigmas[0]);
            sigmas = karras_sigmas(min, max, steps).into_iter().map(f32r).collect();
            timesteps = sigmas.iter().map(|&s| f32r(sigma_to_t(s, &log_sigmas))).collect();
        }
        let last = match cfg.final_sigmas_type.unwrap_or_default() {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train[0],
        };
        sigmas.push(f32r(last));
        let max = sigmas.iter().copied().fold(0f64, f64::max) as f32;
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
            TimestepSpacing::Leading => f64::from((max * max + 1f32).sqrt()),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: cfg.prediction_type,
        })
    }

    /// The sigmas, one per step plus the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Scheduler for EulerDiscrete {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, latents: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        (latents / (sigma * sigma + 1.0).sqrt()).stage("euler scale_model_input")
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, latents: &Tensor) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let (sigma, next) = (self.sigmas[step_index], self.sigmas[step_index + 1]);
        let dtype = latents.dtype();
        let run = || -> candle_core::Result<Tensor> {
            let x = latents.to_dtype(DType::F32)?;
            let out = model_output.to_dtype(DType::F32)?;
            let derivative = match self.prediction {
                PredictionType::Epsilon => out,
                PredictionType::VPrediction => {
                    // x0 = -sigma / sqrt(sigma^2 + 1) * v + x / (sigma^2 + 1); derivative = (x - x0) / sigma.
                    let s2 = sigma * sigma + 1.0;
                    let x0 = ((out * (-sigma / s2.sqrt()))? + (&x / s2)?)?;
                    ((&x - x0)? / sigma)?
                }
            };
            (x + (derivative * (next - sigma))?)?.to_dtype(dtype)
        };
        run().stage("euler step")
    }

    fn noise_level(&self, step_index: usize) -> Result<(f64, f64)> {
        check_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        Ok((alpha, sigma * alpha))
    }

    fn add_noise(&self, clean: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        (noise * self.sigmas[step_index])
            .and_then(|n| clean + n)
            .stage("euler add_noise")
    }
}
