//! `mip bench cluster`: what the coordinator costs and how throughput grows with workers.
//!
//! For each backend — `real` (in-process workers on `--model`) and `synthetic` (workers that spend a fixed
//! `--service-ms` per image, see [`synthetic`]) — it starts the largest number of workers asked, then for each
//! count N in `--workers` a coordinator (memory job store, or Redis with `--redis`) over the first N of them, and
//! measures:
//! - throughput: one job of `--tasks` images, submitted and watched to the end; images per second and the speedup
//!   over the first count;
//! - overhead per task (one worker): the median latency of `--reps` sequential one-image `Generate` calls through
//!   the coordinator minus the median of the same call made straight to the worker.

mod synthetic;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mip_coordinator::config::CoordinatorConfig;
use mip_proto::v1::coordinator_client::CoordinatorClient;
use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{
    generate_event, job_event, GenerateTask, GenerationRequest, JobStatus, ListWorkersRequest, Subject,
    SubmitJobRequest, WatchJobRequest,
};
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;

use crate::device::parse_size;

/// Longest wait for any one step (model load, a whole job).
const BOUND: Duration = Duration::from_secs(600);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Worker counts to measure, comma-separated.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    workers: Vec<usize>,
    /// Images per throughput job.
    #[arg(long, default_value_t = 24)]
    tasks: u32,
    /// Sequential calls for the overhead measurement.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// `real`, `synthetic` or `both`.
    #[arg(long, default_value = "both", value_parser = ["real", "synthetic", "both"])]
    backend: String,
    /// Model of the real workers: `demo` or a bundle folder.
    #[arg(long, default_value = "demo")]
    model: String,
    /// A subject as NAME=IMG[,IMG…] (default with the demo model: its cat and jacket).
    #[arg(long = "subject", value_name = "NAME=IMG[,IMG…]")]
    subjects: Vec<String>,
    /// Image size of the real workers.
    #[arg(long, default_value = "64x64", value_parser = crate::device::size_arg)]
    size: String,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 4)]
    steps: u32,
    /// Service time of a synthetic worker per image, in milliseconds.
    #[arg(long, default_value_t = 100)]
    service_ms: u64,
    /// The coordinators' job store: a Redis URL (fenced writes, leases), or memory when not given.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.workers.is_empty() || args.workers.iter().any(|&n| n == 0 || n > 64) {
        bail!("`--workers` must list counts in 1..=64, got {:?}", args.workers);
    }
    if args.tasks == 0 || args.reps == 0 {
        bail!(
            "`--tasks` and `--reps` must be positive, got {} and {}",
            args.tasks,
            args.reps
        );
    }
    let backends: &[&str] = match args.backend.as_str() {
        "both" => &["synthetic", "real"],
        "real" => &["real"],
        "synthetic" => &["synthetic"],
        other => bail!("`--backend` must be real, synthetic or both, got {other:?}"),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let mut reports = Vec::new();
    for &backend in backends {
        let report = runtime.block_on(measure(&args, backend))?;
        if !args.json {
            print_report(&report);
        }
        reports.push(report);
    }
    if args.json {
        println!("{}", json!({ "backends": reports }));
    }
    Ok(())
}

/// Workers of one backend, kept alive while measured.
#[derive(Default)]
struct Pool {
    /// Dropping it stops the real workers.
    _real: Option<watch::Sender<bool>>,
    _synthetic: Vec<synthetic::SyntheticWorker>,
}

async fn measure(args: &Args, backend: &str) -> Result<serde_json::Value> {
    let max = args.workers.iter().copied().max().unwrap_or(1);
    let (urls, _pool, request) = if backend == "real" {
        start_real(args, max).await?
    } else {
        let mut pool = Vec::new();
        for _ in 0..max {
            pool.push(synthetic::start(Duration::from_millis(args.service_ms)).await?);
        }
        let urls = pool.iter().map(|w| w.url.clone()).collect::<Vec<_>>();
        let request = GenerationRequest {
            prompt: "a cat".into(),
            steps: args.steps,
            subjects: vec![Subject {
                name: "cat".into(),
                images: vec![grey_png()?],
                ..Default::default()
            }],
            ..Default::default()
        };
        (
            urls,
            Pool {
                _synthetic: pool,
                ..Pool::default()
            },
            request,
        )
    };
    let mut rows = Vec::new();
    for &n in &args.workers {
        let coordinator = Coordinator::start(&urls[..n], args.redis.as_deref()).await?;
        let mut client = coordinator.client.clone();
        run_job(&mut client, &request, n as u32).await.context("warm-up job")?;
        let started = Instant::now();
        run_job(&mut client, &request, args.tasks).await?;
        let secs = started.elapsed().as_secs_f64();
        rows.push(
            json!({"workers": n, "images": args.tasks, "seconds": secs, "images_per_s": f64::from(args.tasks) / secs}),
        );
        coordinator.stop().await;
    }
    let base = rows[0]["images_per_s"].as_f64().unwrap_or(1.0);
    for r in &mut rows {
        let s = r["images_per_s"].as_f64().unwrap_or(0.0) / base;
        r["speedup"] = json!(s);
    }
    let (direct, through) = overhead(&urls[0], &request, args.reps, args.redis.as_deref()).await?;
    Ok(json!({
        "backend": backend,
        "job_store": if args.redis.is_some() { "redis" } else { "memory" },
        "service_ms": (backend == "synthetic").then_some(args.service_ms),
        "throughput": rows,
        "direct_median_ms": direct,
        "coordinator_median_ms": through,
        "overhead_per_task_ms": through - direct,
    }))
}

/// `max` in-process workers on the model, and the request they are measured with.
async fn start_real(args: &Args, max: usize) -> Result<(Vec<String>, Pool, GenerationRequest)> {
    let (_, dir) = crate::model::resolve(&args.model)?;
    let subjects = if args.subjects.is_empty() && args.model == "demo" {
        vec![
            format!("cat={}", dir.join("refs/cat.png").display()),
            format!("jacket={}", dir.join("refs/jacket.png").display()),
        ]
    } else {
        args.subjects.clone()
    };
    let subjects = subjects
        .iter()
        .map(|s| crate::generate::parse_subject(s))
        .collect::<Result<Vec<_>>>()?;
    let (w, h) = parse_size(&args.size)?;
    let mut config = mip_worker::config::WorkerConfig::default();
    config.model.path = dir.display().to_string();
    config.server.drain_seconds = 1;
    let (stop, stopped) = watch::channel(false);
    let (urls, tasks) = crate::local::spawn_workers(&config, max, &stopped).await?;
    for (i, task) in tasks.into_iter().enumerate() {
        tokio::spawn(async move {
            if let Ok(Err(e)) = task.await {
                eprintln!("bench worker {i}: {e:#}");
            }
        });
    }
    let request = GenerationRequest {
        prompt: "a cat wearing a jacket".into(),
        subjects,
        width: w as u32,
        height: h as u32,
        steps: args.steps,
        seed: Some(1),
        ..Default::default()
    };
    Ok((
        urls,
        Pool {
            _real: Some(stop),
            ..Pool::default()
        },
        request,
    ))
}

/// A 32x32 grey PNG: the reference image of the synthetic backend's subject (the coordinator decodes every
/// reference image at admission, so it must be a real one).
fn grey_png() -> Result<Vec<u8>> {
    let img = image::RgbImage::from_pixel(32, 32, image::Rgb([128, 128, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .context("encoding the synthetic subject image")?;
    Ok(out.into_inner())
}

/// A coordinator in this process over `urls`, once all of them are healthy.
struct Coordinator {
    client: CoordinatorClient<Channel>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Coordinator {
    async fn start(urls: &[String], redis: Option<&str>) -> Result<Self> {
        let mut cfg = CoordinatorConfig::default();
        cfg.redis.url = redis.unwrap_or_default().to_owned();
        cfg.coordinator.workers = urls.to_vec();
        cfg.coordinator.health_interval_ms = 100;
        cfg.coordinator.max_queued_tasks = 1 << 16;
        cfg.coordinator.max_samples = 1024;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mip_coordinator::server::run(cfg, listener, async {
            let _ = stopped.await;
        }));
        let mut client = CoordinatorClient::connect(url)
            .await
            .context("connecting the coordinator")?;
        tokio::time::timeout(BOUND, async {
            loop {
                let healthy = match client.list_workers(ListWorkersRequest {}).await {
                    Ok(r) => r.into_inner().workers.iter().filter(|w| w.healthy).count(),
                    Err(_) => 0,
                };
                if healthy >= urls.len() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .context("workers did not become healthy")?;
        Ok(Self { client, stop, task })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// Submits `samples` images of `request` and watches the job to its end.
async fn run_job(client: &mut CoordinatorClient<Channel>, request: &GenerationRequest, samples: u32) -> Result<()> {
    let job = client
        .submit_job(SubmitJobRequest {
            requests: vec![request.clone()],
            samples,
            ..Default::default()
        })
        .await?
        .into_inner();
    let watch = async {
        let mut events = client
            .watch_job(WatchJobRequest {
                job_id: job.job_id.clone(),
            })
            .await?
            .into_inner();
        while let Some(ev) = events.message().await? {
            if let Some(job_event::Event::Done(done)) = ev.event {
                let job = done.job.unwrap_or_default();
                if job.status != JobStatus::Done as i32 {
                    bail!("benchmark job ended {:?}: {}", job.status(), job.error);
                }
                return Ok(());
            }
        }
        bail!("the watch of job {} ended without its end", job.job_id)
    };
    tokio::time::timeout(BOUND, watch)
        .await
        .context("benchmark job timed out")?
}

/// Median milliseconds of `reps` one-image calls straight to the worker at `url`, and through a coordinator
/// (interleaved, so both see the same host load; the first pair warms caches and is not counted).
async fn overhead(url: &str, request: &GenerationRequest, reps: usize, redis: Option<&str>) -> Result<(f64, f64)> {
    let mut worker = WorkerClient::connect(url.to_owned()).await?;
    let coordinator = Coordinator::start(&[url.to_owned()], redis).await?;
    let mut client = coordinator.client.clone();
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for i in 0..=reps {
        let t = Instant::now();
        let task = GenerateTask {
            task_id: format!("bench/{i}"),
            request: Some(request.clone()),
        };
        let mut stream = worker.generate(task).await?.into_inner();
        while let Some(ev) = stream.message().await? {
            if let Some(generate_event::Event::Image(_)) = ev.event {
                break;
            }
        }
        let d = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        client.generate(request.clone()).await?;
        if i > 0 {
            direct.push(d);
            through.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    coordinator.stop().await;
    Ok((median(&mut direct), median(&mut through)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn print_report(r: &serde_json::Value) {
    let backend = r["backend"].as_str().unwrap_or("?");
    let store = r["job_store"].as_str().unwrap_or("?");
    match r["service_ms"].as_u64() {
        Some(ms) => println!("backend {backend} ({ms} ms per image, one at a time per worker), job store {store}"),
        None => println!("backend {backend}, job store {store}"),
    }
    println!(
        "  {:>7}  {:>6}  {:>8}  {:>8}  {:>7}",
        "workers", "images", "seconds", "images/s", "speedup"
    );
    for row in r["throughput"].as_array().into_iter().flatten() {
        println!(
            "  {:>7}  {:>6}  {:>8.2}  {:>8.2}  {:>6.2}x",
            row["workers"].as_u64().unwrap_or(0),
            row["images"].as_u64().unwrap_or(0),
            row["seconds"].as_f64().unwrap_or(f64::NAN),
            row["images_per_s"].as_f64().unwrap_or(f64::NAN),
            row["speedup"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!(
        "  one image: {:.2} ms straight to the worker, {:.2} ms through the coordinator, overhead {:.2} ms per task",
        r["direct_median_ms"].as_f64().unwrap_or(f64::NAN),
        r["coordinator_median_ms"].as_f64().unwrap_or(f64::NAN),
        r["overhead_per_task_ms"].as_f64().unwrap_or(f64::NAN),
    );
}
