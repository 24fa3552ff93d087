//! `mip eval --concept101 DATA_ROOT`: MIP-Adapter's multi-subject benchmark on a local copy of the
//! CustomConcept101 layout, done as the paper's evaluation does it.
//!
//! - The protocol: `dataset_multiconcept.json` lists combinations of two concepts (each with its `class_prompt`
//!   and `instance_data_dir`) and a prompt file (`prompt_filename_compose`, one prompt per line with `{0}` and
//!   `{1}` for the two class names). A concept's reference images are every image in
//!   `benchmark_dataset/<last component of instance_data_dir>` (names ending in .png, .jpg, .jpeg, .tiff, .JPG).
//! - `--write-manifest FILE` writes each combination x prompt as a `mip submit` item (both subjects with all their
//!   reference images, 30 steps, seed 420, scale 0.6, the published inference settings).
//! - Scoring: the outputs (sidecars in DIR…) are matched to the protocol by prompt and by the concept folders of
//!   their subjects' images; every protocol prompt must have an output. Per combination, CLIP-T is the mean over
//!   its images against the caption the published script derives from the file name it saves (the prompt up to its
//!   first `.`, then `.`); CLIP-I and DINO are, per concept, the mean of the full (images x references) cosine
//!   matrix, averaged over the two concepts. The table averages the combinations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mip_worker::eval::metrics::{clip_t, mean, set_similarity};
use serde_json::{json, Value};

use crate::eval::{file_features, items, models, progress, Args};

/// Reference image names the published evaluation lists (case as written there).
const IMAGE_SUFFIXES: [&str; 5] = [".png", ".jpg", ".jpeg", ".tiff", ".JPG"];

/// The published inference settings.
const STEPS: u32 = 30;
const SEED: u64 = 420;
const SCALE: f64 = 0.6;

/// One concept of a combination.
#[derive(Debug, Clone)]
struct Concept {
    /// Its class name, put in the prompts and used as the subject's name.
    name: String,
    dir: PathBuf,
    images: Vec<PathBuf>,
}

/// One combination: two concepts and their prompts.
#[derive(Debug, Clone)]
struct Combination {
    index: usize,
    concepts: [Concept; 2],
    prompts: Vec<String>,
}

fn read_concept(data: &Path, v: &Value, what: &str) -> Result<Concept> {
    let name = v["class_prompt"]
        .as_str()
        .with_context(|| format!("{what}: no `class_prompt`"))?;
    let dir = v["instance_data_dir"]
        .as_str()
        .with_context(|| format!("{what}: no `instance_data_dir`"))?;
    let last = dir.trim_end_matches('/').rsplit('/').next().unwrap_or(dir);
    let dir = data.join("benchmark_dataset").join(last);
    let mut images: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("{what}: reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            IMAGE_SUFFIXES.iter().any(|s| n.ends_with(s))
        })
        .collect();
    images.sort();
    if images.is_empty() {
        bail!("{what}: no reference images in {}", dir.display());
    }
    Ok(Concept {
        name: name.to_owned(),
        dir,
        images,
    })
}

/// The combinations of `DATA_ROOT/dataset_multiconcept.json` with their prompts filled in.
fn read_protocol(data: &Path) -> Result<Vec<Combination>> {
    let path = data.join("dataset_multiconcept.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let all: Vec<Value> = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut out = Vec::with_capacity(all.len());
    for (index, comb) in all.iter().enumerate() {
        let what = format!("{} combination {index}", path.display());
        let a = read_concept(data, &comb[0], &what)?;
        let b = read_concept(data, &comb[1], &what)?;
        let file = comb[2]["prompt_filename_compose"]
            .as_str()
            .with_context(|| format!("{what}: no `prompt_filename_compose`"))?;
        let file = data.join(file);
        let prompts = std::fs::read_to_string(&file)
            .with_context(|| format!("{what}: reading {}", file.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.replace("{0}", &a.name).replace("{1}", &b.name))
            .collect();
        out.push(Combination {
            index,
            concepts: [a, b],
            prompts,
        });
    }
    Ok(out)
}

/// The caption the published script scores an image against: it saves `{prompt}_gen.png` and reads the caption
/// back as the file name up to its first `.`, followed by `.`.
pub fn published_caption(prompt: &str) -> String {
    let name = format!("{prompt}_gen.png");
    format!("{}.", name.split('.').next().unwrap_or_default())
}

fn write_manifest(protocol: &[Combination], file: &Path) -> Result<usize> {
    let abs = |p: &Path| -> Result<String> {
        Ok(std::fs::canonicalize(p)
            .with_context(|| format!("resolving {}", p.display()))?
            .display()
            .to_string())
    };
    let mut lines = Vec::new();
    for c in protocol {
        let subjects = c
            .concepts
            .iter()
            .map(|k| {
                let images = k.images.iter().map(|p| abs(p)).collect::<Result<Vec<_>>>()?;
                Ok(json!({"name": k.name, "images": images}))
            })
            .collect::<Result<Vec<_>>>()?;
        for p in &c.prompts {
            let item = json!({"prompt": p, "subjects": subjects, "steps": STEPS, "seed": SEED, "scale": SCALE});
            lines.push(item.to_string());
        }
    }
    std::fs::write(file, lines.join("\n") + "\n").with_context(|| format!("writing {}", file.display()))?;
    Ok(lines.len())
}

/// The folder an output's subject images come from (canonical, so any spelling of the path matches).
fn folder_of(images: &[PathBuf]) -> Option<PathBuf> {
    let parent = images.first()?.parent()?;
    std::fs::canonicalize(parent).ok()
}

pub fn run(a: &Args) -> Result<()> {
    let data = a.concept101.as_deref().context("--concept101 DATA_ROOT")?;
    let protocol = read_protocol(data)?;
    if let Some(file) = &a.write_manifest {
        let n = write_manifest(&protocol, file)?;
        if a.json {
            println!(
                "{}",
                json!({"manifest": file, "items": n, "combinations": protocol.len()})
            );
        } else {
            println!(
                "wrote {} ({n} requests, {} combinations)",
                file.display(),
                protocol.len()
            );
        }
        return Ok(());
    }
    // Outputs by (prompt, first concept folder, second concept folder).
    let mut outputs: BTreeMap<(String, PathBuf, PathBuf), Vec<PathBuf>> = BTreeMap::new();
    for item in items(&a.dirs)? {
        if let [(_, x), (_, y)] = item.subjects.as_slice() {
            if let (Some(x), Some(y)) = (folder_of(x), folder_of(y)) {
                outputs.entry((item.prompt.clone(), x, y)).or_default().push(item.image);
            }
        }
    }
    let mut plan = Vec::with_capacity(protocol.len());
    let mut missing = Vec::new();
    for c in &protocol {
        let [x, y] = [&c.concepts[0].dir, &c.concepts[1].dir].map(|d| std::fs::canonicalize(d).unwrap_or(d.clone()));
        let mut images = Vec::new();
        for p in &c.prompts {
            match outputs.get(&(p.clone(), x.clone(), y.clone())) {
                Some(found) => images.extend(found.iter().map(|i| (p.clone(), i.clone()))),
                None => missing.push(format!("combination {}: {p:?}", c.index)),
            }
        }
        plan.push((c, images));
    }
    if !missing.is_empty() {
        bail!(
            "{} of the protocol's prompts have no output in {:?} (first: {}); generate them from \
             `--write-manifest` with `mip submit`",
            missing.len(),
            a.dirs,
            missing[0]
        );
    }
    let scorer = models(a)?;
    let bar = progress(plan.iter().map(|(_, i)| i.len()).sum(), a.json);
    let mut refs: BTreeMap<PathBuf, (Vec<f32>, Vec<f32>)> = BTreeMap::new();
    let mut rows = Vec::with_capacity(plan.len());
    for (c, images) in plan {
        let mut gen_clip = Vec::with_capacity(images.len());
        let mut gen_dino = Vec::with_capacity(images.len());
        let mut clip_ts = Vec::with_capacity(images.len());
        for (prompt, path) in &images {
            let (ic, id) = file_features(&scorer, path)?;
            let text = scorer.text_features(&published_caption(prompt))?;
            clip_ts.push(clip_t(&ic, &text));
            gen_clip.push(ic);
            gen_dino.push(id);
            bar.inc(1);
        }
        let mut clip_i = Vec::new();
        let mut dino_i = Vec::new();
        for k in &c.concepts {
            for p in &k.images {
                if !refs.contains_key(p) {
                    refs.insert(p.clone(), file_features(&scorer, p)?);
                }
            }
            let rc: Vec<Vec<f32>> = k.images.iter().map(|p| refs[p].0.clone()).collect();
            let rd: Vec<Vec<f32>> = k.images.iter().map(|p| refs[p].1.clone()).collect();
            clip_i.extend(set_similarity(&gen_clip, &rc));
            dino_i.extend(set_similarity(&gen_dino, &rd));
        }
        rows.push(json!({
            "combination": c.index,
            "concepts": [c.concepts[0].name, c.concepts[1].name],
            "images": images.len(),
            "clip_t": mean(clip_ts), "clip_i": mean(clip_i), "dino": mean(dino_i),
        }));
    }
    bar.finish_and_clear();
    let metric = |key: &str| mean(rows.iter().filter_map(|r| r[key].as_f64()));
    let aggregate = json!({"combinations": rows.len(), "clip_t": metric("clip_t"), "clip_i": metric("clip_i"),
                           "dino": metric("dino")});
    if a.json {
        let out = json!({"combinations": rows, "aggregate": aggregate});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.4}"));
    println!(
        "{:<6} {:<32} {:>6} {:>8} {:>8} {:>8}",
        "comb", "concepts", "images", "CLIP-T", "CLIP-I", "DINO"
    );
    for r in &rows {
        let names = format!(
            "{} + {}",
            r["concepts"][0].as_str().unwrap_or(""),
            r["concepts"][1].as_str().unwrap_or("")
        );
        println!(
            "{:<6} {names:<32} {:>6} {:>8} {:>8} {:>8}",
            r["combination"],
            r["images"],
            f(&r["clip_t"]),
            f(&r["clip_i"]),
            f(&r["dino"])
        );
    }
    println!(
        "{:<6} {:<32} {:>6} {:>8} {:>8} {:>8}",
        "mean",
        format!("{} combinations", rows.len()),
        "",
        f(&aggregate["clip_t"]),
        f(&aggregate["clip_i"]),
        f(&aggregate["dino"])
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caption_is_the_saved_file_name_up_to_its_first_dot() {
        assert_eq!(
            published_caption("photo of dog wearing the jacket."),
            "photo of dog wearing the jacket."
        );
        assert_eq!(
            published_caption("A cute shot of dog wearing jacket. "),
            "A cute shot of dog wearing jacket."
        );
        assert_eq!(published_caption("a dog on a sofa"), "a dog on a sofa_gen.");
        assert_eq!(published_caption("dr. dog in a hat."), "dr.");
    }
}
