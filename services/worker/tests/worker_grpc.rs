//! The worker over real gRPC on 127.0.0.1:0 with the fixture model and the memory cache only (no Redis):
//! readiness (NOT_SERVING until the model is loaded and warmed up), reflection, Info, the subject cache through
//! EncodeSubjects, streamed generation, deadlines, cancellation by dropping the stream, and a full queue.

use std::net::SocketAddr;
use std::time::Duration;

use mip_common::errors::reason_of;
use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{
    generate_event, CacheTier, EncodeSubjectsRequest, GenerateEvent, GenerateTask, GenerationRequest, InfoRequest,
    Subject, WorkerInfo,
};
use mip_worker::config::WorkerConfig;
use mip_worker::server::{run_with, RunOptions};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Upper bound of any wait in these tests (model load on a slow machine included).
const BOUND: Duration = Duration::from_secs(120);

struct Worker {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// Starts a worker on the fixture model; with `gate`, loading waits until the returned sender fires.
    async fn start(capacity: usize, gate: bool) -> (Self, Option<oneshot::Sender<()>>) {
        let fixtures = mip_worker::parity::fixtures_dir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = serde_json::json!({
            "base": fixtures.join("sdxl"),
            "image_encoder": fixtures.join("image_encoder"),
            "adapter": fixtures.join("adapter/mip_sdxl_2obj.safetensors"),
            "default_size": [64, 64],
        });
        std::fs::write(dir.path().join("mip.json"), manifest.to_string()).expect("manifest");
        let mut config = WorkerConfig::default();
        config.model.path = dir.path().display().to_string();
        config.executor.queue_capacity = capacity;
        config.server.drain_seconds = 10;
        config.server.worker_id = "test-worker".into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let (gate_tx, gate_rx) = if gate {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let opts = RunOptions {
            load_gate: gate_rx,
            metrics: None,
        };
        let task = tokio::spawn(run_with(
            config,
            listener,
            async {
                let _ = stopped.await;
            },
            opts,
        ));
        let w = Self {
            addr,
            stop: Some(stop),
            task,
            _dir: dir,
        };
        (w, gate_tx)
    }

    async fn client(&self) -> WorkerClient<Channel> {
        let url = format!("http://{}", self.addr);
        let ch = tokio::time::timeout(BOUND, async {
            loop {
                if let Ok(c) = Channel::from_shared(url.clone()).expect("url").connect().await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("worker reachable");
        WorkerClient::new(ch)
    }

    async fn health(&self) -> ServingStatus {
        let ch = Channel::from_shared(format!("http://{}", self.addr))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: "mip.v1.Worker".into(),
            })
            .await
            .expect("health check");
        r.into_inner().status()
    }

    async fn wait_serving(&self) {
        tokio::time::timeout(BOUND, async {
            while self.health().await != ServingStatus::Serving {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("SERVING within the bound");
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = tokio::time::timeout(BOUND, self.task).await.expect("stops in time");
        r.expect("join").expect("run returns Ok");
    }
}

fn image(name: &str) -> Vec<u8> {
    let p = mip_worker::parity::fixtures_dir()
        .unwrap_or_else(|e| panic!("{e}"))
        .join("cases/sdxl_two_objects/refs")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn subject(name: &str, file: &str) -> Subject {
    Subject {
        name: name.into(),
        images: vec![image(file)],
        subject_key: String::new(),
    }
}

fn task(side: u32, steps: u32, subjects: Vec<Subject>) -> GenerateTask {
    GenerateTask {
        task_id: "t".into(),
        request: Some(GenerationRequest {
            prompt: "a cat wearing a jacket".into(),
            subjects,
            width: side,
            height: side,
            steps,
            seed: Some(3),
            ..Default::default()
        }),
    }
}

async fn info(c: &mut WorkerClient<Channel>) -> WorkerInfo {
    c.info(InfoRequest {}).await.expect("info").into_inner()
}

/// Reads a whole Generate stream: the progress steps seen and the final image event or the error.
async fn collect(mut s: Streaming<GenerateEvent>) -> (Vec<u32>, Result<mip_proto::v1::Image, tonic::Status>) {
    let mut steps = Vec::new();
    loop {
        match tokio::time::timeout(BOUND, s.message()).await.expect("stream bounded") {
            Ok(Some(GenerateEvent {
                event: Some(generate_event::Event::Progress(p)),
            })) => steps.push(p.step),
            Ok(Some(GenerateEvent {
                event: Some(generate_event::Event::Image(img)),
            })) => return (steps, Ok(img)),
            Ok(Some(_)) => panic!("empty event"),
            Ok(None) => return (steps, Err(tonic::Status::internal("stream ended without an image"))),
            Err(e) => return (steps, Err(e)),
        }
    }
}

async fn generate(
    c: &mut WorkerClient<Channel>,
    t: GenerateTask,
) -> (Vec<u32>, Result<mip_proto::v1::Image, tonic::Status>) {
    match c.generate(t).await {
        Ok(s) => collect(s.into_inner()).await,
        Err(e) => (Vec::new(), Err(e)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reflection_info_cache_and_generation() {
    let (w, gate) = Worker::start(4, true).await;
    let mut c = w.client().await;
    assert_eq!(
        w.health().await,
        ServingStatus::NotServing,
        "not serving before the model is loaded"
    );
    assert!(!info(&mut c).await.ready);
    let e = c
        .generate(task(64, 2, vec![subject("cat", "cat_0.png")]))
        .await
        .expect_err("not ready");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(reason_of(&e).as_deref(), Some("not_ready"));

    gate.expect("gate").send(()).expect("open the gate");
    w.wait_serving().await;

    // Reflection lists the worker service.
    let services = reflection_services(w.addr).await;
    assert!(services.iter().any(|s| s == "mip.v1.Worker"), "{services:?}");

    let i = info(&mut c).await;
    assert!(i.ready);
    assert_eq!(
        (i.variant.as_str(), i.device.as_str(), i.dtype.as_str()),
        ("sdxl", "cpu", "f32")
    );
    assert_eq!(i.worker_id, "test-worker");
    assert_eq!(i.capacity, 4);
    assert!(i.num_tokens > 0 && !i.model.is_empty());
    let calls0 = i.counters.expect("counters").image_encoder_calls;

    // EncodeSubjects twice: a miss that runs the encoder, then a memory hit that does not.
    let req = EncodeSubjectsRequest {
        subjects: vec![subject("cat", "cat_0.png")],
    };
    let first = c.encode_subjects(req.clone()).await.expect("encode").into_inner();
    assert_eq!(first.subjects[0].tier(), CacheTier::Miss);
    let calls1 = info(&mut c).await.counters.expect("counters").image_encoder_calls;
    assert_eq!(calls1, calls0 + 1);
    let second = c.encode_subjects(req).await.expect("encode again").into_inner();
    assert_eq!(second.subjects[0].tier(), CacheTier::Memory);
    assert_eq!(second.subjects[0].subject_key, first.subjects[0].subject_key);
    let counters = info(&mut c).await.counters.expect("counters");
    assert_eq!(
        counters.image_encoder_calls, calls1,
        "a hit must not run the image encoder"
    );
    assert!(counters.subject_hits_memory >= 1 && counters.subject_misses >= 1);

    // Generate: one Progress per step, then a decodable PNG of the requested size.
    let (steps, img) = generate(&mut c, task(64, 3, vec![subject("cat", "cat_0.png")])).await;
    let img = img.expect("image");
    assert_eq!(steps, vec![1, 2, 3]);
    let png = image::load_from_memory(&img.png).expect("PNG");
    assert_eq!((png.width(), png.height(), img.width, img.height), (64, 64, 64, 64));
    assert_eq!(img.seed, 3);
    assert_eq!(img.subjects[0].tier(), CacheTier::Memory, "the cat was encoded above");

    // The same subject by key only (no images), and a non-square size.
    let by_key = Subject {
        name: "cat".into(),
        images: Vec::new(),
        subject_key: first.subjects[0].subject_key.clone(),
    };
    let mut t = task(64, 2, vec![by_key]);
    if let Some(r) = t.request.as_mut() {
        r.width = 96;
    }
    let (steps, img) = generate(&mut c, t).await;
    let img = img.expect("image by key");
    assert_eq!(steps.len(), 2);
    assert_eq!((img.width, img.height), (96, 64));
    let counters = info(&mut c).await.counters.expect("counters");
    assert_eq!(counters.image_encoder_calls, calls1);
    assert_eq!(counters.generations, 2);
    w.stop().await;
}

async fn reflection_services(addr: SocketAddr) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let ch = Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream
        .message()
        .await
        .expect("reflection message")
        .expect("one response");
    match resp.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection response {other:?}"),
    }
}

/// A long generation: many steps at the largest test size, so deadlines and drops land mid-work.
fn slow_task() -> GenerateTask {
    task(128, 100, vec![subject("cat", "cat_0.png")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_and_dropped_stream_cancel_the_work() {
    let (w, _) = Worker::start(2, false).await;
    w.wait_serving().await;
    let mut c = w.client().await;

    // A deadline shorter than the work.
    let mut req = tonic::Request::new(slow_task());
    req.set_timeout(Duration::from_millis(300));
    let (_, r) = match c.generate(req).await {
        Ok(s) => collect(s.into_inner()).await,
        Err(e) => (Vec::new(), Err(e)),
    };
    let e = r.expect_err("the deadline passes first");
    assert!(matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled), "{e:?}");

    // Dropping a stream mid-way cancels it.
    let before = info(&mut c).await.counters.expect("counters");
    let mut s = c.generate(slow_task()).await.expect("admitted").into_inner();
    let first = tokio::time::timeout(BOUND, s.message())
        .await
        .expect("bounded")
        .expect("event");
    assert!(matches!(
        first,
        Some(GenerateEvent {
            event: Some(generate_event::Event::Progress(_))
        })
    ));
    drop(s);
    tokio::time::timeout(BOUND, async {
        loop {
            let i = info(&mut c).await;
            let n = i.counters.expect("counters");
            if n.failed_generations > before.failed_generations && i.queue_depth == 0 {
                assert_eq!(
                    n.generations, before.generations,
                    "the dropped generation did not finish"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the dropped generation is cancelled");

    // The worker stays healthy: a quick request succeeds.
    assert_eq!(w.health().await, ServingStatus::Serving);
    let (_, img) = generate(&mut c, task(64, 2, vec![subject("cat", "cat_0.png")])).await;
    img.expect("a quick request after the cancellations");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_rejects_with_resource_exhausted() {
    let (w, _) = Worker::start(1, false).await;
    w.wait_serving().await;
    let mut c = w.client().await;

    // One running (first progress seen), one admitted waiting: capacity 1 is used up.
    let mut running = c.generate(slow_task()).await.expect("first admitted").into_inner();
    tokio::time::timeout(BOUND, running.message())
        .await
        .expect("bounded")
        .expect("progress");
    let waiting = c
        .generate(slow_task())
        .await
        .expect("second admitted (queued)")
        .into_inner();
    let mut rejected = 0;
    for _ in 0..3 {
        match c.generate(slow_task()).await {
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert_eq!(reason_of(&e).as_deref(), Some("queue_full"));
                rejected += 1;
            }
            Ok(s) => drop(s),
        }
    }
    assert!(rejected >= 1, "a full queue must reject");
    drop(running);
    drop(waiting);
    tokio::time::timeout(BOUND, async {
        while info(&mut c).await.queue_depth > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the queue empties");
    let (_, img) = generate(&mut c, task(64, 2, vec![subject("cat", "cat_0.png")])).await;
    img.expect("room again");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_running_work() {
    let (mut w, _) = Worker::start(2, false).await;
    w.wait_serving().await;
    let mut c = w.client().await;
    let mut running = c
        .generate(task(128, 30, vec![subject("cat", "cat_0.png")]))
        .await
        .expect("admitted")
        .into_inner();
    tokio::time::timeout(BOUND, running.message())
        .await
        .expect("bounded")
        .expect("progress");

    // Shutdown requested: health turns NOT_SERVING and new work is refused, but the running generation finishes.
    if let Some(s) = w.stop.take() {
        let _ = s.send(());
    }
    tokio::time::timeout(BOUND, async {
        while w.health().await != ServingStatus::NotServing {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("NOT_SERVING while draining");
    let e = c
        .generate(task(64, 2, vec![subject("cat", "cat_0.png")]))
        .await
        .expect_err("draining");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(reason_of(&e).as_deref(), Some("draining"));
    let (steps, img) = collect(running).await;
    img.expect("the running generation completes during the drain");
    assert_eq!(steps.last(), Some(&30));
    w.stop().await;
}
