//! A coordinator stopping (SIGTERM in `mip serve`, the shutdown future of `server::run` here) drains: health turns
//! NOT_SERVING, SubmitJob is refused with UNAVAILABLE `draining` while reads and watches are still served, and
//! the jobs running there finish. When `server.drain_seconds` runs out first, the unfinished jobs are handed
//! over: their tasks stop there and their leases are released, so another replica resumes them at its next scan
//! instead of after the lease (600 s here, longer than any wait of these tests) would have lapsed.

use mip_common::errors::reason_of;
use mip_proto::v1::{JobStatus, WatchJobRequest};
use mip_tests::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn health(coord: &Coord) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", coord.addr))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "mip.v1.Coordinator".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("known status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_coordinator_refuses_new_jobs_and_finishes_running_ones() {
    let redis = RedisServer::start();
    let ws = workers(1).await;
    let mut coord = Coord::start(&ws, &redis, |c| c.server.drain_seconds = 120).await;
    assert_eq!(health(&coord).await, ServingStatus::Serving);
    let running = submit_until_progress(&mut coord.client, job(50, 6, "")).await;
    let mut watch = coord
        .client
        .watch_job(WatchJobRequest {
            job_id: running.job_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    coord.request_stop();
    tokio::time::timeout(BOUND, async {
        while health(&coord).await != ServingStatus::NotServing {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("NOT_SERVING while draining");
    assert!(
        !coord.is_stopped(),
        "the drain ended early; stored images: {:?}",
        stored_results(&redis, &running.job_id).await
    );
    let e = coord.client.submit_job(job(1, 1, "")).await.expect_err("draining");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(reason_of(&e).as_deref(), Some("draining"), "{e:?}");
    assert!(e.message().contains("draining"), "{}", e.message());
    assert!(!coord.is_stopped(), "a job is still running");
    // The watch opened before the drain sees the job to its end.
    let mut last = None;
    while let Some(ev) = watch.message().await.expect("watch stream") {
        last = Some(ev);
    }
    let done = match last.and_then(|e| e.event) {
        Some(mip_proto::v1::job_event::Event::Done(d)) => d.job.expect("job"),
        other => panic!("the watch ended without Done: {other:?}"),
    };
    assert_eq!(done.status, JobStatus::Done as i32, "{done:?}");
    assert_eq!(done.done_tasks, 6);
    assert_eq!(
        stored_results(&redis, &running.job_id).await,
        (0..6).collect::<Vec<u32>>()
    );
    coord.stopped().await;
    for w in ws {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_left_at_the_end_of_a_drain_are_resumed_by_another_replica_at_once() {
    let redis = RedisServer::start();
    let ws = workers(1).await;
    let long_lease = |c: &mut mip_coordinator::config::CoordinatorConfig| {
        c.server.drain_seconds = 0;
        c.coordinator.lease_ms = 600_000;
    };
    let mut first = Coord::start(&ws, &redis, long_lease).await;
    let job_id = submit_until_progress(&mut first.client, job(8, 6, "")).await.job_id;
    first.stop().await;
    let left = stored_results(&redis, &job_id).await;
    assert!(left.len() < 6, "the job was unfinished at the stop: {left:?}");

    let mut second = Coord::start(&ws, &redis, long_lease).await;
    let (_, done) = watch_all(&mut second.client, &job_id).await;
    assert_eq!(done.status, JobStatus::Done as i32, "{done:?}");
    assert_eq!(stored_results(&redis, &job_id).await, (0..6).collect::<Vec<u32>>());
    second.stop().await;
    for w in ws {
        w.stop().await;
    }
}
