//! Fenced job state on a real Redis, step by step: the store calls two coordinators make when the first one is
//! paused past its lease and the second claims the job. The stale owner's writes of the job's state and of its
//! results are refused (and nothing it wrote lands), its renewal reports the lease lost, and its release leaves
//! the new owner's lease alone. A Redis restarted empty fails writes (the token is gone) until the owner's
//! renewal takes the job back with its token, after which the full state can be written again.

use std::time::Duration;

use mip_coordinator::store::{Fence, JobStore, NewClaim, Recorded, RedisStore, Renewal, Write};
use mip_proto::v1::{Job, JobImage, JobStatus, SubmitJobRequest};
use mip_tests::RedisServer;

const LEASE: Duration = Duration::from_millis(300);
const TTL: Duration = Duration::from_secs(600);

fn job(id: &str, status: JobStatus, done: u32) -> Job {
    Job {
        job_id: id.to_owned(),
        status: status as i32,
        total_tasks: 2,
        done_tasks: done,
        created_at_ms: 1,
        ..Default::default()
    }
}

fn image(task: u32, worker: &str) -> JobImage {
    JobImage {
        task_index: task,
        worker: worker.to_owned(),
        png: vec![1, 2, 3],
        ..Default::default()
    }
}

async fn claim_new(s: &RedisStore, id: &str, key: Option<&str>, owner: &str) -> Fence {
    match s.claim_new(id, key, owner, LEASE).await.expect("claim_new") {
        NewClaim::Claimed(f) => f,
        NewClaim::Existing(other) => panic!("{id} should be new, the key names {other}"),
    }
}

#[tokio::test]
async fn a_stale_owner_cannot_overwrite_the_new_owners_state() {
    let redis = RedisServer::start();
    let a = RedisStore::connect(&redis.url(), None, TTL).await.expect("store a");
    let b = RedisStore::connect(&redis.url(), None, TTL).await.expect("store b");
    let spec = SubmitJobRequest {
        idempotency_key: "k1".into(),
        ..Default::default()
    };
    let fa = claim_new(&a, "j1", Some("k1"), "A").await;
    assert_eq!(
        b.claim_new("j2", Some("k1"), "B", LEASE).await.expect("claim"),
        NewClaim::Existing("j1".into()),
        "the key is bound to the job being created"
    );
    assert_eq!(
        a.create(&fa, &job("j1", JobStatus::Running, 0), &spec, &[])
            .await
            .expect("create"),
        Write::Done
    );
    assert_eq!(
        a.write_result(&fa, &image(0, "a")).await.expect("result"),
        Recorded::New
    );
    assert_eq!(b.claim("j1", "B", LEASE).await.expect("claim"), None, "A holds it");
    assert_eq!(
        a.claim("j1", "A", LEASE).await.expect("claim"),
        None,
        "a held lease is not claimed again, not even by its owner"
    );

    // A is paused past its lease; B takes the job over with a newer token.
    tokio::time::sleep(LEASE * 2).await;
    let fb = b
        .claim("j1", "B", LEASE)
        .await
        .expect("claim")
        .expect("lapsed: B claims it");
    assert!(fb.token > fa.token, "{fb:?} after {fa:?}");

    // A wakes up: every write it tries is refused, renewal says lost, release leaves B's lease.
    assert_eq!(
        a.write_job(&fa, &job("j1", JobStatus::Failed, 0)).await.expect("write"),
        Write::Fenced
    );
    assert_eq!(
        a.write_result(&fa, &image(1, "a")).await.expect("result"),
        Recorded::Fenced
    );
    assert_eq!(
        a.create(&fa, &job("j1", JobStatus::Failed, 0), &spec, &[])
            .await
            .expect("create"),
        Write::Fenced
    );
    assert_eq!(
        a.renew(std::slice::from_ref(&fa), LEASE).await.expect("renew"),
        [Renewal::Lost]
    );
    a.release(&fa).await.expect("release");
    assert_eq!(
        b.renew(std::slice::from_ref(&fb), LEASE).await.expect("renew"),
        [Renewal::Held]
    );

    // B's writes land; the image A recorded while it was the owner stands.
    assert_eq!(
        b.write_result(&fb, &image(0, "b")).await.expect("result"),
        Recorded::Existing(Box::new(image(0, "a")))
    );
    assert_eq!(
        b.write_result(&fb, &image(1, "b")).await.expect("result"),
        Recorded::New
    );
    assert_eq!(
        b.write_job(&fb, &job("j1", JobStatus::Done, 2)).await.expect("write"),
        Write::Done
    );
    let stored = b.load_job("j1", true).await.expect("load").expect("stored");
    assert_eq!(stored.status, JobStatus::Done as i32);
    assert_eq!(stored.done_tasks, 2);
    let workers: Vec<&str> = stored.images.iter().map(|i| i.worker.as_str()).collect();
    assert_eq!(workers, ["a", "b"]);
    assert!(
        a.active_ids().await.expect("active").is_empty(),
        "a done job is not active"
    );
}

#[tokio::test]
async fn a_redis_restarted_empty_is_written_again_by_the_owner() {
    let mut redis = RedisServer::start();
    let a = RedisStore::connect(&redis.url(), None, TTL).await.expect("store");
    let f = claim_new(&a, "j1", None, "A").await;
    let spec = SubmitJobRequest::default();
    a.create(&f, &job("j1", JobStatus::Running, 0), &spec, &[])
        .await
        .expect("create");
    redis.restart();
    // The connection manager reconnects; the first command may still fail on the dead connection.
    let mut written = None;
    for _ in 0..50 {
        match a.write_job(&f, &job("j1", JobStatus::Running, 1)).await {
            Err(e) => written = Some(e.to_string()),
            Ok(w) => panic!("a write without the job's token must fail, got {w:?}"),
        }
        if written.as_deref().is_some_and(|e| e.contains("lost job")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = written.expect("an error");
    assert!(e.contains("lost job `j1`"), "{e}");
    assert!(a.write_result(&f, &image(0, "a")).await.is_err(), "results too");
    assert_eq!(
        a.renew(std::slice::from_ref(&f), LEASE).await.expect("renew"),
        [Renewal::Reclaimed]
    );
    assert_eq!(a.write_result(&f, &image(0, "a")).await.expect("result"), Recorded::New);
    assert_eq!(
        a.create(&f, &job("j1", JobStatus::Running, 1), &spec, &[])
            .await
            .expect("create"),
        Write::Done
    );
    let stored = a
        .load_stored("j1")
        .await
        .expect("load")
        .expect("spec and state written again");
    assert_eq!((stored.job.done_tasks, stored.images.len()), (1, 1));
    assert_eq!(a.active_ids().await.expect("active"), ["j1"]);
    assert_eq!(
        a.renew(std::slice::from_ref(&f), LEASE).await.expect("renew"),
        [Renewal::Held]
    );
}
