//! `mip bench --model DIR --cold`: what a worker meets at real scale, measured once from a cold process: the load
//! of each component (time, bytes of weights in the dtype asked for, peak and final host RSS), then the first image
//! (two subjects by default) stage by stage (time, peak host RSS, the VAE tile chosen), and the first-image latency
//! from the start of the load. `--tiling-check WxH` also decodes one random latent of that size whole and in
//! blended tiles of half its side, and reports the difference; without `--cold` it loads only the VAE for that.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use mip_worker::model::vae::AutoencoderKL;
use mip_worker::pipeline::generate::decode_latents;
use mip_worker::pipeline::generate::initial_noise;
use mip_worker::pipeline::memory;
use mip_worker::pipeline::png::{encode_png, tensor_to_rgb8};
use mip_worker::pipeline::{EncodedSubject, GenerateRequest, MipPipeline, ModelSpec, SubjectRequest};
use serde_json::{json, Value};

/// What `--cold` runs with.
pub struct ColdArgs {
    pub spec: ModelSpec,
    pub device: Device,
    pub dtype: candle_core::DType,
    pub size: (usize, usize),
    pub steps: usize,
    pub subjects: usize,
    pub vae_tiling: mip_worker::pipeline::vae_tiling::VaeTiling,
    pub tiling_check: Option<(usize, usize)>,
}

/// `n` subjects with the demo's example images, and a prompt naming them: what the benchmarks generate.
pub fn example_subjects(n: usize) -> (Vec<SubjectRequest>, String) {
    let names = ["cat", "jacket", "dog", "hat", "car", "tree", "cup", "lamp"];
    let subjects: Vec<SubjectRequest> = (0..n)
        .map(|i| SubjectRequest {
            name: names[i % names.len()].to_owned(),
            images: vec![mip_worker::demo::example_image(i)],
        })
        .collect();
    let prompt = format!(
        "a photo of {}",
        subjects
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" and ")
    );
    (subjects, prompt)
}

/// Runs `f` as one stage: wall time and peak host RSS while it ran.
fn stage<T>(rows: &mut Vec<Value>, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    memory::reset_peak_rss();
    let t = Instant::now();
    let out = f()?;
    rows.push(json!({"stage": name, "seconds": t.elapsed().as_secs_f64(), "peak_rss_bytes": memory::peak_rss_bytes()}));
    Ok(out)
}

pub fn run(a: &ColdArgs) -> Result<Value> {
    let started = Instant::now();
    let mut p = MipPipeline::load(&a.spec, &a.device, a.dtype)?;
    p.vae_tiling = a.vae_tiling;
    let report = p.load_report();
    let load: Vec<Value> = report
        .components
        .iter()
        .map(|c| {
            json!({"component": c.component, "seconds": c.seconds, "weight_bytes": c.weight_bytes,
                   "peak_rss_bytes": c.peak_rss_bytes, "rss_after_bytes": c.rss_after_bytes})
        })
        .collect();
    let weights = report.weight_bytes();
    let load_peak = report.peak_rss_bytes();
    let load_s = started.elapsed().as_secs_f64();

    let (width, height) = a.size;
    let (subjects, prompt) = example_subjects(a.subjects);
    let req = GenerateRequest {
        prompt: prompt.clone(),
        subjects: subjects.clone(),
        width,
        height,
        steps: a.steps,
        seed: Some(1),
        ..Default::default()
    }
    .validate(p.default_scale())?;

    let mut rows = Vec::new();
    let (text, negative, empty, names) = stage(&mut rows, "text_encode", || {
        let text = p.encode_text(&prompt)?;
        let negative = p.zero_text(&text)?;
        let empty = p.encode_text("")?;
        let names = subjects
            .iter()
            .map(|s| Ok((p.encode_text(&s.name)?, p.name_token_len(&s.name, "name")?)))
            .collect::<Result<Vec<_>>>()?;
        Ok((text, negative, empty, names))
    })?;
    let encoded = stage(&mut rows, "subject_encode", || {
        subjects
            .iter()
            .zip(names)
            .map(|(s, (name, len))| {
                let images = s
                    .images
                    .iter()
                    .map(|b| p.prepare_image(b, "image"))
                    .collect::<mip_worker::error::Result<Vec<_>>>()?;
                Ok(EncodedSubject {
                    tokens: p.encode_subject(&images)?,
                    name,
                    name_token_len: len,
                })
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let latents = stage(&mut rows, "denoise", || {
        let cond = p.conditioning(&text, &negative, &empty, &encoded, width, height, req.scale)?;
        let noise = initial_noise(1, p.latent_channels(), height, width)?;
        Ok(p.denoise(&cond, &noise, req.scheduler, req.steps, req.guidance, &mut |_, _| true)?)
    })?;
    let (_, _, lh, lw) = latents.dims4()?;
    let tile = p.decode_plan(lh, lw);
    let image = stage(&mut rows, "vae_decode", || Ok(p.decode_with(&latents, tile)?))?;
    let png = stage(&mut rows, "png_encode", || {
        let (rgb, w, h) = tensor_to_rgb8(&image)?;
        Ok(encode_png(&rgb, w, h, &[])?)
    })?;
    let first_image_s = started.elapsed().as_secs_f64();

    let mut out = json!({
        "model": a.spec.base.parent().map(|d| d.display().to_string()),
        "size": format!("{width}x{height}"), "steps": a.steps, "subjects": a.subjects,
        "load": load, "load_seconds": load_s, "weight_bytes": weights, "load_peak_rss_bytes": load_peak,
        "load_peak_over_weights": load_peak.map(|p| p as f64 / weights as f64),
        "first_image": rows, "first_image_seconds": first_image_s, "png_bytes": png.len(),
        "vae_tile": tile, "vae_untiled_estimate_bytes": p.decode_peak_bytes(lh, lw),
    });
    if let Some((w, h)) = a.tiling_check {
        out["tiling_check"] = tiling_check(p.vae(), a.dtype, w, h)?;
    }
    Ok(out)
}

/// Decodes one random latent whole and in blended tiles of half its longer side; reports the time of each and
/// their difference, in image units ([-1, 1]) and in 8-bit levels.
pub fn tiling_check(vae: &AutoencoderKL, compute: DType, width: usize, height: usize) -> Result<Value> {
    let z = initial_noise(7, vae.config().latent_channels, height, width)?;
    let tile = (width.max(height) / vae.config().scale_factor() / 2).max(8);
    let timed = |tile: Option<usize>| -> Result<(Tensor, f64)> {
        let t = Instant::now();
        let image = decode_latents(vae, &z, compute, tile)?;
        Ok((image, t.elapsed().as_secs_f64()))
    };
    let (whole, whole_s) = timed(None)?;
    let (tiled, tiled_s) = timed(Some(tile))?;
    let d = (&whole - &tiled)?.abs()?;
    let max8 = tensor_to_rgb8(&whole)?
        .0
        .iter()
        .zip(tensor_to_rgb8(&tiled)?.0)
        .map(|(a, b)| a.abs_diff(b))
        .max()
        .unwrap_or(0);
    Ok(
        json!({"size": format!("{width}x{height}"), "tile_latent": tile, "whole_seconds": whole_s,
              "tiled_seconds": tiled_s, "max_abs": d.max_all()?.to_scalar::<f32>()?,
              "mean_abs": d.mean_all()?.to_scalar::<f32>()?, "max_abs_8bit": max8}),
    )
}

/// Prints a `--cold` result as JSON or as tables.
pub fn print(out: &Value, as_json: bool) -> Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(out)?);
        return Ok(());
    }
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.3}"));
    let g = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{:.3}", x / 1e9));
    println!(
        "{:<16} {:>10} {:>12} {:>14} {:>14}",
        "component", "load s", "weights GB", "peak RSS GB", "RSS after GB"
    );
    for c in out["load"].as_array().into_iter().flatten() {
        let name = c["component"].as_str().unwrap_or("");
        let (s, w) = (f(&c["seconds"]), g(&c["weight_bytes"]));
        let (p, a) = (g(&c["peak_rss_bytes"]), g(&c["rss_after_bytes"]));
        println!("{name:<16} {s:>10} {w:>12} {p:>14} {a:>14}");
    }
    println!(
        "load {} s, weights {} GB, peak RSS {} GB ({}x the weights)",
        f(&out["load_seconds"]),
        g(&out["weight_bytes"]),
        g(&out["load_peak_rss_bytes"]),
        f(&out["load_peak_over_weights"])
    );
    println!("{:<16} {:>10} {:>14}", "stage", "seconds", "peak RSS GB");
    for r in out["first_image"].as_array().into_iter().flatten() {
        let name = r["stage"].as_str().unwrap_or("");
        println!("{name:<16} {:>10} {:>14}", f(&r["seconds"]), g(&r["peak_rss_bytes"]));
    }
    println!(
        "first image ({}, {} steps, {} subjects) {} s after start; VAE tile {} (whole decode estimate {} GB)",
        out["size"].as_str().unwrap_or(""),
        out["steps"],
        out["subjects"],
        f(&out["first_image_seconds"]),
        out["vae_tile"],
        g(&out["vae_untiled_estimate_bytes"])
    );
    if let Some(t) = out.get("tiling_check") {
        println!("tiling check: {t}");
    }
    Ok(())
}
