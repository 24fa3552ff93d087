//! Reading a `mip submit` manifest: JSONL (`.jsonl`, `.ndjson`: one request per line, blank and `#` lines ignored)
//! or YAML (`.yaml`, `.yml`: a sequence of items). Each item becomes an [`Entry`] with its line (and, for YAML, its
//! index): either a [`Ready`] item (parsed with unknown fields refused, images read relative to the manifest,
//! values checked with the worker's own request validation) or the one-line reason it is bad.
//!
//! A ready item's idempotency key is the blake3 of its canonical JSON and its images' bytes, so the same item
//! with the same photos always maps to the same job and the same output names.

use std::path::Path;

use anyhow::{bail, Context, Result};
use mip_coordinator::best_of::parse_rank;
use mip_proto::v1::{GenerationRequest, JobImage, RankBy, Subject, SubmitJobRequest};
use mip_worker::pipeline::{GenerateRequest, SubjectRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One request of the manifest, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub prompt: String,
    pub subjects: Vec<ItemSubject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Score each image (CLIP-T, CLIP-I, DINO) with the workers' evaluation models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<bool>,
    /// Best-of-N: keep only this many of the `samples` (the best by `rank_by`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_best: Option<u32>,
    /// `clip_i` (default), `dino`, `clip_t` or `mean`; only with `keep_best`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_by: Option<String>,
}

/// A subject: its name in the prompt and its photos (paths relative to the manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemSubject {
    pub name: String,
    pub images: Vec<String>,
}

/// An item ready to submit.
#[derive(Debug, Clone)]
pub struct Ready {
    pub item: Item,
    pub job: SubmitJobRequest,
    /// Hex blake3 of the canonical JSON and the images.
    pub key: String,
}

impl Ready {
    /// The output name of an image: by its sample index, or with `keep_best` by its rank (`…-best1` is the best).
    pub fn stem(&self, image: &JobImage) -> String {
        self.stem_at(if self.item.keep_best.is_some() {
            image.rank
        } else {
            image.sample_index
        })
    }

    /// The output name of the `k`-th image the item returns (its sample index, or its rank with `keep_best`).
    pub fn stem_at(&self, k: u32) -> String {
        match self.item.keep_best {
            Some(_) => format!("{}-best{k}", &self.key[..20]),
            None => format!("{}-{k}", &self.key[..20]),
        }
    }

    /// The `k`s of [`Self::stem_at`] the item's outputs have.
    pub fn outputs(&self) -> std::ops::Range<u32> {
        match self.item.keep_best {
            Some(keep) => 1..keep + 1,
            None => 0..self.samples(),
        }
    }

    pub fn samples(&self) -> u32 {
        self.item.samples.unwrap_or(1)
    }
}

/// One item of the manifest: where it is and what became of it.
#[derive(Debug)]
pub struct Entry {
    /// 1-based line where the item starts.
    pub line: usize,
    /// 0-based index among the manifest's items (YAML) or non-empty lines (JSONL).
    pub index: usize,
    pub item: std::result::Result<Ready, String>,
}

impl Entry {
    /// `line 4` (JSONL) or `item 2 (line 9)` (YAML).
    pub fn place(&self, yaml: bool) -> String {
        if yaml {
            format!("item {} (line {})", self.index, self.line)
        } else {
            format!("line {}", self.line)
        }
    }
}

/// Whether the manifest is YAML (by extension); JSONL otherwise; other extensions are an error.
pub fn is_yaml(path: &Path) -> Result<bool> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("yaml" | "yml") => Ok(true),
        Some("jsonl" | "ndjson") => Ok(false),
        _ => bail!(
            "the manifest must end in .jsonl, .ndjson, .yaml or .yml, got {}",
            path.display()
        ),
    }
}

/// Reads and checks every item of the manifest at `path`.
pub fn read(path: &Path) -> Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the manifest {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let raw = if is_yaml(path)? {
        crate::yaml::items(&text).with_context(|| format!("{}", path.display()))?
    } else {
        jsonl_items(&text)
    };
    Ok(raw
        .into_iter()
        .enumerate()
        .map(|(index, (line, value))| Entry {
            line,
            index,
            item: value.and_then(|v| prepare(v, base)),
        })
        .collect())
}

/// `(line, value or parse error)` for every non-empty, non-comment line.
fn jsonl_items(text: &str) -> Vec<(usize, std::result::Result<Value, String>)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| (i + 1, serde_json::from_str(l).map_err(|e| format!("invalid JSON: {e}"))))
        .collect()
}

/// A parsed value into a ready item: the shape, the images, the values, the key.
fn prepare(value: Value, base: &Path) -> std::result::Result<Ready, String> {
    let item: Item = serde_json::from_value(value).map_err(|e| format!("invalid item: {e}"))?;
    let mut subjects = Vec::with_capacity(item.subjects.len());
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mip-submit-v1\0");
    let canonical = serde_json::to_vec(&item).map_err(|e| format!("invalid item: {e}"))?;
    hasher.update(&(canonical.len() as u64).to_le_bytes());
    hasher.update(&canonical);
    for s in &item.subjects {
        if s.images.is_empty() {
            return Err(format!("subject {:?}: `images` must name at least one file", s.name));
        }
        let mut images = Vec::with_capacity(s.images.len());
        for p in &s.images {
            let full = base.join(p);
            let bytes = std::fs::read(&full)
                .map_err(|e| format!("subject {:?}: cannot read {}: {e}", s.name, full.display()))?;
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
            images.push(bytes);
        }
        subjects.push(Subject {
            name: s.name.clone(),
            images,
            subject_key: String::new(),
        });
    }
    check(&item, &subjects)?;
    let request = GenerationRequest {
        prompt: item.prompt.clone(),
        negative_prompt: item.negative_prompt.clone(),
        subjects,
        width: item.width.unwrap_or(0),
        height: item.height.unwrap_or(0),
        steps: item.steps.unwrap_or(0),
        guidance: item.guidance,
        scale: item.scale,
        scheduler: item.scheduler.clone().unwrap_or_default(),
        seed: item.seed,
        score: item.score.unwrap_or(false),
    };
    let key = hasher.finalize().to_hex().to_string();
    let job = SubmitJobRequest {
        requests: vec![request],
        samples: item.samples.unwrap_or(1),
        priority: item.priority.unwrap_or(0),
        idempotency_key: format!("submit-{key}"),
        keep_best: item.keep_best.unwrap_or(0),
        rank_by: rank_by(&item)? as i32,
        ..Default::default()
    };
    Ok(Ready { item, job, key })
}

/// The item's `rank_by`, checked.
fn rank_by(item: &Item) -> std::result::Result<RankBy, String> {
    match (&item.rank_by, item.keep_best) {
        (None, _) => Ok(RankBy::Unspecified),
        (Some(r), None) => Err(format!("`rank_by` applies only with `keep_best`, got {r:?}")),
        (Some(r), Some(_)) => {
            parse_rank(r).ok_or_else(|| format!("`rank_by` must be clip_i, dino, clip_t or mean, got {r:?}"))
        }
    }
}

/// The worker's own checks, with placeholders for the values the server fills in (size, scale).
fn check(item: &Item, subjects: &[Subject]) -> std::result::Result<(), String> {
    if let Some(s) = item.samples {
        if !(1..=64).contains(&s) {
            return Err(format!("`samples` must be in 1..=64, got {s}"));
        }
    }
    if let Some(k) = item.keep_best {
        let samples = item.samples.unwrap_or(1);
        if !(1..=samples).contains(&k) {
            return Err(format!("`keep_best` must be in 1..=samples ({samples}), got {k}"));
        }
    }
    let request = GenerateRequest {
        prompt: item.prompt.clone(),
        negative_prompt: item.negative_prompt.clone(),
        subjects: subjects
            .iter()
            .map(|s| SubjectRequest {
                name: s.name.clone(),
                // Stand-ins with the same count and emptiness: the bytes are checked by the worker.
                images: s
                    .images
                    .iter()
                    .map(|b| if b.is_empty() { Vec::new() } else { vec![0] })
                    .collect(),
            })
            .collect(),
        width: item.width.unwrap_or(1024) as usize,
        height: item.height.unwrap_or(1024) as usize,
        steps: item.steps.unwrap_or(30) as usize,
        guidance: item.guidance.unwrap_or(5.0),
        scale: item.scale,
        scheduler: item.scheduler.clone().unwrap_or_else(|| "euler".into()),
        seed: item.seed,
    };
    request.validate(0.75).map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_keep_their_numbers() {
        let items = jsonl_items("{\"a\":1}\n\n# note\n{broken\n");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].0, 1);
        assert_eq!(items[1].0, 4);
        assert!(items[1].1.as_ref().is_err_and(|e| e.contains("invalid JSON")));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let dir = std::env::temp_dir();
        let e = prepare(serde_json::json!({"prompt": "x", "subjects": [], "colour": 1}), &dir).expect_err("unknown");
        assert!(e.contains("colour"), "{e}");
        let e = prepare(
            serde_json::json!({"prompt": "x", "subjects": [{"name": "cat", "images": []}]}),
            &dir,
        )
        .expect_err("no images");
        assert!(e.contains("images"), "{e}");
    }

    #[test]
    fn best_of_items_are_checked_and_named_by_rank() {
        let dir = tempfile::tempdir().expect("tempdir");
        let png = dir.path().join("cat.png");
        image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9]))
            .save(&png)
            .expect("png");
        let item = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"prompt": "a cat", "subjects": [{"name": "cat", "images": ["cat.png"]}]});
            for (k, x) in extra.as_object().expect("object") {
                v[k] = x.clone();
            }
            prepare(v, dir.path())
        };
        let e = item(serde_json::json!({"rank_by": "dino"})).expect_err("no keep_best");
        assert!(e.contains("`rank_by` applies only with `keep_best`"), "{e}");
        let e = item(serde_json::json!({"samples": 2, "keep_best": 3})).expect_err("3 of 2");
        assert!(e.contains("`keep_best` must be in 1..=samples (2), got 3"), "{e}");
        let e = item(serde_json::json!({"samples": 2, "keep_best": 1, "rank_by": "best"})).expect_err("unknown");
        assert!(e.contains("clip_i, dino, clip_t or mean"), "{e}");
        let ready =
            item(serde_json::json!({"samples": 4, "keep_best": 2, "rank_by": "dino", "score": true})).expect("valid");
        assert_eq!((ready.job.keep_best, ready.job.rank_by), (2, RankBy::Dino as i32));
        assert!(ready.job.requests[0].score);
        assert_eq!(ready.outputs(), 1..3);
        let kept = JobImage {
            rank: 1,
            sample_index: 3,
            ..Default::default()
        };
        assert!(ready.stem(&kept).ends_with("-best1"), "{}", ready.stem(&kept));
    }
}
