//! `mip eval DIR…`: scores generated images with the published metrics. Every JSON sidecar in the folders (as
//! `mip generate` and `mip submit` write them: the image's file name, the prompt, and each subject's name with its
//! reference images, a submitted one's relative to its manifest) gives one image; its CLIP-T is scored against the
//! prompt, its CLIP-I and DINO against each subject's reference images and averaged over the subjects. The
//! aggregates average per prompt, then over prompts. The evaluation models come from the bundle's `mip.json`
//! (`eval`: the demo bundle has tiny ones) or `--clip` / `--dino`. With `--concept101 DATA_ROOT`, the
//! CustomConcept101 protocol instead ([`crate::eval_concept101`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use mip_worker::eval::metrics::mean;
use mip_worker::eval::scorer::{EvalPixels, ReferenceFeatures, Scorer};
use mip_worker::pipeline::image_decode::{decode_rgb_with, Alpha, DEFAULT_MAX_PIXELS};
use serde_json::{json, Value};

use crate::device::DeviceArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folders of generated images with their JSON sidecars.
    #[arg(required_unless_present = "write_manifest")]
    pub(crate) dirs: Vec<PathBuf>,
    /// `demo` or a model bundle whose mip.json names the evaluation models (`eval`).
    #[arg(long, default_value = "demo")]
    model: String,
    /// The evaluation CLIP folder (a transformers CLIPModel with its tokenizer), instead of the bundle's.
    #[arg(long)]
    clip: Option<PathBuf>,
    /// The evaluation DINO folder (a transformers ViTModel), instead of the bundle's.
    #[arg(long)]
    dino: Option<PathBuf>,
    /// The CustomConcept101 protocol on a local copy of its layout (`dataset_multiconcept.json`, `prompts/`,
    /// `benchmark_dataset/`): each combination's outputs scored against its prompts and both concepts' images.
    #[arg(long, value_name = "DATA_ROOT")]
    pub(crate) concept101: Option<PathBuf>,
    /// With `--concept101`: write the protocol's requests as a `mip submit` manifest (JSONL) and exit.
    #[arg(long, value_name = "FILE", requires = "concept101")]
    pub(crate) write_manifest: Option<PathBuf>,
    #[command(flatten)]
    run_on: DeviceArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// One image to score, read from its sidecar.
pub(crate) struct Item {
    pub(crate) image: PathBuf,
    pub(crate) prompt: String,
    pub(crate) subjects: Vec<(String, Vec<PathBuf>)>,
}

/// A reference path as written in a sidecar: as given when it exists, else relative to the first of `bases` (the
/// sidecar's folder, then the folder of the manifest it came from) where it exists, else to the first base (so the
/// error names that path).
fn resolve(path: &str, bases: &[&Path]) -> PathBuf {
    let p = PathBuf::from(path);
    if p.is_absolute() || p.exists() {
        return p;
    }
    let joined: Vec<PathBuf> = bases.iter().map(|b| b.join(&p)).collect();
    joined
        .iter()
        .find(|c| c.exists())
        .or(joined.first())
        .cloned()
        .unwrap_or(p)
}

fn read_item(sidecar: &Path) -> Result<Option<Item>> {
    let text = std::fs::read_to_string(sidecar).with_context(|| format!("reading {}", sidecar.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", sidecar.display()))?;
    let (Some(image), Some(prompt)) = (v["image"].as_str(), v["prompt"].as_str()) else {
        return Ok(None);
    };
    let dir = sidecar.parent().unwrap_or(Path::new("."));
    // `mip submit` outputs name their images as written in the manifest, relative to it.
    let manifest_dir = v["manifest"]
        .as_str()
        .and_then(|m| Path::new(m).parent().map(Path::to_path_buf));
    let bases: Vec<&Path> = std::iter::once(dir).chain(manifest_dir.as_deref()).collect();
    let mut subjects = Vec::new();
    for s in v["subjects"].as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap_or_default().to_owned();
        let images: Vec<PathBuf> = match (s["images"].as_array(), s["arg"].as_str()) {
            (Some(list), _) => list
                .iter()
                .filter_map(Value::as_str)
                .map(|p| resolve(p, &bases))
                .collect(),
            (None, Some(arg)) => arg
                .split_once('=')
                .map(|(_, imgs)| imgs.split(',').map(|p| resolve(p, &bases)).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        if images.is_empty() {
            bail!("{}: subject `{name}` names no reference images", sidecar.display());
        }
        subjects.push((name, images));
    }
    Ok(Some(Item {
        image: dir.join(image),
        prompt: prompt.to_owned(),
        subjects,
    }))
}

/// Every image sidecar in `dirs` (none is not an error here).
pub(crate) fn items(dirs: &[PathBuf]) -> Result<Vec<Item>> {
    let mut out = Vec::new();
    for dir in dirs {
        let mut sidecars: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        sidecars.sort();
        for s in sidecars {
            out.extend(read_item(&s)?);
        }
    }
    Ok(out)
}

/// The CLIP and DINO features of one image file (a reference, or a generated image in the Concept101 protocol).
pub(crate) fn file_features(scorer: &Scorer, path: &Path) -> Result<(Vec<f32>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let px = EvalPixels::decode(&bytes, &path.display().to_string(), DEFAULT_MAX_PIXELS)?;
    Ok(scorer.features(&px)?)
}

/// The evaluation models: the bundle's (`eval` in mip.json), or `--clip` / `--dino`.
pub(crate) fn models(a: &Args) -> Result<Scorer> {
    let (device, dtype) = a.run_on.resolve()?;
    load_models(a, &device, dtype)
}

fn load_models(a: &Args, device: &Device, dtype: candle_core::DType) -> Result<Scorer> {
    let bundle = match (&a.clip, &a.dino) {
        (Some(_), Some(_)) => None,
        _ => crate::model::resolve(&a.model)?.0.eval,
    };
    let pick = |given: &Option<PathBuf>, from_bundle: Option<PathBuf>, what: &str| -> Result<PathBuf> {
        given.clone().or(from_bundle).with_context(|| {
            format!(
                "no evaluation {what} model: the bundle `{}` names none (`eval` in mip.json); pass --{what}",
                a.model
            )
        })
    };
    let clip_dir = pick(&a.clip, bundle.as_ref().map(|e| e.clip.clone()), "clip")?;
    let dino_dir = pick(&a.dino, bundle.as_ref().map(|e| e.dino.clone()), "dino")?;
    Ok(Scorer::load(&clip_dir, &dino_dir, device, dtype)?)
}

pub fn run(a: Args) -> Result<()> {
    if a.concept101.is_some() {
        return crate::eval_concept101::run(&a);
    }
    let scorer = models(&a)?;
    let items = items(&a.dirs)?;
    if items.is_empty() {
        bail!("no image sidecars (JSON with `image` and `prompt`) in {:?}", a.dirs);
    }
    let bar = progress(items.len(), a.json);
    let mut refs: BTreeMap<PathBuf, (Vec<f32>, Vec<f32>)> = BTreeMap::new();
    let mut rows = Vec::with_capacity(items.len());
    for item in &items {
        let mut subjects = Vec::with_capacity(item.subjects.len());
        for (name, images) in &item.subjects {
            for p in images {
                if !refs.contains_key(p) {
                    refs.insert(p.clone(), file_features(&scorer, p)?);
                }
            }
            let features = ReferenceFeatures {
                clip: images.iter().map(|p| refs[p].0.clone()).collect(),
                dino: images.iter().map(|p| refs[p].1.clone()).collect(),
            };
            subjects.push((name.clone(), features));
        }
        let bytes = std::fs::read(&item.image).with_context(|| format!("reading {}", item.image.display()))?;
        let field = item.image.display().to_string();
        let rgb = decode_rgb_with(&bytes, &field, DEFAULT_MAX_PIXELS, Alpha::Drop)?;
        // The very computation a worker does for a scored request.
        let s = scorer.score(&rgb, &item.prompt, &subjects)?;
        let per_subject: Vec<Value> = s
            .subjects
            .iter()
            .map(|x| json!({"name": x.name, "clip_i": x.clip_i, "dino": x.dino}))
            .collect();
        rows.push(json!({
            "image": item.image.display().to_string(), "prompt": item.prompt,
            "clip_t": s.clip_t, "clip_i": s.clip_i, "dino": s.dino, "subjects": per_subject,
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let aggregate = aggregate(&rows);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"images": rows, "aggregate": aggregate}))?
        );
        return Ok(());
    }
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.4}"));
    println!("{:<48} {:>8} {:>8} {:>8}", "image", "CLIP-T", "CLIP-I", "DINO");
    for r in &rows {
        let name = Path::new(r["image"].as_str().unwrap_or_default())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        println!(
            "{name:<48} {:>8} {:>8} {:>8}",
            f(&r["clip_t"]),
            f(&r["clip_i"]),
            f(&r["dino"])
        );
    }
    println!(
        "{:<48} {:>8} {:>8} {:>8}",
        format!("mean ({} prompts, {} images)", aggregate["prompts"], rows.len()),
        f(&aggregate["clip_t"]),
        f(&aggregate["clip_i"]),
        f(&aggregate["dino"])
    );
    Ok(())
}

/// The scoring progress bar (hidden when output is JSON or not a terminal).
pub(crate) fn progress(images: usize, json: bool) -> ProgressBar {
    if !crate::jobs::bars_enabled(json) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(images as u64);
    bar.set_style(
        ProgressStyle::with_template("scoring [{bar:30}] {pos}/{len} images {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#>-"),
    );
    bar
}

/// Each metric averaged per prompt, then over prompts.
fn aggregate(rows: &[Value]) -> Value {
    let mut by_prompt: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for r in rows {
        by_prompt
            .entry(r["prompt"].as_str().unwrap_or_default())
            .or_default()
            .push(r);
    }
    let metric = |key: &str| {
        mean(
            by_prompt
                .values()
                .filter_map(|group| mean(group.iter().filter_map(|r| r[key].as_f64()))),
        )
    };
    json!({"prompts": by_prompt.len(), "images": rows.len(),
           "clip_t": metric("clip_t"), "clip_i": metric("clip_i"), "dino": metric("dino")})
}
