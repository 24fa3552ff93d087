//! Malformed requests over real gRPC: each is answered INVALID_ARGUMENT (NOT_FOUND for an unknown subject key) with a
//! message naming the field; afterwards the worker is still SERVING and a valid request succeeds.
//!
//! Note: the contract gives zero `width`, `height` and `steps` a meaning (the defaults), so "steps 0" is valid.

use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{generate_event, EncodeSubjectsRequest, GenerateEvent, GenerateTask, GenerationRequest, Subject};
use mip_worker::testing::{TestWorker, BOUND};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;

const MAX_IMAGE_BYTES: usize = 200_000;

fn fixture_image() -> Vec<u8> {
    let p = mip_worker::parity::fixtures_dir()
        .unwrap_or_else(|e| panic!("{e}"))
        .join("cases/sdxl_two_objects/refs/cat_0.png");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A PNG whose header claims `w`x`h` pixels (no image data): a decompression bomb as far as the header goes.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
        out
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    png.extend(chunk(b"IEND", &[]));
    png
}

fn valid() -> GenerationRequest {
    GenerationRequest {
        prompt: "a cat on a sofa".into(),
        subjects: vec![Subject {
            name: "cat".into(),
            images: vec![fixture_image()],
            subject_key: String::new(),
        }],
        width: 64,
        height: 64,
        steps: 2,
        seed: Some(1),
        ..Default::default()
    }
}

type Mutate = Box<dyn Fn(&mut GenerationRequest)>;

fn case(
    name: &'static str,
    field: &'static str,
    f: impl Fn(&mut GenerationRequest) + 'static,
) -> (&'static str, &'static str, Code, Mutate) {
    (name, field, Code::InvalidArgument, Box::new(f))
}

fn cases() -> Vec<(&'static str, &'static str, Code, Mutate)> {
    let img = fixture_image();
    let long_name = vec!["a"; 80].join(" ");
    let mut truncated = img.clone();
    truncated.truncate(img.len() / 2);
    let second = move |r: &mut GenerationRequest| {
        r.subjects.push(Subject {
            name: "dog".into(),
            images: vec![fixture_image()],
            subject_key: String::new(),
        });
    };
    vec![
        case("empty prompt", "prompt", |r| r.prompt.clear()),
        case("prompt of spaces", "prompt", |r| r.prompt = "   ".into()),
        case("prompt too long", "prompt", |r| r.prompt = "a".repeat(201)),
        case("NUL in prompt", "prompt", |r| r.prompt = "a\0cat".into()),
        case("negative prompt too long", "negative_prompt", |r| {
            r.negative_prompt = Some("b".repeat(201))
        }),
        case("NUL in negative prompt", "negative_prompt", |r| {
            r.negative_prompt = Some("x\0".into())
        }),
        case("no subjects", "subjects", |r| r.subjects.clear()),
        case("nine subjects", "subjects", |r| {
            r.subjects = vec![r.subjects[0].clone(); 9]
        }),
        case("empty name", "subjects[0].name", |r| r.subjects[0].name.clear()),
        case("name of spaces", "subjects[0].name", |r| {
            r.subjects[0].name = "  ".into()
        }),
        case("NUL in name", "subjects[0].name", |r| {
            r.subjects[0].name = "c\0t".into()
        }),
        case("name over 75 tokens", "subjects[0].name", move |r| {
            r.subjects[0].name = long_name.clone()
        }),
        case("zero images", "subjects[0].images", |r| r.subjects[0].images.clear()),
        case("too many images", "subjects[0].images", |r| {
            r.subjects[0].images = vec![vec![1]; 4]
        }),
        case("empty image", "subjects[0].images[0]", |r| {
            r.subjects[0].images[0].clear()
        }),
        case("second image empty", "subjects[0].images[1]", |r| {
            r.subjects[0].images.push(Vec::new())
        }),
        case("undecodable image", "subjects[0].images[0]", |r| {
            r.subjects[0].images[0] = b"not an image".to_vec()
        }),
        case("truncated PNG", "subjects[0].images[0]", move |r| {
            r.subjects[0].images[0] = truncated.clone()
        }),
        case("image over the byte limit", "subjects[0].images[0]", |r| {
            r.subjects[0].images[0] = vec![0x89; MAX_IMAGE_BYTES + 1]
        }),
        case("image over the pixel limit", "subjects[0].images[0]", |r| {
            r.subjects[0].images[0] = png_claiming(100_000, 100_000)
        }),
        case("width not a multiple of 8", "width", |r| r.width = 100),
        case("width too small", "width", |r| r.width = 56),
        case("width too large", "width", |r| r.width = 520),
        case("height not a multiple of 8", "height", |r| r.height = 65),
        case("height too small", "height", |r| r.height = 8),
        case("height too large", "height", |r| r.height = 4096),
        case("too many steps", "steps", |r| r.steps = 21),
        case("NaN guidance", "guidance", |r| r.guidance = Some(f64::NAN)),
        case("infinite guidance", "guidance", |r| r.guidance = Some(f64::INFINITY)),
        case("negative guidance", "guidance", |r| r.guidance = Some(-1.0)),
        case("NaN scale", "scale", |r| r.scale = Some(f64::NAN)),
        case("negative scale", "scale", |r| r.scale = Some(-0.5)),
        case("unknown scheduler", "scheduler", |r| r.scheduler = "heun".into()),
        case("malformed subject key", "subjects[0].subject_key", |r| {
            r.subjects[0].images.clear();
            r.subjects[0].subject_key = "hello".into();
        }),
        (
            "unknown subject key",
            "subjects[0].subject_key",
            Code::NotFound,
            Box::new(|r: &mut GenerationRequest| {
                r.subjects[0].images.clear();
                r.subjects[0].subject_key = "mip:subject:v1:sdxl:0000:p1:f32:ffff".into();
            }),
        ),
        case("second subject without a name", "subjects[1].name", move |r| {
            second(r);
            r.subjects[1].name.clear();
        }),
        case("second subject undecodable", "subjects[1].images[0]", |r| {
            r.subjects.push(Subject {
                name: "dog".into(),
                images: vec![vec![0xff, 0xd8, 0xff, 0x00]],
                subject_key: String::new(),
            });
        }),
    ]
}

/// The outcome of a Generate: the error (from the call or the stream) or `Ok` with the image's PNG.
async fn outcome(c: &mut WorkerClient<Channel>, r: GenerationRequest) -> Result<Vec<u8>, Status> {
    let task = GenerateTask {
        task_id: "m".into(),
        request: Some(r),
    };
    let mut s = c.generate(task).await?.into_inner();
    loop {
        match tokio::time::timeout(BOUND, s.message()).await.expect("bounded")? {
            Some(GenerateEvent {
                event: Some(generate_event::Event::Image(img)),
            }) => return Ok(img.png),
            Some(_) => {}
            None => return Err(Status::internal("stream ended without an image")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_name_the_field_and_leave_the_worker_serving() {
    let w = TestWorker::start(|c| {
        c.limits.max_prompt_chars = 200;
        c.limits.max_images_per_subject = 3;
        c.limits.max_image_bytes = MAX_IMAGE_BYTES;
        c.limits.max_image_pixels = 4_000_000;
        c.limits.max_side = 512;
        c.limits.max_steps = 20;
    })
    .await;
    w.wait_serving().await;
    let mut c = w.client().await;

    let table = cases();
    assert!(table.len() >= 30, "{} cases", table.len());
    for (name, field, code, mutate) in &table {
        let mut r = valid();
        mutate(&mut r);
        let e = outcome(&mut c, r).await.expect_err(name);
        assert_eq!(e.code(), *code, "{name}: {e:?}");
        assert!(
            e.message().contains(field),
            "{name}: message {:?} must name `{field}`",
            e.message()
        );
    }

    // EncodeSubjects applies the same rules.
    let e = c
        .encode_subjects(EncodeSubjectsRequest {
            subjects: Vec::new(),
            score: false,
        })
        .await
        .expect_err("no subjects");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("subjects"), "{e:?}");
    let bad = Subject {
        name: "cat".into(),
        images: vec![b"garbage".to_vec()],
        subject_key: String::new(),
    };
    let e = c
        .encode_subjects(EncodeSubjectsRequest {
            subjects: vec![bad],
            score: false,
        })
        .await
        .expect_err("undecodable");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("subjects[0].images[0]"), "{e:?}");

    assert_eq!(
        w.health().await,
        ServingStatus::Serving,
        "still serving after every malformed request"
    );
    let png = outcome(&mut c, valid()).await.expect("a valid request succeeds");
    let img = image::load_from_memory(&png).expect("PNG");
    assert_eq!((img.width(), img.height()), (64, 64));

    w.stop().await;
}
