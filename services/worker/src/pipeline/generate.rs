//! The denoising loop and the whole generation: conditioning for classifier-free guidance (batch order
//! [negative, positive]) with the subjects' image tokens and name embeddings, the scheduler loop with a progress
//! callback that can cancel between steps, VAE decode and PNG encoding.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::image_decode::RgbImage;
use super::model::{MipPipeline, TextEmbedding};
use super::noise::Gaussian;
use super::png::{encode_png, tensor_to_rgb8};
use super::precision::{vae_uses_tf32, Tf32Scope};
use super::request::ValidRequest;
use super::scheduler::{build_scheduler, SchedulerConfig, SchedulerKind};
use crate::error::{ForwardContext, ModelError, Result};
use crate::model::unet::{MergeCond, UNetCond};
use crate::model::vae::AutoencoderKL;

/// One subject ready for the UNet: its image tokens (T, C), its name's embedding and token count.
#[derive(Debug, Clone)]
pub struct EncodedSubject {
    pub tokens: Tensor,
    pub name: TextEmbedding,
    pub name_token_len: usize,
}

/// Everything the UNet is conditioned on, batched [negative, positive].
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub encoder_hidden_states: Tensor,
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
    pub entity_text_embeds: Tensor,
    pub entity_token_lens: Vec<usize>,
    pub num_tokens: usize,
    pub scale: f64,
}

/// Progress reported after each denoising step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
}

/// Wall-clock time spent per stage, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub text_ms: f64,
    pub subjects_ms: f64,
    pub denoise_ms: f64,
    pub decode_ms: f64,
    pub png_ms: f64,
}

/// A finished image.
#[derive(Debug, Clone)]
pub struct Generated {
    pub png: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub timings: Timings,
}

/// Standard-normal initial latents (1, C, H/8, W/8) from `seed` ([`Gaussian`]), drawn on the CPU so every device
/// agrees.
pub fn initial_noise(seed: u64, channels: usize, height: usize, width: usize) -> Result<Tensor> {
    let (h, w) = (height / 8, width / 8);
    let data = Gaussian::new(seed).sample(channels * h * w, 0.0, 1.0);
    Tensor::from_vec(data, (1, channels, h, w), &Device::Cpu).stage("noise")
}

/// How a denoising loop samples: the scheduler config and kind, the step count and the guidance scale.
#[derive(Debug, Clone, Copy)]
pub struct Sampling<'a> {
    pub scheduler: &'a SchedulerConfig,
    pub kind: SchedulerKind,
    pub steps: usize,
    pub guidance: f64,
}

/// The classifier-free-guidance denoising loop from `noise` (1, C, h, w) on its device, with `unet` mapping a CFG
/// batch `[latents; latents]` and a timestep to the model output (f32, batch order [negative, positive]).
/// `on_step` sees the latents after each step and returns `false` to cancel. Returns the final latents (f32).
pub fn denoise_with(
    unet: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor>,
    sampling: &Sampling,
    noise: &Tensor,
    on_step: &mut dyn FnMut(Progress, &Tensor) -> bool,
) -> Result<Tensor> {
    let s = "denoise";
    let mut scheduler = build_scheduler(sampling.kind, sampling.scheduler, sampling.steps)?;
    let timesteps = scheduler.timesteps().to_vec();
    let mut latents = noise
        .to_dtype(DType::F32)
        .and_then(|t| t * scheduler.init_noise_sigma())
        .stage(s)?;
    for (i, &t) in timesteps.iter().enumerate() {
        let batch = Tensor::cat(&[&latents, &latents], 0).stage(s)?;
        let input = scheduler.scale_model_input(&batch, i)?;
        let eps = unet(&input, t)?;
        let uncond = eps.narrow(0, 0, 1).stage(s)?;
        let text = eps.narrow(0, 1, 1).stage(s)?;
        let guided = (&uncond + ((text - &uncond).and_then(|d| d * sampling.guidance)).stage(s)?).stage(s)?;
        latents = scheduler.step(&guided, i, &latents)?;
        let progress = Progress {
            step: i + 1,
            total: timesteps.len(),
        };
        if !on_step(progress, &latents) && i + 1 < timesteps.len() {
            return Err(ModelError::Cancelled {
                completed_steps: i + 1,
                total_steps: timesteps.len(),
            });
        }
    }
    Ok(latents)
}

/// VAE decode of final latents (on the VAE's device) as a pipeline computing in `compute` runs it: in the VAE's
/// dtype, with TF32 GEMMs on CUDA for the f32 VAE of a half-precision pipeline (see [`super::precision`]).
/// `tile` decodes in overlapping tiles of that many latent pixels ([`AutoencoderKL::decode_tiled`]).
/// Returns the image tensor (1, 3, H, W) in about [-1, 1], f32.
pub fn decode_latents(vae: &AutoencoderKL, latents: &Tensor, compute: DType, tile: Option<usize>) -> Result<Tensor> {
    let l = latents.to_dtype(vae.dtype()).stage("vae")?;
    let _tf32 = Tf32Scope::new(vae_uses_tf32(l.device(), compute));
    let image = match tile {
        None => vae.decode_scaled(&l)?,
        Some(tile) => vae.decode_tiled(&vae.unscale_latents(&l)?, tile)?,
    };
    image.to_dtype(DType::F32).stage("vae")
}

impl MipPipeline {
    /// Builds the CFG conditioning: `[negative | uncond tokens…]` and `[prompt | subject tokens…]`.
    #[allow(clippy::too_many_arguments)]
    pub fn conditioning(
        &self,
        prompt: &TextEmbedding,
        negative: &TextEmbedding,
        negative_name: &TextEmbedding,
        subjects: &[EncodedSubject],
        width: usize,
        height: usize,
        scale: f64,
    ) -> Result<Conditioning> {
        let dev = &self.device;
        let s = "conditioning";
        let uncond = self.uncond_tokens.to_device(dev).stage(s)?;
        let mut neg_ctx = vec![negative.hidden.squeeze(0).stage(s)?];
        let mut pos_ctx = vec![prompt.hidden.squeeze(0).stage(s)?];
        let mut neg_names = Vec::new();
        let mut pos_names = Vec::new();
        for subj in subjects {
            neg_ctx.push(uncond.clone());
            pos_ctx.push(subj.tokens.to_device(dev).stage(s)?);
            neg_names.push(negative_name.hidden.squeeze(0).stage(s)?);
            pos_names.push(subj.name.hidden.squeeze(0).stage(s)?);
        }
        let cat_rows = |rows: Vec<Tensor>| -> Result<Tensor> {
            let rows: Vec<Tensor> = rows
                .iter()
                .map(|t| t.to_dtype(DType::F32))
                .collect::<candle_core::Result<_>>()
                .stage(s)?;
            Tensor::cat(&rows, 0).stage(s)
        };
        let encoder_hidden_states = Tensor::stack(&[cat_rows(neg_ctx)?, cat_rows(pos_ctx)?], 0).stage(s)?;
        let entity_text_embeds = Tensor::stack(
            &[
                Tensor::stack(&neg_names, 0).stage(s)?,
                Tensor::stack(&pos_names, 0).stage(s)?,
            ],
            0,
        )
        .stage(s)?;
        let text_embeds = Tensor::cat(&[&negative.pooled, &prompt.pooled], 0).stage(s)?;
        let (h, w) = (height as f32, width as f32);
        let ids = [h, w, 0.0, 0.0, h, w];
        let time_ids = Tensor::new(&[ids, ids], dev).stage(s)?;
        Ok(Conditioning {
            encoder_hidden_states,
            text_embeds,
            time_ids,
            entity_text_embeds,
            entity_token_lens: subjects.iter().map(|x| x.name_token_len).collect(),
            num_tokens: self.num_tokens(),
            scale,
        })
    }

    /// One UNet call on a CFG batch; inputs and output in f32.
    pub fn unet_forward(&self, sample: &Tensor, timestep: f64, cond: &Conditioning) -> Result<Tensor> {
        let s = "unet";
        let to = |t: &Tensor| t.to_device(&self.device).and_then(|t| t.to_dtype(self.dtype));
        let unet_cond = UNetCond {
            encoder_hidden_states: to(&cond.encoder_hidden_states).stage(s)?,
            text_embeds: to(&cond.text_embeds).stage(s)?,
            time_ids: to(&cond.time_ids).stage(s)?,
            merge: Some(MergeCond {
                entity_text_embeds: to(&cond.entity_text_embeds).stage(s)?,
                entity_token_lens: cond.entity_token_lens.clone(),
                num_tokens: cond.num_tokens,
                scale: cond.scale,
                capture: None,
            }),
        };
        let out = self
            .unet
            .forward(&to(sample).stage(s)?, timestep, &unet_cond)
            .stage(s)?;
        out.to_dtype(DType::F32).stage(s)
    }

    /// The denoising loop from `noise` (1, C, h, w); `on_step` sees the latents after each step and returns
    /// `false` to cancel. Returns the final latents (f32).
    pub fn denoise(
        &self,
        cond: &Conditioning,
        noise: &Tensor,
        kind: SchedulerKind,
        steps: usize,
        guidance: f64,
        on_step: &mut dyn FnMut(Progress, &Tensor) -> bool,
    ) -> Result<Tensor> {
        let sampling = Sampling {
            scheduler: &self.scheduler,
            kind,
            steps,
            guidance,
        };
        let noise = noise.to_device(&self.device).stage("denoise")?;
        denoise_with(&mut |x, t| self.unet_forward(x, t, cond), &sampling, &noise, on_step)
    }

    /// VAE decode of final latents to an image tensor (1, 3, H, W) in about [-1, 1], f32 (see [`decode_latents`]),
    /// in tiles when [`MipPipeline::vae_tiling`] says so ([`Self::decode_plan`]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4().stage("vae")?;
        let tile = self.decode_plan(h, w);
        tracing::debug!(tile, "vae decode");
        self.decode_with(latents, tile)
    }

    /// The latent tile [`Self::decode`] uses for an `h` x `w` latent now; `None` = a whole decode.
    pub fn decode_plan(&self, h: usize, w: usize) -> Option<usize> {
        self.vae_tiling
            .plan(&self.vae, h, w, || super::memory::device_free_bytes(&self.device))
    }

    /// VAE decode whole (`tile` `None`) or in tiles of `tile` latent pixels, whatever the tiling policy.
    pub fn decode_with(&self, latents: &Tensor, tile: Option<usize>) -> Result<Tensor> {
        decode_latents(&self.vae, latents, self.dtype, tile)
    }

    /// The VAE.
    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    /// The untiled decode's estimated working memory for an `h` x `w` latent (see
    /// [`AutoencoderKL::decode_peak_bytes`]).
    pub fn decode_peak_bytes(&self, h: usize, w: usize) -> u64 {
        self.vae.decode_peak_bytes(h, w)
    }

    /// Runs a whole validated request. `on_progress` is called after each step; returning `false` cancels.
    pub fn generate(&self, req: &ValidRequest, on_progress: &mut dyn FnMut(Progress) -> bool) -> Result<Generated> {
        let mut timings = Timings::default();
        let t0 = Instant::now();
        let prompt = self.encode_text(&req.prompt)?;
        let negative = match &req.negative_prompt {
            None if self.zeros_for_absent_negative() => self.zero_text(&prompt)?,
            None => self.encode_text("")?,
            Some(n) => self.encode_text(n)?,
        };
        let negative_name = self.encode_text("")?;
        let mut names = Vec::with_capacity(req.subjects.len());
        for (i, s) in req.subjects.iter().enumerate() {
            let len = self.name_token_len(&s.name, &format!("subjects[{i}].name"))?;
            names.push((self.encode_text(&s.name)?, len));
        }
        timings.text_ms = ms(t0);

        let t1 = Instant::now();
        let mut subjects = Vec::with_capacity(req.subjects.len());
        for ((i, s), (name, len)) in req.subjects.iter().enumerate().zip(names) {
            let images = s
                .images
                .iter()
                .enumerate()
                .map(|(j, b)| self.prepare_image(b, &format!("subjects[{i}].images[{j}]")))
                .collect::<Result<Vec<_>>>()?;
            subjects.push(EncodedSubject {
                tokens: self.encode_subject(&images)?,
                name,
                name_token_len: len,
            });
        }
        timings.subjects_ms = ms(t1);

        let generated = self.generate_encoded(req, &prompt, &negative, &negative_name, &subjects, on_progress)?;
        Ok(Generated {
            timings: Timings {
                text_ms: timings.text_ms,
                subjects_ms: timings.subjects_ms,
                ..generated.timings
            },
            ..generated
        })
    }

    /// The part of [`generate`](Self::generate) after encoding: conditioning, denoising, decode, PNG.
    pub fn generate_encoded(
        &self,
        req: &ValidRequest,
        prompt: &TextEmbedding,
        negative: &TextEmbedding,
        negative_name: &TextEmbedding,
        subjects: &[EncodedSubject],
        on_progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Generated> {
        let rendered = self.render_encoded(req, prompt, negative, negative_name, subjects, on_progress)?;
        self.finish_png(req, rendered, &[])
    }

    /// Conditioning, denoising and decode: the image's 8-bit pixels, before its PNG.
    pub fn render_encoded(
        &self,
        req: &ValidRequest,
        prompt: &TextEmbedding,
        negative: &TextEmbedding,
        negative_name: &TextEmbedding,
        subjects: &[EncodedSubject],
        on_progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Rendered> {
        let mut timings = Timings::default();
        let t2 = Instant::now();
        let cond = self.conditioning(
            prompt,
            negative,
            negative_name,
            subjects,
            req.width,
            req.height,
            req.scale,
        )?;
        let noise = initial_noise(req.seed, self.unet_config.in_channels, req.height, req.width)?;
        let latents = tracing::info_span!("denoise", steps = req.steps).in_scope(|| {
            self.denoise(&cond, &noise, req.scheduler, req.steps, req.guidance, &mut |p, _| {
                on_progress(p)
            })
        })?;
        timings.denoise_ms = ms(t2);

        let t3 = Instant::now();
        let image = tracing::info_span!("vae_decode").in_scope(|| self.decode(&latents))?;
        let (data, width, height) = tensor_to_rgb8(&image)?;
        timings.decode_ms = ms(t3);
        Ok(Rendered {
            rgb: RgbImage {
                width: width as usize,
                height: height as usize,
                data,
            },
            timings,
        })
    }

    /// The PNG of a rendered image: the request's parameters, then `extra`, as text chunks.
    pub fn finish_png(&self, req: &ValidRequest, rendered: Rendered, extra: &[(String, String)]) -> Result<Generated> {
        let Rendered { rgb, mut timings } = rendered;
        let t4 = Instant::now();
        let _png = tracing::info_span!("png_encode").entered();
        let mut params = vec![
            ("prompt".to_owned(), req.prompt.clone()),
            ("seed".to_owned(), req.seed.to_string()),
            ("steps".to_owned(), req.steps.to_string()),
            ("guidance".to_owned(), req.guidance.to_string()),
            ("scale".to_owned(), req.scale.to_string()),
            ("scheduler".to_owned(), req.scheduler.to_string()),
            (
                "subjects".to_owned(),
                req.subjects
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ];
        params.extend_from_slice(extra);
        let png = encode_png(&rgb.data, rgb.width as u32, rgb.height as u32, &params)?;
        timings.png_ms = ms(t4);
        Ok(Generated {
            png,
            width: rgb.width,
            height: rgb.height,
            seed: req.seed,
            timings,
        })
    }
}

/// A decoded image before its PNG, with the stage timings so far.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub rgb: RgbImage,
    pub timings: Timings,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
