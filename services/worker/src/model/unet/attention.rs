//! The transformer part of the UNet: diffusers `Attention` (bias-free q/k/v, `to_out.0` with bias; the
//! self-attention with its q/k/v projections fused into one GEMM), the GEGLU
//! `FeedForward`, `BasicTransformerBlock` (self-attention, cross-attention, feed-forward, each pre-LayerNorm with
//! a residual) and `Transformer2DModel` (GroupNorm eps 1e-6, `proj_in`, blocks, `proj_out`, residual).
//!
//! Cross-attention (`attn2`) runs either plain over the whole context or, when the block carries adapter
//! weights and the call carries a [`PreparedMerge`], as the weighted merge of [`super::merge`].

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear, VarBuilder};

use super::merge::{merged_cross_attention, MergeWeights, PreparedMerge};
use crate::model::conv::{conv2d, Conv2d};
use crate::model::norm::{group_norm, GroupNormAct};

/// `(B, L, H*d)` -> `(B, H, L, d)`, contiguous.
pub fn split_heads(xs: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, l, c) = xs.dims3()?;
    xs.reshape((b, l, heads, c / heads))?.transpose(1, 2)?.contiguous()
}

/// `(B, L, H*d)` -> `(B, H, L, d)` as a strided view (no copy).
pub fn heads_view(xs: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, l, c) = xs.dims3()?;
    xs.reshape((b, l, heads, c / heads))?.transpose(1, 2)
}

/// `(B, H, L, d)` -> `(B, L, H*d)`.
pub fn merge_heads(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, l, d) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, l, h * d))
}

/// Softmax over the last axis computed in f32, returned in f32.
pub fn softmax_f32(xs: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax_last_dim(&xs.to_dtype(DType::F32)?.contiguous()?)
}

/// Attention probabilities `softmax(a . b^T * scale)` over the last axis, in f32: `(B, H, La, Lb)`.
fn scaled_probs(a: &Tensor, b: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    softmax_f32(&(a.matmul(&b.t()?)? * scale)?)
}

/// `softmax(q k^T * scale) v` for head views `q` `(B, H, Lq, d)` and `k`/`v` `(B, H, Lk, d)` (any strides),
/// heads merged: `(B, Lq, H*d)`. With the `cuda` feature, CUDA f16/bf16 tensors take the fused kernel, which reads
/// the views without copies; otherwise contiguous copies, the probabilities in f32 and two matmuls.
fn attention_heads(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if mip_kernels::flash_attn_supported(q, k) {
        return mip_kernels::flash_attn(q, k, v, scale as f32);
    }
    let p = scaled_probs(&q.contiguous()?, &k.contiguous()?, scale)?.to_dtype(v.dtype())?;
    merge_heads(&p.matmul(&v.contiguous()?)?)
}

/// diffusers `Attention` as used by `BasicTransformerBlock`.
#[derive(Debug, Clone)]
pub struct Attention {
    pub(super) to_q: Linear,
    pub(super) to_k: Linear,
    pub(super) to_v: Linear,
    to_out: Linear,
    pub(super) heads: usize,
    pub(super) scale: f64,
}

impl Attention {
    /// `query_dim` = inner dim = `heads * dim_head`; `context_dim` is the key/value input size.
    pub fn new(vb: VarBuilder, query_dim: usize, context_dim: usize, heads: usize) -> candle_core::Result<Self> {
        if heads == 0 || !query_dim.is_multiple_of(heads) {
            candle_core::bail!("attention: {query_dim} channels cannot be split into {heads} heads");
        }
        Ok(Self {
            to_q: linear_no_bias(query_dim, query_dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, query_dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, query_dim, vb.pp("to_v"))?,
            to_out: linear(query_dim, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: 1.0 / ((query_dim / heads) as f64).sqrt(),
        })
    }

    /// Attention probabilities `softmax(a . b^T * scale)` over the last axis, in f32: `(B, H, La, Lb)`.
    pub fn probs(&self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        scaled_probs(a, b, self.scale)
    }

    /// Multi-head attention of the split queries `q` `(B, H, L, d)` over keys/values projected from `ctx` by
    /// `to_k`/`to_v` (read as head views of the projections); returns `(B, L, H*d)` before `to_out`.
    pub fn attend(&self, q: &Tensor, ctx: &Tensor, to_k: &Linear, to_v: &Linear) -> candle_core::Result<Tensor> {
        let k = heads_view(&to_k.forward(ctx)?, self.heads)?;
        let v = heads_view(&to_v.forward(ctx)?, self.heads)?;
        attention_heads(q, &k, &v, self.scale)
    }

    /// The output projection `to_out.0` (`to_out.1` is dropout).
    pub fn project_out(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.to_out.forward(xs)
    }

    /// Plain attention of `xs` `(B, L, C)` over `ctx` `(B, S, C_ctx)` (self-attention when `ctx` is `xs`).
    pub fn forward(&self, xs: &Tensor, ctx: &Tensor) -> candle_core::Result<Tensor> {
        let q = heads_view(&self.to_q.forward(xs)?, self.heads)?;
        self.project_out(&self.attend(&q, ctx, &self.to_k, &self.to_v)?)
    }
}

/// Self-attention (`attn1`) with `to_q`, `to_k` and `to_v` concatenated into one `(3C, C)` projection at load:
/// one GEMM reads the input once, and on CUDA the fused kernel reads q, k and v as strided head views of its
/// output (no split copies).
#[derive(Debug, Clone)]
pub struct SelfAttention {
    qkv: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl SelfAttention {
    /// `dim` = inner dim = `heads * dim_head`; reads `to_q`, `to_k`, `to_v` (bias-free) and `to_out.0`.
    pub fn new(vb: VarBuilder, dim: usize, heads: usize) -> candle_core::Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            candle_core::bail!("attention: {dim} channels cannot be split into {heads} heads");
        }
        let w = ["to_q", "to_k", "to_v"]
            .iter()
            .map(|n| vb.pp(n).get((dim, dim), "weight"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            qkv: Linear::new(Tensor::cat(&w, 0)?, None),
            to_out: linear(dim, dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: 1.0 / ((dim / heads) as f64).sqrt(),
        })
    }
}

impl Module for SelfAttention {
    /// `xs` `(B, L, C)` -> `(B, L, C)`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, c) = xs.dims3()?;
        let qkv = self.qkv.forward(xs)?.reshape((b, l, 3, self.heads, c / self.heads))?;
        // (B, H, L, d) strided views of the one projection.
        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        self.to_out.forward(&attention_heads(&q, &k, &v, self.scale)?)
    }
}

/// `FeedForward` with GEGLU: `net.2(h * gelu_erf(g))` where `[h | g] = net.0.proj(x)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, mult: usize) -> candle_core::Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj: linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            out: linear(inner, dim, vb.pp("net").pp("2"))?,
            inner,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let hg = self.proj.forward(xs)?;
        let h = hg.narrow(D::Minus1, 0, self.inner)?;
        let g = hg.narrow(D::Minus1, self.inner, self.inner)?;
        self.out.forward(&(h * g.gelu_erf()?)?)
    }
}

/// The conditioning every cross-attention of one UNet call sees.
#[derive(Debug, Clone)]
pub struct CrossContext<'a> {
    /// `(B, S, C)`: text tokens, then (with the merge) N*T image tokens.
    pub encoder_hidden_states: Tensor,
    pub merge: Option<PreparedMerge<'a>>,
}

/// `BasicTransformerBlock` (layer norms, eps 1e-5) with an optional weighted-merge adapter on `attn2`.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: SelfAttention,
    norm2: LayerNorm,
    attn2: Attention,
    merge: Option<MergeWeights>,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
        merge: Option<MergeWeights>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: SelfAttention::new(vb.pp("attn1"), dim, heads)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads)?,
            merge,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4)?,
        })
    }

    /// `xs` `(B, L, C)` -> `(B, L, C)`.
    pub fn forward(&self, xs: &Tensor, ctx: &CrossContext) -> candle_core::Result<Tensor> {
        let h = self.norm1.forward(xs)?;
        let xs = (self.attn1.forward(&h)? + xs)?;
        let h = self.norm2.forward(&xs)?;
        let a2 = match (&ctx.merge, &self.merge) {
            (None, _) => self.attn2.forward(&h, &ctx.encoder_hidden_states)?,
            (Some(m), Some(w)) => merged_cross_attention(&self.attn2, w, &h, &ctx.encoder_hidden_states, m)?,
            (Some(_), None) => {
                candle_core::bail!("unet: a weighted merge was requested but no adapter weights are loaded")
            }
        };
        let xs = (a2 + xs)?;
        let h = self.norm3.forward(&xs)?;
        self.ff.forward(&h)? + xs
    }
}

/// `proj_in` / `proj_out`: linear over tokens (SDXL) or 1x1 conv over the feature map.
#[derive(Debug, Clone)]
enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

impl Proj {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, use_linear: bool) -> candle_core::Result<Self> {
        Ok(if use_linear {
            Self::Linear(linear(c_in, c_out, vb)?)
        } else {
            Self::Conv(conv2d(c_in, c_out, 1, 1, 0, vb)?)
        })
    }
}

/// `Transformer2DModel` over continuous inputs.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNormAct,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

/// Sizes of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    /// `merges` holds the adapter weights of each block's `attn2` (empty, or one per layer).
    pub fn new(
        vb: VarBuilder,
        cfg: TransformerConfig,
        mut merges: Vec<Option<MergeWeights>>,
    ) -> candle_core::Result<Self> {
        let c = cfg.channels;
        merges.resize(cfg.layers, None);
        let vbb = vb.pp("transformer_blocks");
        let blocks = merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| BasicTransformerBlock::new(vbb.pp(i), c, cfg.heads, cfg.context_dim, m))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: Proj::new(vb.pp("proj_in"), c, c, cfg.use_linear_projection)?,
            blocks,
            proj_out: Proj::new(vb.pp("proj_out"), c, c, cfg.use_linear_projection)?,
        })
    }

    /// `xs` `(B, C, H, W)` -> `(B, C, H, W)`.
    pub fn forward(&self, xs: &Tensor, ctx: &CrossContext) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let mut t = self.norm.forward(xs)?;
        if let Proj::Conv(conv) = &self.proj_in {
            t = conv.forward(&t)?;
        }
        t = t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
        if let Proj::Linear(lin) = &self.proj_in {
            t = lin.forward(&t)?;
        }
        for block in &self.blocks {
            t = block.forward(&t, ctx)?;
        }
        let t = match &self.proj_out {
            Proj::Linear(lin) => lin.forward(&t)?.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?,
            Proj::Conv(conv) => conv.forward(&t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?)?,
        };
        t + xs
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;

    #[test]
    fn fused_self_attention_equals_separate_projections() {
        let dev = Device::Cpu;
        let randn = |shape: &[usize]| Tensor::randn(0f32, 0.3, shape, &dev).expect("randn");
        let mut map = HashMap::new();
        for name in ["to_q", "to_k", "to_v", "to_out.0"] {
            map.insert(format!("{name}.weight"), randn(&[16, 16]));
        }
        map.insert("to_out.0.bias".to_owned(), randn(&[16]));
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let fused = SelfAttention::new(vb.clone(), 16, 2).expect("fused");
        let separate = Attention::new(vb, 16, 16, 2).expect("separate");
        let xs = randn(&[2, 7, 16]);
        let diff = (fused.forward(&xs).expect("fused forward") - separate.forward(&xs, &xs).expect("forward"))
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("diff");
        assert!(diff < 1e-5, "max abs difference {diff}");
        assert!(SelfAttention::new(VarBuilder::zeros(DType::F32, &dev), 16, 3).is_err());
    }
}
