//! `mip workers --coordinator URL [--json]`: the coordinator's view (`ListWorkers`: health, load, limit, last
//! error and each worker's `Info`). `mip workers --workers URL[,URL…] [--json]`: calls `Info` on each worker
//! directly. Both print a table, or a JSON array with each worker's model, device, queue and counters. In the
//! direct mode unreachable workers are listed with their error, and make the command fail after printing.

use std::time::Duration;

use anyhow::{bail, Result};
use mip_proto::v1::{InfoRequest, ListWorkersRequest, WorkerInfo, WorkerStatus};
use serde_json::{json, Value};

use crate::client::{normalize, status_error, ConnectArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Worker addresses (`host:port` or `http://host:port`), comma separated: ask them directly.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "coordinator",
        conflicts_with = "coordinator"
    )]
    workers: Vec<String>,
    #[command(flatten)]
    connect: ConnectArgs,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for each worker.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

pub fn run(a: Args) -> Result<()> {
    let rt = crate::client::runtime()?;
    if a.connect.coordinator.is_some() {
        return rt.block_on(from_coordinator(&a));
    }
    let timeout = Duration::from_secs(a.timeout);
    let results: Vec<(String, Result<WorkerInfo, String>)> = rt.block_on(async {
        let mut out = Vec::with_capacity(a.workers.len());
        for w in &a.workers {
            let url = normalize(w);
            out.push((url.clone(), info(&a.connect, &url, timeout).await));
        }
        out
    });
    if a.json {
        let rows: Vec<Value> = results.iter().map(|(url, r)| to_json(url, r)).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&results);
    }
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if failed > 0 {
        bail!("{failed} of {} workers did not answer", results.len());
    }
    Ok(())
}

async fn info(connect: &ConnectArgs, url: &str, timeout: Duration) -> Result<WorkerInfo, String> {
    let mut client = connect
        .connect_worker(url, timeout)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let call = tokio::time::timeout(timeout, client.info(InfoRequest {}));
    match call.await {
        Err(_) => Err(format!("no answer in {} s", timeout.as_secs())),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// `ListWorkers` on the coordinator, printed.
async fn from_coordinator(a: &Args) -> Result<()> {
    let mut client = a.connect.connect().await?;
    let workers = client
        .list_workers(ListWorkersRequest {})
        .await
        .map_err(|s| status_error("listing workers", &s))?
        .into_inner()
        .workers;
    if a.json {
        let rows: Vec<Value> = workers.iter().map(status_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_status_table(&workers);
    }
    Ok(())
}

/// A worker as the coordinator sees it: health and load, plus its `Info` (with counters) when known.
fn status_json(w: &WorkerStatus) -> Value {
    let mut v = match &w.info {
        Some(i) => to_json(&w.url, &Ok(i.clone())),
        None => json!({"url": w.url, "ok": false}),
    };
    if let Value::Object(m) = &mut v {
        m.insert("healthy".into(), json!(w.healthy));
        m.insert("load".into(), json!(w.load));
        m.insert("limit".into(), json!(w.limit));
        m.insert("last_error".into(), json!(w.last_error));
    }
    v
}

fn print_status_table(workers: &[WorkerStatus]) {
    println!(
        "{:<28} {:<8} {:>7} {:<16} {:<10} {:<8} {:>9} {:>16} {:>7} {:>11}  LAST ERROR",
        "URL", "HEALTHY", "LOAD", "WORKER", "VARIANT", "DEVICE", "ENCODER", "HITS MEM/REDIS", "MISSES", "GENERATED"
    );
    for w in workers {
        let i = w.info.clone().unwrap_or_default();
        let c = i.counters.unwrap_or_default();
        println!(
            "{:<28} {:<8} {:>7} {:<16} {:<10} {:<8} {:>9} {:>16} {:>7} {:>11}  {}",
            w.url,
            if w.healthy { "yes" } else { "no" },
            format!("{}/{}", w.load, w.limit),
            i.worker_id,
            i.variant,
            i.device,
            c.image_encoder_calls,
            format!("{}/{}", c.subject_hits_memory, c.subject_hits_redis),
            c.subject_misses,
            format!("{}/{}", c.generations, c.generations + c.failed_generations),
            w.last_error
        );
    }
}

fn to_json(url: &str, r: &Result<WorkerInfo, String>) -> Value {
    match r {
        Err(e) => json!({ "url": url, "ok": false, "error": e }),
        Ok(i) => {
            let c = i.counters.unwrap_or_default();
            json!({
                "url": url,
                "ok": true,
                "worker_id": i.worker_id,
                "model": i.model,
                "variant": i.variant,
                "device": i.device,
                "dtype": i.dtype,
                "ready": i.ready,
                "capacity": i.capacity,
                "queue_depth": i.queue_depth,
                "num_tokens": i.num_tokens,
                "counters": {
                    "image_encoder_calls": c.image_encoder_calls,
                    "subject_hits_memory": c.subject_hits_memory,
                    "subject_hits_redis": c.subject_hits_redis,
                    "subject_misses": c.subject_misses,
                    "text_hits_memory": c.text_hits_memory,
                    "text_hits_redis": c.text_hits_redis,
                    "text_misses": c.text_misses,
                    "redis_errors": c.redis_errors,
                    "corrupt_entries": c.corrupt_entries,
                    "generations": c.generations,
                    "failed_generations": c.failed_generations,
                    "reference_hits_memory": c.reference_hits_memory,
                    "reference_hits_redis": c.reference_hits_redis,
                    "reference_misses": c.reference_misses,
                },
                "scoring": i.scoring,
            })
        }
    }
}

fn print_table(results: &[(String, Result<WorkerInfo, String>)]) {
    println!(
        "{:<28} {:<16} {:<6} {:<10} {:<8} {:<5} {:>9} {:>9} {:>16} {:>7} {:>11}",
        "URL",
        "WORKER",
        "READY",
        "VARIANT",
        "DEVICE",
        "DTYPE",
        "QUEUE",
        "ENCODER",
        "HITS MEM/REDIS",
        "MISSES",
        "GENERATED"
    );
    for (url, r) in results {
        match r {
            Err(e) => println!("{url:<28} unreachable: {e}"),
            Ok(i) => {
                let c = i.counters.unwrap_or_default();
                println!(
                    "{:<28} {:<16} {:<6} {:<10} {:<8} {:<5} {:>9} {:>9} {:>16} {:>7} {:>11}",
                    url,
                    i.worker_id,
                    if i.ready { "yes" } else { "no" },
                    i.variant,
                    i.device,
                    i.dtype,
                    format!("{}/{}", i.queue_depth, i.capacity),
                    c.image_encoder_calls,
                    format!("{}/{}", c.subject_hits_memory, c.subject_hits_redis),
                    c.subject_misses,
                    format!("{}/{}", c.generations, c.generations + c.failed_generations),
                );
            }
        }
    }
}
