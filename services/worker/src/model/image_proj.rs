//! IP-Adapter image projections: the plain `ImageProjModel` (sdxl: pooled CLIP image embedding -> T tokens) and
//! the perceiver `Resampler` (sdxl_plus: penultimate CLIP hidden states -> Q tokens), plus reading an adapter
//! checkpoint (`.safetensors` with flat keys or the official torch pickle with `image_proj` / `ip_adapter`
//! sub-dicts) into one flat [`WeightSet`].

use std::path::Path;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{linear, linear_no_bias, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{ModelError, Result as ModelResult};
use crate::model::clip::LayerNorm32;
use crate::model::weights::WeightSet;

/// torch's `nn.LayerNorm` default.
const LN_EPS: f64 = 1e-5;

/// Reads an adapter checkpoint into flat keys `image_proj.*` and `ip_adapter.*`: a `.safetensors` file as is, any
/// other file as a torch pickle `{"image_proj": {...}, "ip_adapter": {...}}`.
pub fn load_adapter_weights(path: &Path) -> ModelResult<WeightSet> {
    let is_safetensors = path.extension().and_then(|e| e.to_str()) == Some("safetensors");
    if is_safetensors {
        return WeightSet::from_safetensors(path);
    }
    let mut ws = WeightSet::empty(path.display().to_string());
    ws.add_pickle(path, Some("image_proj"), "image_proj.")?;
    ws.add_pickle(path, Some("ip_adapter"), "ip_adapter.")?;
    Ok(ws)
}

/// Which projection an adapter carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageProjVariant {
    /// `ImageProjModel` (`image_proj.proj.weight`): the `sdxl` adapters.
    Plain,
    /// `Resampler` (`image_proj.latents`): the `sdxl_plus` adapters.
    Plus,
}

impl std::fmt::Display for ImageProjVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain => "sdxl",
            Self::Plus => "sdxl_plus",
        })
    }
}

impl ImageProjVariant {
    /// Decides from the adapter's keys: `image_proj.latents` -> plus, `image_proj.proj.weight` -> plain.
    pub fn detect(ws: &WeightSet) -> ModelResult<Self> {
        if ws.contains("image_proj.latents") {
            Ok(Self::Plus)
        } else if ws.contains("image_proj.proj.weight") {
            Ok(Self::Plain)
        } else {
            Err(ModelError::MissingKey {
                key: "image_proj.latents or image_proj.proj.weight".to_owned(),
                file: "adapter checkpoint".to_owned(),
            })
        }
    }
}

/// Sizes of the plain projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageProjModelConfig {
    /// CLIP `projection_dim` (input).
    pub clip_embeddings_dim: usize,
    /// UNet `cross_attention_dim` (token width).
    pub cross_attention_dim: usize,
    /// Tokens per image (4 for the published sdxl adapter).
    pub num_tokens: usize,
}

/// Hyper-parameters of the Resampler (`resampler` of a case.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct ResamplerConfig {
    pub dim: usize,
    pub depth: usize,
    pub dim_head: usize,
    pub heads: usize,
    pub num_queries: usize,
    /// Image encoder hidden size (input width).
    pub embedding_dim: usize,
    /// UNet `cross_attention_dim` (token width).
    pub output_dim: usize,
    pub ff_mult: usize,
}

impl ResamplerConfig {
    /// The published `sdxl_plus` settings: dim 1280, depth 4, heads 20, dim_head 64, 16 queries, ff_mult 4.
    pub fn published(embedding_dim: usize, output_dim: usize) -> Self {
        Self {
            dim: 1280,
            depth: 4,
            dim_head: 64,
            heads: 20,
            num_queries: 16,
            embedding_dim,
            output_dim,
            ff_mult: 4,
        }
    }
}

/// A projection variant with its sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageProjConfig {
    Plain(ImageProjModelConfig),
    Plus(ResamplerConfig),
}

impl ImageProjConfig {
    /// The config of the projection stored in an adapter: plain sizes are read from the tensor shapes; for plus,
    /// `resampler` if given, else [`ResamplerConfig::published`] with the in/out widths read from the shapes
    /// (heads vs dim_head cannot be told apart from shapes).
    pub fn from_adapter(ws: &WeightSet, resampler: Option<ResamplerConfig>) -> ModelResult<Self> {
        let dims = |key: &str| -> ModelResult<Vec<usize>> {
            ws.dims(key).ok_or_else(|| ModelError::MissingKey {
                key: key.to_owned(),
                file: "adapter".to_owned(),
            })
        };
        match ImageProjVariant::detect(ws)? {
            ImageProjVariant::Plain => {
                let proj = dims("image_proj.proj.weight")?;
                let norm = dims("image_proj.norm.weight")?;
                let (rows, cols, c) = match (proj.as_slice(), norm.as_slice()) {
                    ([r, c], [n]) if r.checked_rem(*n) == Some(0) => (*r, *c, *n),
                    _ => return Err(shape_err("image_proj.proj.weight", proj)),
                };
                Ok(Self::Plain(ImageProjModelConfig {
                    clip_embeddings_dim: cols,
                    cross_attention_dim: c,
                    num_tokens: rows / c,
                }))
            }
            ImageProjVariant::Plus => {
                if let Some(cfg) = resampler {
                    return Ok(Self::Plus(cfg));
                }
                let pin = dims("image_proj.proj_in.weight")?;
                let pout = dims("image_proj.proj_out.weight")?;
                match (pin.as_slice(), pout.as_slice()) {
                    ([_, e], [o, _]) => Ok(Self::Plus(ResamplerConfig::published(*e, *o))),
                    _ => Err(shape_err("image_proj.proj_in.weight", pin)),
                }
            }
        }
    }
}

fn shape_err(key: &str, found: Vec<usize>) -> ModelError {
    ModelError::ShapeMismatch {
        key: key.to_owned(),
        file: "adapter".to_owned(),
        expected: vec![],
        found,
    }
}

/// `ImageProjModel`: `proj` Linear(P -> T*C), reshape (B, T, C), LayerNorm `norm`.
#[derive(Debug, Clone)]
pub struct ImageProjModel {
    proj: Linear,
    norm: LayerNorm32,
    cfg: ImageProjModelConfig,
}

impl ImageProjModel {
    pub fn new(vb: VarBuilder, cfg: &ImageProjModelConfig) -> Result<Self> {
        let out = cfg.num_tokens * cfg.cross_attention_dim;
        Ok(Self {
            proj: linear(cfg.clip_embeddings_dim, out, vb.pp("proj"))?,
            norm: LayerNorm32::new(cfg.cross_attention_dim, LN_EPS, vb.pp("norm"))?,
            cfg: *cfg,
        })
    }

    /// `image_embeds` (B, P) -> tokens (B, T, C).
    pub fn forward(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let x = self.proj.forward(image_embeds)?;
        let x = x.reshape((b, self.cfg.num_tokens, self.cfg.cross_attention_dim))?;
        self.norm.forward(&x)
    }
}

/// IP-Adapter's `PerceiverAttention`: latents attend to `concat(norm1(x), norm2(latents))`.
#[derive(Debug, Clone)]
struct PerceiverAttention {
    norm1: LayerNorm32,
    norm2: LayerNorm32,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
}

impl PerceiverAttention {
    fn new(vb: VarBuilder, cfg: &ResamplerConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        Ok(Self {
            norm1: LayerNorm32::new(cfg.dim, LN_EPS, vb.pp("norm1"))?,
            norm2: LayerNorm32::new(cfg.dim, LN_EPS, vb.pp("norm2"))?,
            to_q: linear_no_bias(cfg.dim, inner, vb.pp("to_q"))?,
            to_kv: linear_no_bias(cfg.dim, 2 * inner, vb.pp("to_kv"))?,
            to_out: linear_no_bias(inner, cfg.dim, vb.pp("to_out"))?,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
        })
    }

    fn heads(&self, t: &Tensor) -> Result<Tensor> {
        let (b, n, _) = t.dims3()?;
        t.reshape((b, n, self.heads, self.dim_head))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, x: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let x = self.norm1.forward(x)?;
        let latents = self.norm2.forward(latents)?;
        let (b, l, _) = latents.dims3()?;
        let inner = self.heads * self.dim_head;
        let q = self.to_q.forward(&latents)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&x, &latents], 1)?)?;
        let k = kv.narrow(D::Minus1, 0, inner)?;
        let v = kv.narrow(D::Minus1, inner, inner)?;
        let scale = (self.dim_head as f64).powf(-0.25);
        let q = (self.heads(&q)? * scale)?;
        let k = (self.heads(&k)? * scale)?;
        let v = self.heads(&v)?;
        let w = q.matmul(&k.t()?)?;
        let w = candle_nn::ops::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(w.dtype())?;
        let out = w.matmul(&v)?.transpose(1, 2)?.reshape((b, l, inner))?;
        self.to_out.forward(&out)
    }
}

/// IP-Adapter's `FeedForward`: `0` LayerNorm, `1` Linear (no bias), GELU, `3` Linear (no bias).
#[derive(Debug, Clone)]
struct FeedForward {
    norm: LayerNorm32,
    fc1: Linear,
    fc2: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, cfg: &ResamplerConfig) -> Result<Self> {
        let inner = cfg.dim * cfg.ff_mult;
        Ok(Self {
            norm: LayerNorm32::new(cfg.dim, LN_EPS, vb.pp("0"))?,
            fc1: linear_no_bias(cfg.dim, inner, vb.pp("1"))?,
            fc2: linear_no_bias(inner, cfg.dim, vb.pp("3"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.fc1.forward(&self.norm.forward(x)?)?;
        self.fc2.forward(&y.gelu_erf()?)
    }
}

/// IP-Adapter plus `Resampler` (no positional embedding, no mean-pooled latents, as in the sdxl_plus models).
#[derive(Debug, Clone)]
pub struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    layers: Vec<(PerceiverAttention, FeedForward)>,
    proj_out: Linear,
    norm_out: LayerNorm32,
    cfg: ResamplerConfig,
}

impl Resampler {
    pub fn new(vb: VarBuilder, cfg: &ResamplerConfig) -> Result<Self> {
        let lvb = vb.pp("layers");
        let layers = (0..cfg.depth)
            .map(|i| {
                let l = lvb.pp(i);
                Ok((
                    PerceiverAttention::new(l.pp("0"), cfg)?,
                    FeedForward::new(l.pp("1"), cfg)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            latents: vb.get((1, cfg.num_queries, cfg.dim), "latents")?,
            proj_in: linear(cfg.embedding_dim, cfg.dim, vb.pp("proj_in"))?,
            layers,
            proj_out: linear(cfg.dim, cfg.output_dim, vb.pp("proj_out"))?,
            norm_out: LayerNorm32::new(cfg.output_dim, LN_EPS, vb.pp("norm_out"))?,
            cfg: *cfg,
        })
    }

    /// Hidden states (B, S, E) -> tokens (B, Q, output_dim).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let b = hidden_states.dim(0)?;
        let mut latents = self
            .latents
            .broadcast_as((b, self.cfg.num_queries, self.cfg.dim))?
            .contiguous()?;
        let x = self.proj_in.forward(hidden_states)?;
        for (attn, ff) in &self.layers {
            latents = (attn.forward(&x, &latents)? + &latents)?;
            latents = (ff.forward(&latents)? + &latents)?;
        }
        self.norm_out.forward(&self.proj_out.forward(&latents)?)
    }
}

/// The image projection of an adapter.
#[derive(Debug, Clone)]
pub enum ImageProj {
    Plain(ImageProjModel),
    Plus(Resampler),
}

impl ImageProj {
    /// Builds the projection under `vb` (already `.pp("image_proj")`).
    pub fn new(vb: VarBuilder, cfg: &ImageProjConfig) -> Result<Self> {
        Ok(match cfg {
            ImageProjConfig::Plain(c) => Self::Plain(ImageProjModel::new(vb, c)?),
            ImageProjConfig::Plus(c) => Self::Plus(Resampler::new(vb, c)?),
        })
    }

    pub fn variant(&self) -> ImageProjVariant {
        match self {
            Self::Plain(_) => ImageProjVariant::Plain,
            Self::Plus(_) => ImageProjVariant::Plus,
        }
    }

    /// Tokens per image.
    pub fn num_tokens(&self) -> usize {
        match self {
            Self::Plain(m) => m.cfg.num_tokens,
            Self::Plus(r) => r.cfg.num_queries,
        }
    }

    /// Plain: `image_embeds` (B, P); plus: penultimate hidden states (B, S, E). Returns (B, T, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain(m) => m.forward(x),
            Self::Plus(r) => r.forward(x),
        }
    }
}

#[cfg(test)]
mod tests;
