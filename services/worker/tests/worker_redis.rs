//! Workers sharing a real Redis: a subject encoded by one worker is a Redis hit for a freshly started one (whose
//! image encoder never runs); the same pixels in other encodings share a key; Redis stopped mid-test does not stop
//! generation and its use comes back with Redis; a corrupted value is re-encoded; eight concurrent requests for one
//! new subject encode it once.

use std::io::Cursor;
use std::time::Duration;

use mip_common::testing::RedisServer;
use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{CacheTier, EncodeSubjectsRequest, EncodedSubject, Subject};
use mip_worker::testing::{generate, image, info, subject, task, TestWorker, BOUND};
use redis::AsyncCommands;
use tonic::transport::Channel;

async fn encode(c: &mut WorkerClient<Channel>, s: Subject) -> EncodedSubject {
    let r = c
        .encode_subjects(EncodeSubjectsRequest {
            subjects: vec![s],
            score: false,
        })
        .await
        .expect("encode")
        .into_inner();
    r.subjects.into_iter().next().expect("one subject back")
}

async fn worker(redis: &RedisServer) -> TestWorker {
    let url = redis.url();
    let w = TestWorker::start(|c| {
        c.redis.url = url;
        c.redis.timeout_ms = 200;
    })
    .await;
    w.wait_serving().await;
    w
}

/// The cat reference re-encoded: `format` BMP, or PNG at another compression level.
fn reencode(bytes: &[u8], format: &str) -> Vec<u8> {
    let img = image::load_from_memory(bytes).expect("decodable");
    let mut out = Vec::new();
    match format {
        "bmp" => img
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Bmp)
            .expect("bmp"),
        _ => {
            let enc = image::codecs::png::PngEncoder::new_with_quality(
                &mut out,
                image::codecs::png::CompressionType::Best,
                image::codecs::png::FilterType::Paeth,
            );
            img.write_with_encoder(enc).expect("png");
        }
    }
    assert_ne!(out, bytes, "the re-encoding must differ in bytes");
    out
}

/// A new, distinct reference image for each `seed`.
fn fresh_image(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(80, 72, |x, y| {
        image::Rgb([seed.wrapping_mul(37), (x * 3) as u8, (y * 5) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("png");
    out
}

async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis.url()).expect("url");
    client.get_multiplexed_async_connection().await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_worker_hits_redis_and_never_runs_its_encoder() {
    let redis = RedisServer::start();
    let a = worker(&redis).await;
    let first = encode(&mut a.client().await, subject("cat", vec![image("cat_0.png")])).await;
    assert_eq!(first.tier(), CacheTier::Miss);
    let b = worker(&redis).await;
    let mut bc = b.client().await;
    let second = encode(&mut bc, subject("cat", vec![image("cat_0.png")])).await;
    assert_eq!(second.subject_key, first.subject_key);
    assert_eq!(second.tier(), CacheTier::Redis);
    let counters = info(&mut bc).await.counters.expect("counters");
    assert_eq!(counters.image_encoder_calls, 0, "{counters:?}");
    assert_eq!(counters.subject_hits_redis, 1, "{counters:?}");
    // A whole generation on B with the same subject still needs no image encoding.
    let (_, img) = generate(&mut bc, task(64, 2, vec![subject("cat", vec![image("cat_0.png")])])).await;
    img.expect("generation on the second worker");
    assert_eq!(info(&mut bc).await.counters.expect("counters").image_encoder_calls, 0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_pixels_in_other_encodings_share_a_key() {
    let redis = RedisServer::start();
    let w = worker(&redis).await;
    let mut c = w.client().await;
    let png = image("cat_0.png");
    let first = encode(&mut c, subject("cat", vec![png.clone()])).await;
    for format in ["bmp", "png-best"] {
        let again = encode(&mut c, subject("cat", vec![reencode(&png, format)])).await;
        assert_eq!(again.subject_key, first.subject_key, "{format}");
        assert_eq!(again.tier(), CacheTier::Memory, "{format}");
    }
    let other = encode(&mut c, subject("cat", vec![image("jacket_0.png")])).await;
    assert_ne!(other.subject_key, first.subject_key);
    assert_eq!(info(&mut c).await.counters.expect("counters").image_encoder_calls, 2);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_degrades_then_recovers() {
    let mut redis = RedisServer::start();
    let a = worker(&redis).await;
    let mut ac = a.client().await;
    encode(&mut ac, subject("cat", vec![fresh_image(1)])).await;
    redis.stop();
    // Generation with a subject never seen goes on without Redis.
    let (steps, img) = generate(&mut ac, task(64, 2, vec![subject("dog", vec![fresh_image(2)])])).await;
    assert_eq!(steps, vec![1, 2]);
    img.expect("generation succeeds while Redis is down");
    let counters = info(&mut ac).await.counters.expect("counters");
    assert!(counters.redis_errors > 0, "{counters:?}");
    redis.restart();
    // Once reconnected, new subjects reach Redis again (bounded wait for the background reconnect).
    let mut conn = raw(&redis).await;
    let (seed, key) = tokio::time::timeout(Duration::from_secs(30), async {
        for seed in 10u8.. {
            let e = encode(&mut ac, subject("hat", vec![fresh_image(seed)])).await;
            let exists: bool = conn.exists(&e.subject_key).await.expect("EXISTS");
            if exists {
                return (seed, e.subject_key);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        unreachable!()
    })
    .await
    .expect("the worker writes to Redis again after it returns");
    // And a fresh worker finds it there.
    let b = worker(&redis).await;
    let hit = encode(&mut b.client().await, subject("hat", vec![fresh_image(seed)])).await;
    assert_eq!(hit.subject_key, key);
    assert_eq!(hit.tier(), CacheTier::Redis);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_value_is_reencoded_and_overwritten() {
    let redis = RedisServer::start();
    let a = worker(&redis).await;
    let first = encode(&mut a.client().await, subject("cat", vec![image("cat_0.png")])).await;
    let mut conn = raw(&redis).await;
    let good: Vec<u8> = conn.get(&first.subject_key).await.expect("GET");
    assert!(!good.is_empty());
    let () = conn
        .set(&first.subject_key, b"definitely not an embedding".to_vec())
        .await
        .expect("SET");
    let b = worker(&redis).await;
    let mut bc = b.client().await;
    let again = encode(&mut bc, subject("cat", vec![image("cat_0.png")])).await;
    assert_eq!(again.tier(), CacheTier::Miss, "a corrupt entry is a miss");
    let counters = info(&mut bc).await.counters.expect("counters");
    assert_eq!(counters.corrupt_entries, 1, "{counters:?}");
    assert_eq!(counters.image_encoder_calls, 1, "{counters:?}");
    let repaired: Vec<u8> = conn.get(&first.subject_key).await.expect("GET");
    assert_eq!(repaired, good, "the entry is overwritten with the re-encoded value");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_requests_encode_once() {
    let redis = RedisServer::start();
    let w = TestWorker::start(|c| {
        c.redis.url = redis.url();
        c.executor.queue_capacity = 16;
    })
    .await;
    w.wait_serving().await;
    let img = fresh_image(99);
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut c = w.client().await;
        let s = subject("cat", vec![img.clone()]);
        calls.push(tokio::spawn(async move { encode(&mut c, s).await }));
    }
    let mut keys = Vec::new();
    for h in calls {
        keys.push(
            tokio::time::timeout(BOUND, h)
                .await
                .expect("bounded")
                .expect("join")
                .subject_key,
        );
    }
    keys.dedup();
    assert_eq!(keys.len(), 1, "one key for one subject");
    let counters = info(&mut w.client().await).await.counters.expect("counters");
    assert_eq!(counters.image_encoder_calls, 1, "{counters:?}");
    w.stop().await;
}
