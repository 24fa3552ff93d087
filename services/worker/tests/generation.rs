//! The generation API on the fixture model: any subject count, non-square sizes, determinism, cancellation and
//! typed errors for bad input.

mod common;

use common::{load_sdxl, request, subject};
use mip_worker::pipeline::png::decode_png_text;
use mip_worker::pipeline::{Progress, SubjectRequest};
use mip_worker::ModelError;

fn png_size(png: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(png).expect("a decodable PNG");
    (img.width(), img.height())
}

#[test]
fn one_and_three_subjects_generate() {
    let p = load_sdxl();
    let one = request(vec![subject("cat", "cat_0.png")])
        .validate(p.default_scale())
        .expect("valid");
    let g1 = p.generate(&one, &mut |_| true).expect("one subject");
    assert_eq!(png_size(&g1.png), (128, 128));
    let three = request(vec![
        subject("cat", "cat_0.png"),
        subject("jacket", "jacket_0.png"),
        subject("dog", "cat_0.png"),
    ])
    .validate(p.default_scale())
    .expect("valid");
    let g3 = p.generate(&three, &mut |_| true).expect("three subjects");
    assert_eq!(png_size(&g3.png), (128, 128));
    assert_ne!(g1.png, g3.png, "a different subject set must change the image");
    let text = decode_png_text(&g3.png).expect("text chunks");
    assert!(
        text.iter().any(|(k, v)| k == "subjects" && v == "cat, jacket, dog"),
        "{text:?}"
    );
}

#[test]
fn multi_word_name_and_several_images_per_subject() {
    let p = load_sdxl();
    let mut s = subject("leather jacket", "jacket_0.png");
    s.images.push(common::ref_image("cat_0.png"));
    let req = request(vec![s]).validate(p.default_scale()).expect("valid");
    p.generate(&req, &mut |_| true).expect("generates");
}

#[test]
fn non_square_sizes_generate() {
    let p = load_sdxl();
    for (w, h) in [(128, 96), (72, 136)] {
        let mut req = request(vec![subject("cat", "cat_0.png")]);
        req.width = w;
        req.height = h;
        req.steps = 2;
        let g = p
            .generate(&req.validate(p.default_scale()).expect("valid"), &mut |_| true)
            .expect("generates");
        assert_eq!(png_size(&g.png), (w as u32, h as u32));
        assert_eq!((g.width, g.height), (w, h));
    }
}

#[test]
fn same_seed_same_image_and_progress_per_step() {
    let p = load_sdxl();
    let req = request(vec![subject("cat", "cat_0.png")])
        .validate(p.default_scale())
        .expect("valid");
    let mut seen = Vec::new();
    let a = p
        .generate(&req, &mut |pr| {
            seen.push(pr);
            true
        })
        .expect("a");
    let b = p.generate(&req, &mut |_| true).expect("b");
    assert_eq!(a.png, b.png);
    assert_eq!(
        seen,
        (1..=3).map(|step| Progress { step, total: 3 }).collect::<Vec<_>>()
    );
}

#[test]
fn cancellation_stops_between_steps() {
    let p = load_sdxl();
    let mut req = request(vec![subject("cat", "cat_0.png")]);
    req.steps = 5;
    let req = req.validate(p.default_scale()).expect("valid");
    let mut calls = 0;
    let err = p
        .generate(&req, &mut |pr| {
            calls += 1;
            pr.step < 2
        })
        .expect_err("cancelled");
    assert!(
        matches!(
            err,
            ModelError::Cancelled {
                completed_steps: 2,
                total_steps: 5
            }
        ),
        "{err}"
    );
    assert_eq!(calls, 2, "no step runs after the cancel");
}

fn invalid_field(err: ModelError) -> String {
    match err {
        ModelError::Invalid(i) => i.field,
        other => panic!("expected a typed InvalidInput error, got {other}"),
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let p = load_sdxl();
    let scale = p.default_scale();
    let base = || request(vec![subject("cat", "cat_0.png")]);
    let cases: Vec<(&str, mip_worker::pipeline::GenerateRequest)> = vec![
        ("subjects", request(vec![])),
        (
            "subjects[0].name",
            request(vec![SubjectRequest {
                name: "  ".into(),
                images: vec![common::ref_image("cat_0.png")],
            }]),
        ),
        ("width", {
            let mut r = base();
            r.width = 130;
            r
        }),
        ("height", {
            let mut r = base();
            r.height = 0;
            r
        }),
        ("steps", {
            let mut r = base();
            r.steps = 0;
            r
        }),
        ("scale", {
            let mut r = base();
            r.scale = Some(f64::NAN);
            r
        }),
        ("guidance", {
            let mut r = base();
            r.guidance = f64::INFINITY;
            r
        }),
    ];
    for (field, req) in cases {
        let err = req.validate(scale).expect_err(field);
        assert_eq!(err.field, field, "{err}");
    }
    // Validation passes, decoding fails: the image bytes are checked when the subject is encoded.
    let req = request(vec![SubjectRequest {
        name: "cat".into(),
        images: vec![b"not an image".to_vec()],
    }]);
    let err = p
        .generate(&req.validate(scale).expect("valid shape"), &mut |_| true)
        .expect_err("undecodable");
    assert_eq!(invalid_field(err), "subjects[0].images[0]");
    // A name longer than the text encoder's window.
    let long = "cat ".repeat(100);
    let req = request(vec![SubjectRequest {
        name: long,
        images: vec![common::ref_image("cat_0.png")],
    }]);
    let err = p
        .generate(&req.validate(scale).expect("valid shape"), &mut |_| true)
        .expect_err("too long");
    assert_eq!(invalid_field(err), "subjects[0].name");
}
