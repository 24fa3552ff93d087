//! Durable jobs against real workers and a real redis-server: every image recorded exactly once, a job surviving
//! the death of its coordinator (resumed by a new one after the lease expired), cancellation of queued and running
//! tasks, and deadlines that keep expired tasks off the workers.

use std::collections::BTreeSet;
use std::time::Duration;

use mip_proto::v1::job_event::Event;
use mip_proto::v1::{CancelJobRequest, Job, JobImage, JobStatus, ListJobsRequest, TaskStatus, WatchJobRequest};
use mip_tests::*;

fn indices(images: &[JobImage]) -> Vec<u32> {
    images.iter().map(|i| i.task_index).collect()
}

fn is_final(j: &Job) -> bool {
    [JobStatus::Done, JobStatus::Failed, JobStatus::Cancelled]
        .iter()
        .any(|s| j.status == *s as i32)
}

async fn is_active(redis: &RedisServer, id: &str) -> bool {
    let mut conn = redis_conn(redis).await;
    redis::cmd("SISMEMBER")
        .arg("mip:coord:active")
        .arg(id)
        .query_async(&mut conn)
        .await
        .expect("sismember")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twelve_images_each_exactly_once_over_several_workers() {
    let redis = RedisServer::start();
    let ws = workers(3).await;
    let mut coord = Coord::start(&ws, &redis, |_| {}).await;
    let submitted = submit(&mut coord.client, job(2, 12, "")).await;
    assert!(
        is_active(&redis, &submitted.job_id).await,
        "a running job is in mip:coord:active"
    );
    let (events, done) = watch_all(&mut coord.client, &submitted.job_id).await;
    assert_eq!(done.status, JobStatus::Done as i32, "{done:?}");
    let got = wait_job(&mut coord.client, &submitted.job_id, is_final).await;
    assert_eq!(indices(&got.images), (0..12).collect::<Vec<u32>>());
    let used: BTreeSet<&String> = got.images.iter().map(|i| &i.worker).collect();
    assert!(used.len() > 1, "images on more than one worker: {used:?}");
    let image_events = events
        .iter()
        .filter(|e| matches!(e.event, Some(Event::Image(_))))
        .count();
    assert_eq!(image_events, 12, "one image event per task");
    assert_eq!(
        stored_results(&redis, &submitted.job_id).await,
        (0..12).collect::<Vec<u32>>()
    );
    assert!(
        got.tasks.iter().all(|t| t.status == TaskStatus::Done as i32),
        "{:?}",
        got.tasks
    );
    // The Done event goes out before the final state is written, so wait (bounded) for the store to catch up.
    let released = tokio::time::timeout(BOUND, async {
        loop {
            let mut conn = redis_conn(&redis).await;
            let lease: Option<String> = redis::cmd("GET")
                .arg(format!("mip:coord:lease:{}", submitted.job_id))
                .query_async(&mut conn)
                .await
                .expect("get");
            if !is_active(&redis, &submitted.job_id).await && lease.is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        released.is_ok(),
        "a finished job leaves mip:coord:active and its lease is released"
    );
    stop_all(coord, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_coordinators_job_completes_on_a_new_one() {
    let redis = RedisServer::start();
    let ws = workers(3).await;
    let edit = |c: &mut mip_coordinator::config::CoordinatorConfig| {
        c.coordinator.lease_ms = 600;
        c.coordinator.worker_concurrency = 1;
    };
    let mut first = KillableCoord::start(&ws, &redis, edit).await;
    let submitted = submit(&mut first.client, job(12, 12, "")).await;
    let id = submitted.job_id.clone();
    // Kill it once some images are stored and others are not.
    let before = tokio::time::timeout(BOUND, async {
        loop {
            let stored = stored_results(&redis, &id).await;
            if stored.len() >= 2 {
                return stored;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("images stored");
    first.kill();
    let at_kill = stored_results(&redis, &id).await;
    assert!(at_kill.len() < 12, "killed mid-job: {at_kill:?}");
    assert!(is_active(&redis, &id).await, "the unfinished job stays active");
    let mut conn = redis_conn(&redis).await;
    let early: Vec<Vec<u8>> = redis::cmd("HMGET")
        .arg(format!("mip:coord:job:{id}:results"))
        .arg(&before)
        .query_async(&mut conn)
        .await
        .expect("hmget");

    let mut second = Coord::start(&ws, &redis, edit).await;
    let done = wait_job(&mut second.client, &id, is_final).await;
    assert_eq!(done.status, JobStatus::Done as i32, "{done:?}");
    assert_eq!(indices(&done.images), (0..12).collect::<Vec<u32>>(), "each image once");
    assert_eq!(stored_results(&redis, &id).await, (0..12).collect::<Vec<u32>>());
    assert!(
        done.tasks.iter().all(|t| t.status == TaskStatus::Done as i32),
        "{:?}",
        done.tasks
    );
    for (idx, raw) in before.iter().zip(early) {
        let img = <JobImage as prost::Message>::decode(raw.as_slice()).expect("image");
        assert_eq!(
            done.images[*idx as usize], img,
            "image {idx} from before the kill is kept"
        );
    }
    assert!(!is_active(&redis, &id).await);
    // A watch on the new coordinator replays the whole job.
    let (events, watched) = watch_all(&mut second.client, &id).await;
    assert_eq!(watched.status, JobStatus::Done as i32);
    assert_eq!(images_by_task(&events).len(), 12);
    stop_all(second, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_stops_queued_and_running_tasks() {
    let redis = RedisServer::start();
    let ws = workers(3).await;
    let mut coord = Coord::start(&ws, &redis, |c| c.coordinator.worker_concurrency = 1).await;
    // 3 slots, 9 tasks: some run, some wait.
    let long = submit_until_progress(&mut coord.client, job(40, 9, "")).await;
    let watch = coord
        .client
        .watch_job(WatchJobRequest {
            job_id: long.job_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let cancelled = coord
        .client
        .cancel_job(CancelJobRequest {
            job_id: long.job_id.clone(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.status, JobStatus::Cancelled as i32);
    let open = |s: i32| s == TaskStatus::Queued as i32 || s == TaskStatus::Running as i32;
    assert!(cancelled.tasks.iter().all(|t| !open(t.status)), "{:?}", cancelled.tasks);
    let cancelled_tasks: Vec<_> = cancelled
        .tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Cancelled as i32)
        .collect();
    assert!(
        cancelled_tasks.iter().any(|t| t.attempts >= 1),
        "a running task was cancelled: {:?}",
        cancelled.tasks
    );
    assert!(
        cancelled_tasks.iter().any(|t| t.attempts == 0),
        "a queued task was cancelled: {:?}",
        cancelled.tasks
    );
    // The watch ends with Done(CANCELLED), and nothing after it.
    let (events, done) = read_to_done(watch).await;
    assert_eq!(done.status, JobStatus::Cancelled as i32);
    let images_before: usize = images_by_task(&events).len();
    assert_eq!(images_before as u32, done.done_tasks);
    // The running generations end on the workers as failures (cancelled), not as images.
    let running = cancelled_tasks.iter().filter(|t| t.attempts >= 1).count() as u64;
    let (gens, failed) = tokio::time::timeout(BOUND, async {
        loop {
            let (g, f) = generation_counts(&ws).await;
            if f >= running {
                return (g, f);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the running generations were cancelled on the workers");
    assert!(failed >= running, "{gens} generations, {failed} failed");
    let after = wait_job(&mut coord.client, &long.job_id, is_final).await;
    assert_eq!(after.done_tasks, done.done_tasks, "no image arrived after the cancel");
    assert_eq!(after.images.len() as u32, done.done_tasks);
    assert_eq!(stored_results(&redis, &long.job_id).await.len() as u32, done.done_tasks);
    stop_all(coord, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_deadline_is_never_sent_to_a_worker() {
    let redis = RedisServer::start();
    let ws = workers(3).await;
    let mut coord = Coord::start(&ws, &redis, |c| c.coordinator.worker_concurrency = 1).await;
    // Every slot busy with a long task.
    let busy = submit(&mut coord.client, job(30, 3, "")).await;
    wait_job(&mut coord.client, &busy.job_id, |j| {
        j.tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Running as i32)
            .count()
            == 3
    })
    .await;

    // SubmitJob.deadline_ms.
    let mut short = job(2, 1, "");
    short.deadline_ms = 300;
    short.priority = 10;
    let short = submit(&mut coord.client, short).await;
    let (events, done) = watch_all(&mut coord.client, &short.job_id).await;
    assert_eq!(done.status, JobStatus::Failed as i32, "{done:?}");
    assert_eq!(done.tasks[0].status, TaskStatus::Failed as i32);
    assert_eq!(done.tasks[0].attempts, 0, "never sent: {:?}", done.tasks[0]);
    assert!(events
        .iter()
        .any(|e| matches!(&e.event, Some(Event::Failed(f)) if f.code == "DeadlineExceeded" && !f.will_retry)));

    // The Generate call's own gRPC deadline.
    let mut req = tonic::Request::new(request(2, cat()));
    req.set_timeout(Duration::from_millis(300));
    let err = coord.client.generate(req).await.expect_err("deadline");
    // The client enforces the timeout too (tonic answers CANCELLED "Timeout expired" when it gets there first).
    assert!(
        matches!(err.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled),
        "{err:?}"
    );
    let listed = coord
        .client
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let generate_job = listed
        .jobs
        .iter()
        .find(|j| j.job_id != busy.job_id && j.job_id != short.job_id)
        .expect("the Generate job")
        .job_id
        .clone();
    let g = wait_job(&mut coord.client, &generate_job, is_final).await;
    assert_eq!(g.status, JobStatus::Failed as i32, "{g:?}");
    assert_eq!(g.tasks[0].attempts, 0, "never sent: {:?}", g.tasks[0]);

    // Only the busy job's three generations ever ran.
    let busy_done = wait_job(&mut coord.client, &busy.job_id, is_final).await;
    assert_eq!(busy_done.status, JobStatus::Done as i32, "{busy_done:?}");
    assert_eq!(generation_counts(&ws).await, (3, 0));
    stop_all(coord, ws).await;
}
