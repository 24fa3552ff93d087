//! The device thread: loads the model, warms it up with a tiny real forward, then runs jobs one at a time
//! (subject encoding, text encoding, generation), skipping cancelled ones and latching not-ready on device errors.

use super::*;

/// The loaded model and what the thread keeps beside it.
struct Loaded {
    pipeline: Arc<MipPipeline>,
    empty_text: TextEmbedding,
    layout: Layout,
    scorer: Option<Scorer>,
}

pub(super) fn thread_main(
    opts: ExecutorOptions,
    mut rx: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    metrics: Metrics,
    loaded: oneshot::Sender<std::result::Result<(), String>>,
) {
    let started = Instant::now();
    let dev = match load(&opts) {
        Ok((dev, info)) => {
            let _ = shared.pipeline.set(dev.pipeline.clone());
            let _ = shared.info.set(info);
            dev
        }
        Err(e) => {
            tracing::error!(error = %e, "model load failed");
            let _ = loaded.send(Err(e));
            return;
        }
    };
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded and warmed up");
    shared.ready.send_replace(true);
    let _ = loaded.send(Ok(()));
    let runner = Runner { dev, shared, metrics };
    while let Some(job) = rx.blocking_recv() {
        if matches!(job.work, Work::Stop) {
            break;
        }
        runner.run(job);
    }
}

fn load(opts: &ExecutorOptions) -> std::result::Result<(Loaded, ModelInfo), String> {
    let device = opts
        .device
        .open()
        .map_err(|e| format!("cannot open device {}: {e}", opts.device))?;
    let mut p = MipPipeline::load(&opts.spec, &device, opts.dtype).map_err(|e| e.to_string())?;
    p.preprocess.max_pixels = opts.max_image_pixels;
    p.vae_tiling = opts.vae_tiling;
    let (empty_text, layout) = warm_up(&p).map_err(|e| format!("warm-up forward failed: {e}"))?;
    let spec = &opts.spec;
    let identity = |files: &[&Path]| files_identity(files).map_err(|e| format!("hashing model files: {e}"));
    let ie = find_weights(&spec.image_encoder, &["model", "pytorch_model"]).map_err(|e| e.to_string())?;
    let te1 = find_weights(&spec.base.join("text_encoder"), &["model", "pytorch_model"]).map_err(|e| e.to_string())?;
    let te2 =
        find_weights(&spec.base.join("text_encoder_2"), &["model", "pytorch_model"]).map_err(|e| e.to_string())?;
    let (scorer, scoring) = match &spec.eval {
        None => (None, None),
        Some(e) => {
            // The evaluation runs in f32 whatever the model's dtype, as the published evaluation does.
            let scorer = Scorer::load(&e.clip, &e.dino, &device, DType::F32)
                .map_err(|err| format!("loading the evaluation models: {err}"))?;
            let clip = find_weights(&e.clip, &["model"]).map_err(|e| e.to_string())?;
            let dino = find_weights(&e.dino, &["model"]).map_err(|e| e.to_string())?;
            let scoring = ScoringInfo {
                eval_id: identity(&[&clip, &dino])?,
                dims: scorer.dims(),
            };
            tracing::info!(clip = %e.clip.display(), dino = %e.dino.display(), "evaluation models loaded");
            (Some(scorer), Some(scoring))
        }
    };
    let info = ModelInfo {
        model: opts.model_name.clone(),
        variant: p.variant().to_string(),
        device: opts.device.to_string(),
        dtype: dtype_name(opts.dtype).to_owned(),
        num_tokens: p.num_tokens(),
        default_size: spec.default_size.unwrap_or([1024, 1024]),
        default_scale: p.default_scale(),
        encoder_id: identity(&[&ie, &spec.adapter])?,
        text_id: identity(&[&te1, &te2])?,
        layout: layout.clone(),
        scoring,
    };
    Ok((
        Loaded {
            pipeline: Arc::new(p),
            empty_text,
            layout,
            scorer,
        },
        info,
    ))
}

/// One text encoding and one 64x64 UNet step: proves the device computes before the worker says SERVING.
fn warm_up(p: &MipPipeline) -> Result<(TextEmbedding, Layout)> {
    let empty = p.encode_text("")?;
    let subject = EncodedSubject {
        tokens: p.uncond_tokens().clone(),
        name: empty.clone(),
        name_token_len: 1,
    };
    let cond = p.conditioning(&empty, &empty, &empty, &[subject], 64, 64, p.default_scale())?;
    let noise = initial_noise(0, p.latent_channels(), 64, 64)?;
    let out = p.denoise(&cond, &noise, SchedulerKind::Euler, 1, 5.0, &mut |_, _| true)?;
    out.sum_all()
        .and_then(|s| s.to_scalar::<f32>())
        .map_err(|source| ModelError::Forward {
            stage: "warm_up",
            source,
        })?;
    let layout = Layout {
        subject: p.uncond_tokens().dims().to_vec(),
        text_hidden: empty.hidden.dims().to_vec(),
        text_pooled: empty.pooled.dims().to_vec(),
    };
    Ok((empty, layout))
}

struct Runner {
    dev: Loaded,
    shared: Arc<Shared>,
    metrics: Metrics,
}

impl Runner {
    fn run(&self, job: Job) {
        let queue_ms = job.enqueued.elapsed().as_secs_f64() * 1e3;
        let skip = if self.cancelled(&job.cancel) {
            Some(ExecError::Cancelled)
        } else if !*self.shared.ready.borrow() {
            Some(ExecError::NotReady)
        } else {
            None
        };
        self.shared.busy.store(true, Ordering::SeqCst);
        let stage = match &job.work {
            Work::Subject { .. } => "image_encode",
            Work::Text { .. } => "text_encode",
            Work::References { .. } => "reference_features",
            Work::Generate { .. } => "generate",
            Work::Stop => "stop",
        };
        let _span = tracing::info_span!(parent: &job.span, "stage", otel.name = stage, queue_ms).entered();
        match job.work {
            Work::Subject { images, reply } => {
                let r = match skip {
                    Some(e) => Err(e),
                    None => self.guard(|| self.encode_subject(&images)),
                };
                let _ = reply.send(r);
            }
            Work::Text { text, reply } => {
                let r = match skip {
                    Some(e) => Err(e),
                    None => self.guard(|| {
                        let e = self.dev.pipeline.encode_text(&text)?;
                        self.dev
                            .layout
                            .text_value(&e)
                            .map_err(|source| ModelError::Forward { stage: "cache", source })
                    }),
                };
                let _ = reply.send(r);
            }
            Work::References { images, reply } => {
                let r = match skip {
                    Some(e) => Err(e),
                    None => self.guard(|| self.scorer()?.reference_features(&images)?.to_value()),
                };
                let _ = reply.send(r);
            }
            Work::Generate { work, events } => {
                let r = match skip {
                    Some(e) => Err(e),
                    None => self.guard(|| self.generate(work, &job.cancel, &events, queue_ms)),
                };
                let _ = events.try_send(ExecEvent::Done(r));
            }
            Work::Stop => {}
        }
        self.shared.busy.store(false, Ordering::SeqCst);
    }

    fn cancelled(&self, token: &CancelToken) -> bool {
        token.is_cancelled() || self.shared.cancel_all.load(Ordering::SeqCst)
    }

    /// Runs `f`, mapping cancellation, and latching not-ready on device errors and panics.
    fn guard<T>(&self, f: impl FnOnce() -> Result<T>) -> std::result::Result<T, ExecError> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(ModelError::Cancelled { .. })) => Err(ExecError::Cancelled),
            Ok(Err(e @ ModelError::Forward { .. })) => {
                tracing::error!(error = %e, "device error: the worker turns not ready");
                self.shared.ready.send_replace(false);
                Err(ExecError::Device(e.to_string()))
            }
            Ok(Err(e)) => Err(ExecError::Model(e)),
            Err(_) => {
                tracing::error!("the executor panicked: the worker turns not ready");
                self.shared.ready.send_replace(false);
                Err(ExecError::Device("the executor panicked".into()))
            }
        }
    }

    fn encode_subject(&self, images: &[PreparedImage]) -> Result<Vec<u8>> {
        self.shared.image_encoder_calls.fetch_add(1, Ordering::SeqCst);
        self.metrics.image_encoder_calls.inc();
        let tokens = self.dev.pipeline.encode_subject(images)?;
        embedding::encode(&tokens).map_err(|source| ModelError::Forward { stage: "cache", source })
    }

    /// The evaluation models, or the error a scoring job without them gets (the service refuses such requests
    /// before they reach the thread).
    fn scorer(&self) -> Result<&Scorer> {
        self.dev.scorer.as_ref().ok_or_else(|| {
            ModelError::Invalid(crate::error::InvalidInput::new(
                "score",
                "needs evaluation models (`eval` in the bundle's mip.json)",
                true,
            ))
        })
    }

    /// Scores a rendered image against the prompt and the subjects' reference features values.
    fn score(&self, prompt: &str, img: &RgbImage, refs: &[(String, Vec<u8>)]) -> Result<ImageScores> {
        let _span = tracing::info_span!("score").entered();
        let scorer = self.scorer()?;
        let subjects = refs
            .iter()
            .map(|(name, value)| {
                ReferenceFeatures::from_value(value, scorer.dims())
                    .map(|f| (name.clone(), f))
                    .ok_or_else(|| ModelError::Forward {
                        stage: "cache",
                        source: candle_core::Error::Msg(format!("reference features of `{name}` do not decode")),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        scorer.score(img, prompt, &subjects)
    }

    fn generate(
        &self,
        work: GenerateWork,
        cancel: &CancelToken,
        events: &mpsc::Sender<ExecEvent>,
        queue_ms: f64,
    ) -> Result<Finished> {
        let p = &self.dev.pipeline;
        let device = p.device().clone();
        let req = work.request;
        let t0 = Instant::now();
        let text = tracing::info_span!("text_encode").entered();
        let prompt = p.encode_text(&req.prompt)?;
        let negative = match &req.negative_prompt {
            None if p.zeros_for_absent_negative() => p.zero_text(&prompt)?,
            None => self.dev.empty_text.clone(),
            Some(n) => p.encode_text(n)?,
        };
        drop(text);
        let mut subjects = Vec::with_capacity(work.subjects.len());
        for (tokens, name, name_token_len) in &work.subjects {
            subjects.push(EncodedSubject {
                tokens: decode_on(tokens, &device)?,
                name: self.dev.layout.text_from_value(name, &device)?,
                name_token_len: *name_token_len,
            });
        }
        let text_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut last = Instant::now();
        let mut on_progress = |pr: Progress| {
            self.metrics.unet_step.observe(last.elapsed().as_secs_f64());
            last = Instant::now();
            let _ = events.try_send(ExecEvent::Progress(pr));
            !self.cancelled(cancel) && !events.is_closed()
        };
        let mut rendered = p.render_encoded(
            &req,
            &prompt,
            &negative,
            &self.dev.empty_text,
            &subjects,
            &mut on_progress,
        )?;
        rendered.timings.text_ms = text_ms;
        let t_score = Instant::now();
        let scores = match &work.score {
            None => None,
            Some(refs) => Some(self.score(&req.prompt, &rendered.rgb, refs)?),
        };
        let score_ms = if scores.is_some() {
            t_score.elapsed().as_secs_f64() * 1e3
        } else {
            0.0
        };
        let chunks = scores.as_ref().map(ImageScores::text_chunks).unwrap_or_default();
        Ok(Finished {
            generated: p.finish_png(&req, rendered, &chunks)?,
            queue_ms,
            scores,
            score_ms,
        })
    }
}
