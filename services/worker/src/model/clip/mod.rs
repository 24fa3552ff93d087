//! CLIP encoders as published by transformers: the text encoders of SDXL ([`text`]), the image encoder of
//! IP-Adapter ([`vision`]) and the two-tower `CLIPModel` of the evaluation ([`full`]). This file holds the configs
//! and the pre-norm transformer encoder they share (also used, with ViT's key names, by [`super::vit`]).
//!
//! Precision: layer norms and attention softmax run in f32 whatever the model dtype (transformers computes
//! softmax in f32 and layer norms at least that precisely), so f16/bf16 weights stay close to the reference.

pub mod full;
pub mod text;
pub mod vision;

use std::path::Path;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{ModelError, Result as ModelResult};

pub use full::ClipModel;
pub use text::{ClipTextModel, ClipTextOutput};
pub use vision::{ClipVisionModel, ClipVisionOutput};

/// The `hidden_act` of a CLIP config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP-L).
    QuickGelu,
    /// Exact GELU with erf (OpenCLIP bigG, ViT-H).
    Gelu,
    /// Tanh approximation of GELU.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
}

impl Activation {
    /// Applies the activation element-wise.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluNew => x.gelu(),
        }
    }
}

fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}
fn default_channels() -> usize {
    3
}
fn default_projection() -> usize {
    512
}

/// `config.json` of a `CLIPTextModel` / `CLIPTextModelWithProjection` (unknown fields ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_projection")]
    pub projection_dim: usize,
    /// 2 in old configs (then the EOS position is the argmax of the ids, as in transformers).
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

/// `config.json` of a `CLIPVisionModelWithProjection` (unknown fields ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_projection")]
    pub projection_dim: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
}

impl ClipTextConfig {
    /// Reads a text `config.json` (or the `text_config` of a full `CLIPConfig`).
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        let cfg: Self = read_sub_config(path, "text_config")?;
        check_encoder(path, cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers)?;
        Ok(cfg)
    }
}

impl ClipVisionConfig {
    /// Reads a vision `config.json` (or the `vision_config` of a full `CLIPConfig`).
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        let cfg: Self = read_sub_config(path, "vision_config")?;
        check_encoder(path, cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers)?;
        if cfg.image_size.checked_rem(cfg.patch_size) != Some(0) {
            return Err(config_err(path, "`image_size` must be a multiple of `patch_size`"));
        }
        Ok(cfg)
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }
}

/// Parses `path`, descending into `sub` when present. A full `CLIPConfig`'s top-level `projection_dim` is the
/// one its projections have (the sub-configs carry an unused default of their own), so it wins.
fn read_sub_config<T: serde::de::DeserializeOwned>(path: &Path, sub: &str) -> ModelResult<T> {
    let mut json: serde_json::Value = crate::model::weights::read_json(path)?;
    if let Some(inner) = json.get(sub).filter(|v| v.is_object()).cloned() {
        let proj = json.get("projection_dim").cloned();
        json = inner;
        if let (Some(p), Some(obj)) = (proj, json.as_object_mut()) {
            obj.insert("projection_dim".into(), p);
        }
    }
    serde_json::from_value(json).map_err(|e| config_err(path, e.to_string()))
}

fn check_encoder(path: &Path, hidden: usize, heads: usize, layers: usize) -> ModelResult<()> {
    if hidden.checked_rem(heads) != Some(0) {
        return Err(config_err(
            path,
            "`hidden_size` must be a multiple of `num_attention_heads`",
        ));
    }
    if layers == 0 {
        return Err(config_err(path, "`num_hidden_layers` must be at least 1"));
    }
    Ok(())
}

fn config_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// A LayerNorm whose parameters are held in f32 and which normalises in f32, returning the input dtype.
#[derive(Debug, Clone)]
pub struct LayerNorm32 {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm32 {
    /// Reads `weight` and `bias` of shape `(size,)` under `vb`.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let get = |name: &str| vb.get_with_hints_dtype(size, name, Default::default(), DType::F32);
        Ok(Self {
            weight: get("weight")?,
            bias: get("bias")?,
            eps: eps as f32,
        })
    }
}

impl Module for LayerNorm32 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        candle_nn::ops::layer_norm(&x32, &self.weight, &self.bias, self.eps)?.to_dtype(x.dtype())
    }
}

/// The key names of a pre-norm encoder layer: CLIP's (transformers `CLIPEncoderLayer`) or ViT's (`ViTLayer`, the
/// DINO evaluation model). The maths is the same; only the names differ.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncoderKeys {
    pub layers: &'static str,
    pub norm1: &'static str,
    pub norm2: &'static str,
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub out: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
}

/// `encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}`.
pub(crate) const CLIP_KEYS: EncoderKeys = EncoderKeys {
    layers: "layers",
    norm1: "layer_norm1",
    norm2: "layer_norm2",
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    out: "self_attn.out_proj",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
};

/// `encoder.layer.N.{layernorm_before, attention.attention.{query,key,value}, attention.output.dense,
/// layernorm_after, intermediate.dense, output.dense}`.
pub(crate) const VIT_KEYS: EncoderKeys = EncoderKeys {
    layers: "layer",
    norm1: "layernorm_before",
    norm2: "layernorm_after",
    q: "attention.attention.query",
    k: "attention.attention.key",
    v: "attention.attention.value",
    out: "attention.output.dense",
    fc1: "intermediate.dense",
    fc2: "output.dense",
};

/// Multi-head self-attention (query, key, value and output projections, all with bias).
#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl SelfAttention {
    fn new(vb: &VarBuilder, hidden: usize, heads: usize, keys: &EncoderKeys) -> Result<Self> {
        let head_dim = hidden / heads;
        Ok(Self {
            q_proj: linear(hidden, hidden, vb.pp(keys.q))?,
            k_proj: linear(hidden, hidden, vb.pp(keys.k))?,
            v_proj: linear(hidden, hidden, vb.pp(keys.v))?,
            out_proj: linear(hidden, hidden, vb.pp(keys.out))?,
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `x`: (B, S, H); `mask`: additive f32 (S, S) or None.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(x)? * self.scale)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(x.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        self.out_proj.forward(&out)
    }
}

/// One pre-norm encoder layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm32,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm32,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, dims: &EncoderDims, keys: &EncoderKeys) -> Result<Self> {
        let h = dims.hidden;
        Ok(Self {
            layer_norm1: LayerNorm32::new(h, dims.eps, vb.pp(keys.norm1))?,
            self_attn: SelfAttention::new(&vb, h, dims.heads, keys)?,
            layer_norm2: LayerNorm32::new(h, dims.eps, vb.pp(keys.norm2))?,
            fc1: linear(h, dims.intermediate, vb.pp(keys.fc1))?,
            fc2: linear(dims.intermediate, h, vb.pp(keys.fc2))?,
            act: dims.act,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let y = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let y = self.fc2.forward(&self.act.apply(&y)?)?;
        x + y
    }
}

/// The sizes an encoder needs, common to text and vision configs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncoderDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub eps: f64,
    pub act: Activation,
}

/// The stack `encoder.layers.N` (`encoder.layer.N` for ViT).
#[derive(Debug, Clone)]
pub(crate) struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    fn new(vb: VarBuilder, dims: &EncoderDims) -> Result<Self> {
        Self::with_keys(vb, dims, &CLIP_KEYS)
    }

    /// An encoder whose layers are named by `keys`.
    pub(crate) fn with_keys(vb: VarBuilder, dims: &EncoderDims, keys: &EncoderKeys) -> Result<Self> {
        let vb = vb.pp(keys.layers);
        let layers = (0..dims.layers)
            .map(|i| EncoderLayer::new(vb.pp(i), dims, keys))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Runs the first `n` layers.
    pub(crate) fn forward_n(&self, x: &Tensor, mask: Option<&Tensor>, n: usize) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in self.layers.iter().take(n) {
            x = layer.forward(&x, mask)?;
        }
        Ok(x)
    }

    /// `(last, penultimate)`: the output of the last layer and `hidden_states[-2]` (its input).
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let n = self.layers.len();
        let penultimate = self.forward_n(x, mask, n.saturating_sub(1))?;
        let last = match self.layers.last() {
            Some(layer) => layer.forward(&penultimate, mask)?,
            None => penultimate.clone(),
        };
        Ok((last, penultimate))
    }
}

/// `[class token; patch embeddings]` (B, 1 + N, H) of `pixel_values` (B, C, S, S), checked against the model's
/// `channels` and `size` (`what` names the model in the error): the input side of CLIP's vision tower and of ViT.
pub(crate) fn class_and_patches(
    pixel_values: &Tensor,
    patch: &candle_nn::Conv2d,
    class: &Tensor,
    channels: usize,
    size: usize,
    what: &str,
) -> Result<Tensor> {
    let (b, c, hh, ww) = pixel_values.dims4()?;
    if c != channels || hh != size || ww != size {
        candle_core::bail!("{what}: pixel_values (B, {c}, {hh}, {ww}), expected (B, {channels}, {size}, {size})");
    }
    let x = pixel_values.to_dtype(class.dtype())?;
    let patches = patch.forward(&x)?.flatten_from(2)?.transpose(1, 2)?;
    let h = patches.dim(2)?;
    let cls = class.reshape((1, 1, h))?.broadcast_as((b, 1, h))?;
    Tensor::cat(&[&cls.contiguous()?, &patches.contiguous()?], 1)
}

/// Takes the first `n` positions of a `(max, H)` table and adds it to `(B, n, H)` embeddings.
pub(crate) fn add_positions(x: &Tensor, table: &Tensor) -> Result<Tensor> {
    let n = x.dim(1)?;
    x.broadcast_add(&table.narrow(0, 0, n)?.unsqueeze(0)?)
}

/// Index of the first maximum along the last axis of a small `(B, S)` u32 tensor, as a Vec.
fn first_argmax_rows(ids: &[Vec<u32>]) -> Vec<usize> {
    ids.iter()
        .map(|row| {
            let mut best = 0;
            for (i, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}
