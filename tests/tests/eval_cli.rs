//! `mip eval` on what `mip generate` wrote: a table per image and the aggregates, `--json` with the same numbers,
//! each image scored against its prompt and each subject's reference images (the demo bundle's tiny evaluation
//! models), and a clear error when a bundle has no evaluation models.

use mip_tests::process::{fixture_setup, mip, text, tmp};
use serde_json::Value;

#[test]
fn eval_scores_generated_images_as_a_table_and_as_json() {
    let dir = tmp("eval");
    let model = dir.join("demo");
    let out = dir.join("out");
    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    let o = mip(&["model", "demo", "--out", &s(&model)]);
    assert!(o.status.success(), "{}", text(&o));
    let cat = format!("cat={}", s(&model.join("refs/cat.png")));
    let jacket = format!("jacket={}", s(&model.join("refs/jacket.png")));
    let o = mip(&[
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        "a cat wearing a jacket",
        "--subject",
        &cat,
        "--subject",
        &jacket,
        "--steps",
        "1",
        "--size",
        "128x128",
        "--samples",
        "2",
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    let o = mip(&["eval", &s(&out), "--model", &s(&model), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    let images = r["images"].as_array().expect("images");
    assert_eq!(images.len(), 2);
    for img in images {
        let clip_t = img["clip_t"].as_f64().expect("clip_t");
        assert!((0.0..=2.5).contains(&clip_t), "{img}");
        let subjects = img["subjects"].as_array().expect("subjects");
        assert_eq!(subjects.len(), 2);
        for key in ["clip_i", "dino"] {
            let per: Vec<f64> = subjects.iter().map(|s| s[key].as_f64().expect("score")).collect();
            assert!(per.iter().all(|v| (-1.0..=1.0).contains(v)), "{img}");
            // The image's score averages its subjects'.
            let avg = per.iter().sum::<f64>() / per.len() as f64;
            assert!((img[key].as_f64().expect(key) - avg).abs() < 1e-12, "{img}");
        }
        assert!(
            subjects[0]["clip_i"] != subjects[1]["clip_i"],
            "each subject against its own references"
        );
    }
    // One prompt: the aggregate is the mean over the images.
    let agg = &r["aggregate"];
    assert_eq!((agg["prompts"].as_u64(), agg["images"].as_u64()), (Some(1), Some(2)));
    for key in ["clip_t", "clip_i", "dino"] {
        let avg = images.iter().map(|i| i[key].as_f64().expect(key)).sum::<f64>() / 2.0;
        assert!((agg[key].as_f64().expect(key) - avg).abs() < 1e-12, "{key}");
    }

    // The table carries the same numbers, to four places.
    let o = mip(&["eval", &s(&out), "--model", &s(&model)]);
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        table.starts_with("image") && table.contains("CLIP-T") && table.contains("DINO"),
        "{table}"
    );
    assert!(
        table.contains(&format!("{:.4}", agg["clip_i"].as_f64().expect("clip_i"))),
        "{table}"
    );
    assert!(table.contains("mean (1 prompts, 2 images)"), "{table}");
}

#[test]
fn a_bundle_without_evaluation_models_is_refused_clearly() {
    let dir = tmp("eval-none");
    let bundle = fixture_setup(&dir);
    let out = dir.join("empty");
    std::fs::create_dir_all(&out).expect("mkdir");
    let o = mip(&[
        "eval",
        out.to_str().expect("utf-8"),
        "--model",
        bundle.to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    let err = text(&o);
    assert!(err.contains("eval") && err.contains("--clip"), "{err}");
}

#[test]
fn generate_keeps_the_best_sample_and_its_scores_are_what_eval_finds() {
    let dir = tmp("eval-best");
    let model = dir.join("demo");
    let out = dir.join("out");
    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    let o = mip(&["model", "demo", "--out", &s(&model)]);
    assert!(o.status.success(), "{}", text(&o));
    let cat = format!("cat={}", s(&model.join("refs/cat.png")));
    let jacket = format!("jacket={}", s(&model.join("refs/jacket.png")));
    let o = mip(&[
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        "a cat wearing a jacket",
        "--subject",
        &cat,
        "--subject",
        &jacket,
        "--steps",
        "1",
        "--size",
        "128x128",
        "--samples",
        "3",
        "--keep-best",
        "1",
        "--rank-by",
        "dino",
        "--json",
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 1, "one kept image of three: {lines:?}");
    assert_eq!(lines[0]["rank"], 1);
    let sidecars: Vec<_> = std::fs::read_dir(&out)
        .expect("out")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(sidecars.len(), 1);
    let sidecar: Value = serde_json::from_slice(&std::fs::read(&sidecars[0]).expect("sidecar")).expect("json");
    assert_eq!(sidecar["rank"], 1);
    let scores = &sidecar["scores"];
    assert_eq!(scores["subjects"].as_array().map(Vec::len), Some(2), "{sidecar}");

    // `mip eval` of the written PNG finds the scores the worker returned.
    let o = mip(&["eval", &s(&out), "--model", &s(&model), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    let evaluated = &r["images"][0];
    for key in ["clip_t", "clip_i", "dino"] {
        let (got, want) = (scores[key].as_f64().expect(key), evaluated[key].as_f64().expect(key));
        assert!((got - want).abs() <= 1e-6, "{key}: served {got}, evaluated {want}");
    }
}
