//! The device executor: one OS thread owns the [`MipPipeline`] (and the evaluation models' [`Scorer`] when the
//! bundle names them) and runs every candle computation; async code hands it jobs over a bounded channel and gets
//! the answer on a `oneshot` (or, for a generation, on a per-job event channel).
//!
//! The thread loads the model, runs a tiny real forward (one text encoding and one 64x64 UNet step) and only then
//! turns ready. Each job carries a [`CancelToken`]: a queued job whose token is set is skipped, a running generation
//! checks it between denoising steps. A forward error that is not an input error (or a panic) latches the worker
//! not-ready. Values cross the thread boundary as cache bytes (`pipeline::embedding`), never as device tensors.

mod device;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tokio::sync::{mpsc, oneshot, watch};

/// Longest wait for room in the executor channel (see [`Executor::submit`]).
const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

use crate::cache::keys::files_identity;
use crate::config::{dtype_name, DeviceKind};
use crate::error::{ModelError, Result};
use crate::eval::scorer::{EvalPixels, ImageScores, ReferenceFeatures, Scorer};
use crate::metrics::Metrics;
use crate::model::weights::find_weights;
use crate::pipeline::embedding;
use crate::pipeline::generate::initial_noise;
use crate::pipeline::image_decode::RgbImage;
use crate::pipeline::preprocess::PreparedImage;
use crate::pipeline::scheduler::SchedulerKind;
use crate::pipeline::vae_tiling::VaeTiling;
use crate::pipeline::{EncodedSubject, Generated, MipPipeline, ModelSpec, Progress, TextEmbedding, ValidRequest};

/// A shared cancel flag: set when the caller goes away or its deadline passes.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// A guard that cancels the token when dropped (the request's future or stream went away).
    pub fn guard(&self) -> CancelGuard {
        CancelGuard(self.clone())
    }
}

/// Cancels its token on drop.
#[derive(Debug)]
pub struct CancelGuard(CancelToken);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Why a job did not produce a value.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("the model is not ready")]
    NotReady,
    #[error("the executor has stopped")]
    Stopped,
    #[error("cancelled")]
    Cancelled,
    #[error("the executor queue is full")]
    QueueFull,
    #[error("device error: {0}")]
    Device(String),
    #[error(transparent)]
    Model(ModelError),
}

/// Shapes of the cached values, learned from the warm-up forward.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// A subject's tokens `[T, C]`.
    pub subject: Vec<usize>,
    /// A text's hidden states `[1, S, C]`.
    pub text_hidden: Vec<usize>,
    /// A text's pooled vector `[1, P]`.
    pub text_pooled: Vec<usize>,
}

impl Layout {
    fn text_len(&self) -> usize {
        self.text_hidden.iter().product::<usize>() + self.text_pooled.iter().product::<usize>()
    }

    /// A subject value decodes (header, checksum) and has shape `[T, C]`.
    pub fn valid_subject(&self, bytes: &[u8]) -> bool {
        embedding::decode(bytes, &Device::Cpu).is_ok_and(|t| t.dims() == self.subject.as_slice())
    }

    /// A text value decodes and has shape `[S·C + P]`: the hidden states then the pooled vector, flattened (one
    /// value per text under one key).
    pub fn valid_text(&self, bytes: &[u8]) -> bool {
        embedding::decode(bytes, &Device::Cpu).is_ok_and(|t| t.dims() == [self.text_len()])
    }

    fn text_value(&self, e: &TextEmbedding) -> candle_core::Result<Vec<u8>> {
        let flat = Tensor::cat(&[e.hidden.flatten_all()?, e.pooled.flatten_all()?], 0)?;
        embedding::encode(&flat)
    }

    fn text_from_value(&self, bytes: &[u8], device: &Device) -> Result<TextEmbedding> {
        let t = decode_on(bytes, device)?;
        let n: usize = self.text_hidden.iter().product();
        let p: usize = self.text_pooled.iter().product();
        let split = || -> candle_core::Result<TextEmbedding> {
            Ok(TextEmbedding {
                hidden: t.narrow(0, 0, n)?.reshape(self.text_hidden.as_slice())?,
                pooled: t.narrow(0, n, p)?.reshape(self.text_pooled.as_slice())?,
            })
        };
        split().map_err(|source| ModelError::Forward { stage: "cache", source })
    }
}

fn decode_on(bytes: &[u8], device: &Device) -> Result<Tensor> {
    embedding::decode(bytes, device).map_err(|e| ModelError::Forward {
        stage: "cache",
        source: candle_core::Error::Msg(e.to_string()),
    })
}

/// What the loaded model is; fixed once the executor is ready.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model: String,
    pub variant: String,
    pub device: String,
    pub dtype: String,
    pub num_tokens: usize,
    pub default_size: [usize; 2],
    pub default_scale: f64,
    /// `files_identity` of the image encoder weights and the adapter (subject keys).
    pub encoder_id: String,
    /// `files_identity` of both text encoders' weights (name keys).
    pub text_id: String,
    pub layout: Layout,
    /// The evaluation models, when the bundle has them.
    pub scoring: Option<ScoringInfo>,
}

/// What the loaded evaluation models are.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoringInfo {
    /// `files_identity` of both evaluation models' weights (reference feature keys).
    pub eval_id: String,
    /// Feature widths: CLIP's projection, DINO's hidden size.
    pub dims: (usize, usize),
}

impl ScoringInfo {
    /// A reference features value decodes and has rows of `Pc + Pd` features.
    pub fn valid_references(&self, bytes: &[u8]) -> bool {
        ReferenceFeatures::from_value(bytes, self.dims).is_some()
    }
}

/// A generation ready for the device: the valid request and each subject's cached values.
#[derive(Debug)]
pub struct GenerateWork {
    pub request: ValidRequest,
    /// Per subject: tokens value, name value, name token count.
    pub subjects: Vec<(Vec<u8>, Vec<u8>, usize)>,
    /// To score the image: each subject's name and reference features value (an empty list scores CLIP-T only).
    pub score: Option<Vec<(String, Vec<u8>)>>,
}

/// A finished generation.
#[derive(Debug)]
pub struct Finished {
    pub generated: Generated,
    /// Milliseconds the job waited in the executor queue.
    pub queue_ms: f64,
    /// With [`GenerateWork::score`]; also in the PNG's text chunks.
    pub scores: Option<ImageScores>,
    pub score_ms: f64,
}

/// Events of a generation job: a progress per step, then the outcome.
#[derive(Debug)]
pub enum ExecEvent {
    Progress(Progress),
    Done(std::result::Result<Finished, ExecError>),
}

type Reply = oneshot::Sender<std::result::Result<Vec<u8>, ExecError>>;

enum Work {
    Subject {
        images: Vec<PreparedImage>,
        reply: Reply,
    },
    Text {
        text: String,
        reply: Reply,
    },
    References {
        images: Vec<EvalPixels>,
        reply: Reply,
    },
    Generate {
        work: GenerateWork,
        events: mpsc::Sender<ExecEvent>,
    },
    Stop,
}

struct Job {
    work: Work,
    cancel: CancelToken,
    enqueued: Instant,
    /// The caller's span: the device thread's stage spans are its children (one trace per job).
    span: tracing::Span,
}

/// State shared between the thread and its handles.
struct Shared {
    ready: watch::Sender<bool>,
    busy: AtomicBool,
    /// Set on shutdown after the drain time: every job counts as cancelled.
    cancel_all: AtomicBool,
    image_encoder_calls: AtomicU64,
    info: OnceLock<ModelInfo>,
    pipeline: OnceLock<Arc<MipPipeline>>,
}

/// A handle to the device thread.
pub struct Executor {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How to start the executor.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    pub spec: ModelSpec,
    pub model_name: String,
    pub device: DeviceKind,
    pub dtype: DType,
    pub vae_tiling: VaeTiling,
    pub max_image_pixels: u64,
    /// Jobs that may wait in the channel.
    pub channel_capacity: usize,
}

impl Executor {
    /// Starts the thread; the receiver tells when loading and warm-up finished (or why they failed).
    /// With `gate`, the thread waits for it (or its sender's drop) before loading.
    pub fn spawn(
        opts: ExecutorOptions,
        metrics: Metrics,
        gate: Option<oneshot::Receiver<()>>,
    ) -> std::io::Result<(Self, oneshot::Receiver<std::result::Result<(), String>>)> {
        let (tx, rx) = mpsc::channel(opts.channel_capacity.max(1));
        let shared = Arc::new(Shared {
            ready: watch::channel(false).0,
            busy: AtomicBool::new(false),
            cancel_all: AtomicBool::new(false),
            image_encoder_calls: AtomicU64::new(0),
            info: OnceLock::new(),
            pipeline: OnceLock::new(),
        });
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new().name("mip-executor".into()).spawn(move || {
            if let Some(g) = gate {
                let _ = g.blocking_recv();
            }
            device::thread_main(opts, rx, thread_shared, metrics, loaded_tx)
        })?;
        let exec = Self {
            tx,
            shared,
            thread: std::sync::Mutex::new(Some(thread)),
        };
        Ok((exec, loaded_rx))
    }

    /// Whether the model is loaded, warmed up and not latched off by a device error.
    pub fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    /// Readiness changes.
    pub fn subscribe_ready(&self) -> watch::Receiver<bool> {
        self.shared.ready.subscribe()
    }

    /// Whether a job is running now.
    pub fn is_busy(&self) -> bool {
        self.shared.busy.load(Ordering::SeqCst)
    }

    /// Cancels every queued and running job (shutdown after the drain time).
    pub fn cancel_all(&self) {
        self.shared.cancel_all.store(true, Ordering::SeqCst);
    }

    /// Image encoder runs so far.
    pub fn image_encoder_calls(&self) -> u64 {
        self.shared.image_encoder_calls.load(Ordering::SeqCst)
    }

    /// The model's description, once loaded.
    pub fn info(&self) -> Option<&ModelInfo> {
        self.shared.info.get()
    }

    /// The loaded pipeline, for CPU-only helpers (tokenizers, image preprocessing) off the device thread.
    pub fn pipeline(&self) -> Option<Arc<MipPipeline>> {
        self.shared.pipeline.get().cloned()
    }

    /// Queues `work`. The channel holds as many jobs as requests are admitted, but a request that went away
    /// leaves its job queued until the device thread skips it, so a new request may find the channel full for a
    /// moment: it waits (at most [`QUEUE_WAIT`]) rather than failing.
    async fn submit(&self, work: Work, cancel: &CancelToken) -> std::result::Result<(), ExecError> {
        let job = Job {
            work,
            cancel: cancel.clone(),
            enqueued: Instant::now(),
            span: tracing::Span::current(),
        };
        match tokio::time::timeout(QUEUE_WAIT, self.tx.send(job)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ExecError::Stopped),
            Err(_) => Err(ExecError::QueueFull),
        }
    }

    async fn ask(
        &self,
        work: impl FnOnce(Reply) -> Work,
        cancel: &CancelToken,
    ) -> std::result::Result<Vec<u8>, ExecError> {
        let (reply, rx) = oneshot::channel();
        self.submit(work(reply), cancel).await?;
        rx.await.map_err(|_| ExecError::Stopped)?
    }

    /// Runs the image encoder on a subject's prepared images; returns its tokens `(T, C)` as a cache value.
    pub async fn encode_subject(
        &self,
        images: Vec<PreparedImage>,
        cancel: &CancelToken,
    ) -> std::result::Result<Vec<u8>, ExecError> {
        self.ask(|reply| Work::Subject { images, reply }, cancel).await
    }

    /// Runs both evaluation models on a subject's prepared reference images; returns a [`ReferenceFeatures`] cache
    /// value (a model error when the worker has no evaluation models).
    pub async fn reference_features(
        &self,
        images: Vec<EvalPixels>,
        cancel: &CancelToken,
    ) -> std::result::Result<Vec<u8>, ExecError> {
        self.ask(|reply| Work::References { images, reply }, cancel).await
    }

    /// Encodes a text with both text encoders; returns it as a cache value (see [`Layout::valid_text`]).
    pub async fn encode_text(&self, text: String, cancel: &CancelToken) -> std::result::Result<Vec<u8>, ExecError> {
        self.ask(|reply| Work::Text { text, reply }, cancel).await
    }

    /// Queues a generation; its events arrive on the returned channel.
    pub async fn generate(
        &self,
        work: GenerateWork,
        cancel: &CancelToken,
    ) -> std::result::Result<mpsc::Receiver<ExecEvent>, ExecError> {
        let (events, rx) = mpsc::channel(work.request.steps + 2);
        self.submit(Work::Generate { work, events }, cancel).await?;
        Ok(rx)
    }

    /// Asks the thread to stop after the queued jobs and waits for it (bounded by `wait`).
    pub async fn stop(&self, wait: std::time::Duration) {
        let stop = Job {
            work: Work::Stop,
            cancel: CancelToken::default(),
            enqueued: Instant::now(),
            span: tracing::Span::none(),
        };
        let _ = tokio::time::timeout(wait, self.tx.send(stop)).await;
        let handle = self.thread.lock().ok().and_then(|mut g| g.take());
        if let Some(h) = handle {
            let joined = tokio::task::spawn_blocking(move || h.join());
            if tokio::time::timeout(wait, joined).await.is_err() {
                tracing::warn!("executor thread did not stop in time");
            }
        }
    }
}
