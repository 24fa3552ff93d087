//! Two coordinator replicas on one real redis-server and the same in-process workers: WatchJob and CancelJob of a
//! job reaching the replica that does not run it (as behind a Kubernetes Service).

use std::time::Duration;

use mip_proto::v1::job_event::Event;
use mip_proto::v1::{CancelJobRequest, Job, JobStatus, TaskStatus};
use mip_tests::*;

fn is_final(j: &Job) -> bool {
    [JobStatus::Done, JobStatus::Failed, JobStatus::Cancelled]
        .iter()
        .any(|s| j.status == *s as i32)
}

/// Short leases (renewal every 200 ms) and one slot per worker, so that a job's tasks run one after another.
fn edit(c: &mut mip_coordinator::config::CoordinatorConfig) {
    c.coordinator.lease_ms = 600;
    c.coordinator.worker_concurrency = 1;
}

async fn get(c: &mut Client, id: &str) -> Job {
    let req = mip_proto::v1::GetJobRequest {
        job_id: id.into(),
        include_images: true,
    };
    c.get_job(req).await.expect("get").into_inner()
}

async fn cancel_key_exists(redis: &RedisServer, id: &str) -> bool {
    let mut conn = redis_conn(redis).await;
    redis::cmd("EXISTS")
        .arg(format!("mip:coord:cancel:{id}"))
        .query_async::<i64>(&mut conn)
        .await
        .expect("exists")
        == 1
}

/// A cancelled job: CANCELLED, no task left open, and exactly its images recorded (none after the cancel).
async fn assert_cancelled(redis: &RedisServer, job: &Job, total: u32) {
    assert_eq!(job.status, JobStatus::Cancelled as i32, "{job:?}");
    let open = |s: i32| s == TaskStatus::Queued as i32 || s == TaskStatus::Running as i32;
    assert!(job.tasks.iter().all(|t| !open(t.status)), "{:?}", job.tasks);
    assert!(job.done_tasks < total, "cancelled before the end: {job:?}");
    assert_eq!(job.images.len() as u32, job.done_tasks);
    // Whatever was running when the job was cancelled is dropped, not recorded later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stored_results(redis, &job.job_id).await.len() as u32,
        job.done_tasks,
        "no image recorded after the cancel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_and_cancel_through_the_replica_not_running_the_job() {
    let redis = RedisServer::start();
    let ws = workers(1).await;
    let mut a = Coord::start(&ws, &redis, edit).await;
    let mut b = Coord::start(&ws, &redis, edit).await;

    // Watch through B a job running on A: every image, then Done.
    let submitted = submit(&mut a.client, job(20, 4, "")).await;
    let id = submitted.job_id.clone();
    let before = get(&mut b.client, &id).await;
    assert!(!is_final(&before), "still running when the watch starts: {before:?}");
    let (events, done) = watch_all(&mut b.client, &id).await;
    assert_eq!(done.status, JobStatus::Done as i32, "{done:?}");
    let images = images_by_task(&events);
    assert_eq!(images.keys().copied().collect::<Vec<u32>>(), vec![0, 1, 2, 3]);
    assert!(images.values().all(|w| w.len() == 1), "each image once: {images:?}");
    assert_eq!(get(&mut a.client, &id).await.status, JobStatus::Done as i32);

    // Cancel through B a job running on A.
    let long = submit_until_progress(&mut a.client, job(40, 6, "")).await;
    let answer = b
        .client
        .cancel_job(CancelJobRequest {
            job_id: long.job_id.clone(),
        })
        .await
        .expect("cancel through B")
        .into_inner();
    assert!(
        answer.status != JobStatus::Done as i32 && answer.status != JobStatus::Failed as i32,
        "{answer:?}"
    );
    assert!(cancel_key_exists(&redis, &long.job_id).await, "the request is recorded");
    let on_a = wait_job(&mut a.client, &long.job_id, is_final).await;
    assert_cancelled(&redis, &on_a, 6).await;
    let on_b = wait_job(&mut b.client, &long.job_id, is_final).await;
    assert_eq!(on_b.status, JobStatus::Cancelled as i32, "{on_b:?}");
    assert_eq!(on_b.done_tasks, on_a.done_tasks);
    let (_, watched) = watch_all(&mut b.client, &long.job_id).await;
    assert_eq!(watched.status, JobStatus::Cancelled as i32);

    b.stop().await;
    stop_all(a, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_recorded_while_the_owner_is_dead_is_honoured_on_resume() {
    let redis = RedisServer::start();
    let ws = workers(1).await;
    let mut a = KillableCoord::start(&ws, &redis, edit).await;
    let mut b = Coord::start(&ws, &redis, edit).await;
    let long = submit_until_progress(&mut a.client, job(40, 6, "")).await;
    a.kill();
    // A's lease still holds for a while, so B records the request rather than running the job.
    let answer = b
        .client
        .cancel_job(CancelJobRequest {
            job_id: long.job_id.clone(),
        })
        .await
        .expect("cancel through B")
        .into_inner();
    assert!(!is_final(&answer), "{answer:?}");
    let resumed = wait_job(&mut b.client, &long.job_id, is_final).await;
    assert_cancelled(&redis, &resumed, 6).await;
    // The watch of the now local (cancelled) job ends with Done(CANCELLED).
    let (events, watched) = watch_all(&mut b.client, &long.job_id).await;
    assert_eq!(watched.status, JobStatus::Cancelled as i32);
    assert!(
        events.iter().all(|e| !matches!(e.event, Some(Event::Started(_)))),
        "{events:?}"
    );
    stop_all(b, ws).await;
}
