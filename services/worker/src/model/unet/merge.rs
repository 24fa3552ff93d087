//! The MIP-Adapter weighted-merge cross-attention (`attn2` of every transformer block when an adapter is
//! loaded), matching the published processor (the maths is in `tests/fixtures/mip-tiny-sdxl/README.md`):
//!
//! ```text
//! context = [text tokens | object_0 tokens (T) | ... | object_{N-1} tokens (T)]
//! out     = to_out(TextAttn(q) + sum_i w_i * scale * ImgAttn_i(q))
//! w_i     = m_i / sum_j m_j * tw,   m_i = mean over name tokens 1..=len_i of the head-averaged
//!           softmax over latent positions of to_k(name_embeds_i) . q
//! tw      = sigmoid(text_to_weight(TextAttn(q))), normalised to mean 1 over positions
//! ```
//!
//! The name maps are computed only for the name-token rows (rows are independent), for all subjects at once;
//! the per-object image attentions are folded into one matmul by scaling each object's probabilities by its
//! weight. Softmaxes and weights are computed in f32.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{linear_no_bias, Linear, VarBuilder};

use super::attention::{merge_heads, softmax_f32, split_heads, Attention};

/// Adapter weights of one weighted-merge layer (`ip_adapter.<k>.*`, all bias-free).
#[derive(Debug, Clone)]
pub struct MergeWeights {
    to_k_ip: Linear,
    to_v_ip: Linear,
    text_to_weight: Linear,
}

impl MergeWeights {
    /// `vb` points at `ip_adapter.<k>`; `hidden` is the layer's inner dim, `context_dim` the UNet's
    /// cross-attention dim.
    pub fn new(vb: VarBuilder, hidden: usize, context_dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            to_k_ip: linear_no_bias(context_dim, hidden, vb.pp("to_k_ip"))?,
            to_v_ip: linear_no_bias(context_dim, hidden, vb.pp("to_v_ip"))?,
            text_to_weight: linear_no_bias(hidden, 1, vb.pp("text_to_weight"))?,
        })
    }
}

/// What the first weighted-merge layer of a call saw and produced.
#[derive(Debug, Clone)]
pub struct MergeCapture {
    /// The layer's input `(B, L, C)` (after `norm2`).
    pub hidden_states: Tensor,
    /// Final per-object weights `(B, N, L)` (normalised maps times the text weight), f32.
    pub object_weights: Tensor,
    /// `(B, L)`, mean 1 over positions, f32.
    pub text_weight: Tensor,
    /// The layer's output `(B, L, C)` (after `to_out`).
    pub output: Tensor,
}

/// A slot that the first weighted-merge layer fills when it holds `None`.
pub type CaptureSlot = Arc<Mutex<Option<MergeCapture>>>;

/// The per-call inputs of the weighted merge.
#[derive(Debug, Clone)]
pub struct MergeCond {
    /// `(B, N, S_e, C)`: each subject's name encoded alone like a prompt (S_e = 77).
    pub entity_text_embeds: Tensor,
    /// Token count of each subject's name (without BOS/EOS), the same for every batch row.
    pub entity_token_lens: Vec<usize>,
    /// Image tokens per subject (T).
    pub num_tokens: usize,
    /// Weight of the image branch.
    pub scale: f64,
    /// When `Some` and holding `None`, the first weighted-merge layer stores a [`MergeCapture`] in it.
    pub capture: Option<CaptureSlot>,
}

/// [`MergeCond`] checked against the context and reduced to the name-token rows, once per UNet call.
#[derive(Debug, Clone)]
pub struct PreparedMerge<'a> {
    /// `(B, sum(len_i), C)`: rows 1..=len_i of each subject's name embeddings, subjects in order.
    name_embeds: Tensor,
    lens: &'a [usize],
    num_tokens: usize,
    scale: f64,
    capture: Option<&'a CaptureSlot>,
}

impl<'a> PreparedMerge<'a> {
    /// Checks `cond` against the context `(B, S, C)` and gathers the name-token rows.
    pub fn new(cond: &'a MergeCond, context: &Tensor) -> candle_core::Result<Self> {
        let (b, s, c) = context.dims3()?;
        let (eb, n, se, ec) = cond.entity_text_embeds.dims4()?;
        let lens = &cond.entity_token_lens;
        if n == 0 || lens.len() != n {
            candle_core::bail!(
                "merge: entity_text_embeds has {n} subjects but entity_token_lens has {}",
                lens.len()
            );
        }
        if eb != b || ec != c {
            candle_core::bail!(
                "merge: entity_text_embeds ({eb}, {n}, {se}, {ec}) does not fit the context ({b}, {s}, {c})"
            );
        }
        if cond.num_tokens == 0 || n * cond.num_tokens >= s {
            candle_core::bail!(
                "merge: {n} subjects x {} tokens do not fit a context of {s} tokens",
                cond.num_tokens
            );
        }
        if let Some((i, len)) = lens.iter().enumerate().find(|(_, &l)| l == 0 || l + 1 > se) {
            candle_core::bail!(
                "merge: entity_token_lens[{i}] = {len} must be in 1..={}",
                se.saturating_sub(1)
            );
        }
        let rows = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| cond.entity_text_embeds.narrow(1, i, 1)?.squeeze(1)?.narrow(1, 1, len))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            name_embeds: Tensor::cat(&rows, 1)?.to_dtype(context.dtype())?,
            lens,
            num_tokens: cond.num_tokens,
            scale: cond.scale,
            capture: cond.capture.as_ref(),
        })
    }
}

/// Per-object weights `(B, N, L)` (maps normalised across objects, times the text weight) and the text weight
/// `(B, L)`, both f32.
fn object_weights(
    attn: &Attention,
    w: &MergeWeights,
    q: &Tensor,
    text_out: &Tensor,
    m: &PreparedMerge,
) -> candle_core::Result<(Tensor, Tensor)> {
    // (B, H, S_n, L): softmax over latent positions, then mean over heads -> (B, S_n, L).
    let ek = split_heads(&attn.to_k.forward(&m.name_embeds)?, attn.heads)?;
    let maps = attn.probs(&ek, q)?.mean(1)?;
    let mut per_object = Vec::with_capacity(m.lens.len());
    let mut offset = 0;
    for &len in m.lens {
        per_object.push(maps.narrow(1, offset, len)?.mean_keepdim(1)?);
        offset += len;
    }
    let maps = Tensor::cat(&per_object, 1)?; // (B, N, L)
    let maps = maps.broadcast_div(&maps.sum_keepdim(1)?)?;
    let tw = candle_nn::ops::sigmoid(&w.text_to_weight.forward(text_out)?.to_dtype(DType::F32)?)?.squeeze(D::Minus1)?;
    let tw = tw.broadcast_div(&tw.mean_keepdim(1)?)?; // (B, L)
    Ok((maps.broadcast_mul(&tw.unsqueeze(1)?)?, tw))
}

/// The weighted-merge cross-attention of `xs` `(B, L, C)` over `context` `(B, S, C_ctx)` whose last N*T tokens
/// are the subjects' image tokens.
pub fn merged_cross_attention(
    attn: &Attention,
    w: &MergeWeights,
    xs: &Tensor,
    context: &Tensor,
    m: &PreparedMerge,
) -> candle_core::Result<Tensor> {
    let (b, l, _) = xs.dims3()?;
    let s = context.dim(1)?;
    let (n, t) = (m.lens.len(), m.num_tokens);
    let s_text = s - n * t;
    let q = split_heads(&attn.to_q.forward(xs)?, attn.heads)?;
    let text_out = attn.attend(&q, &context.narrow(1, 0, s_text)?, &attn.to_k, &attn.to_v)?;
    let (weights, tw) = object_weights(attn, w, &q, &text_out, m)?;

    // Image attention of every object at once: softmax per object over its T tokens, each object's
    // probabilities scaled by scale * w_i, then one matmul against all objects' values.
    let ip = context.narrow(1, s_text, n * t)?;
    let k = split_heads(&w.to_k_ip.forward(&ip)?, attn.heads)?;
    let v = split_heads(&w.to_v_ip.forward(&ip)?, attn.heads)?;
    let h = attn.heads;
    let scores = (q.matmul(&k.t()?)? * attn.scale)?.reshape((b, h, l, n, t))?;
    let p = softmax_f32(&scores)?;
    let coef = (weights.transpose(1, 2)? * m.scale)?.reshape((b, 1, l, n, 1))?;
    let p = p.broadcast_mul(&coef)?.reshape((b, h, l, n * t))?.to_dtype(v.dtype())?;
    let merged = merge_heads(&p.matmul(&v)?)?;
    let out = attn.project_out(&(text_out + merged)?)?;

    if let Some(slot) = m.capture {
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(MergeCapture {
                hidden_states: xs.clone(),
                object_weights: weights,
                text_weight: tw,
                output: out.clone(),
            });
        }
    }
    Ok(out)
}
