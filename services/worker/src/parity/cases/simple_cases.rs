//! The small cases: tokenizer ids, scheduler tables, CLIP preprocessing of awkward images, and one plain UNet call
//! (no adapter).

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use serde::Deserialize;

use super::Golden;
use crate::model::unet::{UNet2DConditionModel, UNetCond, UNetConfig};
use crate::model::weights::{find_weights, read_json, WeightSet};
use crate::parity::{Check, Tolerance};
use crate::pipeline::image_decode::DEFAULT_MAX_PIXELS;
use crate::pipeline::preprocess::{ClipPreprocessor, PreprocessConfig};
use crate::pipeline::scheduler::{EulerDiscrete, Scheduler, SchedulerConfig};
use crate::pipeline::tokenizer::ClipTokenizer;

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids_1: Vec<u32>,
    ids_2: Vec<u32>,
    #[serde(default)]
    unpadded_1: Option<Vec<u32>>,
}

/// Every string of `tokenizer_cases.json` through both tokenizers of `base`.
pub(crate) fn tokenizer(file: &Path, base: &Path, push: &mut dyn FnMut(Check)) {
    let run = || -> Result<Vec<Check>, String> {
        let cases: Vec<TokenizerCase> = read_json(file).map_err(|e| e.to_string())?;
        let t1 = ClipTokenizer::from_dir(base.join("tokenizer")).map_err(|e| e.to_string())?;
        let t2 = ClipTokenizer::from_dir(base.join("tokenizer_2")).map_err(|e| e.to_string())?;
        let mut checks = Vec::new();
        for (i, c) in cases.iter().enumerate() {
            let name = |what: &str| format!("tokenizer[{i}] {what} {:?}", truncate(&c.text));
            let got_1 = t1.encode_padded(&c.text).map_err(|e| e.to_string())?;
            checks.push(Check::equal(name("ids_1"), &got_1, &c.ids_1));
            let got_2 = t2.encode_padded(&c.text).map_err(|e| e.to_string())?;
            checks.push(Check::equal(name("ids_2"), &got_2, &c.ids_2));
            if let Some(want) = &c.unpadded_1 {
                let got = t1.encode_unpadded(&c.text).map_err(|e| e.to_string())?;
                checks.push(Check::equal(name("unpadded_1"), &got, want));
            }
        }
        Ok(checks)
    };
    match run() {
        Ok(checks) => checks.into_iter().for_each(push),
        Err(e) => push(Check::failed("tokenizer_cases", e)),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

#[derive(Deserialize)]
struct SchedulerCases {
    cases: std::collections::BTreeMap<String, SchedulerCase>,
}

#[derive(Deserialize)]
struct SchedulerCase {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

/// Euler timesteps (exact), sigmas and init_noise_sigma (relative 1e-6) for each step count.
pub(crate) fn scheduler(file: &Path, base: &Path, push: &mut dyn FnMut(Check)) {
    let run = || -> Result<Vec<Check>, String> {
        let cases: SchedulerCases = read_json(file).map_err(|e| e.to_string())?;
        let cfg = SchedulerConfig::from_file(&base.join("scheduler").join("scheduler_config.json"))
            .map_err(|e| e.to_string())?;
        let mut checks = Vec::new();
        for (steps, c) in &cases.cases {
            let n: usize = steps.parse().map_err(|_| format!("bad step count `{steps}`"))?;
            let euler = EulerDiscrete::new(&cfg, n).map_err(|e| e.to_string())?;
            let name = |what: &str| format!("scheduler[{steps}] {what}");
            checks.push(Check::equal(
                name("timesteps"),
                &euler.timesteps().to_vec(),
                &c.timesteps,
            ));
            checks.push(relative(name("sigmas"), euler.sigmas(), &c.sigmas, 1e-6));
            checks.push(relative(
                name("init_noise_sigma"),
                &[euler.init_noise_sigma()],
                &[c.init_noise_sigma],
                1e-6,
            ));
        }
        Ok(checks)
    };
    match run() {
        Ok(checks) => checks.into_iter().for_each(push),
        Err(e) => push(Check::failed("scheduler_cases", e)),
    }
}

fn relative(name: String, got: &[f64], want: &[f64], rel: f64) -> Check {
    if got.len() != want.len() {
        return Check::failed(name, format!("{} values, expected {}", got.len(), want.len()));
    }
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / b.abs().max(f64::MIN_POSITIVE))
        .fold(0.0, f64::max);
    Check {
        name,
        max_abs: worst,
        mean_abs: worst,
        bound: rel,
        ok: worst <= rel,
        note: Some("relative".into()),
    }
}

/// Every image of `images.json` through CLIP preprocessing against `pixel_values.safetensors`.
pub(crate) fn preprocess(dir: &Path, name: &str, push: &mut dyn FnMut(Check)) {
    let run = |push: &mut dyn FnMut(Check)| -> Result<(), String> {
        let files: Vec<String> = read_json(&dir.join("images.json")).map_err(|e| e.to_string())?;
        let golden = Golden::load(&dir.join("pixel_values.safetensors"), &super::RunOptions::default())?;
        let pre = ClipPreprocessor::new(PreprocessConfig::default(), DEFAULT_MAX_PIXELS);
        for f in files {
            let bytes = std::fs::read(dir.join(&f)).map_err(|e| format!("{f}: {e}"))?;
            let check = match pre.preprocess(&bytes, &f, &candle_core::Device::Cpu) {
                Ok(pixels) => golden.check(name, &f, &pixels, Tolerance::PIXELS),
                Err(e) => Check::failed(format!("{name}/{f}"), e.to_string()),
            };
            push(check);
        }
        Ok(())
    };
    if let Err(e) = run(push) {
        push(Check::failed(format!("{name}/setup"), e));
    }
}

/// One UNet call without the adapter: `sample`, `timestep`, context, pooled, time ids -> `noise_pred`.
pub(crate) fn plain_unet(dir: &Path, name: &str, base: &Path, opts: &super::RunOptions, push: &mut dyn FnMut(Check)) {
    let run = || -> Result<Check, String> {
        let g = Golden::load(&dir.join("tensors.safetensors"), opts)?;
        let unet_dir = base.join("unet");
        let cfg: UNetConfig = read_json(&unet_dir.join("config.json")).map_err(|e| e.to_string())?;
        let file = find_weights(&unet_dir, &["diffusion_pytorch_model"]).map_err(|e| e.to_string())?;
        let ws = Arc::new(WeightSet::from_safetensors(&file).map_err(|e| e.to_string())?);
        let unet = ws
            .build(opts.dtype, &opts.device, |vb| UNet2DConditionModel::new(vb, &cfg, None))
            .map_err(|e| e.to_string())?;
        ws.ensure_all_used().map_err(|e| e.to_string())?;
        let dev = |k: &str| -> Result<Tensor, String> { g.get(k).cloned() };
        let cond = UNetCond {
            encoder_hidden_states: dev("encoder_hidden_states")?,
            text_embeds: dev("text_embeds")?,
            time_ids: dev("time_ids")?,
            merge: None,
        };
        let t = g
            .get("timestep")?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())?;
        let timestep = f64::from(*t.first().ok_or("empty timestep")?);
        let out = unet
            .forward(&dev("sample")?, timestep, &cond)
            .map_err(|e| e.to_string())?;
        Ok(g.check(name, "noise_pred", &out, Tolerance::MODEL))
    };
    push(run().unwrap_or_else(|e| Check::failed(format!("{name}/setup"), e)));
}
