//! The CUDA side of the custom ops: checks against the layouts, buffer allocation and the kernel launches.
//! Every `unsafe` block is an allocation whose every element the following kernel writes, or a kernel launch whose
//! arguments match the `extern "C"` signature in `cuda/*.cu` and whose buffers hold the extents the kernel reads.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape};

use crate::ptx;

/// Query rows per block of the attention kernel (4 warps x 16 rows), and its block size.
const FLASH_BR: usize = 64;
const FLASH_THREADS: u32 = 128;
/// Threads per block of the GroupNorm kernels, and the target element count of one statistics chunk.
const GN_THREADS: u32 = 256;
const GN_CHUNK: usize = 8192;

fn dtype_suffix(dt: DType) -> Result<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("mip-kernels: dtype {other:?} is not supported (f32, f16, bf16)"),
    }
}

fn to_u32(name: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("mip-kernels: {name} = {v} exceeds u32")))
}

fn to_i32(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("mip-kernels: {name} = {v} exceeds i32")))
}

/// `(b, h, l)` element strides of a `(B, H, L, D)` layout, as the kernel's `long long`s.
fn bhl_strides(l: &Layout) -> [i64; 3] {
    let s = l.stride();
    [s[0] as i64, s[1] as i64, s[2] as i64]
}

/// Fused attention; inputs `(B, H, L, D)` with a contiguous, 16-byte aligned last axis (see `crate::aligned`).
pub struct FlashAttn {
    pub scale: f32,
}

impl FlashAttn {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, h, lq, d) = ql.shape().dims4()?;
        let lk = kl.shape().dims4()?.2;
        let dev = q.device();
        let (module, code) = ptx::FLASH_ATTN;
        let name = format!("flash_attn_{}_d{d}", dtype_suffix(q.dtype())?);
        let func = dev.get_or_load_custom_func(&name, module, code)?;
        let qs = q.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
        let ks = k.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
        let vs = v.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
        let n = b * lq * h * d;
        // SAFETY: the kernel writes each element of the (B, Lq, H*D) output exactly once (every row < Lq of every
        // (b, h) block, all D columns), so no uninitialised value is ever read.
        #[allow(unsafe_code)]
        let out = unsafe { dev.alloc::<T>(n)? };
        let cfg = LaunchConfig {
            grid_dim: (to_u32("query blocks", lq.div_ceil(FLASH_BR))?, to_u32("B*H", b * h)?, 1),
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (heads, lq_i, lk_i) = (to_i32("heads", h)?, to_i32("Lq", lq)?, to_i32("Lk", lk)?);
        let (sq, sk, sv) = (bhl_strides(ql), bhl_strides(kl), bhl_strides(vl));
        let mut builder = func.builder();
        builder.arg(&qs).arg(&ks).arg(&vs).arg(&out);
        builder.arg(&heads).arg(&lq_i).arg(&lk_i).arg(&self.scale);
        for s in [&sq, &sk, &sv] {
            builder.arg(&s[0]).arg(&s[1]).arg(&s[2]);
        }
        // SAFETY: the arguments match `flash_attn_<dt>_d<D>(q, k, v, o, heads, lq, lk, scale, 9 x long long)`;
        // q/k/v views start at their layout offsets and the strides come from the same layouts, so every read
        // (b < B, h < H, row < L, col < D) is inside its buffer; `out` holds B*Lq*H*D elements.
        #[allow(unsafe_code)]
        unsafe { builder.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((b, lq, h * d)),
        ))
    }
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "mip-flash-attn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("mip-flash-attn runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match q.dtype() {
            DType::F16 => self.run::<half::f16>(q, ql, k, kl, v, vl),
            DType::BF16 => self.run::<half::bf16>(q, ql, k, kl, v, vl),
            other => candle_core::bail!("mip-flash-attn: dtype {other:?} is not supported (f16, bf16)"),
        }
    }
}

/// GroupNorm (+ SiLU) of a contiguous `(B, C, ...)` tensor with f32 `gamma`/`beta` `(C,)`.
pub struct GroupNorm {
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl GroupNorm {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        bt: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if !xl.is_contiguous() || !gl.is_contiguous() || !bl.is_contiguous() {
            candle_core::bail!("mip-group-norm: inputs must be contiguous");
        }
        let dims = xl.dims();
        let (b, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let total = b * c * spatial;
        let n_groups = b * self.groups;
        let group_len = c / self.groups * spatial;
        if total == 0 {
            candle_core::bail!("mip-group-norm: empty input {dims:?}");
        }
        let chunks = group_len.div_ceil(GN_CHUNK).clamp(1, 512);
        let chunk_len = group_len.div_ceil(chunks);
        let dev = x.device();
        let (module, code) = ptx::GROUP_NORM;
        let suffix = dtype_suffix(x.dtype())?;
        let stats_fn = dev.get_or_load_custom_func(&format!("gn_stats_{suffix}"), module, code)?;
        let final_fn = dev.get_or_load_custom_func("gn_finalize", module, code)?;
        let apply_fn = dev.get_or_load_custom_func(&format!("gn_apply_{suffix}"), module, code)?;
        let xs = x
            .as_cuda_slice::<T>()?
            .slice(xl.start_offset()..xl.start_offset() + total);
        let gs = g
            .as_cuda_slice::<f32>()?
            .slice(gl.start_offset()..gl.start_offset() + c);
        let bs = bt
            .as_cuda_slice::<f32>()?
            .slice(bl.start_offset()..bl.start_offset() + c);
        // SAFETY: gn_stats writes all (groups, chunks, 3) partials (empty chunks as zeros), gn_finalize all
        // (groups, 2) statistics, and gn_apply every output element (each of the B*C planes, all `spatial` of it).
        #[allow(unsafe_code)]
        let (part, stats, out) = unsafe {
            (
                dev.alloc::<f32>(n_groups * chunks * 3)?,
                dev.alloc::<f32>(n_groups * 2)?,
                dev.alloc::<T>(total)?,
            )
        };
        let (group_len_i, chunk_len_i) = (group_len as i64, to_i32("chunk length", chunk_len)?);
        let mut builder = stats_fn.builder();
        builder.arg(&xs).arg(&part).arg(&group_len_i).arg(&chunk_len_i);
        let cfg = LaunchConfig {
            grid_dim: (to_u32("chunks", chunks)?, to_u32("B*groups", n_groups)?, 1),
            block_dim: (GN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `gn_stats_<dt>(x, part, long long group_len, int chunk_len)`; block (chunk, group) reads
        // x[group*group_len + chunk*chunk_len ..] up to group_len (inside `total`) and writes its 3 partials.
        #[allow(unsafe_code)]
        unsafe { builder.launch(cfg) }.w()?;

        let (groups_i, chunks_i, eps) = (
            to_i32("B*groups", n_groups)?,
            to_i32("chunks", chunks)?,
            self.eps as f32,
        );
        let mut builder = final_fn.builder();
        builder.arg(&part).arg(&stats).arg(&groups_i).arg(&chunks_i).arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (to_u32("groups", n_groups.div_ceil(128))?, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `gn_finalize(part, stats, int groups, int chunks, float eps)`; thread g < groups reads
        // its chunks*3 partials and writes stats[2g..2g+2].
        #[allow(unsafe_code)]
        unsafe { builder.launch(cfg) }.w()?;

        let (spatial_i, c_i, silu) = (spatial as i64, to_i32("channels", c)?, i32::from(self.silu));
        let cpg = to_i32("channels per group", c / self.groups)?;
        let mut builder = apply_fn.builder();
        builder.arg(&xs).arg(&stats).arg(&gs).arg(&bs).arg(&out);
        builder.arg(&spatial_i).arg(&c_i).arg(&cpg).arg(&silu);
        let per_plane = spatial.div_ceil(GN_THREADS as usize * 4).max(1);
        let cfg = LaunchConfig {
            grid_dim: (to_u32("blocks per plane", per_plane)?, to_u32("B*C planes", b * c)?, 1),
            block_dim: (GN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        if b * c > 65_535 {
            candle_core::bail!("mip-group-norm: B*C = {} planes exceed the grid limit 65535", b * c);
        }
        // SAFETY: matches `gn_apply_<dt>(x, stats, gamma, beta, y, long long spatial, int channels, int
        // channels_per_group, int silu)`; block (x, plane) touches x/y[plane*spatial .. (plane+1)*spatial] (inside
        // `total` = B*C*spatial), stats[2*group ..] with group < B*groups, and gamma/beta[c] with c < C.
        #[allow(unsafe_code)]
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), xl.shape().clone()))
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "mip-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("mip-group-norm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F32 => self.run::<f32>(x, xl, g, gl, b, bl),
            DType::F16 => self.run::<half::f16>(x, xl, g, gl, b, bl),
            DType::BF16 => self.run::<half::bf16>(x, xl, g, gl, b, bl),
            other => candle_core::bail!("mip-group-norm: dtype {other:?} is not supported (f32, f16, bf16)"),
        }
    }
}
