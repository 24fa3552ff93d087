//! Scores while serving, on a worker with the tiny evaluation models: the scores a Generate call returns are the
//! ones an independent evaluation of the PNG it returned gives (the PNG's text chunks carry them too); reference
//! features are cached in Redis with the subject (a second worker finds them, a corrupt entry is recomputed); a
//! subject named by key alone needs its features cached; a worker without evaluation models refuses scoring with
//! FAILED_PRECONDITION.

use candle_core::{DType, Device, Tensor};
use mip_common::testing::RedisServer;
use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{EncodeSubjectsRequest, GenerateTask, Image, Scores, Subject};
use mip_worker::eval::metrics::{clip_t, mean, set_similarity};
use mip_worker::eval::preprocess::{CLIP_EVAL, DINO_EVAL};
use mip_worker::eval::{ClipEval, DinoEval};
use mip_worker::pipeline::image_decode::{decode_rgb_with, Alpha, DEFAULT_MAX_PIXELS};
use mip_worker::pipeline::png::decode_png_text;
use mip_worker::testing::{eval_fixtures_dir, generate, image, info, subject, task, TestWorker};
use redis::AsyncCommands;
use tonic::transport::Channel;
use tonic::Code;

fn scored(subjects: Vec<Subject>) -> GenerateTask {
    let mut t = task(64, 2, subjects);
    if let Some(r) = t.request.as_mut() {
        r.score = true;
    }
    t
}

fn two_subjects() -> Vec<Subject> {
    vec![
        subject("cat", vec![image("cat_0.png")]),
        subject("jacket", vec![image("jacket_0.png"), image("cat_0.png")]),
    ]
}

/// The evaluation of `mip eval`, done here from the files: CLIP-T against the prompt, CLIP-I and DINO against
/// each subject's reference images, averaged over the subjects.
fn evaluate(png: &[u8], prompt: &str, subjects: &[(&str, Vec<Vec<u8>>)]) -> (f64, f64, f64) {
    let dir = eval_fixtures_dir();
    let clip = ClipEval::load(&dir.join("clip"), &Device::Cpu, DType::F32).expect("clip");
    let dino = DinoEval::load(&dir.join("dino"), &Device::Cpu, DType::F32).expect("dino");
    let features = |bytes: &[u8]| -> (Vec<f32>, Vec<f32>) {
        let rgb = decode_rgb_with(bytes, "image", DEFAULT_MAX_PIXELS, Alpha::Drop).expect("decodes");
        let row = |t: Tensor| t.flatten_all().and_then(|t| t.to_vec1()).expect("row");
        let c = CLIP_EVAL.tensor_of(&rgb, "image").expect("clip pixels");
        let d = DINO_EVAL.tensor_of(&rgb, "image").expect("dino pixels");
        (
            row(clip.image_features(&c.unsqueeze(0).expect("batch")).expect("clip")),
            row(dino.features(&d.unsqueeze(0).expect("batch")).expect("dino")),
        )
    };
    let (img_c, img_d) = features(png);
    let text: Vec<f32> = clip
        .text_features(prompt)
        .expect("text")
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("text row");
    let mut ci = Vec::new();
    let mut di = Vec::new();
    for (_, refs) in subjects {
        let (rc, rd): (Vec<_>, Vec<_>) = refs.iter().map(|b| features(b)).unzip();
        ci.push(set_similarity(std::slice::from_ref(&img_c), &rc).expect("clip_i"));
        di.push(set_similarity(std::slice::from_ref(&img_d), &rd).expect("dino"));
    }
    (clip_t(&img_c, &text), mean(ci).expect("mean"), mean(di).expect("mean"))
}

fn scores_of(img: &Image) -> &Scores {
    img.scores.as_ref().expect("a scored image carries its scores")
}

async fn scoring_worker(redis: &RedisServer) -> (TestWorker, WorkerClient<Channel>) {
    let url = redis.url();
    let w = TestWorker::start_scoring(|c| c.redis.url = url).await;
    w.wait_serving().await;
    let c = w.client().await;
    (w, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_are_an_evaluation_of_the_returned_png_and_references_are_cached() {
    let redis = RedisServer::start();
    let (a, mut ca) = scoring_worker(&redis).await;
    assert!(info(&mut ca).await.scoring, "a bundle with `eval` scores");

    let (_, img) = generate(&mut ca, scored(two_subjects())).await;
    let img = img.expect("a scored image");
    let s = scores_of(&img).clone();
    let names: Vec<&str> = s.subjects.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["cat", "jacket"]);
    let refs = [
        ("cat", vec![image("cat_0.png")]),
        ("jacket", vec![image("jacket_0.png"), image("cat_0.png")]),
    ];
    let (want_t, want_i, want_d) = evaluate(&img.png, "a cat wearing a jacket", &refs);
    let close = |got: f64, want: f64, what: &str| assert!((got - want).abs() <= 1e-6, "{what}: {got} vs {want}");
    close(s.clip_t, want_t, "clip_t");
    close(s.clip_i.expect("clip_i"), want_i, "clip_i");
    close(s.dino.expect("dino"), want_d, "dino");
    let per_subject_mean = (s.subjects[0].clip_i + s.subjects[1].clip_i) / 2.0;
    close(
        s.clip_i.expect("clip_i"),
        per_subject_mean,
        "clip_i is the subjects' mean",
    );
    assert!(img.timings.as_ref().expect("timings").score_ms > 0.0);

    // The PNG carries the very same numbers.
    let text = decode_png_text(&img.png).expect("text chunks");
    let chunk = |k: &str| -> f64 {
        let v = text.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        v.unwrap_or_else(|| panic!("no `{k}` chunk in {text:?}"))
            .parse()
            .expect("a number")
    };
    assert_eq!(chunk("clip_t"), s.clip_t);
    assert_eq!(chunk("clip_i"), s.clip_i.expect("clip_i"));
    assert_eq!(chunk("dino"), s.dino.expect("dino"));

    // Without `score`: no scores, no chunks.
    let (_, plain) = generate(&mut ca, task(64, 2, two_subjects())).await;
    let plain = plain.expect("image");
    assert!(plain.scores.is_none());
    assert!(!decode_png_text(&plain.png)
        .expect("text")
        .iter()
        .any(|(k, _)| k == "clip_t"));
    // Scoring does not change the image, only its text chunks.
    let pixels = |png: &[u8]| image::load_from_memory(png).expect("png").to_rgb8();
    assert_eq!(pixels(&plain.png), pixels(&img.png));

    // Both subjects' reference features are in Redis; a corrupt one is recomputed by a second worker.
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let mut keys: Vec<String> = conn.keys("mip:refs:v1:*").await.expect("keys");
    keys.sort();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let _: () = conn.set(&keys[0], b"junk".to_vec()).await.expect("set");
    let counters = info(&mut ca).await.counters.expect("counters");
    let seen = (
        counters.reference_misses,
        counters.reference_hits_memory,
        counters.reference_hits_redis,
    );
    assert_eq!(
        seen,
        (2, 0, 0),
        "both subjects' features computed once; the unscored request needs none"
    );
    let (b, mut cb) = scoring_worker(&redis).await;
    let (_, again) = generate(&mut cb, scored(two_subjects())).await;
    assert_eq!(
        scores_of(&again.expect("image")),
        &s,
        "the same image scores the same on another worker"
    );
    let counters = info(&mut cb).await.counters.expect("counters");
    let seen = (counters.reference_misses, counters.reference_hits_redis);
    assert_eq!(
        seen,
        (1, 1),
        "one subject's features from Redis, the corrupt one recomputed"
    );
    let repaired: Vec<u8> = conn.get(&keys[0]).await.expect("get");
    assert!(repaired.len() > 4, "the corrupt entry was overwritten");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_named_by_key_needs_its_reference_features() {
    let redis = RedisServer::start();
    let (w, mut c) = scoring_worker(&redis).await;
    let encode = |score: bool| EncodeSubjectsRequest {
        subjects: vec![subject("cat", vec![image("cat_0.png")])],
        score,
    };
    let key = c
        .encode_subjects(encode(false))
        .await
        .expect("encode")
        .into_inner()
        .subjects[0]
        .subject_key
        .clone();
    let by_key = || {
        scored(vec![Subject {
            name: "cat".into(),
            images: vec![],
            subject_key: key.clone(),
        }])
    };
    let (_, e) = generate(&mut c, by_key()).await;
    let e = e.expect_err("no reference features cached");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("subjects[0].subject_key") && e.message().contains("reference features"));

    c.encode_subjects(encode(true)).await.expect("encode with score");
    let (_, img) = generate(&mut c, by_key()).await;
    let by_key_scores = scores_of(&img.expect("scored by key")).clone();
    let (_, img) = generate(&mut c, scored(vec![subject("cat", vec![image("cat_0.png")])])).await;
    assert_eq!(scores_of(&img.expect("scored by images")), &by_key_scores);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_evaluation_models_refuses_scoring() {
    let w = TestWorker::start(|_| {}).await;
    w.wait_serving().await;
    let mut c = w.client().await;
    assert!(!info(&mut c).await.scoring);
    let (_, e) = generate(&mut c, scored(two_subjects())).await;
    let e = e.expect_err("cannot score");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        mip_common::errors::reason_of(&e).as_deref(),
        Some("scoring_unavailable")
    );
    assert!(
        e.message().contains("`score`") && e.message().contains("mip.json"),
        "{}",
        e.message()
    );
    let e = c
        .encode_subjects(EncodeSubjectsRequest {
            subjects: two_subjects(),
            score: true,
        })
        .await
        .expect_err("cannot score");
    assert_eq!(e.code(), Code::FailedPrecondition);
    // Unscored work goes on.
    let (_, img) = generate(&mut c, task(64, 2, two_subjects())).await;
    img.expect("an unscored image");
    w.stop().await;
}
