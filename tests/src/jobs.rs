//! Requests, jobs and what the tests read back: builders of small (64x64) requests, watch streams read to their
//! Done event, GetJob polled until a state, the Redis records of a job, the workers' counters and a plain HTTP GET
//! (metrics). Every wait is bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use mip_proto::v1::job_event::Event;
use mip_proto::v1::{GenerationRequest, Job, JobEvent, Subject, SubmitJobRequest, WatchJobRequest};

use crate::{image, subject, Client, RedisServer, TestWorker, BOUND};

/// A 64x64 request of `steps` steps about `subjects`, seed 10.
pub fn request(steps: u32, subjects: Vec<Subject>) -> GenerationRequest {
    GenerationRequest {
        prompt: "a cat wearing a jacket".into(),
        subjects,
        width: 64,
        height: 64,
        steps,
        seed: Some(10),
        ..Default::default()
    }
}

/// The fixture's cat.
pub fn cat() -> Vec<Subject> {
    vec![subject("cat", vec![image("cat_0.png")])]
}

/// `samples` images of the cat in `steps` steps, with idempotency key `key` (empty: none).
pub fn job(steps: u32, samples: u32, key: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        requests: vec![request(steps, cat())],
        samples,
        priority: 0,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Submits `req`, which must be accepted; the job as submitted.
pub async fn submit(c: &mut Client, req: SubmitJobRequest) -> Job {
    c.submit_job(req).await.expect("submit").into_inner()
}

/// Every event of a job until Done (bounded), and the final job.
pub async fn watch_all(c: &mut Client, id: &str) -> (Vec<JobEvent>, Job) {
    let s = c
        .watch_job(WatchJobRequest { job_id: id.into() })
        .await
        .expect("watch")
        .into_inner();
    read_to_done(s).await
}

/// The rest of a watch stream, until Done (bounded).
pub async fn read_to_done(mut s: tonic::Streaming<JobEvent>) -> (Vec<JobEvent>, Job) {
    let mut events = Vec::new();
    loop {
        let e = tokio::time::timeout(BOUND, s.message())
            .await
            .expect("event in time")
            .expect("stream ok")
            .expect("stream ends only after Done");
        if let Some(Event::Done(d)) = &e.event {
            let job = d.job.clone().expect("job");
            events.push(e);
            return (events, job);
        }
        events.push(e);
    }
}

/// Submits `samples` 2-step images of `subjects` and watches the job to its end; returns the final status and the
/// workers of the images in the order they came.
pub async fn run_job(c: &mut Client, subjects: Vec<Subject>, samples: u32, deadline_ms: u64) -> (i32, Vec<String>) {
    let req = SubmitJobRequest {
        requests: vec![request(2, subjects)],
        samples,
        deadline_ms,
        ..Default::default()
    };
    let job = submit(c, req).await;
    let (events, done) = watch_all(c, &job.job_id).await;
    let workers = events
        .into_iter()
        .filter_map(|e| match e.event {
            Some(Event::Image(i)) => Some(i.worker),
            _ => None,
        })
        .collect();
    (done.status, workers)
}

/// Submits `job` and waits (bounded) until one of its tasks reports progress; returns the job.
pub async fn submit_until_progress(c: &mut Client, job: SubmitJobRequest) -> Job {
    let submitted = submit(c, job).await;
    let req = WatchJobRequest {
        job_id: submitted.job_id.clone(),
    };
    let mut s = c.watch_job(req).await.expect("watch").into_inner();
    tokio::time::timeout(BOUND, async {
        while !matches!(
            s.message().await.expect("ok").expect("event").event,
            Some(Event::Progress(_))
        ) {}
    })
    .await
    .expect("progress");
    submitted
}

/// task index → worker of the image events.
pub fn images_by_task(events: &[JobEvent]) -> BTreeMap<u32, Vec<String>> {
    let mut m: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for e in events {
        if let Some(Event::Image(i)) = &e.event {
            assert!(i.png.starts_with(b"\x89PNG"), "png bytes");
            m.entry(i.task_index).or_default().push(i.worker.clone());
        }
    }
    m
}

/// Polls GetJob (bounded) until `done` holds for the job; returns it with its images.
pub async fn wait_job(c: &mut Client, id: &str, done: impl Fn(&Job) -> bool) -> Job {
    tokio::time::timeout(BOUND, async {
        loop {
            let req = mip_proto::v1::GetJobRequest {
                job_id: id.into(),
                include_images: true,
            };
            if let Ok(j) = c.get_job(req).await {
                let j = j.into_inner();
                if done(&j) {
                    return j;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("job state reached in time")
}

/// A connection to the test Redis.
pub async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// The task indices recorded in the job's Redis results hash.
pub async fn stored_results(redis: &RedisServer, job_id: &str) -> Vec<u32> {
    let mut conn = redis_conn(redis).await;
    let mut keys: Vec<u32> = redis::cmd("HKEYS")
        .arg(format!("mip:coord:job:{job_id}:results"))
        .query_async(&mut conn)
        .await
        .expect("hkeys");
    keys.sort_unstable();
    keys
}

/// (generations, failed generations) summed over the workers' Info counters.
pub async fn generation_counts(ws: &[TestWorker]) -> (u64, u64) {
    let mut total = (0, 0);
    for w in ws {
        let info = mip_worker::testing::info(&mut w.client().await).await;
        let c = info.counters.unwrap_or_default();
        total.0 += c.generations;
        total.1 += c.failed_generations;
    }
    total
}

/// A GET over plain HTTP/1.1; the whole response.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(BOUND, fetch).await.expect("http in time")
}
