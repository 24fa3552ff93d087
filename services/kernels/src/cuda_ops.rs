//! The CUDA side of the custom ops: checks against the layouts, buffer allocation and the kernel launches.
//! Every `unsafe` block is an allocation whose every element the following kernel writes, or a kernel launch whose
//! arguments match the `extern "C"` signature in `cuda/*.cu` and whose buffers hold the extents the kernel reads.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape};

use crate::plan::{self, Arg, Buf, Launch};
use crate::ptx;

fn config(l: &Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: 0,
    }
}

/// Pushes the arguments of a plan's launch in order onto `$builder`, each buffer as the given expression.
macro_rules! push_args {
    ($builder:ident, $launch:expr, { $($buf:ident => $val:expr),* $(,)? }) => {
        for arg in &$launch.args {
            match arg {
                $(Arg::Buf(Buf::$buf) => $builder.arg($val),)*
                Arg::Buf(other) => candle_core::bail!("mip-kernels: {} has no buffer {other:?}", $launch.kernel),
                Arg::I32(x) => $builder.arg(x),
                Arg::I64(x) => $builder.arg(x),
                Arg::F32(x) => $builder.arg(x),
            };
        }
    };
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
        let plan = plan::flash_attn(q.dtype(), ql, kl, vl, self.scale)?;
        let dev = q.device();
        let (module, code) = ptx::FLASH_ATTN;
        let func = dev.get_or_load_custom_func(&plan.launch.kernel, module, code)?;
        let [q_off, k_off, v_off] = plan.in_offsets;
        let qs = q.as_cuda_slice::<T>()?.slice(q_off..);
        let ks = k.as_cuda_slice::<T>()?.slice(k_off..);
        let vs = v.as_cuda_slice::<T>()?.slice(v_off..);
        // SAFETY: the kernel writes each element of the (B, Lq, H*D) output exactly once (every row < Lq of every
        // (b, h) block, all D columns), so no uninitialised value is ever read.
        #[allow(unsafe_code)]
        let out = unsafe { dev.alloc::<T>(plan.out_len)? };
        let mut builder = func.builder();
        push_args!(builder, plan.launch, { Q => &qs, K => &ks, V => &vs, Out => &out });
        // SAFETY: the plan's arguments match `flash_attn_<dt>_d<D>(q, k, v, o, heads, lq, lk, scale, 9 x long
        // long)`; q/k/v views start at their layout offsets and the strides come from the same layouts, so every
        // read (b < B, h < H, row < L, col < D) is inside its buffer; `out` holds B*Lq*H*D elements.
        #[allow(unsafe_code)]
        unsafe { builder.launch(config(&plan.launch)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(plan.out_shape),
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
        let plan = plan::group_norm(x.dtype(), xl, self.groups, self.eps, self.silu)?;
        let (total, c) = (plan.len, plan.channels);
        let dev = x.device();
        let (module, code) = ptx::GROUP_NORM;
        let stats_fn = dev.get_or_load_custom_func(&plan.stats.kernel, module, code)?;
        let final_fn = dev.get_or_load_custom_func(&plan.finalize.kernel, module, code)?;
        let apply_fn = dev.get_or_load_custom_func(&plan.apply.kernel, module, code)?;
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
                dev.alloc::<f32>(plan.part_len)?,
                dev.alloc::<f32>(plan.stats_len)?,
                dev.alloc::<T>(total)?,
            )
        };
        for (func, launch) in [
            (&stats_fn, &plan.stats),
            (&final_fn, &plan.finalize),
            (&apply_fn, &plan.apply),
        ] {
            let mut builder = func.builder();
            push_args!(builder, launch, {
                X => &xs, Part => &part, Stats => &stats, Gamma => &gs, Beta => &bs, Y => &out,
            });
            // SAFETY: the plan's arguments match `gn_stats_<dt>(x, part, long long group_len, int chunk_len)`,
            // `gn_finalize(part, stats, int groups, int chunks, float eps)` and `gn_apply_<dt>(x, stats, gamma,
            // beta, y, long long spatial, int channels, int channels_per_group, int silu)`. Block (chunk, group)
            // of gn_stats reads x[group*group_len + chunk*chunk_len ..] up to group_len (inside `total`) and writes
            // its 3 partials; thread g < groups of gn_finalize reads its chunks*3 partials and writes
            // stats[2g..2g+2]; block (x, plane) of gn_apply touches x/y[plane*spatial .. (plane+1)*spatial]
            // (inside `total` = B*C*spatial), stats[2*group ..] with group < B*groups, gamma/beta[c] with c < C.
            #[allow(unsafe_code)]
            unsafe { builder.launch(config(launch)) }.w()?;
        }
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

/// The im2col of a contiguous `(B, C, H, W)` input (any start offset): `(B, C*kh*kw, rows*W_out)`.
pub fn im2col(spec: &plan::Im2Col, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
    match x.dtype() {
        DType::F32 => im2col_run::<f32>(spec, x, xl),
        DType::F16 => im2col_run::<half::f16>(spec, x, xl),
        DType::BF16 => im2col_run::<half::bf16>(spec, x, xl),
        other => candle_core::bail!("mip-im2col: dtype {other:?} is not supported (f32, f16, bf16)"),
    }
}

fn im2col_run<T: CudaDType + DeviceRepr>(
    spec: &plan::Im2Col,
    x: &CudaStorage,
    xl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let plan = plan::im2col(x.dtype(), xl, spec)?;
    let dev = x.device();
    let (module, code) = ptx::IM2COL;
    let func = dev.get_or_load_custom_func(&plan.launch.kernel, module, code)?;
    let xs = x
        .as_cuda_slice::<T>()?
        .slice(plan.in_offset..plan.in_offset + plan.in_len);
    // SAFETY: the grid covers every (position < rows*W_out, channel < C, image < B), and each such thread writes
    // all kh*kw column-matrix entries of its position and channel, so every element is written before it is read.
    #[allow(unsafe_code)]
    let col = unsafe { dev.alloc::<T>(plan.out_len)? };
    let mut builder = func.builder();
    push_args!(builder, plan.launch, { X => &xs, Col => &col });
    // SAFETY: the plan's arguments match `im2col_<dt>(x, col, int h, int w, int kh, int kw, int stride, int pad,
    // int w_out, int row0, int positions)`; reads are x[(b*C + c)*H*W + iy*W + ix] with iy < H, ix < W checked
    // in the kernel (inside the B*C*H*W elements of `xs`), writes col[((b*C + c)*kh*kw + tap)*positions + p] with
    // p < positions (inside the B*K*positions elements of `col`).
    #[allow(unsafe_code)]
    unsafe { builder.launch(config(&plan.launch)) }.w()?;
    let (b, k, p) = plan.out_shape;
    Ok((CudaStorage::wrap_cuda_slice(col, dev.clone()), Shape::from((b, k, p))))
}
