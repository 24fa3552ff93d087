//! `mip bench`: per-stage timings of the pipeline (text encode, image encode, one UNet step with CFG, VAE decode,
//! the whole image), median and minimum over `--iters` runs after a warm-up, as a table or JSON. `--sdxl` times
//! random weights in the SDXL shapes instead (see [`crate::bench_sdxl`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use mip_worker::model::vae::AutoencoderKL;
use mip_worker::pipeline::generate::initial_noise;
use mip_worker::pipeline::precision::vae_dtype;
use mip_worker::pipeline::vae_tiling::VaeTiling;
use mip_worker::pipeline::{EncodedSubject, GenerateRequest, MipPipeline, ModelSpec};
use serde_json::json;

use crate::device::{parse_size, DeviceArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// `demo`, a model bundle folder, or a fixture folder (with index.json; its sdxl/ image_encoder/ adapter/).
    #[arg(long, default_value = "demo")]
    model: String,
    /// Image size WxH (default: the model's).
    #[arg(long, value_parser = crate::device::size_arg)]
    size: Option<String>,
    /// Subjects in the request.
    #[arg(long, default_value_t = 2)]
    subjects: usize,
    /// Denoising steps of the whole-image run.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Timed repetitions per stage (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[command(flatten)]
    run_on: DeviceArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Random weights in the SDXL shapes (1024x1024 unless --size): text/image encoders, UNet step with and
    /// without the weighted merge, VAE decode, estimated whole image, peak GPU memory on CUDA.
    #[arg(long)]
    sdxl: bool,
    /// With --sdxl: tiny models of the same layout (for CPU runs).
    #[arg(long, requires = "sdxl")]
    tiny: bool,
    /// One cold start instead of repeated timings: the load per component (time, weights, peak host RSS), then
    /// the first image stage by stage (time, peak host RSS) and the first-image latency. Use with --model DIR
    /// (e.g. from `mip model random`), --size and --steps.
    #[arg(long, conflicts_with = "sdxl")]
    cold: bool,
    /// VAE tiling for the run: auto (when a whole decode would not fit the free memory), always or never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    vae_tiling: String,
    /// Largest VAE tile in image pixels (0 = the VAE config's sample_size).
    #[arg(long, default_value_t = 0)]
    vae_tile_px: usize,
    /// Decode one random latent of this image size (WxH) whole and in blended tiles of half its side, and report
    /// the difference; without --cold only the VAE is loaded.
    #[arg(long, value_parser = crate::device::size_arg, conflicts_with = "sdxl")]
    tiling_check: Option<String>,
}

struct Stage {
    name: &'static str,
    times_ms: Vec<f64>,
}

impl Stage {
    fn median(&self) -> f64 {
        let mut t = self.times_ms.clone();
        t.sort_by(f64::total_cmp);
        t.get(t.len() / 2).copied().unwrap_or(f64::NAN)
    }
    fn min(&self) -> f64 {
        self.times_ms.iter().copied().fold(f64::INFINITY, f64::min)
    }
}

fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?;
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

fn spec_for(model: &str) -> Result<ModelSpec> {
    let dir = PathBuf::from(model);
    if model != "demo" && dir.join("index.json").is_file() && !dir.join("mip.json").is_file() {
        return Ok(ModelSpec {
            base: dir.join("sdxl"),
            image_encoder: dir.join("image_encoder"),
            adapter: dir.join("adapter").join("mip_sdxl_2obj.safetensors"),
            resampler: None,
            default_size: Some([128, 128]),
            eval: None,
        });
    }
    Ok(crate::model::resolve(model)?.0)
}

pub fn run(args: Args) -> Result<()> {
    let (device, dtype) = args.run_on.resolve()?;
    if args.sdxl {
        return run_sdxl(&args, device, dtype);
    }
    let spec = spec_for(&args.model)?;
    let (width, height) = match &args.size {
        Some(s) => parse_size(s)?,
        None => spec.default_size.map(|[w, h]| (w, h)).unwrap_or((1024, 1024)),
    };
    let vae_tiling = VaeTiling {
        mode: args.vae_tiling.parse().map_err(anyhow::Error::msg)?,
        tile_px: (args.vae_tile_px != 0).then_some(args.vae_tile_px),
        budget_bytes: None,
    };
    if let (false, Some(size)) = (args.cold, &args.tiling_check) {
        let (w, h) = parse_size(size)?;
        let vae = AutoencoderKL::load(&spec.base.join("vae"), vae_dtype(dtype), &device)?;
        let out = crate::bench_cold::tiling_check(&vae, dtype, w, h)?;
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if args.cold {
        let a = crate::bench_cold::ColdArgs {
            spec,
            device,
            dtype,
            size: (width, height),
            steps: args.steps,
            subjects: args.subjects,
            vae_tiling,
            tiling_check: args.tiling_check.as_deref().map(parse_size).transpose()?,
        };
        let out = crate::bench_cold::run(&a)?;
        return crate::bench_cold::print(&out, args.json);
    }
    let t_load = Instant::now();
    let mut p = MipPipeline::load(&spec, &device, dtype)?;
    p.vae_tiling = vae_tiling;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    let image = mip_worker::demo::example_image(0);
    let (subjects, prompt) = crate::bench_cold::example_subjects(args.subjects);
    let req = GenerateRequest {
        prompt: prompt.clone(),
        negative_prompt: Some("low quality".into()),
        subjects: subjects.clone(),
        width,
        height,
        steps: args.steps,
        seed: Some(1),
        ..Default::default()
    }
    .validate(p.default_scale())?;

    let mut stages = Vec::new();
    let n_texts = 2 + args.subjects + 1;
    stages.push(Stage {
        name: "text encode (prompt, negative, names)",
        times_ms: time(args.iters, || {
            for _ in 0..n_texts {
                p.encode_text(&prompt)?;
            }
            Ok(())
        })?,
    });
    let prepared = p.prepare_image(&image, "bench")?;
    stages.push(Stage {
        name: "image encode (all subjects)",
        times_ms: time(args.iters, || {
            for _ in 0..args.subjects {
                p.encode_subject(std::slice::from_ref(&prepared))?;
            }
            Ok(())
        })?,
    });
    let text = p.encode_text(&prompt)?;
    let neg = p.encode_text("low quality")?;
    let empty = p.encode_text("")?;
    let encoded: Vec<EncodedSubject> = subjects
        .iter()
        .map(|s| {
            Ok(EncodedSubject {
                tokens: p.encode_subject(std::slice::from_ref(&prepared))?,
                name: p.encode_text(&s.name)?,
                name_token_len: p.name_token_len(&s.name, "name")?,
            })
        })
        .collect::<Result<_>>()?;
    let cond = p.conditioning(&text, &neg, &empty, &encoded, width, height, req.scale)?;
    let noise = initial_noise(1, p.latent_channels(), height, width)?;
    let batch = candle_core::Tensor::cat(&[&noise, &noise], 0)?;
    stages.push(Stage {
        name: "unet step (CFG batch 2, weighted merge)",
        times_ms: time(args.iters, || {
            let out = p.unet_forward(&batch, 500.0, &cond)?;
            out.device().synchronize()?;
            Ok(())
        })?,
    });
    stages.push(Stage {
        name: "vae decode",
        times_ms: time(args.iters, || p.decode(&noise).map(drop).map_err(Into::into))?,
    });
    let whole_iters = args.iters.min(3);
    stages.push(Stage {
        name: "whole image",
        times_ms: time(whole_iters, || {
            p.generate(&req, &mut |_| true).map(drop).map_err(Into::into)
        })?,
    });

    if args.json {
        let rows: Vec<_> = stages
            .iter()
            .map(|s| json!({"stage": s.name, "median_ms": s.median(), "min_ms": s.min(), "runs": s.times_ms.len()}))
            .collect();
        let out = json!({"model": args.model, "device": args.run_on.device, "dtype": args.run_on.dtype, "width": width, "height": height,
            "subjects": args.subjects, "steps": args.steps, "load_ms": load_ms, "stages": rows});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "model {} on {} ({}), {width}x{height}, {} subjects, {} steps; load {load_ms:.0} ms",
            args.model, args.run_on.device, args.run_on.dtype, args.subjects, args.steps
        );
        println!("{:<42} {:>12} {:>12}", "stage", "median ms", "min ms");
        for s in &stages {
            println!("{:<42} {:>12.2} {:>12.2}", s.name, s.median(), s.min());
        }
    }
    Ok(())
}

fn run_sdxl(args: &Args, device: candle_core::Device, dtype: candle_core::DType) -> Result<()> {
    let size = match &args.size {
        Some(s) => parse_size(s)?,
        None => (1024, 1024),
    };
    if size.0 % 64 != 0 || size.1 % 64 != 0 {
        anyhow::bail!(
            "`--size` must be a multiple of 64 on each side for --sdxl, got {}x{}",
            size.0,
            size.1
        );
    }
    let a = crate::bench_sdxl::SdxlArgs {
        device,
        dtype,
        size,
        steps: args.steps,
        subjects: args.subjects,
        iters: args.iters,
        tiny: args.tiny,
    };
    let t0 = Instant::now();
    let mut res = crate::bench_sdxl::run(&a)?;
    if let Some(obj) = res.as_object_mut() {
        obj.insert("device".into(), json!(args.run_on.device));
        obj.insert("dtype".into(), json!(args.run_on.dtype));
        obj.insert("size".into(), json!(format!("{}x{}", size.0, size.1)));
        obj.insert("steps".into(), json!(args.steps));
        obj.insert("subjects".into(), json!(args.subjects));
        obj.insert("tiny".into(), json!(args.tiny));
        obj.insert("cuda_kernels".into(), json!(cfg!(feature = "cuda")));
        obj.insert("bench_wall_s".into(), json!(t0.elapsed().as_secs_f64()));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else if let Some(obj) = res.as_object() {
        for (k, v) in obj {
            println!("{k:<40} {v}");
        }
    }
    Ok(())
}
