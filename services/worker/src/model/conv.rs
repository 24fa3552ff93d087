//! 2-D convolution with bias for the UNet and VAE. On CPU (and any build without the `cuda` feature) it is
//! candle's `conv2d` plus a broadcast bias, exactly as candle-nn's `Conv2d`; on CUDA it is `mip_kernels::conv2d`
//! (a coalesced im2col and one batched GEMM writing NCHW directly, 1x1 convolutions as a plain GEMM) instead of
//! candle's im2col, GEMM and transposing copy.
//!
//! candle's im2col unfolds the whole input (9 values per input value for a 3x3 kernel): 9.4 GB for the SDXL VAE's
//! 256-channel convolutions at 1024x1024 in f32. A stride-1 convolution whose unfolded input would exceed
//! [`MAX_UNFOLD_BYTES`] therefore runs on horizontal strips of the input that overlap by the kernel's reach, each
//! padded as the whole would be: every output value is the same sum over the same inputs, so the result is the
//! whole convolution's, with at most one strip unfolded at a time.

use candle_core::{Module, Result, Tensor};

/// Largest unfolded input one candle convolution call may build; larger stride-1 convolutions run in strips.
pub const MAX_UNFOLD_BYTES: usize = 256 << 20;
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

    /// The convolution without bias, in horizontal strips when the unfolded input would exceed `max_unfold` bytes
    /// (stride 1 and kernels larger than 1x1 only; see the module docs).
    fn conv_in_strips(&self, xs: &Tensor, max_unfold: usize) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let k = self.weight.dim(2)?;
        let p = self.padding;
        let row_bytes = b * (w + 2 * p) * c * k * k * xs.dtype().size_in_bytes();
        if self.stride != 1 || k == 1 || row_bytes * h <= max_unfold || h + 2 * p < k {
            return xs.conv2d(&self.weight, p, self.stride, 1, 1);
        }
        let out_h = h + 2 * p - k + 1;
        let rows = (max_unfold / row_bytes).max(1);
        let mut strips = Vec::with_capacity(out_h.div_ceil(rows));
        for r0 in (0..out_h).step_by(rows) {
            let r1 = (r0 + rows).min(out_h);
            // Output rows r0..r1 read padded rows r0..r1+k-1, i.e. input rows r0-p..r1+k-1-p.
            let (lo, hi) = (r0 as isize - p as isize, (r1 + k - 1) as isize - p as isize);
            let (from, to) = (lo.max(0) as usize, (hi.min(h as isize)) as usize);
            let strip = xs
                .narrow(2, from, to - from)?
                .pad_with_zeros(2, (-lo).max(0) as usize, (hi - h as isize).max(0) as usize)?
                .pad_with_zeros(3, p, p)?;
            strips.push(strip.conv2d(&self.weight, 0, 1, 1, 1)?);
        }
        Tensor::cat(&strips, 2)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if mip_kernels::conv2d_supported(xs, &self.weight) {
            return mip_kernels::conv2d(xs, &self.weight, self.bias.as_ref(), self.stride, self.padding);
        }
        let out = self.conv_in_strips(xs, MAX_UNFOLD_BYTES)?;
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
    fn strips_are_the_whole_convolution() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 11, 6), &dev).expect("x");
        for (k, padding) in [(3, 1), (3, 0), (5, 2)] {
            let w = Tensor::randn(0f32, 0.3, (4, 3, k, k), &dev).expect("w");
            let conv = Conv2d::new(w, None, 1, padding);
            let whole = conv.conv_in_strips(&x, usize::MAX).expect("whole");
            // One row per strip up to a few rows per strip.
            for max_unfold in [1, 2 * 8 * 3 * k * k * 4 * 2, 2 * 8 * 3 * k * k * 4 * 5] {
                let strips = conv.conv_in_strips(&x, max_unfold).expect("strips");
                assert_eq!(strips.dims(), whole.dims());
                let max = (&strips - &whole)
                    .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                    .expect("diff");
                assert!(max <= 1e-5, "k {k} padding {padding} budget {max_unfold}: {max}");
            }
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
