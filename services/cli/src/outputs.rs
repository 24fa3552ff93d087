//! Writing a job's images: each as a PNG (the worker already put the generation parameters in its tEXt chunks)
//! with a JSON sidecar that repeats them (read back from the PNG, so they are the values actually used) plus what
//! the caller adds (subjects, model, job id), and the image's scores and rank when it has them. Files are written to a temporary name and renamed, sidecar first, so
//! an existing PNG always means a complete output.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mip_proto::v1::JobImage;
use serde_json::{json, Map, Value};

/// Where one image went.
#[derive(Debug, Clone)]
pub struct Written {
    pub png: PathBuf,
    pub json: PathBuf,
    pub seed: u64,
}

impl Written {
    pub fn to_json(&self) -> Value {
        json!({"png": self.png, "json": self.json, "seed": self.seed})
    }
}

/// The PNG and sidecar paths of `stem` in `dir`.
pub fn paths(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{stem}.png")), dir.join(format!("{stem}.json")))
}

/// Writes `image` as `dir/stem.png` and `dir/stem.json`; `extra` goes into the sidecar as is.
pub fn write_image(
    dir: &Path,
    stem: &str,
    image: &JobImage,
    job_id: &str,
    extra: &Map<String, Value>,
) -> Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (png, sidecar_path) = paths(dir, stem);
    let mut sidecar = Map::new();
    sidecar.insert(
        "image".into(),
        json!(png.file_name().map(|n| n.to_string_lossy().into_owned())),
    );
    sidecar.insert("job_id".into(), json!(job_id));
    for (k, v) in png_parameters(&image.png) {
        sidecar.insert(k, v);
    }
    sidecar.insert("seed".into(), json!(image.seed));
    sidecar.insert("width".into(), json!(image.width));
    sidecar.insert("height".into(), json!(image.height));
    sidecar.insert("worker".into(), json!(image.worker));
    if let Some(t) = &image.timings {
        let ms = json!({"queue": t.queue_ms, "text": t.text_ms, "subjects": t.subjects_ms, "denoise": t.denoise_ms,
            "decode": t.decode_ms, "png": t.png_ms, "score": t.score_ms});
        sidecar.insert("timings_ms".into(), ms);
    }
    if let Some(s) = &image.scores {
        let subjects: Vec<Value> = s
            .subjects
            .iter()
            .map(|x| json!({"name": x.name, "clip_i": x.clip_i, "dino": x.dino}))
            .collect();
        let scores = json!({"clip_t": s.clip_t, "clip_i": s.clip_i, "dino": s.dino, "subjects": subjects});
        sidecar.insert("scores".into(), scores);
    }
    if image.rank > 0 {
        sidecar.insert("rank".into(), json!(image.rank));
        sidecar.insert("sample".into(), json!(image.sample_index));
    }
    for (k, v) in extra {
        sidecar.insert(k.clone(), v.clone());
    }
    write_atomic(&sidecar_path, &serde_json::to_vec_pretty(&Value::Object(sidecar))?)?;
    write_atomic(&png, &image.png)?;
    Ok(Written {
        png,
        json: sidecar_path,
        seed: image.seed,
    })
}

/// The generation parameters of a PNG's text chunks, numbers as numbers (`subjects` is left to the caller, the
/// scores come from the image's `scores`).
fn png_parameters(png: &[u8]) -> Vec<(String, Value)> {
    let Ok(text) = mip_worker::pipeline::png::decode_png_text(png) else {
        return Vec::new();
    };
    text.into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "subjects" | "seed" | "clip_t" | "clip_i" | "dino"))
        .map(|(k, v)| {
            let value = match k.as_str() {
                "steps" => v.parse::<u64>().map(Value::from).unwrap_or(Value::String(v)),
                "guidance" | "scale" => v.parse::<f64>().map(Value::from).unwrap_or(Value::String(v)),
                _ => Value::String(v),
            };
            (k, value)
        })
        .collect()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.part",
        path.extension().and_then(|e| e.to_str()).unwrap_or("out")
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
