//! The worker's domain logic behind the [`WorkerService`] trait (the gRPC adapter in `api.rs` only converts): request
//! admission (readiness, draining, a bounded number of admitted requests), validation with the configured limits,
//! the subject and name caches in front of the executor, and the generation event stream with cancellation and
//! deadlines. Tests can call it without a network.
//!
//! Cache values: a subject is its tokens `(T, C)` under `keys::subject_key` over the preprocessed pixels; a name is
//! its hidden states and pooled vector flattened into one tensor `[S·C + P]` under `keys::text_key` (one key per
//! text, see [`crate::executor::Layout`]).

mod error;

pub use error::WorkerError;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use mip_common::errors::Kind;
use mip_proto::v1 as pb;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::cache::keys::{pixel_digest, references_key, subject_key, text_key};
use crate::cache::{CacheTier, EmbeddingCache, EntryKind};
use crate::error::{InvalidInput, ModelError};
use crate::eval::scorer::{EvalPixels, ImageScores};
use crate::executor::{CancelGuard, CancelToken, ExecError, ExecEvent, Executor, GenerateWork, ModelInfo, ScoringInfo};
use crate::limits::{self, Limits, SubjectInput, SubjectSpec};
use crate::metrics::Metrics;
use crate::pipeline::MipPipeline;

/// What the transport knows about a call.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallContext {
    /// When the caller stops waiting (from `grpc-timeout`).
    pub deadline: Option<Instant>,
}

/// A generation's events: progress per step, then the image; an error ends it.
pub type EventStream = mpsc::Receiver<Result<pb::GenerateEvent, WorkerError>>;

/// The worker's operations, independent of the transport.
pub trait WorkerService: Send + Sync + 'static {
    fn encode_subjects(
        &self,
        req: pb::EncodeSubjectsRequest,
        ctx: CallContext,
    ) -> impl Future<Output = Result<pb::EncodeSubjectsResponse, WorkerError>> + Send;
    fn generate(
        &self,
        task: pb::GenerateTask,
        ctx: CallContext,
    ) -> impl Future<Output = Result<EventStream, WorkerError>> + Send;
    fn info(&self) -> pb::WorkerInfo;
}

/// The worker service: the executor and the cache behind admission and validation. Cheap to clone.
#[derive(Clone)]
pub struct WorkerCore {
    inner: Arc<Inner>,
}

struct Inner {
    exec: Executor,
    cache: EmbeddingCache,
    metrics: Metrics,
    limits: Limits,
    worker_id: String,
    capacity: usize,
    admission: Arc<Semaphore>,
    draining: AtomicBool,
    generations: AtomicU64,
    failed_generations: AtomicU64,
}

/// Everything a request needs once admitted.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    pipeline: Arc<MipPipeline>,
    info: ModelInfo,
    token: CancelToken,
    _guard: CancelGuard,
}

/// A subject resolved to its cache value (and its images, when it came with them).
struct Resolved {
    proto: pb::EncodedSubject,
    value: Vec<u8>,
    images: Option<Arc<Vec<Vec<u8>>>>,
}

impl WorkerCore {
    /// `capacity` requests may wait beyond the one running.
    pub fn new(
        exec: Executor,
        cache: EmbeddingCache,
        metrics: Metrics,
        limits: Limits,
        capacity: usize,
        worker_id: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                exec,
                cache,
                metrics,
                limits,
                worker_id,
                capacity,
                admission: Arc::new(Semaphore::new(capacity + 1)),
                draining: AtomicBool::new(false),
                generations: AtomicU64::new(0),
                failed_generations: AtomicU64::new(0),
            }),
        }
    }

    /// The executor (readiness, stop).
    pub fn executor(&self) -> &Executor {
        &self.inner.exec
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Stops admitting requests and waits up to `wait` for admitted ones to finish; then cancels what is left.
    /// Returns whether everything finished in time.
    pub async fn drain(&self, wait: std::time::Duration) -> bool {
        let s = &self.inner;
        s.draining.store(true, Ordering::SeqCst);
        let all = u32::try_from(s.capacity + 1).unwrap_or(u32::MAX);
        let done = tokio::time::timeout(wait, s.admission.acquire_many(all)).await.is_ok();
        if !done {
            s.exec.cancel_all();
        }
        done
    }

    fn queue_depth(&self) -> usize {
        let s = &self.inner;
        let admitted = s.capacity + 1 - s.admission.available_permits();
        admitted.saturating_sub(usize::from(s.exec.is_busy()))
    }

    fn reject(&self, e: WorkerError) -> WorkerError {
        self.inner.metrics.rejected.with_label_values(&[e.reason()]).inc();
        e
    }

    fn admit(&self) -> Result<Admitted, WorkerError> {
        let s = &self.inner;
        if s.draining.load(Ordering::SeqCst) {
            return Err(self.reject(WorkerError::Draining));
        }
        let (Some(pipeline), Some(info)) = (s.exec.pipeline(), s.exec.info().cloned()) else {
            return Err(self.reject(WorkerError::NotReady));
        };
        if !s.exec.is_ready() {
            return Err(self.reject(WorkerError::NotReady));
        }
        let permit = s
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.reject(WorkerError::QueueFull { capacity: s.capacity }))?;
        s.metrics.queue_depth.set(self.queue_depth() as i64);
        let token = CancelToken::default();
        let guard = token.guard();
        Ok(Admitted {
            _permit: permit,
            pipeline,
            info,
            token,
            _guard: guard,
        })
    }

    fn count_error(&self, e: &WorkerError) {
        self.inner.metrics.errors.with_label_values(&[e.reason()]).inc();
    }

    async fn resolve_subject(&self, i: usize, spec: SubjectSpec, a: &Admitted) -> Result<Resolved, WorkerError> {
        let s = &self.inner;
        let layout = a.info.layout.clone();
        let valid = move |b: &[u8]| layout.valid_subject(b);
        let mut kept_images = None;
        let (key, (value, tier)) = match spec.input {
            SubjectInput::Images(images) => {
                let images = Arc::new(images);
                kept_images = Some(images.clone());
                let p = a.pipeline.clone();
                let prepared = tokio::task::spawn_blocking(move || {
                    images
                        .iter()
                        .enumerate()
                        .map(|(j, b)| p.prepare_image(b, &format!("subjects[{i}].images[{j}]")))
                        .collect::<Result<Vec<_>, ModelError>>()
                })
                .await
                .map_err(|e| WorkerError::Internal(format!("image preparation task: {e}")))??;
                let digests: Vec<_> = prepared.iter().map(pixel_digest).collect();
                let key = subject_key(&a.info.variant, &a.info.encoder_id, &a.info.dtype, &digests);
                let token = a.token.clone();
                let found = s
                    .cache
                    .get_or_compute(EntryKind::Subject, &key, valid, || async move {
                        s.exec.encode_subject(prepared, &token).await.map_err(WorkerError::from)
                    })
                    .await?;
                (key, found)
            }
            SubjectInput::Key(key) => {
                let missing = WorkerError::NotFound {
                    index: i,
                    key: key.clone(),
                };
                let found = s
                    .cache
                    .get_or_compute(EntryKind::Subject, &key, valid, || async move { Err(missing) })
                    .await?;
                (key, found)
            }
        };
        let (label, tier) = match tier {
            CacheTier::Memory => ("memory", pb::CacheTier::Memory),
            CacheTier::Redis => ("redis", pb::CacheTier::Redis),
            CacheTier::Miss => ("miss", pb::CacheTier::Miss),
        };
        tracing::Span::current().record("cache_tier", label);
        if tier == pb::CacheTier::Miss {
            s.metrics.subject_misses.inc();
        } else {
            s.metrics.subject_hits.with_label_values(&[label]).inc();
        }
        Ok(Resolved {
            proto: pb::EncodedSubject {
                name: spec.name,
                subject_key: key,
                tier: tier as i32,
            },
            value,
            images: kept_images,
        })
    }

    /// The evaluation models, or FAILED_PRECONDITION.
    fn scoring<'a>(&self, a: &'a Admitted) -> Result<&'a ScoringInfo, WorkerError> {
        a.info
            .scoring
            .as_ref()
            .ok_or_else(|| self.reject(WorkerError::ScoringUnavailable))
    }

    /// A subject's reference features value for scoring: cached under the subject's key; computed from its images
    /// when it came with them.
    async fn resolve_references(
        &self,
        i: usize,
        r: &Resolved,
        scoring: &ScoringInfo,
        a: &Admitted,
    ) -> Result<Vec<u8>, WorkerError> {
        let s = &self.inner;
        let key = references_key(&scoring.eval_id, &r.proto.subject_key);
        let info = scoring.clone();
        let valid = move |b: &[u8]| info.valid_references(b);
        let images = r.images.clone();
        let token = a.token.clone();
        let max_pixels = a.pipeline.preprocess.max_pixels;
        let subject_key = r.proto.subject_key.clone();
        let (value, _) = s
            .cache
            .get_or_compute(EntryKind::References, &key, valid, || async move {
                let Some(images) = images else {
                    return Err(WorkerError::NoReferences {
                        index: i,
                        key: subject_key,
                    });
                };
                let prepared = tokio::task::spawn_blocking(move || {
                    images
                        .iter()
                        .enumerate()
                        .map(|(j, b)| EvalPixels::decode(b, &format!("subjects[{i}].images[{j}]"), max_pixels))
                        .collect::<Result<Vec<_>, ModelError>>()
                })
                .await
                .map_err(|e| WorkerError::Internal(format!("reference preparation task: {e}")))??;
                s.exec
                    .reference_features(prepared, &token)
                    .await
                    .map_err(WorkerError::from)
            })
            .await?;
        Ok(value)
    }

    /// A name's text value (cached) and its token count.
    async fn resolve_name(&self, i: usize, name: &str, a: &Admitted) -> Result<(Vec<u8>, usize), WorkerError> {
        let s = &self.inner;
        let p = &a.pipeline;
        let len = p.name_token_len(name, &format!("subjects[{i}].name"))?;
        let ids_1 = p.tokenizer_1.encode_padded(name)?;
        let ids_2 = p.tokenizer_2.encode_padded(name)?;
        let key = text_key(&a.info.text_id, &a.info.dtype, &ids_1, &ids_2);
        let layout = a.info.layout.clone();
        let token = a.token.clone();
        let text = name.to_owned();
        let (value, _) = s
            .cache
            .get_or_compute(
                EntryKind::Text,
                &key,
                move |b| layout.valid_text(b),
                || async move { s.exec.encode_text(text, &token).await.map_err(WorkerError::from) },
            )
            .await?;
        Ok((value, len))
    }

    async fn prepare_generation(
        &self,
        task: pb::GenerateTask,
        a: &Admitted,
    ) -> Result<(GenerateWork, Head), WorkerError> {
        let s = &self.inner;
        let request = task.request.unwrap_or_default();
        let valid = limits::validate_generation(request, &s.limits, a.info.default_size, a.info.default_scale)?;
        let scoring = if valid.score { Some(self.scoring(a)?) } else { None };
        for (i, subj) in valid.subjects.iter().enumerate() {
            a.pipeline.name_token_len(&subj.name, &format!("subjects[{i}].name"))?;
        }
        let t0 = std::time::Instant::now();
        let mut resolved = Vec::with_capacity(valid.subjects.len());
        for (i, spec) in valid.subjects.into_iter().enumerate() {
            // One span per subject, with the cache tier that answered (memory, redis, or miss: encoded here).
            let span = tracing::info_span!("subject_encode", subject = i, cache_tier = tracing::field::Empty);
            resolved.push(self.resolve_subject(i, spec, a).instrument(span).await?);
        }
        let subjects_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t_refs = std::time::Instant::now();
        let score = match scoring {
            None => None,
            Some(info) => {
                let mut refs = Vec::with_capacity(resolved.len());
                for (i, r) in resolved.iter().enumerate() {
                    let span = tracing::info_span!("reference_features", subject = i);
                    let value = self.resolve_references(i, r, info, a).instrument(span).await?;
                    refs.push((r.proto.name.clone(), value));
                }
                Some(refs)
            }
        };
        let refs_ms = t_refs.elapsed().as_secs_f64() * 1e3;
        let t1 = std::time::Instant::now();
        let mut inputs = Vec::with_capacity(resolved.len());
        let mut protos = Vec::with_capacity(resolved.len());
        for (i, r) in resolved.into_iter().enumerate() {
            let (name, len) = self.resolve_name(i, &r.proto.name, a).await?;
            inputs.push((r.value, name, len));
            protos.push(r.proto);
        }
        let names_ms = t1.elapsed().as_secs_f64() * 1e3;
        let work = GenerateWork {
            request: valid.request,
            subjects: inputs,
            score,
        };
        let head = Head {
            subjects: protos,
            subjects_ms,
            names_ms,
            refs_ms,
        };
        Ok((work, head))
    }

    async fn with_deadline<T>(
        ctx: CallContext,
        fut: impl Future<Output = Result<T, WorkerError>>,
    ) -> Result<T, WorkerError> {
        match ctx.deadline {
            Some(d) => tokio::time::timeout_at(d, fut)
                .await
                .map_err(|_| WorkerError::DeadlineExceeded)?,
            None => fut.await,
        }
    }
}

impl WorkerService for WorkerCore {
    async fn encode_subjects(
        &self,
        req: pb::EncodeSubjectsRequest,
        ctx: CallContext,
    ) -> Result<pb::EncodeSubjectsResponse, WorkerError> {
        let a = self.admit()?;
        let work = async {
            let specs = limits::validate_subjects(req.subjects, &self.inner.limits, false)?;
            let scoring = if req.score { Some(self.scoring(&a)?) } else { None };
            let mut subjects = Vec::with_capacity(specs.len());
            for (i, spec) in specs.into_iter().enumerate() {
                let r = self.resolve_subject(i, spec, &a).await?;
                if let Some(info) = scoring {
                    self.resolve_references(i, &r, info, &a).await?;
                }
                subjects.push(r.proto);
            }
            Ok(pb::EncodeSubjectsResponse { subjects })
        };
        let r = Self::with_deadline(ctx, work).await;
        if let Err(e) = &r {
            self.count_error(e);
        }
        r
    }

    async fn generate(&self, task: pb::GenerateTask, ctx: CallContext) -> Result<EventStream, WorkerError> {
        let a = self.admit()?;
        let task_id = task.task_id.clone();
        let prepared = Self::with_deadline(ctx, self.prepare_generation(task, &a)).await;
        let (work, head) = prepared.inspect_err(|e| self.count_error(e))?;
        let steps = work.request.steps;
        let events = self
            .inner
            .exec
            .generate(work, &a.token)
            .await
            .map_err(WorkerError::from)?;
        let (out, rx) = mpsc::channel(steps + 2);
        let core = self.clone();
        tokio::spawn(async move {
            let r = core.forward(events, &out, ctx, &a.token, head).await;
            let s = &core.inner;
            match r {
                Ok(()) => s.generations.fetch_add(1, Ordering::SeqCst),
                Err(e) => {
                    tracing::info!(task_id, error = %e, "generation failed");
                    core.count_error(&e);
                    let _ = out.send(Err(e)).await;
                    s.failed_generations.fetch_add(1, Ordering::SeqCst)
                }
            };
            drop(a);
            s.metrics.queue_depth.set(core.queue_depth() as i64);
        });
        Ok(rx)
    }

    fn info(&self) -> pb::WorkerInfo {
        let s = &self.inner;
        let stats = s.cache.stats();
        let info = s.exec.info();
        let depth = self.queue_depth();
        s.metrics.queue_depth.set(depth as i64);
        pb::WorkerInfo {
            worker_id: s.worker_id.clone(),
            model: info.map(|i| i.model.clone()).unwrap_or_default(),
            variant: info.map(|i| i.variant.clone()).unwrap_or_default(),
            device: info.map(|i| i.device.clone()).unwrap_or_default(),
            dtype: info.map(|i| i.dtype.clone()).unwrap_or_default(),
            capacity: u32::try_from(s.capacity).unwrap_or(u32::MAX),
            queue_depth: u32::try_from(depth).unwrap_or(u32::MAX),
            ready: s.exec.is_ready() && !s.draining.load(Ordering::SeqCst),
            num_tokens: info.map(|i| i.num_tokens as u32).unwrap_or_default(),
            limits: Some(s.limits.to_proto()),
            default_width: info.map(|i| i.default_size[0] as u32).unwrap_or_default(),
            default_height: info.map(|i| i.default_size[1] as u32).unwrap_or_default(),
            default_scale: info.map(|i| i.default_scale).unwrap_or_default(),
            scoring: info.is_some_and(|i| i.scoring.is_some()),
            counters: Some(pb::Counters {
                image_encoder_calls: s.exec.image_encoder_calls(),
                subject_hits_memory: stats.subject.hits_memory,
                subject_hits_redis: stats.subject.hits_redis,
                subject_misses: stats.subject.misses,
                text_hits_memory: stats.text.hits_memory,
                text_hits_redis: stats.text.hits_redis,
                text_misses: stats.text.misses,
                redis_errors: stats.redis_errors,
                corrupt_entries: stats.corrupt,
                generations: s.generations.load(Ordering::SeqCst),
                failed_generations: s.failed_generations.load(Ordering::SeqCst),
                reference_hits_memory: stats.references.hits_memory + stats.references.coalesced,
                reference_hits_redis: stats.references.hits_redis,
                reference_misses: stats.references.misses,
            }),
        }
    }
}

/// What the image event carries besides the executor's result.
struct Head {
    subjects: Vec<pb::EncodedSubject>,
    subjects_ms: f64,
    names_ms: f64,
    /// Finding or computing the subjects' reference features (scoring).
    refs_ms: f64,
}

impl WorkerCore {
    /// Relays executor events to the caller; cancels the job when the caller goes away or the deadline passes.
    async fn forward(
        &self,
        mut events: mpsc::Receiver<ExecEvent>,
        out: &mpsc::Sender<Result<pb::GenerateEvent, WorkerError>>,
        ctx: CallContext,
        token: &CancelToken,
        head: Head,
    ) -> Result<(), WorkerError> {
        let deadline = async {
            match ctx.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                () = out.closed() => {
                    token.cancel();
                    return Err(WorkerError::Cancelled);
                }
                () = &mut deadline => {
                    token.cancel();
                    return Err(WorkerError::DeadlineExceeded);
                }
            };
            let event = match ev {
                Some(ExecEvent::Progress(p)) => pb::generate_event::Event::Progress(pb::Progress {
                    step: p.step as u32,
                    total: p.total as u32,
                }),
                Some(ExecEvent::Done(Ok(done))) => {
                    let (g, queue_ms) = (done.generated, done.queue_ms);
                    let score_ms = if done.scores.is_some() {
                        done.score_ms + head.refs_ms
                    } else {
                        0.0
                    };
                    let m = &self.inner.metrics;
                    let t = &g.timings;
                    let text_ms = t.text_ms + head.names_ms;
                    for (stage, ms) in [
                        ("queue", queue_ms),
                        ("text", text_ms),
                        ("subjects", head.subjects_ms),
                        ("denoise", t.denoise_ms),
                        ("decode", t.decode_ms),
                        ("png", t.png_ms),
                        ("score", score_ms),
                    ] {
                        if stage != "score" || done.scores.is_some() {
                            m.stage_ms(stage, ms);
                        }
                    }
                    let image = pb::Image {
                        png: g.png,
                        seed: g.seed,
                        width: g.width as u32,
                        height: g.height as u32,
                        timings: Some(pb::StageTimings {
                            queue_ms,
                            text_ms,
                            subjects_ms: head.subjects_ms,
                            denoise_ms: t.denoise_ms,
                            decode_ms: t.decode_ms,
                            png_ms: t.png_ms,
                            score_ms,
                        }),
                        subjects: head.subjects,
                        scores: done.scores.as_ref().map(scores_proto),
                    };
                    let ev = pb::GenerateEvent {
                        event: Some(pb::generate_event::Event::Image(image)),
                    };
                    return out.send(Ok(ev)).await.map_err(|_| WorkerError::Cancelled);
                }
                Some(ExecEvent::Done(Err(e))) => return Err(e.into()),
                None => return Err(WorkerError::Internal("the executor dropped the job".into())),
            };
            if out.send(Ok(pb::GenerateEvent { event: Some(event) })).await.is_err() {
                token.cancel();
                return Err(WorkerError::Cancelled);
            }
        }
    }
}

/// The scores of an image as the API carries them.
fn scores_proto(s: &ImageScores) -> pb::Scores {
    pb::Scores {
        clip_t: s.clip_t,
        clip_i: s.clip_i,
        dino: s.dino,
        subjects: s
            .subjects
            .iter()
            .map(|x| pb::SubjectScores {
                name: x.name.clone(),
                clip_i: x.clip_i,
                dino: x.dino,
            })
            .collect(),
    }
}
