//! Op-level measurements for `mip bench --sdxl`: the fused kernels of `mip-kernels` against candle's unfused ops
//! (max errors and times), and an op profile in SDXL shapes (3x3 / 1x1 convolutions of the UNet and VAE, the
//! linear layers, layer norm, an elementwise add, nearest upsampling, a permuting copy) with the achieved TFLOP/s
//! or GB/s of each: where a whole-model time comes from, in one GPU run.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use mip_worker::model::conv::Conv2d;
use mip_worker::pipeline::precision::{vae_dtype, vae_uses_tf32, Tf32Scope};
use serde_json::{json, Value};

/// Median milliseconds of `iters` synchronised runs after one warm-up.
pub fn median_ms(device: &Device, iters: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        let out = f()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?;
    Ok(d.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// The fused attention (self-attention 4096x4096, cross-attention 4096x77, an odd 100x77, head dim 64, 10 heads,
/// batch 2) and GroupNorm+SiLU (2x640x64x64, 32 groups) against candle's unfused ops: max abs errors (the
/// reference computed in f32 from the same half inputs) and median ms of each; and `mip_kernels::conv2d` against
/// candle's `conv2d` in three UNet/VAE shapes.
pub fn kernel_check(dev: &Device, dt: DType, iters: usize) -> Result<Value> {
    let mut res = serde_json::Map::new();
    // One failing check must not hide the others.
    let mut record = |name: &str, r: Result<Option<Value>>| match r {
        Ok(Some(entry)) => {
            res.insert(name.into(), entry);
        }
        Ok(None) => {
            res.insert(name.into(), json!("unsupported dtype/device"));
        }
        Err(e) => {
            res.insert(name.into(), json!(format!("error: {e:#}")));
        }
    };
    for (name, lq, lk) in [
        ("self_4096", 4096, 4096),
        ("cross_4096x77", 4096, 77),
        ("odd_100x77", 100, 77),
    ] {
        record(name, flash_check(dev, dt, iters, lq, lk));
    }
    record("group_norm_silu_2x640x64x64", group_norm_check(dev, dt, iters));
    for (name, shape, c_out, k) in [
        ("conv3x3_2x320x128x128", [2, 320, 128, 128], 320, 3),
        ("conv3x3_1x128x1024x1024", [1, 128, 1024, 1024], 128, 3),
        ("conv1x1_2x960x64x64_to_640", [2, 960, 64, 64], 640, 1),
    ] {
        record(name, conv_check(dev, dt, iters, shape, c_out, k));
    }
    Ok(Value::Object(res))
}

/// The fused attention of q `(2, 10, lq, 64)` over k/v `(2, 10, lk, 64)` against candle's unfused ops (errors
/// against an f32 reference from the same inputs) and the median ms of each; `None` where it does not apply.
fn flash_check(dev: &Device, dt: DType, iters: usize, lq: usize, lk: usize) -> Result<Option<Value>> {
    let q = rand(&[2, 10, lq, 64], dt, dev)?;
    let k = rand(&[2, 10, lk, 64], dt, dev)?;
    let v = rand(&[2, 10, lk, 64], dt, dev)?;
    if !mip_kernels::flash_attn_supported(&q, &k) {
        return Ok(None);
    }
    let unfused = || -> Result<Tensor> {
        let s = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * 0.125)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?.to_dtype(dt)?;
        Ok(p.matmul(&v)?.transpose(1, 2)?.reshape((2, lq, 640))?)
    };
    let f32_ref = {
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * 0.125)?)?;
        p.matmul(&v)?.transpose(1, 2)?.reshape((2, lq, 640))?
    };
    let fused = mip_kernels::flash_attn(&q, &k, &v, 0.125)?;
    Ok(Some(json!({"max_abs_err_fused": max_abs_diff(&fused, &f32_ref)?,
                   "max_abs_err_unfused": max_abs_diff(&unfused()?, &f32_ref)?,
                   "fused_ms": median_ms(dev, iters, || Ok(mip_kernels::flash_attn(&q, &k, &v, 0.125)?))?,
                   "unfused_ms": median_ms(dev, iters, unfused)?})))
}

/// GroupNorm+SiLU (2x640x64x64, 32 groups), fused against candle's ops; `None` where it does not apply.
fn group_norm_check(dev: &Device, dt: DType, iters: usize) -> Result<Option<Value>> {
    let x = rand(&[2, 640, 64, 64], dt, dev)?;
    let gamma = Tensor::randn(1f32, 0.1, 640, dev)?;
    let beta = Tensor::randn(0f32, 0.1, 640, dev)?;
    let gn = candle_nn::GroupNorm::new(gamma.to_dtype(dt)?, beta.to_dtype(dt)?, 640, 32, 1e-5)?;
    let unfused = || -> Result<Tensor> { Ok(candle_nn::ops::silu(&candle_core::Module::forward(&gn, &x)?)?) };
    if !mip_kernels::group_norm_supported(&x) {
        return Ok(None);
    }
    let fused = || -> Result<Tensor> { Ok(mip_kernels::group_norm(&x, &gamma, &beta, 32, 1e-5, true)?) };
    Ok(Some(json!({"max_abs_diff": max_abs_diff(&fused()?, &unfused()?)?,
                   "fused_ms": median_ms(dev, iters, fused)?, "unfused_ms": median_ms(dev, iters, unfused)?})))
}

/// `mip_kernels::conv2d` (im2col + GEMM into NCHW) against candle's `conv2d`, both with a bias: max abs diff and
/// median ms of each; `None` where the kernels do not take the tensors.
fn conv_check(
    dev: &Device,
    dt: DType,
    iters: usize,
    shape: [usize; 4],
    c_out: usize,
    k: usize,
) -> Result<Option<Value>> {
    let x = rand(&shape, dt, dev)?;
    let w = (rand(&[c_out, shape[1], k, k], dt, dev)? * 0.05)?;
    let bias = rand(&[c_out], dt, dev)?;
    if !mip_kernels::conv2d_supported(&x, &w) {
        return Ok(None);
    }
    let pad = k / 2;
    let ours = || -> Result<Tensor> { Ok(mip_kernels::conv2d(&x, &w, Some(&bias), 1, pad)?) };
    let candle = || -> Result<Tensor> {
        Ok(x.conv2d(&w, pad, 1, 1, 1)?
            .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?)
    };
    Ok(Some(json!({"max_abs_diff": max_abs_diff(&ours()?, &candle()?)?,
                   "mip_ms": median_ms(dev, iters, ours)?, "candle_ms": median_ms(dev, iters, candle)?})))
}

/// A convolution case: name, input `(B, C_in, H, W)`, `C_out`, kernel size, and whether it is a VAE shape (timed
/// again in the pipeline's VAE dtype when that differs).
type ConvCase = (&'static str, [usize; 4], usize, usize, bool);

const CONVS: [ConvCase; 7] = [
    ("conv3x3_unet_2x320x128x128", [2, 320, 128, 128], 320, 3, false),
    ("conv3x3_unet_2x640x64x64", [2, 640, 64, 64], 640, 3, false),
    ("conv3x3_unet_2x1280x32x32", [2, 1280, 32, 32], 1280, 3, false),
    ("conv1x1_unet_2x960x64x64_to_640", [2, 960, 64, 64], 640, 1, false),
    ("conv3x3_vae_1x512x128x128", [1, 512, 128, 128], 512, 3, true),
    ("conv3x3_vae_1x256x512x512", [1, 256, 512, 512], 256, 3, true),
    ("conv3x3_vae_1x128x1024x1024", [1, 128, 1024, 1024], 128, 3, true),
];

/// Linear layers: name, tokens `(B*L)`, in and out features.
const LINEARS: [(&str, usize, usize, usize); 3] = [
    ("linear_2x4096x640_to_640", 2 * 4096, 640, 640),
    ("linear_2x1024x1280_to_1280", 2 * 1024, 1280, 1280),
    ("linear_ff_2x4096x640_to_5120", 2 * 4096, 640, 5120),
];

/// `n / 8` (at least 1) for `--tiny` runs, `n` otherwise.
fn shrink(n: usize, tiny: bool) -> usize {
    if tiny {
        (n / 8).max(1)
    } else {
        n
    }
}

/// Standard normal values of `shape` in `dt` on `dev`.
pub fn rand(shape: &[usize], dt: DType, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dt)?)
}

/// `{"ms", "tflops"}` of a computation of `flop` operations.
fn with_tflops(ms: f64, flop: f64) -> Value {
    json!({"ms": ms, "tflops": flop / (ms * 1e-3) / 1e12})
}

/// `{"ms", "gbps"}` of a computation moving `bytes`.
fn with_gbps(ms: f64, bytes: f64) -> Value {
    json!({"ms": ms, "gbps": bytes / (ms * 1e-3) / 1e9})
}

fn conv_entry(dev: &Device, dt: DType, iters: usize, shape: [usize; 4], c_out: usize, k: usize) -> Result<Value> {
    let x = rand(&shape, dt, dev)?;
    let w = (rand(&[c_out, shape[1], k, k], dt, dev)? * 0.05)?;
    // The module the UNet and VAE run: our im2col + GEMM on CUDA (unless MIP_KERNELS=off), candle's conv2d
    // otherwise.
    let conv = Conv2d::new(w, Some(rand(&[c_out], dt, dev)?), 1, k / 2);
    let ms = median_ms(dev, iters, || Ok(conv.forward(&x)?))?;
    let flop = 2.0 * (shape[0] * c_out * shape[2] * shape[3] * shape[1] * k * k) as f64;
    Ok(with_tflops(ms, flop))
}

/// Times each op of the profile in `dt` on `dev` (`tiny`: every size divided by 8).
pub fn op_profile(dev: &Device, dt: DType, iters: usize, tiny: bool) -> Result<Value> {
    let mut res = serde_json::Map::new();
    let es = dt.size_in_bytes() as f64;
    for (name, shape, c_out, k, vae) in CONVS {
        let shape = [
            shape[0],
            shrink(shape[1], tiny),
            shrink(shape[2], tiny),
            shrink(shape[3], tiny),
        ];
        let c_out = shrink(c_out, tiny);
        res.insert(name.into(), conv_entry(dev, dt, iters, shape, c_out, k)?);
        let vdt = vae_dtype(dt);
        if vae && vdt != dt {
            let _tf32 = Tf32Scope::new(vae_uses_tf32(dev, dt));
            let entry = conv_entry(dev, vdt, iters, shape, c_out, k)?;
            res.insert(format!("{name}_{vdt:?}_pipeline").to_lowercase(), entry);
        }
    }
    for (name, tokens, c_in, c_out) in LINEARS {
        let (tokens, c_in, c_out) = (shrink(tokens, tiny), shrink(c_in, tiny), shrink(c_out, tiny));
        let x = rand(&[1, tokens, c_in], dt, dev)?;
        let lin = candle_nn::Linear::new(rand(&[c_out, c_in], dt, dev)?, Some(rand(&[c_out], dt, dev)?));
        let ms = median_ms(dev, iters, || Ok(lin.forward(&x)?))?;
        res.insert(name.into(), with_tflops(ms, 2.0 * (tokens * c_in * c_out) as f64));
    }
    let big = [2, shrink(320, tiny), shrink(128, tiny), shrink(128, tiny)];
    let n = big.iter().product::<usize>() as f64;
    let (a, b) = (rand(&big, dt, dev)?, rand(&big, dt, dev)?);
    let ms = median_ms(dev, iters, || Ok((&a + &b)?))?;
    res.insert("add_2x320x128x128".into(), with_gbps(ms, 3.0 * n * es));
    let ms = median_ms(dev, iters, || Ok(candle_nn::ops::silu(&a)?))?;
    res.insert("silu_2x320x128x128".into(), with_gbps(ms, 2.0 * n * es));
    let ms = median_ms(dev, iters, || Ok(a.permute((0, 2, 3, 1))?.contiguous()?))?;
    res.insert("permute_copy_2x320x128x128".into(), with_gbps(ms, 2.0 * n * es));

    let (tokens, c) = (shrink(2 * 4096, tiny), shrink(640, tiny));
    let x = rand(&[1, tokens, c], dt, dev)?;
    let (g, bias) = (rand(&[c], dt, dev)?, rand(&[c], dt, dev)?);
    let ms = median_ms(dev, iters, || Ok(candle_nn::ops::layer_norm(&x, &g, &bias, 1e-5)?))?;
    res.insert(
        "layer_norm_2x4096x640".into(),
        with_gbps(ms, 2.0 * (tokens * c) as f64 * es),
    );
    let up = [1, shrink(512, tiny), shrink(256, tiny), shrink(256, tiny)];
    let x = rand(&up, dt, dev)?;
    let ms = median_ms(dev, iters, || Ok(x.upsample_nearest2d(up[2] * 2, up[3] * 2)?))?;
    let n = up.iter().product::<usize>() as f64;
    res.insert("upsample_nearest_1x512x256x256".into(), with_gbps(ms, 5.0 * n * es));
    Ok(Value::Object(res))
}
