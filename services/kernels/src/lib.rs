//! `mip-kernels`: own CUDA kernels for the SDXL UNet and VAE hot spots, as candle custom ops.
//!
//! - [`flash_attn`]: fused multi-head attention (online softmax, tensor cores through WMMA, f32 accumulation) for
//!   f16/bf16 with head dim 16, 32 or 64, reading q/k/v through their strides (no head-split copies) and writing
//!   `(B, Lq, H*D)` with the heads already merged;
//! - [`group_norm`]: GroupNorm (+ optional SiLU) in three launches, statistics in f32, for f32/f16/bf16;
//! - [`conv2d`]: 2-D convolution as a coalesced [`im2col`] (Caffe-style `(B, K, H_out*W_out)` column matrix) and
//!   one batched GEMM that yields NCHW directly; 1x1 convolutions as a plain GEMM.
//!
//! The CUDA C sources live in `cuda/` and are compiled to PTX by `build.rs` with nvcc only when the `cuda` feature
//! is on. Without it every `*_supported` answers `false` and the ops return an error, so callers keep their own
//! (CPU) path; with it they are used only for tensors on a CUDA device.
//!
//! `MIP_KERNELS=off` in the environment (read once) turns them off in a CUDA build too, so candle's unfused ops
//! run instead: a diagnostic switch to tell a kernel fault from anything else on a GPU.

use std::sync::OnceLock;

use candle_core::{DType, Result, Tensor};

/// The environment variable that turns the kernels off (`off`, `0` or `false`).
pub const DISABLE_ENV: &str = "MIP_KERNELS";

/// Whether the kernels may be used: a CUDA build, and [`DISABLE_ENV`] not set to `off`/`0`/`false`.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    cfg!(feature = "cuda")
        && *ENABLED.get_or_init(|| {
            std::env::var(DISABLE_ENV).map_or(true, |v| {
                !matches!(v.trim().to_ascii_lowercase().as_str(), "off" | "0" | "false")
            })
        })
}

mod conv;
#[cfg(feature = "cuda")]
mod cuda_ops;
pub mod plan;
#[cfg(feature = "cuda")]
mod ptx;

pub use conv::{conv2d, conv2d_supported, im2col, MAX_COL_BYTES};

/// Head dims [`flash_attn`] has kernels for.
pub const FLASH_HEAD_DIMS: [usize; 3] = [16, 32, 64];

/// Whether [`flash_attn`] takes `q` `(B, H, Lq, D)` and `k` `(B, H, Lk, D)`: the kernels [`enabled`], CUDA
/// tensors, f16 or bf16, and a head dim in [`FLASH_HEAD_DIMS`].
pub fn flash_attn_supported(q: &Tensor, k: &Tensor) -> bool {
    enabled()
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && k.dtype() == q.dtype()
        && q.rank() == 4
        && q.dims().last().is_some_and(|d| FLASH_HEAD_DIMS.contains(d))
}

/// `softmax(q k^T * scale) v` for `q` `(B, H, Lq, D)`, `k`/`v` `(B, H, Lk, D)` (any strides with a contiguous
/// last axis; views of `(B, L, H*D)` projections work without a copy). Returns `(B, Lq, H*D)`.
pub fn flash_attn(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let (kb, kh, lk, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
        candle_core::bail!(
            "flash_attn: q {:?}, k {:?} and v {:?} must be (B, H, L, D) with equal B, H, D and equal k/v shapes",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if lk == 0 || lq == 0 {
        candle_core::bail!("flash_attn: empty sequence (Lq = {lq}, Lk = {lk})");
    }
    if !flash_attn_supported(q, k) {
        candle_core::bail!(
            "flash_attn: needs a CUDA build ({DISABLE_ENV} not off) and CUDA f16/bf16 tensors with head dim in {FLASH_HEAD_DIMS:?}, got {:?} {:?} on {:?}",
            q.dtype(),
            q.dims(),
            q.device().location()
        );
    }
    #[cfg(feature = "cuda")]
    {
        let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
        q.apply_op3_no_bwd(&k, &v, &cuda_ops::FlashAttn { scale })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = scale;
        candle_core::bail!("flash_attn: built without the `cuda` feature")
    }
}

/// `x` itself when its last axis is contiguous and its offset and strides keep every row 16-byte aligned (what the
/// kernel's vector loads need), else a contiguous copy.
#[cfg(feature = "cuda")]
fn aligned(x: &Tensor) -> Result<Tensor> {
    if plan::flash_layout_ok(x.layout()) {
        Ok(x.clone())
    } else {
        x.copy()
    }
}

/// Whether [`group_norm`] takes `x`: the kernels [`enabled`] and a CUDA tensor of rank >= 3 in f32, f16 or bf16.
pub fn group_norm_supported(x: &Tensor) -> bool {
    enabled() && x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) && x.rank() >= 3
}

/// GroupNorm of `x` `(B, C, ...)` over `groups` groups with per-channel `gamma`/`beta` `(C,)`, then SiLU when
/// `silu`. Statistics in f32; the result has `x`'s dtype.
pub fn group_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    if groups == 0 || !c.is_multiple_of(groups) {
        candle_core::bail!("group_norm: {c} channels cannot be split into {groups} groups");
    }
    if gamma.dims() != [c] || beta.dims() != [c] {
        candle_core::bail!(
            "group_norm: gamma {:?} and beta {:?} must be ({c},)",
            gamma.dims(),
            beta.dims()
        );
    }
    if !group_norm_supported(x) {
        candle_core::bail!(
            "group_norm: needs a CUDA build ({DISABLE_ENV} not off) and a CUDA f32/f16/bf16 tensor of rank >= 3, got {:?} {:?} on {:?}",
            x.dtype(),
            x.dims(),
            x.device().location()
        );
    }
    #[cfg(feature = "cuda")]
    {
        let x = x.contiguous()?;
        let gamma = gamma.to_dtype(DType::F32)?.contiguous()?;
        let beta = beta.to_dtype(DType::F32)?.contiguous()?;
        x.apply_op3_no_bwd(&gamma, &beta, &cuda_ops::GroupNorm { groups, eps, silu })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (eps, silu);
        candle_core::bail!("group_norm: built without the `cuda` feature")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_tensors_are_not_supported_and_ops_fail_cleanly() {
        let q = Tensor::zeros((1, 2, 4, 16), DType::F16, &Device::Cpu).expect("q");
        assert!(!flash_attn_supported(&q, &q));
        assert!(flash_attn(&q, &q, &q, 0.25).is_err());
        let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).expect("x");
        let g = Tensor::ones(4, DType::F32, &Device::Cpu).expect("g");
        assert!(!group_norm_supported(&x));
        assert!(group_norm(&x, &g, &g, 2, 1e-5, true).is_err());
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let q = Tensor::zeros((1, 2, 4, 16), DType::F16, &Device::Cpu).expect("q");
        let k = Tensor::zeros((1, 2, 4, 32), DType::F16, &Device::Cpu).expect("k");
        let e = flash_attn(&q, &k, &k, 0.25).expect_err("mismatch").to_string();
        assert!(e.contains("[1, 2, 4, 16]"), "{e}");
        let x = Tensor::zeros((1, 6, 2, 2), DType::F32, &Device::Cpu).expect("x");
        let g = Tensor::ones(6, DType::F32, &Device::Cpu).expect("g");
        let e = group_norm(&x, &g, &g, 4, 1e-5, false).expect_err("groups").to_string();
        assert!(e.contains("6 channels") && e.contains("4 groups"), "{e}");
    }
}
