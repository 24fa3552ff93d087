//! `mip workers --workers URL[,URL…] [--json]`: calls `Info` on each worker and prints a table, or a JSON array with
//! each worker's model, device, queue and counters. Unreachable workers are listed with their error, and make the
//! command fail after printing.

use std::time::Duration;

use anyhow::{bail, Result};
use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{InfoRequest, WorkerInfo};
use serde_json::{json, Value};
use tonic::transport::Endpoint;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Worker addresses (`host:port` or `http://host:port`), comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    workers: Vec<String>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for each worker.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

pub fn run(a: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let timeout = Duration::from_secs(a.timeout);
    let results: Vec<(String, Result<WorkerInfo, String>)> = rt.block_on(async {
        let mut out = Vec::with_capacity(a.workers.len());
        for w in &a.workers {
            let url = if w.contains("://") {
                w.clone()
            } else {
                format!("http://{w}")
            };
            out.push((url.clone(), info(&url, timeout).await));
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

async fn info(url: &str, timeout: Duration) -> Result<WorkerInfo, String> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("bad address: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint.connect().await.map_err(|e| format!("cannot connect: {e}"))?;
    let r = WorkerClient::new(channel)
        .info(InfoRequest {})
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(r.into_inner())
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
                },
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
