//! A whole-pipeline case (`case.json` + `tensors.safetensors` + `expected.png`): every stage is checked twice over —
//! on the fixture's own inputs (so an error is pinned to its stage) and, for the loop, the decode and the PNG, on
//! the chain of our own outputs from the reference images and the prompt.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use super::{CaseSpec, Golden};
use crate::model::image_proj::{load_adapter_weights, ImageProjVariant as Variant};
use crate::model::unet::{MergeCapture, MergeCond, UNetCond};
use crate::parity::{compare, Check, Tolerance};
use crate::pipeline::png::tensor_to_rgb8;
use crate::pipeline::{EncodedSubject, MipPipeline, ModelSpec};

/// Runs one case, pushing a check per tensor (or one failed check naming what could not run).
pub(crate) fn run(dir: &Path, name: &str, opts: &super::RunOptions, push: &mut dyn FnMut(Check)) {
    if let Err(e) = run_inner(dir, name, opts, push) {
        push(Check::failed(format!("{name}/setup"), e));
    }
}

fn run_inner(dir: &Path, name: &str, opts: &super::RunOptions, push: &mut dyn FnMut(Check)) -> Result<(), String> {
    let text = std::fs::read_to_string(dir.join("case.json")).map_err(|e| e.to_string())?;
    let case: CaseSpec = serde_json::from_str(&text).map_err(|e| format!("case.json: {e}"))?;
    let golden = Golden::load(&dir.join("tensors.safetensors"), opts)?;
    let spec = ModelSpec {
        base: dir.join(&case.model),
        image_encoder: dir.join(&case.image_encoder),
        adapter: dir.join(&case.adapter),
        resampler: case.resampler,
        default_size: None,
        eval: None,
    };
    let p = MipPipeline::load(&spec, &opts.device, opts.dtype).map_err(|e| format!("load: {e}"))?;
    if let Some(bin) = &case.adapter_bin {
        push(adapter_formats_agree(&dir.join(&case.adapter), &dir.join(bin), name));
    }
    let subjects = reference_stage(&p, dir, name, &case, &golden, push)?;
    let (prompt, negative, negative_name) = text_stage(&p, name, &case, &golden, push)?;
    let encoded: Vec<EncodedSubject> = subjects
        .into_iter()
        .zip(&case.subjects)
        .map(|(tokens, s)| {
            let len = p.name_token_len(&s.name, "name").map_err(|e| e.to_string())?;
            Ok(EncodedSubject {
                tokens,
                name: p.encode_text(&s.name).map_err(|e| e.to_string())?,
                name_token_len: len,
            })
        })
        .collect::<Result<_, String>>()?;
    for (i, (e, want)) in encoded.iter().zip(&case.entity_token_lens).enumerate() {
        push(Check::equal(
            format!("{name}/entity_token_lens[{i}]"),
            &e.name_token_len,
            want,
        ));
    }
    let cond = p
        .conditioning(
            &prompt,
            &negative,
            &negative_name,
            &encoded,
            case.width,
            case.height,
            case.scale,
        )
        .map_err(|e| e.to_string())?;
    for (key, got) in [
        ("unet.encoder_hidden_states", &cond.encoder_hidden_states),
        ("unet.entity_text_embeds", &cond.entity_text_embeds),
        ("unet.text_embeds", &cond.text_embeds),
        ("unet.time_ids", &cond.time_ids),
    ] {
        push(golden.check(name, key, got, Tolerance::MODEL));
    }
    unet_stage(&p, name, &case, &golden, push)?;
    loop_stage(&p, dir, name, &case, &golden, &cond, push)
}

fn adapter_formats_agree(st: &Path, bin: &Path, name: &str) -> Check {
    let check_name = format!("{name}/adapter .bin == .safetensors");
    let (a, b) = match (load_adapter_weights(st), load_adapter_weights(bin)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Check::failed(check_name, e.to_string()),
    };
    if a.keys() != b.keys() {
        return Check::failed(check_name, "the two files hold different keys");
    }
    let mut worst = Check::equal(&check_name, &0, &0);
    for k in a.keys() {
        if let (Some(x), Some(y)) = (a.peek(&k), b.peek(&k)) {
            let c = compare(&check_name, &x, &y, Tolerance::Exact);
            if !c.ok || c.max_abs > worst.max_abs {
                worst = c;
            }
        }
    }
    worst
}

/// ref.*: our pixels from the reference images; encoder and projection on the fixture's pixels; per-subject
/// averages. Returns our own subject tokens (from our pixels) for the chain.
fn reference_stage(
    p: &MipPipeline,
    dir: &Path,
    name: &str,
    case: &CaseSpec,
    g: &Golden,
    push: &mut dyn FnMut(Check),
) -> Result<Vec<Tensor>, String> {
    let mut ours = Vec::new();
    let mut per_subject = Vec::new();
    for (i, s) in case.subjects.iter().enumerate() {
        let mut images = Vec::new();
        for (j, img) in s.images.iter().enumerate() {
            let bytes = std::fs::read(dir.join(img)).map_err(|e| format!("{}: {e}", img.display()))?;
            images.push(
                p.prepare_image(&bytes, &format!("subjects[{i}].images[{j}]"))
                    .map_err(|e| e.to_string())?,
            );
        }
        per_subject.push(images);
    }
    let all: Vec<_> = per_subject.iter().flatten().cloned().collect();
    let pixels = p.pixel_values(&all).map_err(|e| e.to_string())?;
    push(g.check(name, "ref.pixel_values", &pixels, Tolerance::PIXELS));

    let ref_pixels = g.get("ref.pixel_values")?;
    let out = p.image_encoder.forward(ref_pixels).map_err(|e| e.to_string())?;
    let features = match p.variant() {
        Variant::Plain => {
            push(g.check(name, "ref.image_embeds", &out.image_embeds, Tolerance::MODEL));
            out.image_embeds
        }
        Variant::Plus => {
            push(g.check(
                name,
                "ref.penultimate_hidden_states",
                &out.penultimate,
                Tolerance::MODEL,
            ));
            if g.has("ref.uncond_penultimate_hidden_states") {
                let cfg = p.image_encoder.config();
                let zeros = Tensor::zeros(
                    (case.subjects.len(), 3, cfg.image_size, cfg.image_size),
                    DType::F32,
                    &p.device,
                )
                .map_err(|e| e.to_string())?;
                let z = p.image_encoder.forward(&zeros).map_err(|e| e.to_string())?;
                push(g.check(
                    name,
                    "ref.uncond_penultimate_hidden_states",
                    &z.penultimate,
                    Tolerance::MODEL,
                ));
            }
            out.penultimate
        }
    };
    let tokens = p.image_proj.forward(&features).map_err(|e| e.to_string())?;
    push(g.check(name, "ref.image_tokens_per_image", &tokens, Tolerance::MODEL));

    let ref_tokens = g.get("ref.image_tokens_per_image")?;
    let mut start = 0;
    let mut means = Vec::new();
    for images in &per_subject {
        let n = images.len();
        means.push(
            ref_tokens
                .narrow(0, start, n)
                .and_then(|t| t.mean(0))
                .map_err(|e| e.to_string())?,
        );
        start += n;
        ours.push(p.encode_subject(images).map_err(|e| e.to_string())?);
    }
    let means = Tensor::stack(&means, 0).map_err(|e| e.to_string())?;
    push(g.check(name, "ref.image_tokens", &means, Tolerance::MODEL));
    let uncond = repeat_rows(p.uncond_tokens(), case.subjects.len())?;
    push(g.check(name, "ref.uncond_image_tokens", &uncond, Tolerance::MODEL));
    Ok(ours)
}

type Texts = (
    crate::pipeline::TextEmbedding,
    crate::pipeline::TextEmbedding,
    crate::pipeline::TextEmbedding,
);

/// text.*: prompt, negative prompt, pooled vectors and the subjects' name embeddings.
fn text_stage(
    p: &MipPipeline,
    name: &str,
    case: &CaseSpec,
    g: &Golden,
    push: &mut dyn FnMut(Check),
) -> Result<Texts, String> {
    let e = |t: &str| p.encode_text(t).map_err(|e| e.to_string());
    let prompt = e(&case.prompt)?;
    let negative = match &case.negative_prompt {
        Some(n) => e(n)?,
        None => p.zero_text(&prompt).map_err(|e| e.to_string())?,
    };
    let negative_name = e("")?;
    push(g.check(name, "text.prompt_embeds", &prompt.hidden, Tolerance::MODEL));
    push(g.check(name, "text.pooled_prompt_embeds", &prompt.pooled, Tolerance::MODEL));
    push(g.check(name, "text.negative_prompt_embeds", &negative.hidden, Tolerance::MODEL));
    push(g.check(
        name,
        "text.negative_pooled_prompt_embeds",
        &negative.pooled,
        Tolerance::MODEL,
    ));
    let names: Vec<Tensor> = case
        .subjects
        .iter()
        .map(|s| e(&s.name)?.hidden.squeeze(0).map_err(|e| e.to_string()))
        .collect::<Result<_, String>>()?;
    let names = Tensor::stack(&names, 0).map_err(|e| e.to_string())?;
    push(g.check(name, "text.entity_embeds", &names, Tolerance::MODEL));
    let neg_names = repeat_rows(
        &negative_name.hidden.squeeze(0).map_err(|e| e.to_string())?,
        case.subjects.len(),
    )?;
    push(g.check(name, "text.negative_entity_embeds", &neg_names, Tolerance::MODEL));
    Ok((prompt, negative, negative_name))
}

/// unet.* and layer0.*: one UNet call on the fixture's inputs, capturing the first weighted-merge layer.
fn unet_stage(
    p: &MipPipeline,
    name: &str,
    case: &CaseSpec,
    g: &Golden,
    push: &mut dyn FnMut(Check),
) -> Result<(), String> {
    let capture = Arc::new(Mutex::new(None::<MergeCapture>));
    let cond = UNetCond {
        encoder_hidden_states: g.get("unet.encoder_hidden_states")?.clone(),
        text_embeds: g.get("unet.text_embeds")?.clone(),
        time_ids: g.get("unet.time_ids")?.clone(),
        merge: Some(MergeCond {
            entity_text_embeds: g.get("unet.entity_text_embeds")?.clone(),
            entity_token_lens: case.entity_token_lens.clone(),
            num_tokens: p.num_tokens(),
            scale: case.scale,
            capture: Some(capture.clone()),
        }),
    };
    let t = g
        .get("unet.timestep")?
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())?;
    let timestep = t.first().map(|&v| f64::from(v)).unwrap_or(case.unet_forward_timestep);
    let out = p
        .unet
        .forward(g.get("unet.sample")?, timestep, &cond)
        .map_err(|e| e.to_string())?;
    push(g.check(name, "unet.noise_pred", &out, Tolerance::MODEL));
    let captured = capture.lock().map_err(|_| "capture lock poisoned".to_string())?.take();
    match captured {
        Some(c) => {
            push(g.check(name, "layer0.hidden_states", &c.hidden_states, Tolerance::MODEL));
            push(g.check(name, "layer0.object_weights", &c.object_weights, Tolerance::MODEL));
            push(g.check(name, "layer0.text_weight", &c.text_weight, Tolerance::MODEL));
            push(g.check(name, "layer0.output", &c.output, Tolerance::MODEL));
        }
        None => push(Check::failed(format!("{name}/layer0.*"), "no weighted-merge layer ran")),
    }
    Ok(())
}

/// loop.*, vae.decoded and expected.png on our own chain of conditioning, then the decode on the fixture latents.
fn loop_stage(
    p: &MipPipeline,
    dir: &Path,
    name: &str,
    case: &CaseSpec,
    g: &Golden,
    cond: &crate::pipeline::Conditioning,
    push: &mut dyn FnMut(Check),
) -> Result<(), String> {
    let kind = case
        .scheduler
        .parse()
        .map_err(|_| format!("unknown scheduler `{}`", case.scheduler))?;
    let noise = g.get("loop.initial_noise")?;
    let per_step = g.get("loop.latents_per_step")?;
    let mut checks = Vec::new();
    let latents = p
        .denoise(
            cond,
            noise,
            kind,
            case.num_inference_steps,
            case.guidance_scale,
            &mut |prog, l| {
                let i = prog.step - 1;
                let key = format!("loop.latents_per_step[{i}]");
                checks.push(match per_step.get(i) {
                    Ok(want) => compare(&format!("{name}/{key}"), l, &want, g.tol(Tolerance::LOOP)),
                    Err(e) => Check::failed(format!("{name}/{key}"), e.to_string()),
                });
                true
            },
        )
        .map_err(|e| e.to_string())?;
    checks.into_iter().for_each(&mut *push);
    push(g.check(name, "loop.final_latents", &latents, Tolerance::LOOP));

    let decoded_ref = p.decode(g.get("loop.final_latents")?).map_err(|e| e.to_string())?;
    push(g.check(name, "vae.decoded", &decoded_ref, Tolerance::LOOP));
    let decoded = p.decode(&latents).map_err(|e| e.to_string())?;
    push(g.check(&format!("{name}/chain"), "vae.decoded", &decoded, Tolerance::LOOP));
    let png = dir.join("expected.png");
    if png.is_file() {
        // Half precision: 1e-2 of the [-1, 1] range is about 1.3 levels on top of the f32 bound.
        let bound = if g.is_half() { 4.0 } else { 2.0 };
        push(png_check(&decoded, &png, &format!("{name}/expected.png"), bound));
    }
    Ok(())
}

fn png_check(decoded: &Tensor, png: &Path, check_name: &str, bound: f64) -> Check {
    let ours = match tensor_to_rgb8(decoded) {
        Ok((rgb, _, _)) => rgb,
        Err(e) => return Check::failed(check_name, e.to_string()),
    };
    let want = match image::open(png) {
        Ok(i) => i.to_rgb8().into_raw(),
        Err(e) => return Check::failed(check_name, e.to_string()),
    };
    if ours.len() != want.len() {
        return Check::failed(check_name, format!("{} bytes vs {}", ours.len(), want.len()));
    }
    let diffs: Vec<f64> = ours.iter().zip(&want).map(|(a, b)| f64::from(a.abs_diff(*b))).collect();
    let max_abs = diffs.iter().copied().fold(0.0, f64::max);
    let mean_abs = diffs.iter().sum::<f64>() / diffs.len().max(1) as f64;
    Check {
        name: check_name.to_owned(),
        max_abs,
        mean_abs,
        bound,
        ok: max_abs <= bound,
        note: Some("levels".into()),
    }
}

fn repeat_rows(t: &Tensor, n: usize) -> Result<Tensor, String> {
    let rows = vec![t.clone(); n];
    Tensor::stack(&rows, 0).map_err(|e| e.to_string())
}
