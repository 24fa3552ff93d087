//! CPU tests of the convolution composition (the CPU im2col + candle's matmul) against candle's own `conv2d`,
//! including the chunked paths (forced through a tiny column-matrix limit).

use candle_core::{DType, Device, IndexOp, Tensor};

use super::*;

/// Deterministic values in [-1, 1) of `shape`.
fn data(seed: usize, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
        .collect();
    Tensor::from_vec(vals, shape, &Device::Cpu).expect("data")
}

fn max_rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let g = got.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("got");
    let w = want.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("want");
    g.iter()
        .zip(&w)
        .map(|(a, b)| {
            let e = (a - b).abs() / b.abs().max(1.0);
            if e.is_nan() {
                f32::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f32::max)
}

/// `conv2d_im2col` against candle's `conv2d` (+ bias) for x `(B, C_in, H, W)` and a `(C_out, C_in, k, k)` kernel.
fn check(x_shape: [usize; 4], c_out: usize, k: usize, stride: usize, padding: usize, bias: bool, limit: usize) {
    let x = data(1, &x_shape);
    let w = (data(2, &[c_out, x_shape[1], k, k]) * 0.3).expect("w");
    let b = data(3, &[c_out]);
    let bias = bias.then_some(&b);
    let got = conv2d_im2col(&x, &w, bias, stride, padding, limit).expect("conv2d_im2col");
    let mut want = x.conv2d(&w, padding, stride, 1, 1).expect("conv2d");
    if let Some(b) = bias {
        want = want
            .broadcast_add(&b.reshape((1, c_out, 1, 1)).expect("b"))
            .expect("add");
    }
    let err = max_rel_err(&got, &want);
    assert!(
        err < 1e-4,
        "x {x_shape:?} C_out {c_out} k {k} stride {stride} pad {padding} bias {} limit {limit}: error {err}",
        bias.is_some()
    );
}

#[test]
fn im2col_cpu_of_a_2x2_image_with_padding() {
    let x = Tensor::from_vec(vec![1f32, 2., 3., 4.], (1, 1, 2, 2), &Device::Cpu).expect("x");
    let col = im2col(&x, 3, 3, 1, 1).expect("im2col");
    assert_eq!(col.dims(), [1, 9, 4]);
    let rows = col.i(0).and_then(|t| t.to_vec2::<f32>()).expect("rows");
    assert_eq!(rows[0], [0., 0., 0., 1.]); // (ky, kx) = (0, 0): up-left neighbours
    assert_eq!(rows[2], [0., 0., 2., 0.]); // (0, 2): up-right
    assert_eq!(rows[4], [1., 2., 3., 4.]); // centre
    assert_eq!(rows[5], [2., 0., 4., 0.]); // (1, 2): right
    assert_eq!(rows[8], [4., 0., 0., 0.]); // (2, 2): down-right
}

#[test]
fn im2col_cpu_keeps_half_dtypes_bit_exact() {
    let x = data(4, &[2, 3, 5, 7]);
    for dt in [DType::F16, DType::BF16] {
        let col = im2col(&x.to_dtype(dt).expect("dt"), 3, 3, 2, 1).expect("im2col");
        let want = im2col(
            &x.to_dtype(dt).and_then(|t| t.to_dtype(DType::F32)).expect("f32"),
            3,
            3,
            2,
            1,
        );
        let want = want.and_then(|t| t.to_dtype(dt)).expect("want");
        assert_eq!(col.dtype(), dt);
        assert_eq!(col.dims(), [2, 27, 12]);
        let same = col
            .eq(&want)
            .and_then(|m| m.to_dtype(DType::F32)?.min_all()?.to_scalar::<f32>());
        assert_eq!(same.expect("eq"), 1.0, "{dt:?}");
    }
}

#[test]
fn conv3x3_pad1_matches_candle() {
    check([2, 5, 9, 11], 7, 3, 1, 1, true, MAX_COL_BYTES);
    check([2, 5, 9, 11], 7, 3, 1, 1, false, MAX_COL_BYTES);
}

#[test]
fn conv3x3_stride2_matches_candle() {
    // pad 1 (the UNet's Downsample2D) and pad 0 on an odd, already padded size (the VAE's).
    check([2, 4, 16, 16], 6, 3, 2, 1, true, MAX_COL_BYTES);
    check([2, 4, 17, 13], 6, 3, 2, 0, false, MAX_COL_BYTES);
    check([1, 3, 8, 10], 2, 3, 2, 1, true, MAX_COL_BYTES);
}

#[test]
fn conv1x1_matches_candle() {
    check([2, 6, 7, 9], 5, 1, 1, 0, true, MAX_COL_BYTES);
    check([2, 6, 7, 9], 5, 1, 1, 0, false, MAX_COL_BYTES);
    // A strided or padded 1x1 takes the im2col path.
    check([2, 6, 7, 9], 5, 1, 2, 0, true, MAX_COL_BYTES);
    check([1, 2, 3, 3], 3, 1, 1, 1, false, MAX_COL_BYTES);
}

#[test]
fn single_channel_and_wide_kernels_match_candle() {
    check([2, 1, 6, 5], 4, 3, 1, 1, true, MAX_COL_BYTES);
    check([1, 3, 12, 9], 2, 5, 1, 2, true, MAX_COL_BYTES);
}

#[test]
fn chunked_paths_match_candle() {
    let (c_in, w_out, h_out) = (5, 11, 9);
    let row = c_in * 9 * w_out * 4; // one output row of one image, f32
                                    // Whole images one at a time; bands of 4 rows (the last one 1); single rows (limit below one row).
    check([3, c_in, 9, 11], 4, 3, 1, 1, true, row * h_out);
    check([3, c_in, 9, 11], 4, 3, 1, 1, true, row * 4);
    check([2, c_in, 9, 11], 4, 3, 1, 1, false, 1);
    check([2, c_in, 17, 13], 4, 3, 2, 0, true, row);
}

#[test]
fn conv2d_checks_shapes_and_needs_cuda() {
    let x = data(5, &[1, 4, 6, 6]);
    let w = data(6, &[2, 3, 3, 3]);
    let e = conv2d_im2col(&x, &w, None, 1, 1, MAX_COL_BYTES)
        .expect_err("channels")
        .to_string();
    assert!(e.contains("[2, 3, 3, 3]") && e.contains("C_in 4"), "{e}");
    let w = data(6, &[2, 4, 9, 9]);
    let e = conv2d_im2col(&x, &w, None, 1, 1, MAX_COL_BYTES)
        .expect_err("kernel")
        .to_string();
    assert!(e.contains("9x9") && e.contains("8x8"), "{e}");
    let empty = Tensor::zeros((0, 4, 6, 6), DType::F32, &Device::Cpu).expect("empty");
    assert!(conv2d_im2col(&empty, &data(6, &[2, 4, 3, 3]), None, 1, 1, 1).is_err());
    assert!(!conv2d_supported(&x, &data(6, &[2, 4, 3, 3])));
    assert!(conv2d(&x, &data(6, &[2, 4, 3, 3]), None, 1, 1).is_err());
}
