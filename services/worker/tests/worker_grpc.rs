//! The worker over real gRPC on 127.0.0.1:0 with the fixture model and the memory cache only (no Redis):
//! readiness (NOT_SERVING until the model is loaded and warmed up), reflection, Info, the subject cache through
//! EncodeSubjects, streamed generation, deadlines, cancellation by dropping the stream, and a full queue.

use std::net::SocketAddr;
use std::time::Duration;

use mip_common::errors::reason_of;
use mip_proto::v1::{generate_event, CacheTier, EncodeSubjectsRequest, GenerateEvent, GenerateTask, Subject};
use mip_worker::testing::{collect, generate, image, info, task, TestWorker, BOUND};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn subject(name: &str, file: &str) -> Subject {
    mip_worker::testing::subject(name, vec![image(file)])
}

/// A worker with `capacity` queue slots; with `gate`, its model loads only when the returned sender fires.
async fn start(capacity: usize, gate: bool) -> (TestWorker, Option<oneshot::Sender<()>>) {
    let (tx, rx) = if gate {
        let (t, r) = oneshot::channel();
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    let w = TestWorker::start_with(|c| c.executor.queue_capacity = capacity, rx).await;
    (w, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reflection_info_cache_and_generation() {
    let (w, gate) = start(4, true).await;
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
        score: false,
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
    let (w, _) = start(2, false).await;
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
    let (w, _) = start(1, false).await;
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
    let (mut w, _) = start(2, false).await;
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
    w.request_stop();
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
