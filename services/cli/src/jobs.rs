//! Jobs on a coordinator: [`follow`] watches one job to its end (driving a progress bar), and the commands
//! `mip watch JOB_ID [--out DIR]`, `mip jobs [--page-size N] [--all]` and `mip cancel JOB_ID`, each with `--json`.
//! [`job_json`] and [`event_json`] are the JSON shapes every command prints.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mip_proto::v1::job_event::Event;
use mip_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobEvent, JobStatus, ListJobsRequest, TaskStatus, WatchJobRequest,
};
use serde_json::{json, Value};

use crate::client::{runtime, status_error, ConnectArgs, Coordinator};
use crate::retry::Retry;

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// The job to follow.
    job_id: String,
    #[command(flatten)]
    connect: ConnectArgs,
    /// Also write the job's images (PNG + JSON sidecar) into this folder when it ends.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print each event as a JSON line, then the final job.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Jobs per page (1..=500).
    #[arg(long, default_value_t = 50)]
    page_size: u32,
    /// Continue from a previous page (the `next_page_token` it printed).
    #[arg(long, default_value = "")]
    page_token: String,
    /// Follow the pages to the end.
    #[arg(long)]
    all: bool,
    /// Print `{"jobs": [...], "next_page_token": "..."}`.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The job to cancel.
    job_id: String,
    #[command(flatten)]
    connect: ConnectArgs,
    /// Print the job as JSON.
    #[arg(long)]
    json: bool,
}

/// A job's status as a lowercase word (`queued`, `running`, `done`, `failed`, `cancelled`).
pub fn status_name(status: i32) -> String {
    let name = JobStatus::try_from(status).map_or("JOB_STATUS_UNSPECIFIED", |s| s.as_str_name());
    name.trim_start_matches("JOB_STATUS_").to_lowercase()
}

fn task_status_name(status: i32) -> String {
    let name = TaskStatus::try_from(status).map_or("TASK_STATUS_UNSPECIFIED", |s| s.as_str_name());
    name.trim_start_matches("TASK_STATUS_").to_lowercase()
}

/// A job without image bytes.
pub fn job_json(j: &Job) -> Value {
    json!({
        "job_id": j.job_id, "status": status_name(j.status), "priority": j.priority,
        "total_tasks": j.total_tasks, "done_tasks": j.done_tasks, "failed_tasks": j.failed_tasks,
        "error": j.error, "created_at_ms": j.created_at_ms, "finished_at_ms": j.finished_at_ms,
        "tasks": j.tasks.iter().map(|t| json!({
            "task_index": t.task_index, "status": task_status_name(t.status), "attempts": t.attempts,
            "worker": t.worker, "error": t.error,
        })).collect::<Vec<_>>(),
    })
}

/// One event, image bytes left out.
pub fn event_json(e: &JobEvent) -> Value {
    let body = match &e.event {
        None => json!({"type": "unknown"}),
        Some(Event::Queued(q)) => json!({"type": "queued", "position": q.position}),
        Some(Event::Started(s)) => {
            json!({"type": "started", "task_index": s.task_index, "worker": s.worker, "attempt": s.attempt})
        }
        Some(Event::Progress(p)) => {
            json!({"type": "progress", "task_index": p.task_index, "step": p.step, "total": p.total})
        }
        Some(Event::Image(i)) => json!({"type": "image", "task_index": i.task_index, "seed": i.seed,
            "width": i.width, "height": i.height, "worker": i.worker, "bytes": i.png.len()}),
        Some(Event::Failed(f)) => json!({"type": "failed", "task_index": f.task_index, "code": f.code,
            "reason": f.reason, "message": f.message, "will_retry": f.will_retry}),
        Some(Event::Done(d)) => json!({"type": "done", "job": d.job.as_ref().map(job_json)}),
    };
    json!({"job_id": e.job_id, "event": body})
}

/// The style of a per-job bar once a task reported its first step.
fn job_bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} steps {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// A per-job bar labelled `prefix`: only the job's state (submitted, queued with its position, running on a
/// worker) until a task reports a step, then the steps of all its tasks.
pub fn job_bar(prefix: impl Into<std::borrow::Cow<'static, str>>) -> ProgressBar {
    let waiting = ProgressStyle::with_template("{prefix:>12} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(0).with_style(waiting).with_prefix(prefix);
    bar.set_message("submitted");
    bar
}

/// Whether progress bars should be drawn (stderr is a terminal and no `--json`).
pub fn bars_enabled(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// Watches `job_id` until it ends and returns its final state (without images); `bar` follows the denoising steps
/// of all its tasks, `on_event` sees every event. A stream that breaks, or a coordinator that is unavailable for a
/// while, is re-attached to (the replay brings the job's state back) until `retry`'s total time has passed.
pub async fn follow(
    client: &mut Coordinator,
    retry: Retry,
    job_id: &str,
    bar: &ProgressBar,
    on_event: &mut dyn FnMut(&JobEvent),
) -> Result<Job> {
    let mut steps: HashMap<u32, (u64, u64)> = HashMap::new();
    let mut backoff = retry.backoff();
    loop {
        let what = format!("watching job {job_id}");
        let request = WatchJobRequest {
            job_id: job_id.to_owned(),
        };
        let opened = retry
            .call(&what, || {
                let mut c = client.clone();
                let r = request.clone();
                async move { c.watch_job(r).await }
            })
            .await;
        let mut stream = opened.map_err(|s| status_error(&what, &s))?.into_inner();
        let broke = loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    on_event(&event);
                    if let Some(done) = track(&event, &mut steps, bar) {
                        return Ok(done);
                    }
                }
                Ok(None) => break None,
                Err(s) if crate::retry::transient(&s) => break Some(s),
                Err(s) => return Err(status_error(&what, &s)),
            }
        };
        let job = get(client, retry, job_id, false).await?;
        if job.status >= JobStatus::Done as i32 {
            return Ok(job);
        }
        let Some(wait) = backoff.next() else {
            let why = broke.map_or("the stream kept closing".to_owned(), |s| s.message().to_owned());
            bail!("job {job_id}: lost the watch stream before the job ended ({why})");
        };
        tracing::warn!(job_id, ?wait, "watch stream ended early; re-attaching");
        tokio::time::sleep(wait).await;
    }
}

/// Moves the bar for one event; the job when the event says it ended.
fn track(event: &JobEvent, steps: &mut HashMap<u32, (u64, u64)>, bar: &ProgressBar) -> Option<Job> {
    match &event.event {
        Some(Event::Queued(q)) => bar.set_message(format!("queued, {} ahead", q.position)),
        Some(Event::Started(s)) => bar.set_message(format!("running on {}", s.worker)),
        Some(Event::Progress(p)) => {
            let e = steps.entry(p.task_index).or_default();
            *e = (u64::from(p.step), u64::from(p.total));
        }
        Some(Event::Image(i)) => {
            let e = steps.entry(i.task_index).or_default();
            e.0 = e.1.max(1);
            e.1 = e.1.max(1);
        }
        Some(Event::Failed(f)) if f.will_retry => bar.set_message(format!("task {} retrying", f.task_index)),
        Some(Event::Failed(f)) => bar.set_message(format!("task {} failed: {}", f.task_index, f.message)),
        Some(Event::Done(d)) => return Some(d.job.clone().unwrap_or_default()),
        None => {}
    }
    let (pos, len) = steps.values().fold((0, 0), |(p, l), (s, t)| (p + s, l + t));
    if len > 0 {
        if bar.length() == Some(0) {
            bar.set_style(job_bar_style());
        }
        bar.set_length(len);
        bar.set_position(pos);
    }
    None
}

/// `GetJob`, retried while the coordinator is unavailable.
pub async fn get(client: &mut Coordinator, retry: Retry, job_id: &str, include_images: bool) -> Result<Job> {
    let request = GetJobRequest {
        job_id: job_id.to_owned(),
        include_images,
    };
    let what = format!("getting job {job_id}");
    let got = retry
        .call(&what, || {
            let mut c = client.clone();
            let r = request.clone();
            async move { c.get_job(r).await }
        })
        .await;
    got.map(tonic::Response::into_inner)
        .map_err(|s| status_error(&what, &s))
}

pub fn watch(a: WatchArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = a.connect.connect().await?;
        let bar = if bars_enabled(a.json) {
            job_bar("job")
        } else {
            ProgressBar::hidden()
        };
        let json = a.json;
        let retry = a.connect.retry();
        let job = follow(&mut client, retry, &a.job_id, &bar, &mut |e| {
            if json {
                println!("{}", event_json(e));
            }
        })
        .await?;
        bar.finish_and_clear();
        let mut written = Vec::new();
        if let Some(out) = &a.out {
            let full = get(&mut client, retry, &a.job_id, true).await?;
            for img in &full.images {
                let stem = format!("{}-{}-{}", a.job_id, img.request_index, img.sample_index);
                written.push(crate::outputs::write_image(
                    out,
                    &stem,
                    img,
                    &a.job_id,
                    &Default::default(),
                )?);
            }
        }
        if json {
            let files: Vec<Value> = written.iter().map(|w| w.to_json()).collect();
            println!("{}", json!({"job": job_json(&job), "images": files}));
        } else {
            for w in &written {
                println!("wrote {} (seed {})", w.png.display(), w.seed);
            }
            print_job_line(&job);
        }
        finished_ok(&job)
    })
}

/// An error unless the job ended DONE.
pub fn finished_ok(job: &Job) -> Result<()> {
    if job.status == JobStatus::Done as i32 {
        return Ok(());
    }
    bail!(
        "job {} ended {} ({} of {} tasks failed){}",
        job.job_id,
        status_name(job.status),
        job.failed_tasks,
        job.total_tasks,
        if job.error.is_empty() {
            String::new()
        } else {
            format!(": {}", job.error)
        }
    )
}

fn print_job_line(j: &Job) {
    println!(
        "{:<34} {:<10} {:>5}/{:<5} {:>6}  {}",
        j.job_id,
        status_name(j.status),
        j.done_tasks,
        j.total_tasks,
        j.failed_tasks,
        j.error
    );
}

pub fn jobs(a: JobsArgs) -> Result<()> {
    if !(1..=500).contains(&a.page_size) {
        bail!("`--page-size` must be in 1..=500, got {}", a.page_size);
    }
    runtime()?.block_on(async {
        let mut client = a.connect.connect().await?;
        let mut token = a.page_token.clone();
        let mut all = Vec::new();
        loop {
            let request = ListJobsRequest {
                page_size: a.page_size,
                page_token: token.clone(),
            };
            let page = client
                .list_jobs(request)
                .await
                .map_err(|s| status_error("listing jobs", &s))?
                .into_inner();
            all.extend(page.jobs);
            token = page.next_page_token;
            if !a.all || token.is_empty() {
                break;
            }
        }
        if a.json {
            let jobs: Vec<Value> = all.iter().map(job_json).collect();
            println!("{}", json!({"jobs": jobs, "next_page_token": token}));
        } else {
            println!(
                "{:<34} {:<10} {:>11} {:>6}  ERROR",
                "JOB", "STATUS", "DONE/TOTAL", "FAILED"
            );
            all.iter().for_each(print_job_line);
            if !token.is_empty() {
                println!("more: --page-token {token}");
            }
        }
        Ok(())
    })
}

pub fn cancel(a: CancelArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = a.connect.connect().await?;
        let job = client
            .cancel_job(CancelJobRequest {
                job_id: a.job_id.clone(),
            })
            .await
            .map_err(|s| status_error(&format!("cancelling job {}", a.job_id), &s))?
            .into_inner();
        if a.json {
            println!("{}", job_json(&job));
        } else {
            print_job_line(&job);
        }
        Ok(())
    })
}
