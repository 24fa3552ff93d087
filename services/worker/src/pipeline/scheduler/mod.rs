//! Diffusion schedulers behind one [`Scheduler`] trait, so the denoising loop is written once:
//!
//! ```text
//! let mut s = build_scheduler(kind, &cfg, steps)?;
//! let mut x = (noise * s.init_noise_sigma())?;
//! for (i, &t) in s.timesteps().to_vec().iter().enumerate() {
//!     let eps = unet(&s.scale_model_input(&x, i)?, t)?;   // + guidance
//!     x = s.step(&eps, i, &x)?;
//! }
//! ```
//!
//! - [`config`]: `scheduler_config.json` ([`SchedulerConfig`]) and the shared noise-table arithmetic.
//! - [`euler`]: `EulerDiscreteScheduler` (matches the fixture's timesteps and sigmas).
//! - [`ddim`]: `DDIMScheduler`, eta 0.
//! - [`dpm`]: `DPMSolverMultistepScheduler` as DPM-Solver++(2M) with Karras sigmas.

pub mod config;
pub mod ddim;
pub mod dpm;
pub mod euler;

use std::fmt;

use candle_core::Tensor;

pub use config::{BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing};
pub use ddim::Ddim;
pub use dpm::DpmSolverMultistep;
pub use euler::EulerDiscrete;
/// The samplers a request may name (one list for the whole cluster, in `mip-admission`).
pub use mip_admission::SchedulerKind;

use crate::error::{InvalidInput, Result};

/// One generation's sampler: the timesteps to feed the model, how to scale its input, and the update.
///
/// `step_index` counts from 0 over [`Scheduler::timesteps`]. Steps compute in f32 and return latents in the
/// dtype of the `latents` argument.
pub trait Scheduler: Send + fmt::Debug {
    /// Which sampler this is.
    fn kind(&self) -> SchedulerKind;
    /// The model timesteps, one per step, in the order they are run.
    fn timesteps(&self) -> &[f64];
    /// Multiply unit Gaussian noise by this to get the starting latents.
    fn init_noise_sigma(&self) -> f64;
    /// The model input for step `step_index` (Euler divides by `sqrt(sigma^2 + 1)`; DDIM/DPM: unchanged).
    fn scale_model_input(&self, latents: &Tensor, step_index: usize) -> Result<Tensor>;
    /// Advances `latents` by one step given the model output (epsilon or v, per the config) at `step_index`.
    fn step(&mut self, model_output: &Tensor, step_index: usize, latents: &Tensor) -> Result<Tensor>;
    /// `(alpha, sigma)` such that the model input at `step_index` is `alpha * x0 + sigma * eps`.
    fn noise_level(&self, step_index: usize) -> Result<(f64, f64)>;
    /// Latents at the noise level of `step_index` for a clean sample (img2img), in the scheduler's own space.
    fn add_noise(&self, clean: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
}

/// Builds the sampler `kind` from a scheduler config for `steps` inference steps (`1..=num_train_timesteps`,
/// else an [`InvalidInput`] naming `steps`).
pub fn build_scheduler(kind: SchedulerKind, cfg: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    cfg.check_steps(steps)?;
    Ok(match kind {
        SchedulerKind::Euler => Box::new(EulerDiscrete::new(cfg, steps)?),
        SchedulerKind::Ddim => Box::new(Ddim::new(cfg, steps)?),
        SchedulerKind::DpmPp2mKarras => Box::new(DpmSolverMultistep::new(cfg, steps, true)?),
    })
}

/// `step_index` must address one of the `len` steps.
pub(crate) fn check_index(step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        return Err(InvalidInput::new("step_index", format!("must be in 0..{len}"), step_index).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
