//! diffusers `DPMSolverMultistepScheduler` as `dpmpp_2m_karras`: `algorithm_type = dpmsolver++`,
//! `solver_order = 2`, `solver_type = midpoint`, `lower_order_final = True`, `use_karras_sigmas = True`,
//! `final_sigmas_type = zero`.
//!
//! Variance-preserving latents (`x = alpha * x0 + sigma_vp * eps`, `alpha = 1 / sqrt(1 + s^2)`,
//! `sigma_vp = s * alpha` for the scheduler sigma `s`); `init_noise_sigma` is 1 and the model input is not
//! scaled. Each step converts the model output to a data (x0) prediction and takes a first-order step (the
//! first, and the last: the final sigma is zero) or a second-order multistep using the previous x0.

use candle_core::{DType, Tensor};

use super::config::{
    arange_desc, f32r, interp, karras_sigmas, linspace, np_round, sigma_to_t, FinalSigmasType, PredictionType,
    SchedulerConfig, TimestepSpacing,
};
use super::{check_index, Scheduler, SchedulerKind};
use crate::error::{ForwardContext, Result};

/// DPM-Solver++(2M) sampler state for one generation (keeps the previous data prediction).
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    /// One more than `timesteps`; the last is the final sigma.
    sigmas: Vec<f64>,
    prediction: PredictionType,
    /// diffusers `lower_order_final`: the last step is first order (final sigma zero, or fewer than 15 steps).
    last_first_order: bool,
    /// The data prediction of the previous step and its step index.
    previous: Option<(usize, Tensor)>,
}

/// `(alpha_t, sigma_t, lambda_t = ln(alpha_t / sigma_t))` for a scheduler sigma.
fn alpha_sigma_lambda(s: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (s * s + 1.0).sqrt();
    let sigma = s * alpha;
    (alpha, sigma, alpha.ln() - sigma.ln())
}

impl DpmSolverMultistep {
    /// Schedules `steps` inference steps; `karras` re-spaces the sigmas (the `dpmpp_2m_karras` kind).
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        cfg.check_steps(steps)?;
        let n_train = cfg.num_train_timesteps;
        let train = cfg.train_sigmas();
        let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
        let (mut timesteps, mut sigmas): (Vec<f64>, Vec<f64>) = if karras {
            // The full table, max first (flipped ascending table), re-spaced.
            let sigmas = karras_sigmas(train[0], train[n_train - 1], steps);
            let ts = sigmas.iter().map(|&s| np_round(sigma_to_t(s, &log_sigmas))).collect();
            (ts, sigmas)
        } else {
            let ts = spaced_timesteps(cfg, steps);
            let sigmas = ts.iter().map(|&t| interp(t, &train)).collect();
            (ts, sigmas)
        };
        let final_type = cfg.final_sigmas_type.unwrap_or_default();
        let last = match final_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin if karras => sigmas[sigmas.len() - 1],
            FinalSigmasType::SigmaMin => train[0],
        };
        sigmas.push(last);
        let sigmas = sigmas.into_iter().map(f32r).collect();
        timesteps.truncate(steps);
        Ok(Self {
            timesteps,
            sigmas,
            prediction: cfg.prediction_type,
            last_first_order: final_type == FinalSigmasType::Zero || steps < 15,
            previous: None,
        })
    }

    /// The sigmas, one per step plus the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// Data (x0) prediction from the model output at scheduler sigma `s`.
    fn data_prediction(&self, out: &Tensor, x: &Tensor, s: f64) -> candle_core::Result<Tensor> {
        let (alpha, sigma, _) = alpha_sigma_lambda(s);
        match self.prediction {
            PredictionType::Epsilon => (x - (out * sigma)?)? / alpha,
            PredictionType::VPrediction => (x * alpha)? - (out * sigma)?,
        }
    }
}

/// The timesteps before Karras re-spacing (`n + 1` points, the last dropped, for leading and linspace).
fn spaced_timesteps(cfg: &SchedulerConfig, steps: usize) -> Vec<f64> {
    let n_train = cfg.num_train_timesteps;
    match cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace) {
        TimestepSpacing::Linspace => {
            let mut ts: Vec<f64> = linspace(0.0, (n_train - 1) as f64, steps + 1).map(np_round).collect();
            ts.reverse();
            ts.truncate(steps);
            ts
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / (steps + 1);
            (1..=steps)
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
    }
}

impl Scheduler for DpmSolverMultistep {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmPp2mKarras
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
        let n = self.timesteps.len();
        check_index(step_index, n)?;
        let (s0, s_next) = (self.sigmas[step_index], self.sigmas[step_index + 1]);
        let dtype = latents.dtype();
        let x = latents.to_dtype(DType::F32).stage("dpm step")?;
        let out = model_output.to_dtype(DType::F32).stage("dpm step")?;
        let x0 = self.data_prediction(&out, &x, s0).stage("dpm step")?;
        // First order on the first step, and on the last one when `last_first_order` (lower_order_final).
        let second_order_ok = step_index + 1 < n || !self.last_first_order;
        let prev = match self.previous.take() {
            Some((i, m1)) if i + 1 == step_index && second_order_ok => Some((self.sigmas[i], m1)),
            _ => None,
        };
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(s_next);
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(s0);
        let run = || -> candle_core::Result<Tensor> {
            if s_next == 0.0 {
                // lambda_t = inf: the update is exactly the data prediction.
                return x0.to_dtype(dtype);
            }
            let h = lambda_t - lambda_s0;
            let coef = alpha_t * ((-h).exp_m1());
            let base = ((&x * (sigma_t / sigma_s0))? - (&x0 * coef)?)?;
            let y = match &prev {
                None => base,
                Some((s1, m1)) => {
                    let (_, _, lambda_s1) = alpha_sigma_lambda(*s1);
                    let r0 = (lambda_s0 - lambda_s1) / h;
                    let d1 = ((&x0 - m1)? / r0)?;
                    (base - (d1 * (0.5 * coef))?)?
                }
            };
            y.to_dtype(dtype)
        };
        let y = run().stage("dpm step")?;
        self.previous = Some((step_index, x0));
        Ok(y)
    }

    fn noise_level(&self, step_index: usize) -> Result<(f64, f64)> {
        check_index(step_index, self.timesteps.len())?;
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[step_index]);
        Ok((alpha, sigma))
    }

    fn add_noise(&self, clean: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha, sigma) = self.noise_level(step_index)?;
        (clean * alpha)
            .and_then(|c| c + (noise * sigma)?)
            .stage("dpm add_noise")
    }
}
