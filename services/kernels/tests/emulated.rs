//! The CUDA kernels of `cuda/*.cu`, unmodified, run on the CPU under the CUDA emulator in `emu/` (fibers for
//! threads, barriers, WMMA, shuffles; see `emu/emu_sched.h`) with the very launch plans the CUDA ops use
//! (`mip_kernels::plan`), and checked against candle CPU references in f32 (the im2col copy, in `emulated/im2col.rs`,
//! bit for bit against the crate's CPU im2col). Every case runs under several thread
//! scheduling orders, whose results must be bit-identical (a missing barrier makes them differ), and outputs start
//! poisoned with NaN (an element the kernel never writes fails the comparison).
//!
//! Needs a C++20 compiler (`$CXX`, else `c++`).

mod emu;
#[path = "emulated/im2col.rs"]
mod im2col;

use anyhow::{ensure, Result};
use candle_core::{DType, IndexOp, Module, Tensor};
use mip_kernels::plan::{self, Buf};

use emu::{f32_from_bytes, max_rel_err, randn, to_bytes, Job};

/// One attention case: q `(B, Lq, H*D)` and a fused kv projection `(B, Lk, 2, H, D)`, viewed as `(B, H, L, D)`.
struct Flash {
    dtype: DType,
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    scale: f32,
    /// q and v as contiguous `(B, H, L, D)` copies instead of views (strides unlike k's in every axis).
    head_major: bool,
    /// Bound on the largest error relative to max(1, |reference|).
    tol: f32,
}

fn check_flash(c: Flash) -> Result<()> {
    let Flash {
        dtype,
        b,
        h,
        lq,
        lk,
        d,
        scale,
        head_major,
        tol,
    } = c;
    let seed = (b * 1000 + h * 100 + lq + lk * 7 + d) as u64;
    let q_base = randn(seed, (b, lq, h * d))?.to_dtype(dtype)?;
    let kv_base = randn(seed + 1, (b, lk, 2, h, d))?.to_dtype(dtype)?;
    // The worker's head views: projections reshaped and transposed, never copied.
    let mut q = q_base.reshape((b, lq, h, d))?.transpose(1, 2)?;
    let q_base = if head_major {
        q = q.contiguous()?;
        q.clone()
    } else {
        q_base
    };
    let k = kv_base.i((.., .., 0))?.transpose(1, 2)?;
    let mut v = kv_base.i((.., .., 1))?.transpose(1, 2)?;
    if head_major {
        v = v.contiguous()?;
    }
    ensure!(head_major || !q.is_contiguous() || h == 1, "q should be a strided view");
    ensure!(
        head_major || v.layout().start_offset() == h * d,
        "v should start inside the kv storage: {:?}",
        v.layout()
    );

    let p = plan::flash_attn(dtype, q.layout(), k.layout(), v.layout(), scale)?;
    let elem = dtype.size_in_bytes();
    let [qo, ko, vo] = p.in_offsets;
    let mut job = Job::new()?;
    job.input("q", &to_bytes(&q_base)?)?;
    job.input("kv", &to_bytes(&kv_base)?)?;
    job.input("v", &to_bytes(&v)?)?;
    job.poisoned("out", p.out_len * elem);
    job.launch(&p.launch, |buf| match buf {
        Buf::Q => ("q", qo * elem),
        Buf::K => ("kv", ko * elem),
        Buf::V if head_major => ("v", vo * elem),
        Buf::V => ("kv", vo * elem),
        _ => ("out", 0),
    });
    job.output("out");
    let got = f32_from_bytes(&job.run_all_orders("out")?, dtype, p.out_shape)?;

    let f = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let (qf, kf, vf) = (f(&q)?, f(&k)?, f(&v)?);
    let probs = candle_nn::ops::softmax_last_dim(&(qf.matmul(&kf.t()?)? * f64::from(scale))?)?;
    let want = probs.matmul(&vf)?.transpose(1, 2)?.reshape((b, lq, h * d))?;
    let err = max_rel_err(&got, &want)?;
    eprintln!("flash_attn {dtype:?} B{b} H{h} Lq{lq} Lk{lk} D{d}: max error {err:.3e} (bound {tol:.0e})");
    ensure!(
        err < tol,
        "flash_attn {dtype:?} B{b} H{h} Lq{lq} Lk{lk} D{d}: error {err} >= {tol}"
    );
    Ok(())
}

const F16_TOL: f32 = 2e-3;
const BF16_TOL: f32 = 1e-2;

#[test]
fn flash_f16_d64_uneven_lengths() -> Result<()> {
    check_flash(Flash {
        dtype: DType::F16,
        b: 2,
        h: 3,
        lq: 100,
        lk: 77,
        d: 64,
        scale: 0.125,
        head_major: false,
        tol: F16_TOL,
    })
}

#[test]
fn flash_bf16_d64_uneven_lengths() -> Result<()> {
    check_flash(Flash {
        dtype: DType::BF16,
        b: 1,
        h: 2,
        lq: 100,
        lk: 77,
        d: 64,
        scale: 0.125,
        head_major: false,
        tol: BF16_TOL,
    })
}

#[test]
fn flash_f16_d32_sharp_scores_many_key_tiles() -> Result<()> {
    // Large scores: the running maximum changes from tile to tile, so the rescaling by alpha matters.
    check_flash(Flash {
        dtype: DType::F16,
        b: 1,
        h: 2,
        lq: 130,
        lk: 161,
        d: 32,
        scale: 0.6,
        head_major: false,
        tol: F16_TOL,
    })
}

#[test]
fn flash_f16_d64_head_major_q_and_v() -> Result<()> {
    check_flash(Flash {
        dtype: DType::F16,
        b: 2,
        h: 2,
        lq: 64,
        lk: 40,
        d: 64,
        scale: 0.2,
        head_major: true,
        tol: F16_TOL,
    })
}

#[test]
fn flash_bf16_d32_one_key_tile_plus_one() -> Result<()> {
    check_flash(Flash {
        dtype: DType::BF16,
        b: 2,
        h: 2,
        lq: 65,
        lk: 33,
        d: 32,
        scale: 0.25,
        head_major: false,
        tol: BF16_TOL,
    })
}

#[test]
fn flash_f16_d16_single_key() -> Result<()> {
    check_flash(Flash {
        dtype: DType::F16,
        b: 2,
        h: 2,
        lq: 70,
        lk: 1,
        d: 16,
        scale: 0.25,
        head_major: false,
        tol: F16_TOL,
    })
}

#[test]
fn flash_bf16_d16_single_query() -> Result<()> {
    check_flash(Flash {
        dtype: DType::BF16,
        b: 3,
        h: 1,
        lq: 1,
        lk: 77,
        d: 16,
        scale: 0.5,
        head_major: false,
        tol: BF16_TOL,
    })
}

/// One GroupNorm case on `(B, C, spatial...)` values around 2 with spread 3.
struct Norm {
    dtype: DType,
    shape: &'static [usize],
    groups: usize,
    silu: bool,
    tol: f32,
}

fn check_group_norm(c: Norm) -> Result<()> {
    let Norm {
        dtype,
        shape,
        groups,
        silu,
        tol,
    } = c;
    let ch = shape[1];
    let seed = shape.iter().product::<usize>() as u64 + groups as u64;
    let x = ((randn(seed, shape)? * 3.0)? + 2.0)?.to_dtype(dtype)?;
    let gamma = ((randn(seed + 1, ch)? * 0.5)? + 1.0)?;
    let beta = (randn(seed + 2, ch)? * 0.5)?;
    let eps = 1e-5;

    let p = plan::group_norm(dtype, x.layout(), groups, eps, silu)?;
    let mut job = Job::new()?;
    job.input("x", &to_bytes(&x)?)?;
    job.input("gamma", &to_bytes(&gamma)?)?;
    job.input("beta", &to_bytes(&beta)?)?;
    job.poisoned("part", p.part_len * 4);
    job.poisoned("stats", p.stats_len * 4);
    job.poisoned("y", p.len * dtype.size_in_bytes());
    let bind = |buf| match buf {
        Buf::X => ("x", 0),
        Buf::Part => ("part", 0),
        Buf::Stats => ("stats", 0),
        Buf::Gamma => ("gamma", 0),
        Buf::Beta => ("beta", 0),
        _ => ("y", 0),
    };
    for l in [&p.stats, &p.finalize, &p.apply] {
        job.launch(l, bind);
    }
    job.output("y");
    let got = f32_from_bytes(&job.run_all_orders("y")?, dtype, shape)?;

    let norm = candle_nn::GroupNorm::new(gamma, beta, ch, groups, eps)?;
    let mut want = norm.forward(&x.to_dtype(DType::F32)?)?;
    if silu {
        want = candle_nn::ops::silu(&want)?;
    }
    let err = max_rel_err(&got, &want)?;
    eprintln!("group_norm {dtype:?} {shape:?} groups {groups} silu {silu}: max error {err:.3e} (bound {tol:.0e})");
    ensure!(
        err < tol,
        "group_norm {dtype:?} {shape:?} groups {groups} silu {silu}: error {err} >= {tol}"
    );
    Ok(())
}

#[test]
fn group_norm_f32_silu_five_chunks() -> Result<()> {
    // group length 4 * 10000 = 40000 > GN_CHUNK: 5 chunks merged by gn_finalize.
    check_group_norm(Norm {
        dtype: DType::F32,
        shape: &[1, 32, 100, 100],
        groups: 8,
        silu: true,
        tol: 1e-4,
    })
}

#[test]
fn group_norm_f16_two_chunks() -> Result<()> {
    // (2, 64, 48, 48) with 16 groups: group length 9216, 2 chunks.
    check_group_norm(Norm {
        dtype: DType::F16,
        shape: &[2, 64, 48, 48],
        groups: 16,
        silu: false,
        tol: 2e-3,
    })
}

#[test]
fn group_norm_bf16_uneven_last_chunk() -> Result<()> {
    // group length 2 * 10001 = 20002: 3 chunks of 6668, the last 6666; odd plane length.
    check_group_norm(Norm {
        dtype: DType::BF16,
        shape: &[1, 2, 73, 137],
        groups: 1,
        silu: true,
        tol: 1e-2,
    })
}

#[test]
fn group_norm_f32_uneven_chunks_several_groups() -> Result<()> {
    // group length 3 * 3367 = 10101: 2 chunks of 5051 and 5050; the input is a multiple of 16 bytes, so it ends
    // right at the harness's guard page (a chunk reading past its group's end faults in the last group).
    check_group_norm(Norm {
        dtype: DType::F32,
        shape: &[2, 6, 37, 91],
        groups: 2,
        silu: false,
        tol: 1e-4,
    })
}

#[test]
fn group_norm_f32_small_rank3() -> Result<()> {
    // Fewer elements than threads; a rank-3 input.
    check_group_norm(Norm {
        dtype: DType::F32,
        shape: &[2, 8, 7],
        groups: 4,
        silu: false,
        tol: 1e-4,
    })
}

#[test]
fn group_norm_f16_small_silu() -> Result<()> {
    check_group_norm(Norm {
        dtype: DType::F16,
        shape: &[2, 6, 5, 3],
        groups: 3,
        silu: true,
        tol: 2e-3,
    })
}

/// Self-attention as the UNet's `SelfAttention` runs it: q, k and v are head views of one fused projection
/// `(B, L, 3, H, D)` (row stride 3*H*D, k and v at offsets H*D and 2*H*D).
#[test]
fn flash_f16_d64_views_of_one_qkv_projection() -> Result<()> {
    let (dtype, b, h, l, d, scale) = (DType::F16, 2, 3, 90, 64, 0.125f32);
    let qkv = randn(7, (b, l, 3, h, d))?.to_dtype(dtype)?;
    let part = |i: usize| qkv.i((.., .., i))?.transpose(1, 2);
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    ensure!(k.layout().start_offset() == h * d && v.layout().start_offset() == 2 * h * d);
    let p = plan::flash_attn(dtype, q.layout(), k.layout(), v.layout(), scale)?;
    let elem = dtype.size_in_bytes();
    let offsets = p.in_offsets;
    let mut job = Job::new()?;
    job.input("qkv", &to_bytes(&qkv)?)?;
    job.poisoned("out", p.out_len * elem);
    job.launch(&p.launch, |buf| match buf {
        Buf::Q => ("qkv", offsets[0] * elem),
        Buf::K => ("qkv", offsets[1] * elem),
        Buf::V => ("qkv", offsets[2] * elem),
        _ => ("out", 0),
    });
    job.output("out");
    let got = f32_from_bytes(&job.run_all_orders("out")?, dtype, p.out_shape)?;
    let f = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let probs = candle_nn::ops::softmax_last_dim(&(f(&q)?.matmul(&f(&k)?.t()?)? * f64::from(scale))?)?;
    let want = probs.matmul(&f(&v)?)?.transpose(1, 2)?.reshape((b, l, h * d))?;
    let err = max_rel_err(&got, &want)?;
    ensure!(err < F16_TOL, "fused qkv views: error {err} >= {F16_TOL}");
    Ok(())
}
