//! 2-D convolution as im2col + one batched GEMM, producing NCHW directly (no transposing copy):
//!
//! - 1x1 kernels with stride 1 and no padding need no im2col: `w (C_out, C_in) @ x (B, C_in, H*W)`;
//! - otherwise `col = im2col(x)` `(B, K, H_out*W_out)` with `K = C_in*kh*kw` ordered `(c, ky, kx)`, then
//!   `w (C_out, K) @ col` gives `(B, C_out, H_out*W_out)`. The column matrix is bounded by [`MAX_COL_BYTES`]:
//!   larger convolutions run a few images, or a band of output rows of one image, at a time and concatenate.
//!
//! [`im2col`] runs on the CPU in plain Rust (the reference of the CUDA kernel, and what lets the tests compare
//! the whole composition against candle's `conv2d` on the CPU) and on CUDA with `cuda/im2col.cu`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};

use crate::plan::{self, Im2Col};
use crate::{enabled, DISABLE_ENV};

/// Largest column matrix materialised at once (1 GiB).
pub const MAX_COL_BYTES: usize = 1 << 30;

/// The im2col of a contiguous `(B, C, H, W)` tensor as a candle op: `(B, C*kh*kw, rows*W_out)`.
struct Im2ColOp(Im2Col);

impl CustomOp1 for Im2ColOp {
    fn name(&self) -> &'static str {
        "mip-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = plan::im2col(storage.dtype(), layout, &self.0)?;
        let (_, _, h, w) = layout.shape().dims4()?;
        let w_out = p.out_shape.2 / self.0.rows;
        let src = p.in_offset..p.in_offset + p.in_len;
        let g = CpuGeom {
            hw: (h, w),
            w_out,
            planes_len: p.out_len,
            spec: self.0,
        };
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(im2col_cpu(input(v, src)?, &g)),
            CpuStorage::F16(v) => CpuStorage::F16(im2col_cpu(input(v, src)?, &g)),
            CpuStorage::BF16(v) => CpuStorage::BF16(im2col_cpu(input(v, src)?, &g)),
            other => candle_core::bail!(
                "mip-im2col: dtype {:?} is not supported (f32, f16, bf16)",
                other.dtype()
            ),
        };
        Ok((out, Shape::from(p.out_shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda_ops::im2col(&self.0, storage, layout)
    }
}

/// The input elements `src` of a storage of `v.len()` elements.
fn input<T>(v: &[T], src: std::ops::Range<usize>) -> Result<&[T]> {
    let len = v.len();
    v.get(src.clone())
        .ok_or_else(|| candle_core::Error::Msg(format!("mip-im2col: input {src:?} outside a storage of {len}")))
}

/// What the CPU im2col needs besides the input.
struct CpuGeom {
    hw: (usize, usize),
    w_out: usize,
    /// Elements of the whole output.
    planes_len: usize,
    spec: Im2Col,
}

/// The CPU im2col: for each `(b, c)` plane, its `kh*kw` rows of the column matrix, zeros where the kernel window
/// leaves the input.
fn im2col_cpu<T: WithDType>(x: &[T], g: &CpuGeom) -> Vec<T> {
    let (h, w) = g.hw;
    let Im2Col {
        kh,
        kw,
        stride,
        padding,
        row_start,
        rows,
    } = g.spec;
    let positions = rows * g.w_out;
    let mut out = vec![T::zero(); g.planes_len];
    for (src, dst) in x.chunks_exact(h * w).zip(out.chunks_exact_mut(kh * kw * positions)) {
        for (tap, dst) in dst.chunks_exact_mut(positions).enumerate() {
            let (ky, kx) = (tap / kw, tap % kw);
            for (r, dst) in dst.chunks_exact_mut(g.w_out).enumerate() {
                let Some(iy) = ((row_start + r) * stride + ky)
                    .checked_sub(padding)
                    .filter(|&iy| iy < h)
                else {
                    continue;
                };
                for (ox, d) in dst.iter_mut().enumerate() {
                    if let Some(ix) = (ox * stride + kx).checked_sub(padding).filter(|&ix| ix < w) {
                        *d = src[iy * w + ix];
                    }
                }
            }
        }
    }
    out
}

/// The column matrix `(B, C*kh*kw, H_out*W_out)` of `x` `(B, C, H, W)` for a `kh x kw` kernel with `stride` and
/// `padding` zeros on every side (dilation 1), `K` ordered `(c, ky, kx)`. f32/f16/bf16, on the CPU or (CUDA build)
/// on CUDA.
pub fn im2col(x: &Tensor, kh: usize, kw: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (h_out, _) = plan::conv_out_size(h, w, kh, kw, stride, padding)?;
    im2col_rows(x, kh, kw, stride, padding, 0, h_out)
}

fn im2col_rows(
    x: &Tensor,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    row_start: usize,
    rows: usize,
) -> Result<Tensor> {
    let spec = Im2Col {
        kh,
        kw,
        stride,
        padding,
        row_start,
        rows,
    };
    x.contiguous()?.apply_op1_no_bwd(&Im2ColOp(spec))
}

/// Whether [`conv2d`] takes `x` `(B, C_in, H, W)` and `w` `(C_out, C_in, kh, kw)`: the kernels [`enabled`], CUDA
/// tensors of one dtype (f32, f16 or bf16), no groups, and sizes within the kernel's 32-bit index math.
pub fn conv2d_supported(x: &Tensor, w: &Tensor) -> bool {
    enabled()
        && x.device().is_cuda()
        && x.device().same_device(w.device())
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && w.dtype() == x.dtype()
        && x.rank() == 4
        && w.rank() == 4
        && x.dims()[1] == w.dims()[1]
        && x.dims()[1] <= plan::GRID_Y_MAX
        && x.dims()[2] * x.dims()[3] <= i32::MAX as usize
}

/// `conv2d(x, w) + bias` for `x` `(B, C_in, H, W)`, `w` `(C_out, C_in, kh, kw)` and `bias` `(C_out,)`, with
/// `stride` and `padding` zeros on every side (dilation 1, no groups): `(B, C_out, H_out, W_out)`, on CUDA (see
/// [`conv2d_supported`]).
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    if !conv2d_supported(x, w) {
        candle_core::bail!(
            "conv2d: needs a CUDA build ({DISABLE_ENV} not off) and CUDA f32/f16/bf16 tensors (B, C, H, W) and (C_out, C, kh, kw) of one dtype, got {:?} {:?} and {:?} {:?} on {:?}",
            x.dtype(),
            x.dims(),
            w.dtype(),
            w.dims(),
            x.device().location()
        );
    }
    conv2d_im2col(x, w, bias, stride, padding, MAX_COL_BYTES)
}

/// [`conv2d`] on any device, with column matrices of at most `max_col_bytes` (at least one output row of one
/// image).
pub(crate) fn conv2d_im2col(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    max_col_bytes: usize,
) -> Result<Tensor> {
    let (b, c_in, h, wd) = x.dims4()?;
    let (c_out, w_c, kh, kw) = w.dims4()?;
    if w_c != c_in || w.dtype() != x.dtype() {
        candle_core::bail!(
            "conv2d: weight {:?} {:?} does not fit input {:?} {:?} (C_in {c_in}, one dtype, no groups)",
            w.dims(),
            w.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    let (h_out, w_out) = plan::conv_out_size(h, wd, kh, kw, stride, padding)?;
    let out = if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        let x = x.reshape((b, c_in, h * wd))?;
        w.reshape((c_out, c_in))?
            .broadcast_left(b)?
            .matmul(&x)?
            .reshape((b, c_out, h, wd))?
    } else {
        let conv = Banded {
            w: w.reshape((c_out, c_in * kh * kw))?,
            kh,
            kw,
            stride,
            padding,
            out_hw: (h_out, w_out),
        };
        conv.run(&x.contiguous()?, max_col_bytes)?
    };
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, c_out, 1, 1))?),
        None => Ok(out),
    }
}

/// The im2col path: the weight as `(C_out, K)` and the geometry.
struct Banded {
    w: Tensor,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    out_hw: (usize, usize),
}

impl Banded {
    /// Groups of whole images while they fit `max_col_bytes`, else bands of output rows of one image.
    fn run(&self, x: &Tensor, max_col_bytes: usize) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (h_out, w_out) = self.out_hw;
        let row_bytes = self.w.dim(1)? * w_out * x.dtype().size_in_bytes();
        let image_bytes = row_bytes * h_out;
        // (No `clamp` with a bound that may fall below 1: no panic on degenerate sizes; the plan rejects those.)
        let images = (max_col_bytes / image_bytes.max(1)).min(b).clamp(1, plan::GRID_Y_MAX);
        let rows = if image_bytes <= max_col_bytes {
            h_out
        } else {
            (max_col_bytes / row_bytes.max(1)).min(i32::MAX as usize / w_out).max(1)
        };
        let mut groups = Vec::with_capacity(b.div_ceil(images));
        for b0 in (0..b).step_by(images) {
            let xs = x.narrow(0, b0, images.min(b - b0))?;
            let mut bands = Vec::with_capacity(h_out.div_ceil(rows));
            for r0 in (0..h_out).step_by(rows) {
                bands.push(self.band(&xs, r0, rows.min(h_out - r0))?);
            }
            groups.push(cat_or_single(bands, 2)?);
        }
        cat_or_single(groups, 0)
    }

    /// Output rows `r0 .. r0 + rows` of the images `x`: `(n, C_out, rows, W_out)`.
    fn band(&self, x: &Tensor, r0: usize, rows: usize) -> Result<Tensor> {
        let n = x.dim(0)?;
        let col = im2col_rows(x, self.kh, self.kw, self.stride, self.padding, r0, rows)?;
        let out = self.w.broadcast_left(n)?.matmul(&col)?;
        out.reshape((n, self.w.dim(0)?, rows, self.out_hw.1))
    }
}

fn cat_or_single(mut parts: Vec<Tensor>, dim: usize) -> Result<Tensor> {
    if parts.len() == 1 {
        if let Some(t) = parts.pop() {
            return Ok(t);
        }
    }
    Tensor::cat(&parts, dim)
}

#[cfg(test)]
mod tests;
