//! Admission at the door, over real gRPC on loopback: a table of malformed `SubmitJob` requests (bad text, counts,
//! sizes, numbers, schedulers, keys, and image bytes that are garbage, truncated, empty, too large, a
//! decompression bomb or an unsupported format) is refused by the coordinator itself with INVALID_ARGUMENT naming
//! the field — nothing is stored, queued or sent to the worker — and both services keep serving: a valid job
//! still succeeds afterwards. A request beyond what the workers report they can do is refused the same way.

use std::io::Cursor;

use mip_proto::v1::{GenerationRequest, ListJobsRequest, Subject, SubmitJobRequest};
use mip_tests::*;
use tonic::Code;

/// A valid 64x64 request about the fixture's cat (2 steps).
fn ok() -> GenerationRequest {
    request(2, cat())
}

fn job(requests: Vec<GenerationRequest>) -> SubmitJobRequest {
    SubmitJobRequest {
        requests,
        samples: 1,
        ..Default::default()
    }
}

fn with(edit: impl FnOnce(&mut GenerationRequest)) -> SubmitJobRequest {
    let mut r = ok();
    edit(&mut r);
    job(vec![r])
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_pixel(w, h, image::Rgb([200, 100, 50]))
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("png");
    out
}

/// A PNG whose header claims `w` x `h` pixels (CRC fixed up), followed by a tiny body.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut b = png(2, 2);
    b[16..20].copy_from_slice(&w.to_be_bytes());
    b[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    b
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn image_of(edit: impl FnOnce(&mut Vec<u8>) + 'static) -> SubmitJobRequest {
    with(move |r| edit(&mut r.subjects[0].images[0]))
}

/// (field named in the error, request) — each must be refused by SubmitJob.
fn table() -> Vec<(&'static str, SubmitJobRequest)> {
    let cat_png = image("cat_0.png");
    let truncated = cat_png[..cat_png.len() / 2].to_vec();
    let mut huge = cat_png.clone();
    huge.resize(17 << 20, 0);
    vec![
        ("requests", job(vec![])),
        ("requests", job(vec![ok(); 65])),
        (
            "samples",
            SubmitJobRequest {
                samples: 17,
                ..job(vec![ok()])
            },
        ),
        (
            "idempotency_key",
            SubmitJobRequest {
                idempotency_key: "k".repeat(300),
                ..job(vec![ok()])
            },
        ),
        ("requests[0].prompt", with(|r| r.prompt = String::new())),
        ("requests[0].prompt", with(|r| r.prompt = "   ".into())),
        ("requests[0].prompt", with(|r| r.prompt = "p".repeat(200_000))),
        ("requests[0].prompt", with(|r| r.prompt = "a\0cat".into())),
        (
            "requests[0].negative_prompt",
            with(|r| r.negative_prompt = Some("n".repeat(200_000))),
        ),
        ("requests[0].subjects", with(|r| r.subjects.clear())),
        (
            "requests[0].subjects",
            with(|r| r.subjects = vec![r.subjects[0].clone(); 9]),
        ),
        (
            "requests[0].subjects[0].name",
            with(|r| r.subjects[0].name = String::new()),
        ),
        (
            "requests[0].subjects[0].name",
            with(|r| r.subjects[0].name = "n".repeat(3000)),
        ),
        (
            "requests[0].subjects[0].images",
            with(|r| r.subjects[0].images = vec![r.subjects[0].images[0].clone(); 9]),
        ),
        ("requests[0].subjects[0].images", with(|r| r.subjects[0].images.clear())),
        ("requests[0].subjects[0].images[0]", image_of(|b| b.clear())),
        (
            "requests[0].subjects[0].images[0]",
            image_of(|b| *b = b"\x00garbage, not an image".to_vec()),
        ),
        ("requests[0].subjects[0].images[0]", image_of(move |b| *b = truncated)),
        (
            "requests[0].subjects[0].images[0]",
            image_of(|b| *b = png_claiming(60_000, 60_000)),
        ),
        ("requests[0].subjects[0].images[0]", image_of(move |b| *b = huge)),
        (
            "requests[0].subjects[0].images[0]",
            image_of(|b| *b = b"II*\x00\x08\x00\x00\x00tiff".to_vec()),
        ),
        (
            "requests[0].subjects[0].images[0]",
            image_of(|b| *b = png_claiming(0, 5)),
        ),
        (
            "requests[0].subjects[0].subject_key",
            with(|r| {
                r.subjects[0].images.clear();
                r.subjects[0].subject_key = "not-a-key".into();
            }),
        ),
        ("requests[0].width", with(|r| r.width = 65)),
        ("requests[0].width", with(|r| r.width = 100_000)),
        ("requests[0].width", with(|r| r.width = 32)),
        ("requests[0].height", with(|r| r.height = 4)),
        ("requests[0].steps", with(|r| r.steps = 100_000)),
        ("requests[0].steps", with(|r| r.steps = 101)),
        ("requests[0].guidance", with(|r| r.guidance = Some(f64::NAN))),
        ("requests[0].guidance", with(|r| r.guidance = Some(f64::INFINITY))),
        ("requests[0].guidance", with(|r| r.guidance = Some(-1.0))),
        ("requests[0].scale", with(|r| r.scale = Some(f64::NAN))),
        ("requests[0].scale", with(|r| r.scale = Some(-1e300))),
        ("requests[0].scheduler", with(|r| r.scheduler = "heun".into())),
        (
            "requests[1].steps",
            job(vec![ok(), GenerationRequest { steps: 500, ..ok() }]),
        ),
        (
            "requests[0].subjects[1].images[2]",
            with(|r| {
                let mut jacket = Subject {
                    name: "jacket".into(),
                    images: vec![image("jacket_0.png"); 3],
                    subject_key: String::new(),
                };
                jacket.images[2] = b"GIF89a".to_vec();
                r.subjects.push(jacket);
            }),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_jobs_are_refused_at_the_door_and_nothing_is_queued() {
    let ws = workers(1).await;
    let coord = Coord::run(config(vec![url(&ws[0], "http")], None, |_| {}), None, None).await;
    let mut c = coord.client.clone();
    wait_healthy(&mut c, 1).await;
    let cases = table();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for (field, req) in cases {
        let e = c.submit_job(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(&format!("`{field}`")), "{field}: {}", e.message());
        assert_eq!(
            mip_common::errors::reason_of(&e).as_deref(),
            Some("invalid_argument"),
            "{field}"
        );
    }
    // The same rules on the one-call path.
    let e = c
        .generate(GenerationRequest {
            steps: 0,
            width: 72 + 1,
            ..ok()
        })
        .await
        .expect_err("bad width");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("`requests[0].width`"), "{}", e.message());

    // Nothing was stored, queued or run.
    let jobs = c
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(jobs.jobs.is_empty(), "{:?}", jobs.jobs);
    assert_eq!(generation_counts(&ws).await, (0, 0));
    // Both services still serve, and a valid job runs.
    assert_eq!(
        ws[0].health().await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let images = c.generate(ok()).await.expect("a valid request").into_inner().images;
    assert_eq!(images.len(), 1);
    assert_eq!(generation_counts(&ws).await, (1, 0));
    stop_all(coord, ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_no_worker_can_run_is_refused() {
    let ws = workers_with(1, |c| c.limits.max_steps = 10).await;
    let coord = Coord::run(config(vec![url(&ws[0], "http")], None, |_| {}), None, None).await;
    let mut c = coord.client.clone();
    // The worker's limits arrive with its Info on the health poll.
    wait_workers(&mut c, "info with limits", |w| {
        w.iter()
            .any(|w| w.healthy && w.info.as_ref().is_some_and(|i| i.limits.is_some()))
    })
    .await;
    let e = c.submit_job(with(|r| r.steps = 20)).await.expect_err("20 > 10 steps");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("`requests[0].steps`") && e.message().contains("every worker"),
        "{}",
        e.message()
    );
    assert!(c
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs
        .is_empty());
    c.submit_job(with(|r| r.steps = 2))
        .await
        .expect("within the worker's limits");
    stop_all(coord, ws).await;
}
