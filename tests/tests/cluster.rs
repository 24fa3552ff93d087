//! The coordinator against real workers: a real redis-server, in-process workers on the fixture model (64x64,
//! few steps) and the coordinator on 127.0.0.1:0, driven over gRPC.

use std::collections::{BTreeMap, BTreeSet};

use mip_proto::v1::job_event::Event;
use mip_proto::v1::{
    CancelJobRequest, GetJobRequest, JobStatus, ListJobsRequest, ListWorkersRequest, SubmitJobRequest, WatchJobRequest,
};
use mip_tests::*;
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_images_spread_watch_idempotency_and_restart() {
    let redis = RedisServer::start();
    let ws = workers(3).await;
    let mut coord = Coord::start(&ws, &redis, |_| {}).await;
    let submitted = submit(&mut coord.client, job(2, 6, "k-1")).await;
    assert_eq!(submitted.total_tasks, 6);
    let (events, done) = watch_all(&mut coord.client, &submitted.job_id).await;
    assert_eq!(done.status, JobStatus::Done as i32, "{done:?}");
    let images = images_by_task(&events);
    assert_eq!(images.keys().copied().collect::<Vec<_>>(), (0..6).collect::<Vec<u32>>());
    assert!(images.values().all(|w| w.len() == 1), "each image once: {images:?}");
    let used: BTreeSet<&String> = images.values().flatten().collect();
    assert!(used.len() > 1, "images spread over workers: {used:?}");
    assert!(events.iter().any(|e| matches!(e.event, Some(Event::Progress(_)))));
    assert!(events.iter().any(|e| matches!(e.event, Some(Event::Started(_)))));
    let seeds: Vec<u64> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Image(i)) => Some((i.task_index, i.seed)),
            _ => None,
        })
        .collect::<BTreeMap<u32, u64>>()
        .into_values()
        .collect();
    assert_eq!(
        seeds,
        (10..16).collect::<Vec<u64>>(),
        "seed = request seed + sample index"
    );

    let again = submit(&mut coord.client, job(2, 6, "k-1")).await;
    assert_eq!(again.job_id, submitted.job_id);
    let listed = coord
        .client
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs.len(), 1);

    // The spec is in Redis next to the job.
    let mut conn = redis_conn(&redis).await;
    let key = format!("mip:coord:job:{}", submitted.job_id);
    let spec: Vec<u8> = redis::cmd("HGET")
        .arg(&key)
        .arg("spec")
        .query_async(&mut conn)
        .await
        .expect("hget");
    let spec = <SubmitJobRequest as prost::Message>::decode(spec.as_slice()).expect("spec decodes");
    assert_eq!((spec.requests.len(), spec.samples), (1, 6));

    // A fresh coordinator on the same Redis still knows the finished job and its images.
    coord.stop().await;
    let mut coord = Coord::start(&ws, &redis, |_| {}).await;
    let req = GetJobRequest {
        job_id: submitted.job_id.clone(),
        include_images: true,
    };
    let got = coord.client.get_job(req).await.expect("get after restart").into_inner();
    assert_eq!(got.status, JobStatus::Done as i32);
    let idx: Vec<u32> = got.images.iter().map(|i| i.task_index).collect();
    assert_eq!(idx, (0..6).collect::<Vec<u32>>());
    let same = submit(&mut coord.client, job(2, 6, "k-1")).await;
    assert_eq!(same.job_id, submitted.job_id);
    stop_all(coord, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_worker_does_not_stop_the_job() {
    let redis = RedisServer::start();
    // No drain: stopping a worker cuts its running task, which must go to another worker.
    let mut ws = workers_with(3, no_drain).await;
    let mut coord = Coord::start(&ws, &redis, |c| c.coordinator.worker_concurrency = 1).await;
    let submitted = submit(&mut coord.client, job(20, 6, "")).await;
    let mut s = coord
        .client
        .watch_job(WatchJobRequest {
            job_id: submitted.job_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    // Stop the worker of the first task to make progress, while that task runs.
    let mut workers_of = BTreeMap::new();
    let (victim, victim_task) = tokio::time::timeout(BOUND, async {
        loop {
            match s.message().await.expect("ok").expect("event").event {
                Some(Event::Started(t)) => {
                    workers_of.insert(t.task_index, t.worker);
                }
                Some(Event::Progress(p)) => return (workers_of[&p.task_index].clone(), p.task_index),
                Some(Event::Done(d)) => panic!("done before any progress: {d:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("a task makes progress");
    let pos = ws
        .iter()
        .position(|w| victim.ends_with(&w.addr.to_string()))
        .expect("victim is ours");
    let dead = ws.remove(pos);
    dead.stop().await;
    let (events, done) = read_to_done(s).await;
    assert_eq!(done.status, JobStatus::Done as i32, "{done:?}");
    let images = images_by_task(&events);
    assert_eq!(images.len(), 6, "{images:?}");
    assert!(images.values().all(|w| w.len() == 1), "each image once: {images:?}");
    assert_ne!(images[&victim_task][0], victim, "the cut task was retried elsewhere");
    let retried = events
        .iter()
        .any(|e| matches!(&e.event, Some(Event::Failed(f)) if f.task_index == victim_task && f.will_retry));
    assert!(retried, "a retry event for task {victim_task}");
    stop_all(coord, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_affinity_generate_and_queue_limit() {
    let redis = RedisServer::start();
    let ws = workers(3).await;
    let mut coord = Coord::start(&ws, &redis, |c| {
        c.coordinator.worker_concurrency = 1;
        c.coordinator.max_queued_tasks = 12;
    })
    .await;

    // Cancel a long job after its first progress event.
    let long = submit_until_progress(&mut coord.client, job(30, 6, "")).await;
    let req = CancelJobRequest {
        job_id: long.job_id.clone(),
    };
    let cancelled = coord.client.cancel_job(req).await.expect("cancel").into_inner();
    assert_eq!(cancelled.status, JobStatus::Cancelled as i32);
    let (_, done) = watch_all(&mut coord.client, &long.job_id).await;
    assert_eq!(done.status, JobStatus::Cancelled as i32);
    assert!(done.done_tasks < 6, "cancelled before the end: {done:?}");

    // The queue limit: 13 tasks > 12.
    let err = coord.client.submit_job(job(2, 13, "")).await.expect_err("queue full");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");

    // Affinity: the same subjects go back to the worker that served them.
    let subjects = || vec![subject("jacket", vec![image("jacket_0.png")])];
    let mut first_worker = None;
    for round in 0..3 {
        let req = SubmitJobRequest {
            requests: vec![request(2, subjects())],
            samples: 1,
            ..Default::default()
        };
        let j = submit(&mut coord.client, req).await;
        let (events, done) = watch_all(&mut coord.client, &j.job_id).await;
        assert_eq!(done.status, JobStatus::Done as i32, "{done:?}");
        let w = images_by_task(&events).remove(&0).expect("image").remove(0);
        match &first_worker {
            None => first_worker = Some(w),
            Some(f) => assert_eq!(&w, f, "round {round}"),
        }
    }

    // Generate: submit and wait.
    let r = coord
        .client
        .generate(request(2, cat()))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(r.images.len(), 1);
    assert!(r.images[0].png.starts_with(b"\x89PNG"));
    assert_eq!(r.images[0].seed, 10);
    stop_all(coord, ws).await;
}

#[tokio::test]
async fn no_worker_deadline_and_validation() {
    let redis = RedisServer::start();
    // Nothing listens on a port just bound and released: the worker never turns healthy.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let mut coord = Coord::start_urls(vec![dead], 0, &redis, |_| {}).await;
    let mut req = job(2, 2, "");
    req.deadline_ms = 200;
    let j = submit(&mut coord.client, req).await;
    let (events, done) = watch_all(&mut coord.client, &j.job_id).await;
    assert_eq!(done.status, JobStatus::Failed as i32, "{done:?}");
    assert_eq!(done.failed_tasks, 2);
    assert!(events
        .iter()
        .any(|e| matches!(&e.event, Some(Event::Failed(f)) if f.code == "DeadlineExceeded" && !f.will_retry)));
    let workers = coord
        .client
        .list_workers(ListWorkersRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(!workers.workers[0].healthy && !workers.workers[0].last_error.is_empty());

    let mut empty = job(2, 1, "");
    empty.requests.clear();
    let e = coord.client.submit_job(empty).await.expect_err("no requests");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("requests"), "{}", e.message());
    let e = coord
        .client
        .get_job(GetJobRequest {
            job_id: "nope".into(),
            include_images: false,
        })
        .await
        .expect_err("unknown job");
    assert_eq!(e.code(), tonic::Code::NotFound);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_job_goes_first() {
    let redis = RedisServer::start();
    let ws = workers(1).await;
    let mut coord = Coord::start(&ws, &redis, |c| c.coordinator.worker_concurrency = 1).await;
    // One slot: one low task runs, seven wait (without priorities the high task would win the slot 1 time in 8).
    let low = submit_until_progress(&mut coord.client, job(30, 8, "")).await;
    let mut high = job(2, 1, "");
    high.priority = 5;
    let high = submit(&mut coord.client, high).await;
    let (_, done) = watch_all(&mut coord.client, &high.job_id).await;
    assert_eq!(done.status, JobStatus::Done as i32);
    let req = GetJobRequest {
        job_id: low.job_id.clone(),
        include_images: false,
    };
    let low_now = coord.client.get_job(req).await.expect("get").into_inner();
    assert!(
        low_now.done_tasks <= 1,
        "the high job ran before the waiting low tasks: {low_now:?}"
    );
    coord
        .client
        .cancel_job(CancelJobRequest { job_id: low.job_id })
        .await
        .expect("cancel");
    stop_all(coord, ws).await;
}
