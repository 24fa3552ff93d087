//! diffusers `DDIMScheduler` with eta = 0 (deterministic), in the variance-preserving parametrisation
//! `x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps`. `init_noise_sigma` is 1 and the model input is not scaled.
//! The step past the last timestep uses `alphas_cumprod[0]` unless `set_alpha_to_one` (SDXL configs: false).

use candle_core::{DType, Tensor};

use super::config::{arange_desc, linspace, np_round, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{check_index, Scheduler, SchedulerKind};
use crate::error::{ForwardContext, Result};

/// DDIM sampler state for one generation.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    /// `num_train_timesteps / steps` (integer division), the distance to the previous timestep.
    step_ratio: i64,
    prediction: PredictionType,
    clip_sample: bool,
}

impl Ddim {
    /// Schedules `steps` inference steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        cfg.check_steps(steps)?;
        let n_train = cfg.num_train_timesteps;
        let timesteps: Vec<f64> = match cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading) {
            TimestepSpacing::Leading => {
                let ratio = n_train / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Linspace => linspace(0.0, (n_train - 1) as f64, steps).map(np_round).rev().collect(),
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                arange_desc(n_train as f64, 0.0, ratio)
                    .into_iter()
                    .map(|t| np_round(t) - 1.0)
                    .collect()
            }
        };
        let alphas_cumprod = cfg.alphas_cumprod();
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (n_train / steps) as i64,
            prediction: cfg.prediction_type,
            clip_sample: cfg.clip_sample.unwrap_or(false),
        })
    }

    fn alpha_at(&self, t: i64) -> f64 {
        match usize::try_from(t) {
            Ok(t) if t < self.alphas_cumprod.len() => self.alphas_cumprod[t],
            Ok(_) => self.alphas_cumprod[self.alphas_cumprod.len() - 1],
            Err(_) => self.final_alpha_cumprod,
        }
    }
}

impl Scheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, latents: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        Ok(latents.clone())
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, latents: &Tensor) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let t = self.timesteps[step_index] as i64;
        let a_t = self.alpha_at(t);
        let a_prev = self.alpha_at(t - self.step_ratio);
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let dtype = latents.dtype();
        let run = || -> candle_core::Result<Tensor> {
            let x = latents.to_dtype(DType::F32)?;
            let out = model_output.to_dtype(DType::F32)?;
            let (x0, eps) = match self.prediction {
                PredictionType::Epsilon => (((&x - (&out * sb)?)? / sa)?, out),
                PredictionType::VPrediction => (((&x * sa)? - (&out * sb)?)?, ((&out * sa)? + (&x * sb)?)?),
            };
            let x0 = if self.clip_sample { x0.clamp(-1f32, 1f32)? } else { x0 };
            let prev = ((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?;
            prev.to_dtype(dtype)
        };
        run().stage("ddim step")
    }

    fn noise_level(&self, step_index: usize) -> Result<(f64, f64)> {
        check_index(step_index, self.timesteps.len())?;
        let a = self.alpha_at(self.timesteps[step_index] as i64);
        Ok((a.sqrt(), (1.0 - a).sqrt()))
    }

    fn add_noise(&self, clean: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha, sigma) = self.noise_level(step_index)?;
        (clean * alpha)
            .and_then(|c| c + (noise * sigma)?)
            .stage("ddim add_noise")
    }
}
