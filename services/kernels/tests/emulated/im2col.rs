//! The im2col kernel under the emulator, bit for bit against the CPU im2col of `mip_kernels::im2col` (it is a
//! pure copy): padding, strides, odd and non-square sizes, one channel, and a band of output rows of images that
//! start inside their storage (the chunked path of `mip_kernels::conv2d`).

use anyhow::{ensure, Result};
use candle_core::DType;
use mip_kernels::plan::{self, Buf};

use crate::emu::{randn, to_bytes, Job};

/// One im2col case: the kernel over `x` (images `images` of it, output rows `rows`; `None`: all) against the CPU
/// im2col of `mip_kernels::im2col`, bit for bit (it is a pure copy).
struct Cols {
    dtype: DType,
    shape: [usize; 4],
    k: (usize, usize),
    stride: usize,
    padding: usize,
    images: Option<(usize, usize)>,
    rows: Option<(usize, usize)>,
}

fn check_im2col(c: Cols) -> Result<()> {
    let Cols {
        dtype,
        shape,
        k: (kh, kw),
        stride,
        padding,
        images,
        rows,
    } = c;
    let full = randn(shape.iter().sum::<usize>() as u64 + 11, &shape[..])?.to_dtype(dtype)?;
    let (i0, n) = images.unwrap_or((0, shape[0]));
    let x = full.narrow(0, i0, n)?;
    let (h_out, w_out) = plan::conv_out_size(shape[2], shape[3], kh, kw, stride, padding)?;
    let (r0, rows) = rows.unwrap_or((0, h_out));
    let spec = plan::Im2Col {
        kh,
        kw,
        stride,
        padding,
        row_start: r0,
        rows,
    };
    let p = plan::im2col(dtype, x.layout(), &spec)?;
    let elem = dtype.size_in_bytes();
    let mut job = Job::new()?;
    job.input("x", &to_bytes(&full)?)?;
    job.poisoned("col", p.out_len * elem);
    let x_off = p.in_offset * elem;
    job.launch(&p.launch, |buf| match buf {
        Buf::X => ("x", x_off),
        _ => ("col", 0),
    });
    job.output("col");
    let got = job.run_all_orders("col")?;
    let want = mip_kernels::im2col(&x, kh, kw, stride, padding)?.narrow(2, r0 * w_out, rows * w_out)?;
    ensure!(want.dims() == [p.out_shape.0, p.out_shape.1, p.out_shape.2]);
    let want = to_bytes(&want.contiguous()?)?;
    let name = format!("im2col {dtype:?} {shape:?} k{kh}x{kw} s{stride} p{padding} images {images:?} rows {rows:?}");
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let (b, k, pos) = p.out_shape;
        let e = at / elem;
        anyhow::bail!(
            "{name}: first difference at element {e} = (image {}, row {}, position {}) of ({b}, {k}, {pos})",
            e / (k * pos),
            e / pos % k,
            e % pos
        );
    }
    ensure!(
        got.len() == want.len(),
        "{name}: {} bytes, expected {}",
        got.len(),
        want.len()
    );
    eprintln!("{name}: bit-exact");
    Ok(())
}

#[test]
fn im2col_f32_3x3_pad1_non_square() -> Result<()> {
    // 480 positions: one full and one partial block per (channel, image).
    check_im2col(Cols {
        dtype: DType::F32,
        shape: [2, 3, 20, 24],
        k: (3, 3),
        stride: 1,
        padding: 1,
        images: None,
        rows: None,
    })
}

#[test]
fn im2col_f16_3x3_stride2_pad1_downsample() -> Result<()> {
    check_im2col(Cols {
        dtype: DType::F16,
        shape: [2, 4, 16, 16],
        k: (3, 3),
        stride: 2,
        padding: 1,
        images: None,
        rows: None,
    })
}

#[test]
fn im2col_f16_3x3_stride2_odd_unpadded() -> Result<()> {
    // The VAE's Downsample2D: padded right/bottom to an odd size, then stride 2 without padding.
    check_im2col(Cols {
        dtype: DType::F16,
        shape: [2, 3, 17, 15],
        k: (3, 3),
        stride: 2,
        padding: 0,
        images: None,
        rows: None,
    })
}

#[test]
fn im2col_bf16_one_channel_odd_size() -> Result<()> {
    check_im2col(Cols {
        dtype: DType::BF16,
        shape: [1, 1, 13, 7],
        k: (3, 3),
        stride: 1,
        padding: 1,
        images: None,
        rows: None,
    })
}

#[test]
fn im2col_bf16_5x5_pad2() -> Result<()> {
    check_im2col(Cols {
        dtype: DType::BF16,
        shape: [2, 2, 9, 10],
        k: (5, 5),
        stride: 1,
        padding: 2,
        images: None,
        rows: None,
    })
}

#[test]
fn im2col_f32_band_of_rows_of_later_images() -> Result<()> {
    // The chunked path: images 1..3 of 3 (the input starts inside its storage), output rows 4..9 of 15.
    check_im2col(Cols {
        dtype: DType::F32,
        shape: [3, 2, 15, 9],
        k: (3, 3),
        stride: 1,
        padding: 1,
        images: Some((1, 2)),
        rows: Some((4, 5)),
    })
}
