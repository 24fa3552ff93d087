//! `mip generate`: the embedded default. Loads the model in this process, encodes the subjects, generates
//! `--samples` images and writes each as a PNG (generation parameters in tEXt chunks) with a JSON sidecar.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mip_worker::pipeline::{GenerateRequest, MipPipeline, SubjectRequest};
use serde_json::json;

use crate::device::{parse_size, DeviceArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The prompt; each subject's name should appear in it.
    #[arg(long)]
    prompt: String,
    /// A subject as NAME=IMG[,IMG…] (repeat for several subjects, 1 to 8).
    #[arg(long = "subject", value_name = "NAME=IMG[,IMG…]")]
    subjects: Vec<String>,
    /// Negative prompt (absent: zero negative embeddings, as SDXL does).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Seed of the first sample (absent: drawn at random and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Image size WxH, multiples of 8 (default: the model's, 1024x1024 for SDXL).
    #[arg(long)]
    size: Option<String>,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Image-prompt scale (default: 0.75 for sdxl, 0.65 for sdxl_plus).
    #[arg(long)]
    scale: Option<f64>,
    /// Number of images (seeds seed, seed+1, …).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// euler, ddim or dpmpp_2m_karras.
    #[arg(long, default_value = "euler")]
    scheduler: String,
    /// Output folder.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// `demo` (the built-in demo model) or a model bundle folder (with mip.json).
    #[arg(long, default_value = "demo")]
    model: String,
    #[command(flatten)]
    run_on: DeviceArgs,
    /// Print one JSON object per image instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, verbose: bool) -> Result<()> {
    if args.samples == 0 || args.samples > 64 {
        bail!("`--samples` must be in 1..=64, got {}", args.samples);
    }
    let subjects = args
        .subjects
        .iter()
        .map(|s| parse_subject(s))
        .collect::<Result<Vec<_>>>()?;
    let (device, dtype) = args.run_on.resolve()?;
    let (spec, _dir) = crate::model::resolve(&args.model)?;
    let (width, height) = match &args.size {
        Some(s) => parse_size(s)?,
        None => spec.default_size.map(|[w, h]| (w, h)).unwrap_or((1024, 1024)),
    };
    if verbose {
        eprintln!("loading model from {}", spec.base.display());
    }
    let pipeline = MipPipeline::load(&spec, &device, dtype)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let first_seed = args.seed.unwrap_or_else(rand_seed);
    for k in 0..args.samples {
        let request = GenerateRequest {
            prompt: args.prompt.clone(),
            negative_prompt: args.negative_prompt.clone(),
            subjects: subjects.clone(),
            width,
            height,
            steps: args.steps,
            guidance: args.guidance,
            scale: args.scale,
            scheduler: args.scheduler.clone(),
            seed: Some(first_seed.wrapping_add(k as u64)),
        };
        let valid = request.validate(pipeline.default_scale())?;
        let generated = pipeline.generate(&valid, &mut |p| {
            if verbose {
                eprintln!("sample {}/{}: step {}/{}", k + 1, args.samples, p.step, p.total);
            }
            true
        })?;
        let stem = format!("mip-{}-{k}", generated.seed);
        let png_path = args.out.join(format!("{stem}.png"));
        std::fs::write(&png_path, &generated.png).with_context(|| format!("writing {}", png_path.display()))?;
        let t = generated.timings;
        let sidecar = json!({
            "image": png_path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "prompt": valid.prompt, "negative_prompt": valid.negative_prompt,
            "subjects": valid.subjects.iter().zip(&args.subjects).map(|(s, raw)| json!({"name": s.name, "arg": raw})).collect::<Vec<_>>(),
            "width": valid.width, "height": valid.height, "steps": valid.steps, "guidance": valid.guidance,
            "scale": valid.scale, "scheduler": valid.scheduler.to_string(), "seed": generated.seed,
            "model": args.model, "variant": pipeline.variant().to_string(), "device": args.run_on.device, "dtype": args.run_on.dtype,
            "timings_ms": {"text": t.text_ms, "subjects": t.subjects_ms, "denoise": t.denoise_ms, "decode": t.decode_ms, "png": t.png_ms},
        });
        let json_path = args.out.join(format!("{stem}.json"));
        std::fs::write(&json_path, serde_json::to_vec_pretty(&sidecar)?)
            .with_context(|| format!("writing {}", json_path.display()))?;
        if args.json {
            println!(
                "{}",
                json!({"png": png_path, "json": json_path, "seed": generated.seed})
            );
        } else {
            println!(
                "wrote {} (seed {}, {:.0} ms denoising)",
                png_path.display(),
                generated.seed,
                t.denoise_ms
            );
        }
    }
    Ok(())
}

/// `NAME=IMG[,IMG…]` into a subject with the images' bytes.
fn parse_subject(s: &str) -> Result<SubjectRequest> {
    let Some((name, images)) = s.split_once('=') else {
        bail!("`--subject` must look like NAME=IMG[,IMG…], got {s:?}");
    };
    let images = images
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| std::fs::read(Path::new(p)).with_context(|| format!("`--subject {name}`: cannot read {p}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(SubjectRequest {
        name: name.to_owned(),
        images,
    })
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
