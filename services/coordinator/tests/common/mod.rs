//! Shared helpers of the coordinator's integration tests: a real redis-server, in-process workers on the fixture
//! model (64x64, few steps) and coordinators on 127.0.0.1:0 (in the test's runtime, or in a runtime of their own
//! that can be killed), driven over gRPC.

#[path = "../../../worker/tests/support/redis.rs"]
pub mod redis_support;
#[path = "../../../worker/tests/support/worker.rs"]
pub mod worker_support;

use std::collections::BTreeMap;
use std::time::Duration;

use mip_coordinator::config::CoordinatorConfig;
use mip_proto::v1::coordinator_client::CoordinatorClient;
use mip_proto::v1::job_event::Event;
use mip_proto::v1::{GenerationRequest, Job, JobEvent, ListWorkersRequest, Subject, SubmitJobRequest, WatchJobRequest};
pub use redis_support::RedisServer;
use tokio::sync::oneshot;
use tonic::transport::Channel;
pub use worker_support::{image, TestWorker, BOUND};

pub struct Coord {
    pub client: CoordinatorClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Coord {
    pub async fn start(
        workers: &[&TestWorker],
        redis: &RedisServer,
        edit: impl FnOnce(&mut CoordinatorConfig),
    ) -> Self {
        let urls = workers.iter().map(|w| format!("http://{}", w.addr)).collect();
        Self::start_urls(urls, workers.len(), redis, edit).await
    }

    /// A coordinator over `urls`, once `healthy` of them are healthy.
    pub async fn start_urls(
        urls: Vec<String>,
        healthy: usize,
        redis: &RedisServer,
        edit: impl FnOnce(&mut CoordinatorConfig),
    ) -> Self {
        let cfg = config(urls, redis, edit);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mip_coordinator::server::run(cfg, listener, async {
            let _ = stopped.await;
        }));
        let client = connect(addr).await;
        let mut c = Self {
            client,
            stop: Some(stop),
            task,
        };
        c.wait_healthy(healthy).await;
        c
    }

    pub async fn wait_healthy(&mut self, n: usize) {
        tokio::time::timeout(BOUND, async {
            loop {
                let w = self
                    .client
                    .list_workers(ListWorkersRequest {})
                    .await
                    .expect("list workers");
                if w.into_inner().workers.iter().filter(|w| w.healthy).count() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("workers healthy");
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = tokio::time::timeout(BOUND, self.task).await.expect("stops in time");
        r.expect("join").expect("run returns Ok");
    }
}

pub async fn workers(n: usize) -> Vec<TestWorker> {
    workers_with(n, |_| {}).await
}

pub async fn workers_with(n: usize, edit: impl Fn(&mut mip_worker::config::WorkerConfig)) -> Vec<TestWorker> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestWorker::start(&edit).await);
    }
    for w in &out {
        w.wait_serving().await;
    }
    out
}

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

pub fn cat() -> Vec<Subject> {
    vec![worker_support::subject("cat", vec![image("cat_0.png")])]
}

pub fn job(steps: u32, samples: u32, key: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        requests: vec![request(steps, cat())],
        samples,
        priority: 0,
        idempotency_key: key.into(),
        deadline_ms: 0,
    }
}

/// Every event of a job until Done (bounded), and the final job.
pub async fn watch_all(c: &mut CoordinatorClient<Channel>, id: &str) -> (Vec<JobEvent>, Job) {
    let s = c
        .watch_job(WatchJobRequest { job_id: id.into() })
        .await
        .expect("watch")
        .into_inner();
    read_to_done(s).await
}

/// Submits `job` and waits (bounded) until one of its tasks reports progress; returns the job.
pub async fn submit_until_progress(c: &mut CoordinatorClient<Channel>, job: SubmitJobRequest) -> Job {
    let submitted = c.submit_job(job).await.expect("submit").into_inner();
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

/// The test configuration: `urls`, fast health polling, `redis`, then `edit`.
pub fn config(urls: Vec<String>, redis: &RedisServer, edit: impl FnOnce(&mut CoordinatorConfig)) -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::default();
    cfg.coordinator.workers = urls;
    cfg.coordinator.health_interval_ms = 100;
    cfg.redis.url = redis.url();
    edit(&mut cfg);
    cfg
}

/// A client of the coordinator at `addr`, once it accepts (bounded).
pub async fn connect(addr: std::net::SocketAddr) -> CoordinatorClient<Channel> {
    let url = format!("http://{addr}");
    tokio::time::timeout(BOUND, async {
        loop {
            if let Ok(c) = CoordinatorClient::connect(url.clone()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("coordinator reachable")
}

/// A coordinator in a tokio runtime of its own, so that [`kill`](Self::kill) can end it (and every task it
/// spawned) at once, as a crash would: nothing of it runs afterwards and nothing is cleaned up.
pub struct KillableCoord {
    pub client: CoordinatorClient<Channel>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl KillableCoord {
    pub async fn start(
        workers: &[&TestWorker],
        redis: &RedisServer,
        edit: impl FnOnce(&mut CoordinatorConfig),
    ) -> Self {
        let urls = workers.iter().map(|w| format!("http://{}", w.addr)).collect();
        let cfg = config(urls, redis, edit);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("coordinator runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            mip_coordinator::server::run(cfg, listener, std::future::pending::<()>()).await
        });
        let mut c = Self {
            client: connect(addr).await,
            runtime: Some(runtime),
        };
        c.wait_healthy(workers.len()).await;
        c
    }

    async fn wait_healthy(&mut self, n: usize) {
        tokio::time::timeout(BOUND, async {
            loop {
                let w = self
                    .client
                    .list_workers(ListWorkersRequest {})
                    .await
                    .expect("list workers");
                if w.into_inner().workers.iter().filter(|w| w.healthy).count() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("workers healthy");
    }

    /// Ends the coordinator's runtime without waiting for anything (its connections drop with it).
    pub fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for KillableCoord {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
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

/// Polls GetJob (bounded) until `done` holds for the job; returns it with its images.
pub async fn wait_job(c: &mut CoordinatorClient<Channel>, id: &str, done: impl Fn(&Job) -> bool) -> Job {
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

/// (generations, failed generations) summed over the workers' Info counters.
pub async fn generation_counts(ws: &[TestWorker]) -> (u64, u64) {
    let mut total = (0, 0);
    for w in ws {
        let info = worker_support::info(&mut w.client().await).await;
        let c = info.counters.unwrap_or_default();
        total.0 += c.generations;
        total.1 += c.failed_generations;
    }
    total
}
