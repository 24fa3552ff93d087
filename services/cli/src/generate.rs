//! `mip generate`: one request, `--samples` images. With `--coordinator URL` it runs on that cluster; without, it
//! starts an embedded cluster in this process (one worker on `--model`, in-memory cache unless `--redis`, and a
//! coordinator on 127.0.0.1:0) and goes through the same gRPC client path: SubmitJob, WatchJob with a progress
//! bar, GetJob with the images. Each image is written as a PNG (generation parameters in tEXt chunks) with a JSON
//! sidecar, named `mip-{seed}-{sample}`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use mip_coordinator::best_of::parse_rank;
use mip_coordinator::config::CoordinatorConfig;
use mip_proto::v1::{GenerationRequest, RankBy, Subject, SubmitJobRequest};
use mip_worker::config::WorkerConfig;
use serde_json::{json, Map, Value};
use tracing::Instrument as _;

use crate::client::{status_error, ConnectArgs};
use crate::device::{parse_size, DeviceArgs};
use crate::jobs;
use crate::local::LocalCluster;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The prompt; each subject's name should appear in it.
    #[arg(long)]
    prompt: String,
    /// A subject as NAME=IMG[,IMG…] (repeat for several subjects, 1 to 8).
    #[arg(long = "subject", value_name = "NAME=IMG[,IMG…]")]
    subjects: Vec<String>,
    /// Negative prompt (absent: zero negative embeddings, as SDXL does).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Seed of the first sample (absent: drawn by the worker and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    steps: u32,
    /// Image size WxH, multiples of 8 (default: the model's, 1024x1024 for SDXL).
    #[arg(long, value_parser = crate::device::size_arg)]
    size: Option<String>,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Image-prompt scale (default: 0.75 for sdxl, 0.65 for sdxl_plus).
    #[arg(long)]
    scale: Option<f64>,
    /// Number of images (seeds seed, seed+1, …).
    #[arg(long, default_value_t = 1)]
    samples: u32,
    /// Score each image (CLIP-T, CLIP-I, DINO) with the evaluation models; the scores go into the sidecar and the
    /// PNG's text chunks.
    #[arg(long)]
    score: bool,
    /// Best-of-N: generate `--samples` images, keep only the K best (scored, ranked by `--rank-by`).
    #[arg(long, value_name = "K")]
    keep_best: Option<u32>,
    /// The score `--keep-best` ranks by.
    #[arg(long, default_value = "clip_i", value_parser = ["clip_i", "dino", "clip_t", "mean"], requires = "keep_best")]
    rank_by: String,
    /// The sampler.
    #[arg(long, default_value = "euler", value_parser = crate::device::schedulers())]
    scheduler: String,
    /// Output folder.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    #[command(flatten)]
    connect: ConnectArgs,
    /// Embedded mode: `demo` (the built-in demo model) or a model bundle folder (with mip.json).
    #[arg(long, default_value = "demo")]
    model: String,
    /// Embedded mode: a shared subject cache, e.g. redis://127.0.0.1:6379/0 (default: in memory).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    #[command(flatten)]
    run_on: DeviceArgs,
    /// Print one JSON object per image instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, v: crate::verbosity::Verbosity) -> Result<()> {
    if args.samples == 0 || args.samples > 64 {
        bail!("`--samples` must be in 1..=64, got {}", args.samples);
    }
    let subjects = args
        .subjects
        .iter()
        .map(|s| parse_subject(s))
        .collect::<Result<Vec<_>>>()?;
    let (width, height) = match &args.size {
        Some(s) => parse_size(s)?,
        None => (0, 0),
    };
    let request = GenerationRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        subjects,
        width: u32::try_from(width).context("`--size` width is too large")?,
        height: u32::try_from(height).context("`--size` height is too large")?,
        steps: args.steps,
        guidance: Some(args.guidance),
        scale: args.scale,
        scheduler: args.scheduler.clone(),
        seed: args.seed,
        score: args.score,
    };
    if let Some(k) = args.keep_best {
        if k == 0 || k > args.samples {
            bail!("`--keep-best` must be in 1..=--samples ({}), got {k}", args.samples);
        }
    }
    let job = SubmitJobRequest {
        requests: vec![request],
        samples: args.samples,
        keep_best: args.keep_best.unwrap_or(0),
        rank_by: match args.keep_best {
            Some(_) => parse_rank(&args.rank_by).unwrap_or(RankBy::ClipI),
            None => RankBy::Unspecified,
        } as i32,
        ..Default::default()
    };
    let rt = crate::client::runtime()?;
    rt.block_on(async {
        let telemetry = crate::trace::init(v)?;
        let span = crate::trace::command_span("mip generate");
        let result = run_traced(&args, job).instrument(span).await;
        // The command's span has ended: flush it (and the embedded services' spans) before exiting.
        if let Some(t) = telemetry {
            t.shutdown()?;
        }
        result
    })
}

/// The command inside its span: on `--coordinator`, or on an embedded cluster.
async fn run_traced(args: &Args, job: SubmitJobRequest) -> Result<()> {
    if args.connect.coordinator.is_some() {
        return submit_and_write(args, &args.connect, job).await;
    }
    let mut cluster = start_embedded(args).await?;
    let connect = ConnectArgs {
        coordinator: Some(format!("http://{}", cluster.addr)),
        ..args.connect.clone()
    };
    let ready = async {
        let mut client = connect.connect().await?;
        cluster.wait_healthy(&mut client, 1, Duration::from_secs(1800)).await
    };
    let result = match ready.await {
        Ok(()) => submit_and_write(args, &connect, job).await,
        Err(e) => Err(e),
    };
    let stopped = cluster.stop().await;
    result.and(stopped)
}

/// One worker on the model and a coordinator, on loopback ports.
async fn start_embedded(args: &Args) -> Result<LocalCluster> {
    let (_, dir) = crate::model::resolve(&args.model)?;
    let mut worker = WorkerConfig::default();
    worker.model.path = dir.display().to_string();
    worker.model.device = args.run_on.device.clone();
    worker.model.dtype = args.run_on.dtype.clone();
    worker.redis.url = args.redis.clone().unwrap_or_default();
    worker.server.drain_seconds = 5;
    worker.server.worker_id = "embedded".into();
    worker.validate()?;
    let mut coordinator = CoordinatorConfig::default();
    coordinator.coordinator.health_interval_ms = 50;
    coordinator.coordinator.max_samples = 64;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the embedded coordinator on 127.0.0.1:0")?;
    LocalCluster::start(&worker, 1, coordinator, listener).await
}

/// SubmitJob, WatchJob (progress bar), GetJob with images, then the files.
async fn submit_and_write(args: &Args, connect: &ConnectArgs, mut job: SubmitJobRequest) -> Result<()> {
    let mut client = connect.connect().await?;
    let retry = connect.retry();
    if job.idempotency_key.is_empty() {
        // A retried submission must not start a second job.
        job.idempotency_key = format!("mip-generate-{:032x}", rand::random::<u128>());
    }
    let submitted = retry
        .call("submitting the job", || {
            let mut c = client.clone();
            let j = job.clone();
            async move { c.submit_job(j).await }
        })
        .await
        .map_err(|s| status_error("submitting the job", &s))?
        .into_inner();
    let bar = if jobs::bars_enabled(args.json) {
        jobs::job_bar("generating")
    } else {
        ProgressBar::hidden()
    };
    let done = jobs::follow(&mut client, retry, &submitted.job_id, &bar, &mut |_| {}).await?;
    bar.finish_and_clear();
    let full = jobs::get(&mut client, retry, &submitted.job_id, true).await?;
    let mut extra = Map::new();
    extra.insert("negative_prompt".into(), json!(args.negative_prompt));
    let subjects: Vec<Value> = args
        .subjects
        .iter()
        .map(|raw| json!({"name": raw.split_once('=').map_or(raw.as_str(), |(n, _)| n), "arg": raw}))
        .collect();
    extra.insert("subjects".into(), Value::Array(subjects));
    let model = if args.connect.coordinator.is_some() {
        None
    } else {
        Some(&args.model)
    };
    extra.insert("model".into(), json!(model));
    extra.insert("device".into(), json!(args.run_on.device));
    extra.insert("dtype".into(), json!(args.run_on.dtype));
    let mut images = full.images;
    images.sort_by_key(|i| (i.rank, i.sample_index));
    for img in &images {
        let stem = format!("mip-{}-{}", img.seed, img.sample_index);
        let w = crate::outputs::write_image(&args.out, &stem, img, &submitted.job_id, &extra)?;
        if args.json {
            let mut v = w.to_json();
            if let Some(s) = &img.scores {
                v["scores"] = json!({"clip_t": s.clip_t, "clip_i": s.clip_i, "dino": s.dino});
            }
            if img.rank > 0 {
                v["rank"] = json!(img.rank);
            }
            println!("{v}");
        } else {
            let scores = img.scores.as_ref().map_or(String::new(), |s| {
                let f = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.4}"));
                format!(", CLIP-T {:.4} CLIP-I {} DINO {}", s.clip_t, f(s.clip_i), f(s.dino))
            });
            let rank = if img.rank > 0 {
                format!(", best #{} of {}", img.rank, args.samples)
            } else {
                String::new()
            };
            println!("wrote {} (seed {}{scores}{rank})", w.png.display(), w.seed);
        }
    }
    jobs::finished_ok(&done)
}

/// `NAME=IMG[,IMG…]` into a subject with the images' bytes.
pub(crate) fn parse_subject(s: &str) -> Result<Subject> {
    let Some((name, images)) = s.split_once('=') else {
        bail!("`--subject` must look like NAME=IMG[,IMG…], got {s:?}");
    };
    let images = images
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| std::fs::read(Path::new(p)).with_context(|| format!("`--subject {name}`: cannot read {p}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(Subject {
        name: name.to_owned(),
        images,
        subject_key: String::new(),
    })
}
