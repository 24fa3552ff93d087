//! The CLIP text encoder (`CLIPTextModel`, and `CLIPTextModelWithProjection` for SDXL's `text_encoder_2`).
//!
//! Keys are accepted with or without the `text_model.` prefix (`text_projection.weight` is always top level);
//! an `embeddings.position_ids` buffer, when present, is read so strict loading passes. The forward pass gives
//! what SDXL needs: `hidden_states[-2]` (the penultimate layer's output, no final norm), the final-normed last
//! state, and the projected pooled vector taken at the EOS position.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{embedding, linear_no_bias, Embedding, Linear, VarBuilder};

use super::{add_positions, first_argmax_rows, ClipTextConfig, Encoder, EncoderDims, LayerNorm32};

/// What one forward pass of a text encoder returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `hidden_states[-2]`: (B, S, H).
    pub penultimate: Tensor,
    /// `final_layer_norm(last layer)`: (B, S, H).
    pub last_hidden: Tensor,
    /// `text_projection(last_hidden[eos])`: (B, P), when the model has a projection.
    pub pooled: Option<Tensor>,
}

/// A CLIP text transformer with an optional `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm32,
    text_projection: Option<Linear>,
    eos_token_id: u32,
    max_positions: usize,
}

impl ClipTextModel {
    /// Builds the model from `vb` (the root of the checkpoint). `with_projection` reads `text_projection.weight`
    /// (`CLIPTextModelWithProjection`).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig, with_projection: bool) -> Result<Self> {
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let h = cfg.hidden_size;
        let emb = tm.pp("embeddings");
        let token_embedding = embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding = emb.get((cfg.max_position_embeddings, h), "position_embedding.weight")?;
        if emb.contains_tensor("position_ids") {
            // A buffer of older checkpoints (arange): consumed, not needed.
            emb.get_unchecked_dtype("position_ids", DType::F32)?;
        }
        let dims = EncoderDims {
            hidden: h,
            intermediate: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        let encoder = Encoder::new(tm.pp("encoder"), &dims)?;
        let final_layer_norm = LayerNorm32::new(h, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?;
        let text_projection = if with_projection {
            Some(linear_no_bias(h, cfg.projection_dim, vb.pp("text_projection"))?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            encoder,
            final_layer_norm,
            text_projection,
            eos_token_id: cfg.eos_token_id,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// Encodes `input_ids` (B, S) u32 with S <= `max_position_embeddings` under a causal mask.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, s) = input_ids.dims2()?;
        if s == 0 || s > self.max_positions {
            candle_core::bail!("text encoder: sequence length {s} not in 1..={}", self.max_positions);
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let x = self.token_embedding.forward(&ids)?;
        let x = add_positions(&x, &self.position_embedding)?;
        let mask = causal_mask(s, x.device())?;
        let (last, penultimate) = self.encoder.forward(&x, Some(&mask))?;
        let last_hidden = self.final_layer_norm.forward(&last)?;
        let pooled = match &self.text_projection {
            None => None,
            Some(proj) => {
                let rows = ids.to_device(&Device::Cpu)?.to_vec2::<u32>()?;
                let pos = eos_positions(&rows, self.eos_token_id);
                let picked = (0..b)
                    .map(|i| last_hidden.i((i, pos[i]))?.unsqueeze(0))
                    .collect::<Result<Vec<_>>>()?;
                Some(proj.forward(&Tensor::cat(&picked, 0)?)?)
            }
        };
        Ok(ClipTextOutput {
            penultimate,
            last_hidden,
            pooled,
        })
    }
}

/// transformers' rule: with `eos_token_id == 2` (legacy configs) the argmax of the ids, else the first position
/// holding `eos_token_id` (0 when absent).
fn eos_positions(rows: &[Vec<u32>], eos: u32) -> Vec<usize> {
    if eos == 2 {
        return first_argmax_rows(rows);
    }
    rows.iter()
        .map(|r| r.iter().position(|&t| t == eos).unwrap_or(0))
        .collect()
}

/// Additive (S, S) f32 mask: 0 on and below the diagonal, -inf above.
fn causal_mask(s: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (s, s), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::{find_weights, WeightSet};
    use crate::parity::{compare, fixtures_dir, Check, Tolerance};
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;

    struct Encoders {
        te1: ClipTextModel,
        te2: ClipTextModel,
    }

    fn load_one(dir: &Path, with_projection: bool) -> (ClipTextModel, Arc<WeightSet>) {
        let cfg = ClipTextConfig::from_file(&dir.join("config.json")).expect("config");
        let ws = Arc::new(WeightSet::from_safetensors(&find_weights(dir, &["model"]).expect("weights")).expect("ws"));
        let m = ws
            .build(DType::F32, &Device::Cpu, |vb| {
                ClipTextModel::new(vb, &cfg, with_projection)
            })
            .expect("build");
        (m, ws)
    }

    fn load() -> Encoders {
        let root = fixtures_dir().expect("fixtures").join("sdxl");
        let (te1, ws1) = load_one(&root.join("text_encoder"), false);
        let (te2, ws2) = load_one(&root.join("text_encoder_2"), true);
        ws1.ensure_all_used().expect("text_encoder strict");
        ws2.ensure_all_used().expect("text_encoder_2 strict");
        Encoders { te1, te2 }
    }

    /// Token ids by text: from `tokenizer_cases.json`, else from the fixture tokenizers through the `tokenizers`
    /// crate, but only when that crate reproduces every entry of `tokenizer_cases.json` exactly.
    struct Ids {
        cases: HashMap<String, (Vec<u32>, Vec<u32>)>,
        fallback: Option<(tokenizers::Tokenizer, tokenizers::Tokenizer)>,
    }

    fn pad77(mut ids: Vec<u32>, pad: u32) -> Vec<u32> {
        if ids.len() > 77 {
            let eos = ids[ids.len() - 1];
            ids.truncate(76);
            ids.push(eos);
        }
        ids.resize(77, pad);
        ids
    }

    impl Ids {
        fn load() -> Self {
            let root = fixtures_dir().expect("fixtures");
            let text = std::fs::read_to_string(root.join("tokenizer_cases.json")).expect("cases");
            let json: Vec<serde_json::Value> = serde_json::from_str(&text).expect("json");
            let ids = |v: &serde_json::Value| -> Vec<u32> { serde_json::from_value(v.clone()).expect("ids") };
            let cases: HashMap<_, _> = json
                .iter()
                .map(|e| {
                    let t = e["text"].as_str().expect("text").to_owned();
                    (t, (ids(&e["ids_1"]), ids(&e["ids_2"])))
                })
                .collect();
            let mut me = Self { cases, fallback: None };
            let t1 = tokenizers::Tokenizer::from_file(root.join("sdxl/tokenizer/tokenizer.json"));
            let t2 = tokenizers::Tokenizer::from_file(root.join("sdxl/tokenizer_2/tokenizer.json"));
            if let (Ok(t1), Ok(t2)) = (t1, t2) {
                let candidate = Self {
                    cases: HashMap::new(),
                    fallback: Some((t1, t2)),
                };
                let bad: Vec<_> = me
                    .cases
                    .iter()
                    .filter(|(t, want)| candidate.get(t).as_ref() != Some(*want))
                    .map(|(t, _)| t.clone())
                    .collect();
                if bad.is_empty() {
                    me.fallback = candidate.fallback;
                } else {
                    println!("note: tokenizers crate disagrees with tokenizer_cases.json on {bad:?}; no fallback");
                }
            }
            me
        }

        fn get(&self, text: &str) -> Option<(Vec<u32>, Vec<u32>)> {
            if let Some(v) = self.cases.get(text) {
                return Some(v.clone());
            }
            let (t1, t2) = self.fallback.as_ref()?;
            let enc =
                |t: &tokenizers::Tokenizer, pad| t.encode(text, true).ok().map(|e| pad77(e.get_ids().to_vec(), pad));
            let out = Some((enc(t1, 49407)?, enc(t2, 0)?));
            if !self.cases.is_empty() {
                println!(
                    "note: ids of {text:?} absent from tokenizer_cases.json; taken from the validated tokenizers crate"
                );
            }
            out
        }
    }

    /// (penultimate concat (B,77,h1+h2), pooled (B,P)) for the given texts.
    fn encode(enc: &Encoders, ids: &Ids, texts: &[&str]) -> Option<(Tensor, Tensor)> {
        let mut r1 = Vec::new();
        let mut r2 = Vec::new();
        for t in texts {
            let Some((a, b)) = ids.get(t) else {
                println!("note: no token ids for {t:?}; skipped");
                return None;
            };
            r1.extend(a);
            r2.extend(b);
        }
        let n = texts.len();
        let i1 = Tensor::from_vec(r1, (n, 77), &Device::Cpu).expect("ids");
        let i2 = Tensor::from_vec(r2, (n, 77), &Device::Cpu).expect("ids");
        let o1 = enc.te1.forward(&i1).expect("te1");
        let o2 = enc.te2.forward(&i2).expect("te2");
        let embeds = Tensor::cat(&[&o1.penultimate, &o2.penultimate], 2).expect("cat");
        Some((embeds, o2.pooled.expect("pooled")))
    }

    fn run_case(name: &str) -> Vec<Check> {
        let dir = fixtures_dir().expect("fixtures").join("cases").join(name);
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).expect("case")).expect("json");
        let want = candle_core::safetensors::load(dir.join("tensors.safetensors"), &Device::Cpu).expect("tensors");
        let (enc, ids) = (load(), Ids::load());
        let names: Vec<&str> = case["subjects"]
            .as_array()
            .expect("subjects")
            .iter()
            .map(|s| s["name"].as_str().expect("name"))
            .collect();
        let mut checks = Vec::new();
        let mut cmp = |key: &str, got: &Tensor| {
            let c = compare(&format!("{name}/{key}"), got, &want[key], Tolerance::MODEL);
            println!("{}", c.line());
            checks.push(c);
        };
        for (text, embeds, pooled) in [
            (
                case["prompt"].as_str().expect("prompt"),
                "text.prompt_embeds",
                "text.pooled_prompt_embeds",
            ),
            (
                case["negative_prompt"].as_str().expect("negative"),
                "text.negative_prompt_embeds",
                "text.negative_pooled_prompt_embeds",
            ),
        ] {
            if let Some((e, p)) = encode(&enc, &ids, &[text]) {
                cmp(embeds, &e);
                cmp(pooled, &p);
            }
        }
        if let Some((e, _)) = encode(&enc, &ids, &names) {
            cmp("text.entity_embeds", &e);
        }
        if let Some((e, _)) = encode(&enc, &ids, &vec![""; names.len()]) {
            cmp("text.negative_entity_embeds", &e);
        }
        checks
    }

    fn assert_all(checks: &[Check]) {
        assert!(!checks.is_empty(), "no comparison could be made");
        for c in checks {
            assert!(c.ok, "{}", c.line());
        }
    }

    #[test]
    fn text_embeds_sdxl_two_objects() {
        assert_all(&run_case("sdxl_two_objects"));
    }

    #[test]
    fn text_embeds_sdxl_plus_multi_ref() {
        assert_all(&run_case("sdxl_plus_two_objects_multi_ref"));
    }

    #[test]
    fn half_precision_stays_close() {
        let dir = fixtures_dir().expect("fixtures").join("sdxl/text_encoder_2");
        let cfg = ClipTextConfig::from_file(&dir.join("config.json")).expect("config");
        let ws = Arc::new(WeightSet::from_safetensors(&find_weights(&dir, &["model"]).expect("w")).expect("ws"));
        let (_, ids2) = Ids::load().get("a photo of a cat").expect("ids");
        let ids = Tensor::from_vec(ids2, (1, 77), &Device::Cpu).expect("ids");
        let build = |dt| {
            ws.build(dt, &Device::Cpu, |vb| ClipTextModel::new(vb, &cfg, true))
                .expect("build")
        };
        let want = build(DType::F32).forward(&ids).expect("f32");
        for dt in [DType::F16, DType::BF16] {
            let got = build(dt).forward(&ids).expect("half");
            assert_eq!(got.penultimate.dtype(), dt);
            let tol = Tolerance::Scaled(5e-2);
            for (name, g, w) in [
                ("penultimate", &got.penultimate, &want.penultimate),
                ("last_hidden", &got.last_hidden, &want.last_hidden),
                (
                    "pooled",
                    got.pooled.as_ref().expect("p"),
                    want.pooled.as_ref().expect("p"),
                ),
            ] {
                let c = compare(&format!("{dt:?} {name}"), g, w, tol);
                println!("{}", c.line());
                assert!(c.ok, "{}", c.line());
            }
        }
    }

    #[test]
    fn position_ids_buffer_is_consumed() {
        let dir = fixtures_dir().expect("fixtures").join("sdxl/text_encoder_2");
        let cfg = ClipTextConfig::from_file(&dir.join("config.json")).expect("config");
        let mut ws = WeightSet::from_safetensors(&find_weights(&dir, &["model"]).expect("w")).expect("ws");
        let ids = Tensor::arange(0i64, 77, &Device::Cpu)
            .expect("arange")
            .unsqueeze(0)
            .expect("unsqueeze");
        ws.insert("text_model.embeddings.position_ids", ids);
        let ws = Arc::new(ws);
        ws.build(DType::F32, &Device::Cpu, |vb| ClipTextModel::new(vb, &cfg, true))
            .expect("build");
        ws.ensure_all_used().expect("position_ids consumed");
    }

    #[test]
    fn eos_rules() {
        let rows = vec![vec![49406, 5, 49407, 49407], vec![49406, 49407, 0, 0]];
        assert_eq!(eos_positions(&rows, 49407), vec![2, 1]);
        assert_eq!(eos_positions(&rows, 2), vec![2, 1]);
        assert_eq!(eos_positions(&[vec![1, 2, 3]], 49407), vec![0]);
    }

    #[test]
    fn missing_and_unused_keys_are_errors() {
        let dir = fixtures_dir().expect("fixtures").join("sdxl/text_encoder_2");
        let cfg = ClipTextConfig::from_file(&dir.join("config.json")).expect("config");
        let path = find_weights(&dir, &["model"]).expect("weights");
        let mut ws = WeightSet::from_safetensors(&path).expect("ws");
        ws.remove("text_model.encoder.layers.1.layer_norm2.bias");
        let ws = Arc::new(ws);
        let err = ws
            .build(DType::F32, &Device::Cpu, |vb| ClipTextModel::new(vb, &cfg, true))
            .expect_err("missing");
        assert!(err.to_string().contains("layers.1.layer_norm2.bias"), "{err}");
        // Without the projection, `text_projection.weight` is left unused.
        let ws = Arc::new(WeightSet::from_safetensors(&path).expect("ws"));
        ws.build(DType::F32, &Device::Cpu, |vb| ClipTextModel::new(vb, &cfg, false))
            .expect("build");
        let err = ws.ensure_all_used().expect_err("unused");
        assert!(err.to_string().contains("text_projection.weight"), "{err}");
    }
}
