//! 2-D convolution with bias for the UNet and VAE. On CPU (and any build without the `cuda` feature) it is
//! candle's `conv2d` plus a broadcast bias, exactly as candle-nn's `Conv2d`; on CUDA it is `mip_kernels::conv2d`
//! (a coalesced im2col and one batched GEMM writing NCHW directly, 1x1 convolutions as a plain GEMM) instead of
//! candle's im2col, GEMM and transposing copy.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A `k x k` convolution with `stride` and `padding` zeros on every side (dilation 1, no groups) and a bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `(C_out, C_in, k, k)`.
    weight: Tensor,
    /// `(C_out,)`.
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

/// Loads `weight` `(c_out, c_in, k, k)` and `bias` `(c_out,)` under `vb`, with candle-nn's init hints.
pub fn conv2d(c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv2d> {
    let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let bound = 1. / (c_in as f64).sqrt();
    let bias = vb.get_with_hints(c_out, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?;
    Ok(Conv2d::new(weight, Some(bias), stride, padding))
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if mip_kernels::conv2d_supported(xs, &self.weight) {
            return mip_kernels::conv2d(xs, &self.weight, self.bias.as_ref(), self.stride, self.padding);
        }
        let out = xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(bias) => out.broadcast_add(&bias.reshape((1, bias.dims1()?, 1, 1))?),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn cpu_forward_is_candle_nn_conv2d_bit_for_bit() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 9, 7), &dev).expect("x");
        let w = Tensor::randn(0f32, 0.3, (5, 4, 3, 3), &dev).expect("w");
        let b = Tensor::randn(0f32, 1.0, 5, &dev).expect("b");
        for (stride, padding) in [(1, 1), (2, 1), (2, 0)] {
            let ours = Conv2d::new(w.clone(), Some(b.clone()), stride, padding);
            let cfg = candle_nn::Conv2dConfig {
                stride,
                padding,
                ..Default::default()
            };
            let theirs = candle_nn::Conv2d::new(w.clone(), Some(b.clone()), cfg);
            let diff = (ours.forward(&x).expect("ours") - theirs.forward(&x).expect("theirs")).expect("diff");
            let max = diff.abs().and_then(|d| d.max_all()).and_then(|m| m.to_scalar::<f32>());
            assert_eq!(max.expect("max"), 0.0, "stride {stride} padding {padding}");
        }
    }

    #[test]
    fn loads_weight_and_bias_like_candle_nn() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let c = conv2d(3, 8, 3, 2, 1, vb.pp("conv")).expect("conv");
        assert_eq!(c.weight().dims(), [8, 3, 3, 3]);
        assert_eq!(c.bias.as_ref().map(|b| b.dims().to_vec()), Some(vec![8]));
        let y = c
            .forward(&Tensor::ones((1, 3, 8, 8), DType::F32, &Device::Cpu).expect("x"))
            .expect("y");
        assert_eq!(y.dims(), [1, 8, 4, 4]);
    }
}
