//! diffusers `ResnetBlock2D` (default time-scale-shift, SiLU), `Downsample2D` (strided conv) and `Upsample2D`
//! (nearest-neighbour resize then conv).

use candle_core::{Module, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};

use crate::model::conv::{conv2d, Conv2d};
use crate::model::norm::{group_norm, GroupNormAct};

/// `ResnetBlock2D`: `(shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNormAct,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNormAct,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Sizes and norms of one resnet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

fn conv3(c_in: usize, c_out: usize, stride: usize, padding: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    conv2d(c_in, c_out, 3, stride, padding, vb)
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: ResnetConfig) -> candle_core::Result<Self> {
        let (c_in, c_out) = (cfg.in_channels, cfg.out_channels);
        let conv_shortcut = if c_in != c_out {
            Some(conv2d(c_in, c_out, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(cfg.groups, c_in, cfg.eps, vb.pp("norm1"))?,
            conv1: conv3(c_in, c_out, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: linear(cfg.temb_channels, c_out, vb.pp("time_emb_proj"))?,
            norm2: group_norm(cfg.groups, c_out, cfg.eps, vb.pp("norm2"))?,
            conv2: conv3(c_out, c_out, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `xs` `(B, C_in, H, W)`, `temb` `(B, temb_channels)` -> `(B, C_out, H, W)`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.norm1.forward_silu(xs)?;
        let h = self.conv1.forward(&h)?;
        let t = self.time_emb_proj.forward(&candle_nn::ops::silu(temb)?)?;
        let h = h.broadcast_add(&t.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?;
        let h = self.norm2.forward_silu(&h)?;
        let h = self.conv2.forward(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D` with a conv: 3x3, stride 2, `padding` (0 means pad right/bottom by one first, as diffusers).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> candle_core::Result<Self> {
        Ok(Self {
            conv: conv3(channels, channels, 2, padding, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad_right_bottom {
            let xs = xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D` with a conv: nearest-neighbour resize (x2, or to the size of the skip connection it will be
/// concatenated with when the latent is not a multiple of the total downsampling), then a 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> candle_core::Result<Self> {
        Ok(Self {
            conv: conv3(channels, channels, 1, 1, vb.pp("conv"))?,
        })
    }

    /// Resizes `xs` to `size` (`None`: twice its size) and applies the conv.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}
