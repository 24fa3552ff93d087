//! Building blocks of the diffusers `AutoencoderKL`: `ResnetBlock2D` (no time embedding), `Downsample2D`
//! (asymmetric zero pad then stride-2 conv), `Upsample2D` (nearest x2 then conv), the single-head mid-block
//! `Attention` over channels, and `UNetMidBlock2D` (resnet, [attention, resnet]).
//!
//! Every GroupNorm uses the VAE's eps (1e-6) and computes its statistics in f32 for half dtypes; the attention
//! runs entirely in f32 with the query rows chunked so that 1024x1024 decodes do not materialise the full
//! 16384^2 score matrix at once.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};

use crate::model::conv::{conv2d, Conv2d};
use crate::model::norm::{group_norm, GroupNormAct};

/// GroupNorm eps used throughout the VAE (diffusers `resnet_eps=1e-6`).
pub const VAE_NORM_EPS: f64 = 1e-6;

/// Most f32 attention scores materialised at once (2^26 elements = 256 MiB).
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

fn conv3x3(cin: usize, cout: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(cin, cout, 3, stride, padding, vb)
}

/// `ResnetBlock2D` without time embedding: `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNormAct,
    conv1: Conv2d,
    norm2: GroupNormAct,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        let conv_shortcut = if cin != cout {
            Some(conv2d(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, cin, VAE_NORM_EPS, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, 1, 1, vb.pp("conv1"))?,
            norm2: group_norm(groups, cout, VAE_NORM_EPS, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }
}

impl Module for ResnetBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?;
        let h = self.conv1.forward(&h)?;
        let h = self.norm2.forward_silu(&h)?;
        let h = self.conv2.forward(&h)?;
        let residual = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        residual + h
    }
}

/// `Downsample2D(use_conv=True, padding=0)`: pad right/bottom by one zero, then a 3x3 stride-2 conv.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, 2, 0, vb.pp("conv"))?,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
        self.conv.forward(&x)
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour x2, then a 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, 1, 1, vb.pp("conv"))?,
        })
    }
}

impl Module for Upsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

/// Linear layer named by the new diffusers key, or by the legacy one (`query`, `key`, `value`, `proj_attn`).
fn linear_either(vb: &VarBuilder, channels: usize, new: &str, legacy: &str) -> Result<Linear> {
    let name = if !vb.contains_tensor(&format!("{new}.weight")) && vb.contains_tensor(&format!("{legacy}.weight")) {
        legacy
    } else {
        new
    };
    linear(channels, channels, vb.pp(name))
}

/// The mid-block self-attention: one head of dimension `channels` over the `H*W` positions, with a GroupNorm in
/// front and a residual connection (diffusers `Attention(..., residual_connection=True, upcast_softmax=True)`).
#[derive(Debug, Clone)]
pub struct VaeAttention {
    group_norm: GroupNormAct,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl VaeAttention {
    pub fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, VAE_NORM_EPS, vb.pp("group_norm"))?,
            to_q: linear_either(&vb, channels, "to_q", "query")?,
            to_k: linear_either(&vb, channels, "to_k", "key")?,
            to_v: linear_either(&vb, channels, "to_v", "value")?,
            to_out: linear_either(&vb, channels, "to_out.0", "proj_attn")?,
            channels,
        })
    }
}

impl Module for VaeAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_chunked(x, MAX_SCORE_ELEMENTS)
    }
}

impl VaeAttention {
    /// The forward pass, materialising at most about `max_scores` f32 attention scores at a time (query rows
    /// are processed in chunks; at least one row per chunk).
    pub fn forward_chunked(&self, x: &Tensor, max_scores: usize) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let dtype = x.dtype();
        let n = h * w;
        // (B, C, H, W) -> (B, N, C) after the norm.
        let hs = self.group_norm.forward(x)?.reshape((b, c, n))?.transpose(1, 2)?;
        let q = self.to_q.forward(&hs)?.to_dtype(DType::F32)?;
        let k = self.to_k.forward(&hs)?.to_dtype(DType::F32)?;
        let v = self.to_v.forward(&hs)?.to_dtype(DType::F32)?;
        let kt = k.t()?.contiguous()?;
        let scale = 1.0 / (self.channels as f64).sqrt();
        let rows = (max_scores / (b * n).max(1)).clamp(1, n.max(1));
        let mut outs = Vec::with_capacity(n.div_ceil(rows));
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let qc = q.narrow(1, start, len)?;
            let scores = (qc.matmul(&kt)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            outs.push(probs.matmul(&v)?);
            start += len;
        }
        let attn = Tensor::cat(&outs, 1)?.to_dtype(dtype)?;
        let out = self.to_out.forward(&attn)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// `UNetMidBlock2D` as the VAE uses it: resnet, then (attention if enabled, resnet).
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<VaeAttention>,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), channels, channels, groups))
            .collect::<Result<Vec<_>>>()?;
        let attention = if add_attention {
            Some(VaeAttention::new(vb.pp("attentions.0"), channels, groups)?)
        } else {
            None
        };
        Ok(Self { resnets, attention })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnets[1].forward(&h)
    }
}
