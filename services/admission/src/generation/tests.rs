//! Each rule of a generation request, named by its field.

use std::io::Cursor;

use super::*;

fn png() -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]))
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encode");
    out
}

fn ok() -> GenerationRequest {
    GenerationRequest {
        prompt: "a cat".into(),
        subjects: vec![Subject {
            name: "cat".into(),
            images: vec![png()],
            subject_key: String::new(),
        }],
        ..Default::default()
    }
}

const DEFAULTS: Defaults = Defaults {
    size: [128, 64],
    scale: 0.75,
};

fn check(r: GenerationRequest, limits: &Limits) -> Result<ValidGeneration, InvalidInput> {
    validate_generation(r, limits, &DEFAULTS, ImageCheck::Decode)
}

#[test]
fn defaults_fill_zero_fields() {
    let v = check(ok(), &Limits::default()).expect("valid");
    assert_eq!((v.width, v.height, v.steps), (128, 64, DEFAULT_STEPS));
    assert_eq!((v.guidance, v.scale, v.scheduler), (5.0, 0.75, SchedulerKind::Euler));
    assert_eq!(v.seed, None);
    assert_eq!(v.subjects[0].input, SubjectInput::Images(vec![png()]));
}

#[test]
fn each_bad_field_is_named() {
    type Mutate = Box<dyn Fn(&mut GenerationRequest)>;
    let subject = |r: &mut GenerationRequest| r.subjects[0].clone();
    let cases: Vec<(&str, Mutate)> = vec![
        ("prompt", Box::new(|r| r.prompt = " ".into())),
        ("prompt", Box::new(|r| r.prompt = "x".repeat(2001))),
        ("prompt", Box::new(|r| r.prompt = "a\0b".into())),
        (
            "negative_prompt",
            Box::new(|r| r.negative_prompt = Some("y".repeat(200_000))),
        ),
        ("subjects", Box::new(|r| r.subjects.clear())),
        ("subjects", Box::new(move |r| r.subjects = vec![subject(r); 9])),
        ("subjects[0].name", Box::new(|r| r.subjects[0].name = String::new())),
        (
            "subjects[0].images",
            Box::new(|r| r.subjects[0].images = vec![png(); 9]),
        ),
        ("subjects[0].images", Box::new(|r| r.subjects[0].images.clear())),
        ("subjects[0].images[0]", Box::new(|r| r.subjects[0].images[0].clear())),
        (
            "subjects[0].images[0]",
            Box::new(|r| r.subjects[0].images[0] = b"garbage".to_vec()),
        ),
        (
            "subjects[0].subject_key",
            Box::new(|r| {
                r.subjects[0].images.clear();
                r.subjects[0].subject_key = "not-a-key".into();
            }),
        ),
        ("width", Box::new(|r| r.width = 65)),
        ("width", Box::new(|r| r.width = 100_000)),
        ("height", Box::new(|r| r.height = 8)),
        ("steps", Box::new(|r| r.steps = 100_000)),
        ("guidance", Box::new(|r| r.guidance = Some(f64::NAN))),
        ("guidance", Box::new(|r| r.guidance = Some(f64::INFINITY))),
        ("scale", Box::new(|r| r.scale = Some(f64::NAN))),
        ("scale", Box::new(|r| r.scale = Some(-1e300))),
        ("scheduler", Box::new(|r| r.scheduler = "heun".into())),
    ];
    for (field, mutate) in cases {
        let mut r = ok();
        mutate(&mut r);
        let err = check(r, &Limits::default()).expect_err(field);
        assert_eq!(err.field, field, "{err}");
    }
}

#[test]
fn configured_limits_apply() {
    let limits = Limits {
        max_image_bytes: 2,
        ..Limits::default()
    };
    let e = check(ok(), &limits).expect_err("too big");
    assert_eq!(e.field, "subjects[0].images[0]");
    assert!(e.rule.contains("at most 2 bytes"), "{e}");
    let mut r = ok();
    r.steps = 101;
    assert_eq!(check(r, &Limits::default()).expect_err("steps").field, "steps");
    let mut r = ok();
    r.steps = 101;
    let hard = check(r, &Limits::HARD).expect("the hard maximum is 200 steps");
    assert_eq!(hard.steps, 101);
}

#[test]
fn a_key_stands_in_for_images() {
    let mut r = ok();
    r.subjects[0].images.clear();
    r.subjects[0].subject_key = "mip:subject:v1:abc".into();
    let v = check(r, &Limits::default()).expect("valid");
    assert_eq!(v.subjects[0].input, SubjectInput::Key("mip:subject:v1:abc".into()));
}
