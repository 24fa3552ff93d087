//! GroupNorm with an optional fused SiLU. On CPU (and any build without the `cuda` feature) it is candle-nn's
//! `GroupNorm` followed by `silu`, exactly as before; with the `cuda` feature and a tensor on a CUDA device it is
//! the fused `mip_kernels::group_norm` (three launches, statistics in f32) instead of ~10 separate kernels.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

/// `GroupNorm(groups, channels, eps)` with affine weights `weight`/`bias` (`(C,)`).
#[derive(Debug, Clone)]
pub struct GroupNormAct {
    inner: candle_nn::GroupNorm,
    /// The affine weights in f32 for the fused kernel (cast once at load).
    #[cfg(feature = "cuda")]
    weight_f32: Tensor,
    #[cfg(feature = "cuda")]
    bias_f32: Tensor,
    #[cfg(feature = "cuda")]
    groups: usize,
    #[cfg(feature = "cuda")]
    eps: f64,
}

/// Loads `weight` and `bias` of a GroupNorm under `vb`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<GroupNormAct> {
    // The same init hints as candle-nn's `group_norm` (ones / zeros) for backends that create weights.
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Ok(GroupNormAct {
        #[cfg(feature = "cuda")]
        weight_f32: weight.to_dtype(candle_core::DType::F32)?,
        #[cfg(feature = "cuda")]
        bias_f32: bias.to_dtype(candle_core::DType::F32)?,
        #[cfg(feature = "cuda")]
        groups,
        #[cfg(feature = "cuda")]
        eps,
        inner: candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?,
    })
}

impl GroupNormAct {
    /// GroupNorm, then SiLU when `silu`.
    pub fn forward_act(&self, xs: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if mip_kernels::group_norm_supported(xs) {
            return mip_kernels::group_norm(xs, &self.weight_f32, &self.bias_f32, self.groups, self.eps, silu);
        }
        let h = self.inner.forward(xs)?;
        if silu {
            candle_nn::ops::silu(&h)
        } else {
            Ok(h)
        }
    }

    /// GroupNorm followed by SiLU.
    pub fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(xs, true)
    }
}

impl Module for GroupNormAct {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(xs, false)
    }
}
