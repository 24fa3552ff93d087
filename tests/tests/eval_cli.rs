//! `mip eval` on what `mip generate` wrote: a table per image and the aggregates, `--json` with the same numbers,
//! each image scored against its prompt and each subject's reference images (the demo bundle's tiny evaluation
//! models), and a clear error when a bundle has no evaluation models; `mip generate --keep-best` writes the best
//! sample with the scores `mip eval` finds in its PNG; `--concept101` writes the protocol's manifest and scores
//! each combination of a small copy of the CustomConcept101 layout.

use mip_tests::process::{fixture_setup, mip, text, tmp};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The demo model written to a fresh folder and `mip generate` on it (two subjects, 1 step, 128x128, `extra`):
/// the model folder, the output folder and the command's output.
fn demo_generate(name: &str, extra: &[&str]) -> (PathBuf, PathBuf, std::process::Output) {
    let dir = tmp(name);
    let (model, out) = (dir.join("demo"), dir.join("out"));
    let s = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let o = mip(&["model", "demo", "--out", &s(&model)]);
    assert!(o.status.success(), "{}", text(&o));
    let cat = format!("cat={}", s(&model.join("refs/cat.png")));
    let jacket = format!("jacket={}", s(&model.join("refs/jacket.png")));
    let (model_s, out_s) = (s(&model), s(&out));
    let base = [
        "generate",
        "--model",
        &model_s,
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
        "--out",
        &out_s,
    ];
    let o = mip(&[&base[..], extra].concat());
    (model, out, o)
}

#[test]
fn eval_scores_generated_images_as_a_table_and_as_json() {
    let (model, out, o) = demo_generate("eval", &["--samples", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();

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
    let args = ["--samples", "3", "--keep-best", "1", "--rank-by", "dino", "--json"];
    let (model, out, o) = demo_generate("eval-best", &args);
    assert!(o.status.success(), "{}", text(&o));
    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
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

/// A two-combination copy of the CustomConcept101 layout made of the demo's reference images.
fn concept101_layout(root: &std::path::Path, model: &std::path::Path) {
    let put = |dir: &str, name: &str, from: &str| {
        let d = root.join("benchmark_dataset").join(dir);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::copy(model.join("refs").join(from), d.join(name)).expect("copy");
    };
    put("pet_cat1", "a.png", "cat.png");
    put("pet_cat1", "b.png", "jacket.png");
    put("wearable_jacket1", "c.png", "jacket.png");
    put("wearable_jacket2", "d.png", "cat.png");
    std::fs::write(root.join("benchmark_dataset/pet_cat1/notes.txt"), "not an image").expect("write");
    std::fs::create_dir_all(root.join("prompts")).expect("mkdir");
    std::fs::write(
        root.join("prompts/pet_wearable.txt"),
        "photo of {0} wearing the {1}.\n{0} in {1} playing with a ball.\n",
    )
    .expect("prompts");
    let concept = |class: &str, dir: &str| {
        serde_json::json!({"class_prompt": class, "instance_data_dir": format!("./benchmark_dataset/{dir}"),
                           "prompt_filename": "prompts/x.txt"})
    };
    let compose = serde_json::json!({"prompt_filename_compose": "prompts/pet_wearable.txt"});
    let combos = serde_json::json!([
        [
            concept("cat", "pet_cat1"),
            concept("jacket", "wearable_jacket1"),
            compose
        ],
        [
            concept("cat", "pet_cat1"),
            concept("jacket", "wearable_jacket2"),
            compose
        ],
    ]);
    std::fs::write(root.join("dataset_multiconcept.json"), combos.to_string()).expect("json");
}

#[test]
fn concept101_writes_the_protocol_and_scores_each_combination() {
    let dir = tmp("eval-c101");
    let model = dir.join("demo");
    let data = dir.join("concept101");
    let out = dir.join("out");
    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    let o = mip(&["model", "demo", "--out", &s(&model)]);
    assert!(o.status.success(), "{}", text(&o));
    concept101_layout(&data, &model);

    let manifest = dir.join("protocol.jsonl");
    let o = mip(&["eval", "--concept101", &s(&data), "--write-manifest", &s(&manifest)]);
    assert!(o.status.success(), "{}", text(&o));
    let items: Vec<Value> = std::fs::read_to_string(&manifest)
        .expect("manifest")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(items.len(), 4, "two combinations, two prompts each");
    assert_eq!(items[0]["prompt"], "photo of cat wearing the jacket.");
    assert_eq!(
        (items[0]["seed"].as_u64(), items[0]["steps"].as_u64()),
        (Some(420), Some(30))
    );
    let cat_images = items[0]["subjects"][0]["images"].as_array().expect("images");
    assert_eq!(cat_images.len(), 2, "every image of the concept, nothing else");

    // Nothing generated yet: the evaluation says what is missing.
    std::fs::create_dir_all(&out).expect("mkdir");
    let o = mip(&["eval", "--concept101", &s(&data), &s(&out), "--model", &s(&model)]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("4 of the protocol's prompts have no output"),
        "{}",
        text(&o)
    );

    // One folder per request: they share the seed, and so the output name.
    let dirs: Vec<String> = (0..items.len()).map(|k| s(&out.join(k.to_string()))).collect();
    for (item, item_out) in items.iter().zip(&dirs) {
        let subject = |k: usize| {
            let imgs: Vec<&str> = item["subjects"][k]["images"]
                .as_array()
                .expect("images")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            format!(
                "{}={}",
                item["subjects"][k]["name"].as_str().expect("name"),
                imgs.join(",")
            )
        };
        let (a, b) = (subject(0), subject(1));
        let o = mip(&[
            "generate",
            "--model",
            &s(&model),
            "--prompt",
            item["prompt"].as_str().expect("prompt"),
            "--subject",
            &a,
            "--subject",
            &b,
            "--steps",
            "1",
            "--size",
            "64x64",
            "--seed",
            "420",
            "--out",
            item_out,
        ]);
        assert!(o.status.success(), "{}", text(&o));
    }

    let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
    let (c101, model_s) = (s(&data), s(&model));
    let o = mip(&[
        &["eval", "--concept101", &c101][..],
        &dirs,
        &["--model", &model_s, "--json"],
    ]
    .concat());
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    let combos = r["combinations"].as_array().expect("combinations");
    assert_eq!(combos.len(), 2);
    // Per image, plain `mip eval` (these prompts end in their only `.`, so the published caption is the prompt).
    let o = mip(&[&["eval"][..], &dirs, &["--model", &model_s, "--json"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let per_image: Value = serde_json::from_slice(&o.stdout).expect("json");
    let images = per_image["images"].as_array().expect("images");
    assert_eq!(images.len(), 4);
    for (k, combo) in combos.iter().enumerate() {
        assert_eq!(combo["images"], 2);
        let jacket_dir = format!("wearable_jacket{}", k + 1);
        let mine: Vec<&Value> = images
            .iter()
            .filter(|i| {
                let png = std::path::PathBuf::from(i["image"].as_str().expect("image"));
                let sidecar: Value =
                    serde_json::from_slice(&std::fs::read(png.with_extension("json")).expect("sidecar")).expect("json");
                sidecar["subjects"][1]["arg"]
                    .as_str()
                    .is_some_and(|a| a.contains(&jacket_dir))
            })
            .collect();
        assert_eq!(mine.len(), 2);
        for key in ["clip_t", "clip_i", "dino"] {
            // The mean of the full (images x references) matrix is the mean of each image's own mean.
            let want = mine.iter().map(|i| i[key].as_f64().expect(key)).sum::<f64>() / 2.0;
            let got = combo[key].as_f64().expect(key);
            assert!((got - want).abs() < 1e-9, "combination {k} {key}: {got} vs {want}");
        }
    }
    let agg = &r["aggregate"];
    for key in ["clip_t", "clip_i", "dino"] {
        let want = combos.iter().map(|c| c[key].as_f64().expect(key)).sum::<f64>() / 2.0;
        assert!((agg[key].as_f64().expect(key) - want).abs() < 1e-12, "{key}");
    }
}
