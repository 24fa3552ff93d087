//! `mip submit MANIFEST --coordinator URL --out DIR [--concurrency N] [--json]`: runs every item of a JSONL or
//! YAML manifest (see [`crate::manifest`]) on the cluster, `--concurrency` jobs at a time, and writes each image
//! as `{key}-{sample}.png` + `.json` where `key` comes from the item's idempotency key.
//!
//! Bad items are reported with their line and skipped; the rest still run. Resumable: an item whose outputs all
//! exist is skipped, any other is submitted with its idempotency key, so a job left running by an interrupted run
//! is re-attached, not generated again (a job that had failed is retried under a derived key). Progress: one
//! overall bar and one per job in flight (stderr terminals only, never with `--json`). At the end a summary
//! (done / skipped / failed / bad), and a non-zero exit when anything failed or was bad.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use mip_proto::v1::{Job, JobStatus, SubmitJobRequest};
use serde_json::{json, Map, Value};

use crate::client::{runtime, status_error, ConnectArgs, Coordinator};
use crate::jobs;
use crate::manifest::{self, Entry, Ready};
use crate::retry::Retry;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The manifest: .jsonl / .ndjson (one request per line) or .yaml / .yml (a sequence of requests).
    manifest: PathBuf,
    #[command(flatten)]
    connect: ConnectArgs,
    /// Output folder (also how a re-run knows what is done).
    #[arg(long)]
    out: PathBuf,
    /// Jobs in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// One JSON line per item and a final summary line, no progress bars.
    #[arg(long)]
    json: bool,
}

/// What became of an item.
enum Outcome {
    Done { job_id: String, images: Vec<Value> },
    Skipped(String),
    Failed { job_id: Option<String>, error: String },
    Bad(String),
}

/// Prints item lines (above the bars) and counts outcomes.
struct Report {
    json: bool,
    yaml: bool,
    multi: MultiProgress,
    counts: HashMap<&'static str, usize>,
}

impl Report {
    fn item(&mut self, entry: &Entry, outcome: &Outcome) {
        let (word, detail, mut value) = match outcome {
            Outcome::Done { job_id, images } => {
                let files: Vec<&str> = images.iter().filter_map(|i| i["png"].as_str()).collect();
                ("done", files.join(" "), json!({"job_id": job_id, "images": images}))
            }
            Outcome::Skipped(why) => ("skipped", why.clone(), json!({"reason": why})),
            Outcome::Failed { job_id, error } => ("failed", error.clone(), json!({"job_id": job_id, "error": error})),
            Outcome::Bad(error) => ("bad", error.clone(), json!({"error": error})),
        };
        *self.counts.entry(word).or_default() += 1;
        if let Value::Object(m) = &mut value {
            m.insert("event".into(), json!(word));
            m.insert("line".into(), json!(entry.line));
            m.insert("index".into(), json!(entry.index));
            if let Ok(r) = &entry.item {
                m.insert("key".into(), json!(r.key));
            }
        }
        let text = format!("{word} {}: {detail}", entry.place(self.yaml));
        let json_mode = self.json;
        self.multi.suspend(|| {
            if json_mode {
                println!("{value}");
            } else {
                println!("{text}");
            }
        });
    }

    fn count(&self, word: &str) -> usize {
        self.counts.get(word).copied().unwrap_or(0)
    }
}

pub fn run(a: Args) -> Result<()> {
    if !(1..=256).contains(&a.concurrency) {
        bail!("`--concurrency` must be in 1..=256, got {}", a.concurrency);
    }
    let yaml = manifest::is_yaml(&a.manifest)?;
    let entries = manifest::read(&a.manifest)?;
    let bars = jobs::bars_enabled(a.json);
    let multi = MultiProgress::with_draw_target(if bars {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let mut report = Report {
        json: a.json,
        yaml,
        multi,
        counts: HashMap::new(),
    };
    // Bad items, finished items and repeats are settled before connecting.
    let mut todo = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for entry in &entries {
        let outcome = match &entry.item {
            Err(e) => Some(Outcome::Bad(e.clone())),
            Ok(r) => match seen.insert(r.key.clone(), entry.line) {
                Some(first) => Some(Outcome::Skipped(format!("same request as line {first}"))),
                None if outputs_exist(&a.out, r) => Some(Outcome::Skipped("outputs exist".into())),
                None => None,
            },
        };
        match outcome {
            Some(o) => report.item(entry, &o),
            None => todo.push(entry),
        }
    }
    if !todo.is_empty() {
        runtime()?.block_on(run_items(&a, &todo, &mut report))?;
    }
    let (done, skipped, failed, bad) = (
        report.count("done"),
        report.count("skipped"),
        report.count("failed"),
        report.count("bad"),
    );
    if a.json {
        let s = json!({"event": "summary", "items": entries.len(), "done": done, "skipped": skipped,
            "failed": failed, "bad": bad});
        println!("{s}");
    } else {
        println!(
            "{} items: {done} done, {skipped} skipped, {failed} failed, {bad} bad",
            entries.len()
        );
    }
    if failed + bad > 0 {
        bail!("{failed} failed and {bad} bad of {} items", entries.len());
    }
    Ok(())
}

/// Runs the items `concurrency` at a time, reporting each as it ends.
async fn run_items(a: &Args, todo: &[&Entry], report: &mut Report) -> Result<()> {
    let client = a.connect.connect().await?;
    let overall = report.multi.add(ProgressBar::new(todo.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} items {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#>-"),
    );
    overall.set_prefix("submit");
    let multi = report.multi.clone();
    let yaml = report.yaml;
    let mut results = futures::stream::iter(todo.iter().copied())
        .map(|entry| {
            let mut client = client.clone();
            let bar = multi.insert_before(&overall, jobs::job_bar(entry.place(yaml)));
            async move {
                let outcome = match &entry.item {
                    Ok(ready) => run_one(&mut client, a, entry, ready, &bar).await,
                    Err(e) => Outcome::Bad(e.clone()),
                };
                bar.finish_and_clear();
                (entry, outcome)
            }
        })
        .buffer_unordered(a.concurrency);
    while let Some((entry, outcome)) = results.next().await {
        overall.inc(1);
        report.item(entry, &outcome);
    }
    overall.finish_and_clear();
    Ok(())
}

/// Submit (re-attaching by idempotency key), follow, write the images.
async fn run_one(client: &mut Coordinator, a: &Args, entry: &Entry, ready: &Ready, bar: &ProgressBar) -> Outcome {
    let job = match submit(client, a.connect.retry(), ready.job.clone()).await {
        Ok(j) => j,
        Err(e) => {
            return Outcome::Failed {
                job_id: None,
                error: format!("{e:#}"),
            }
        }
    };
    let failed = |error: anyhow::Error| Outcome::Failed {
        job_id: Some(job.job_id.clone()),
        error: format!("{error:#}"),
    };
    let retry = a.connect.retry();
    let done = match jobs::follow(client, retry, &job.job_id, bar, &mut |_| {}).await {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    if let Err(e) = jobs::finished_ok(&done) {
        return failed(e);
    }
    let full = match jobs::get(client, retry, &job.job_id, true).await {
        Ok(f) => f,
        Err(e) => return failed(e),
    };
    let mut extra = Map::new();
    extra.insert("negative_prompt".into(), json!(ready.item.negative_prompt));
    extra.insert("subjects".into(), json!(ready.item.subjects));
    // Absolute, so a reader of the sidecar (`mip eval`) finds the manifest's relative image paths from anywhere.
    let manifest = std::fs::canonicalize(&a.manifest).unwrap_or_else(|_| a.manifest.clone());
    extra.insert("manifest".into(), json!(manifest));
    extra.insert("line".into(), json!(entry.line));
    extra.insert("idempotency_key".into(), json!(ready.job.idempotency_key));
    let mut images = Vec::new();
    for img in &full.images {
        match crate::outputs::write_image(&a.out, &ready.stem(img), img, &job.job_id, &extra) {
            Ok(w) => images.push(w.to_json()),
            Err(e) => return failed(e),
        }
    }
    if images.len() != ready.outputs().len() {
        return failed(anyhow::anyhow!(
            "the job returned {} images, expected {}",
            images.len(),
            ready.outputs().len()
        ));
    }
    Outcome::Done {
        job_id: job.job_id,
        images,
    }
}

/// SubmitJob, retried while the coordinator is unavailable or its queue is full (safe: the item's idempotency key
/// makes a repeated submission return the first job); a job that already ended badly under this key is retried under
/// a key derived from it (so a re-run re-attaches to the retry, too).
async fn submit(client: &mut Coordinator, retry: Retry, mut request: SubmitJobRequest) -> Result<Job> {
    for _ in 0..4 {
        let submitted = retry
            .call("submitting", || {
                let mut c = client.clone();
                let r = request.clone();
                async move { c.submit_job(r).await }
            })
            .await;
        let job = submitted.map_err(|s| status_error("submitting", &s))?.into_inner();
        let ended_badly = job.status == JobStatus::Failed as i32 || job.status == JobStatus::Cancelled as i32;
        if !ended_badly {
            return Ok(job);
        }
        request.idempotency_key = format!("{}/retry-{}", request.idempotency_key, job.job_id);
    }
    bail!("the job failed on every retry")
}

/// Whether every sample's PNG and sidecar are in `out`.
fn outputs_exist(out: &Path, r: &Ready) -> bool {
    r.outputs().all(|k| {
        let (png, json) = crate::outputs::paths(out, &r.stem_at(k));
        png.is_file() && json.is_file()
    })
}
