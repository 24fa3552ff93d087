//! The pixel stages of libjpeg(-turbo)'s default decoder, which Pillow uses, reproduced bit for bit: the
//! accurate integer inverse DCT (`jidctint.c`, `JDCT_ISLOW`), "fancy" chroma upsampling (`jdsample.c`: triangle
//! filters for h2v1 / h1v2 / h2v2, box replication otherwise) and the YCbCr -> RGB tables of `jdcolor.c`.

/// Fixed-point bits of the IDCT constants.
const CONST_BITS: u32 = 13;
/// Extra precision kept between the two IDCT passes.
const PASS1_BITS: u32 = 2;
const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// libjpeg's post-IDCT range limit: the value masked to 10 bits, then `x + 128` clipped, with wrap-around for
/// wildly out-of-range values exactly as the table does.
fn idct_range_limit(x: i64) -> u8 {
    let m = (x & 1023) as i32;
    match m {
        0..=127 => (m + 128) as u8,
        128..=511 => 255,
        512..=895 => 0,
        _ => (m - 896) as u8,
    }
}

/// One 1-D pass of the islow IDCT over 8 values (`v[0..8]` in natural order), before descaling:
/// returns the 8 outputs scaled by `2^CONST_BITS`.
fn idct_1d(v: [i64; 8]) -> [i64; 8] {
    // Even part.
    let (z2, z3) = (v[2], v[6]);
    let z1 = (z2 + z3) * FIX_0_541196100;
    let tmp2 = z1 + z3 * -FIX_1_847759065;
    let tmp3 = z1 + z2 * FIX_0_765366865;
    let tmp0 = (v[0] + v[4]) << CONST_BITS;
    let tmp1 = (v[0] - v[4]) << CONST_BITS;
    let (tmp10, tmp13) = (tmp0 + tmp3, tmp0 - tmp3);
    let (tmp11, tmp12) = (tmp1 + tmp2, tmp1 - tmp2);
    // Odd part.
    let (t0, t1, t2, t3) = (v[7], v[5], v[3], v[1]);
    let z1 = t0 + t3;
    let z2 = t1 + t2;
    let z3 = t0 + t2;
    let z4 = t1 + t3;
    let z5 = (z3 + z4) * FIX_1_175875602;
    let t0 = t0 * FIX_0_298631336;
    let t1 = t1 * FIX_2_053119869;
    let t2 = t2 * FIX_3_072711026;
    let t3 = t3 * FIX_1_501321110;
    let z1 = z1 * -FIX_0_899976223;
    let z2 = z2 * -FIX_2_562915447;
    let z3 = z3 * -FIX_1_961570560 + z5;
    let z4 = z4 * -FIX_0_390180644 + z5;
    let t0 = t0 + z1 + z3;
    let t1 = t1 + z2 + z4;
    let t2 = t2 + z2 + z3;
    let t3 = t3 + z1 + z4;
    [
        tmp10 + t3,
        tmp11 + t2,
        tmp12 + t1,
        tmp13 + t0,
        tmp13 - t0,
        tmp12 - t1,
        tmp11 - t2,
        tmp10 - t3,
    ]
}

/// `jpeg_idct_islow`: dequantises one block (`coef` and `quant` in natural order) and writes 8x8 samples into
/// `out` at `(x0, y0)` of a plane `stride` wide.
pub fn idct_islow(coef: &[i16; 64], quant: &[u16; 64], out: &mut [u8], stride: usize, x0: usize, y0: usize) {
    let mut ws = [0i64; 64];
    for col in 0..8 {
        let v: [i64; 8] = std::array::from_fn(|r| i64::from(coef[r * 8 + col]) * i64::from(quant[r * 8 + col]));
        let res = idct_1d(v);
        for (r, x) in res.iter().enumerate() {
            // int workspace in libjpeg.
            ws[r * 8 + col] = i64::from(descale(*x, CONST_BITS - PASS1_BITS) as i32);
        }
    }
    for row in 0..8 {
        let v: [i64; 8] = std::array::from_fn(|c| ws[row * 8 + c]);
        let res = idct_1d(v);
        let base = (y0 + row) * stride + x0;
        for (c, x) in res.iter().enumerate() {
            out[base + c] = idct_range_limit(descale(*x, CONST_BITS + PASS1_BITS + 3));
        }
    }
}

/// A decoded component plane: `width x height` meaningful samples in a buffer `stride` wide.
pub struct Plane {
    pub data: Vec<u8>,
    pub stride: usize,
    pub width: usize,
    pub height: usize,
}

impl Plane {
    fn at(&self, x: usize, y: usize) -> i32 {
        i32::from(self.data[y * self.stride + x])
    }
}

/// Upsamples a component by `(fx, fy)` to `out_w x out_h` as libjpeg's upsampler with `do_fancy_upsampling`.
pub fn upsample(p: &Plane, fx: usize, fy: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let mut out = vec![0u8; out_w * out_h];
    let (w, h) = (p.width, p.height);
    let fancy = w > 2;
    for y in 0..out_h {
        let iy = (y / fy).min(h - 1);
        let above = y % 2 == 0;
        let far_y = if above {
            iy.saturating_sub(1)
        } else {
            (iy + 1).min(h - 1)
        };
        for x in 0..out_w {
            let ix = (x / fx).min(w - 1);
            let left = x % 2 == 0;
            let far_x = if left {
                ix.saturating_sub(1)
            } else {
                (ix + 1).min(w - 1)
            };
            let v = match (fx, fy) {
                (1, 1) => p.at(ix, iy),
                (2, 1) if fancy => (3 * p.at(ix, iy) + p.at(far_x, iy) + if left { 1 } else { 2 }) >> 2,
                (1, 2) => (3 * p.at(ix, iy) + p.at(ix, far_y) + if above { 1 } else { 2 }) >> 2,
                (2, 2) if fancy => {
                    let this = 3 * p.at(ix, iy) + p.at(ix, far_y);
                    let other = 3 * p.at(far_x, iy) + p.at(far_x, far_y);
                    (3 * this + other + if left { 8 } else { 7 }) >> 4
                }
                _ => p.at(ix, iy),
            };
            out[y * out_w + x] = v as u8;
        }
    }
    out
}

/// `jdcolor.c` YCbCr -> RGB with its 16-bit fixed-point tables.
pub fn ycc_to_rgb(y: &[u8], cb: &[u8], cr: &[u8]) -> Vec<u8> {
    const SCALEBITS: u32 = 16;
    const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
    let fix = |x: f64| (x * f64::from(1u32 << SCALEBITS) + 0.5) as i64;
    let mut cr_r = [0i32; 256];
    let mut cb_b = [0i32; 256];
    let mut cr_g = [0i64; 256];
    let mut cb_g = [0i64; 256];
    for i in 0..256 {
        let x = i as i64 - 128;
        cr_r[i] = ((fix(1.40200) * x + ONE_HALF) >> SCALEBITS) as i32;
        cb_b[i] = ((fix(1.77200) * x + ONE_HALF) >> SCALEBITS) as i32;
        cr_g[i] = -fix(0.71414) * x;
        cb_g[i] = -fix(0.34414) * x + ONE_HALF;
    }
    let clamp = |v: i32| v.clamp(0, 255) as u8;
    let mut out = Vec::with_capacity(y.len() * 3);
    for ((&yy, &b), &r) in y.iter().zip(cb).zip(cr) {
        let (yy, b, r) = (i32::from(yy), usize::from(b), usize::from(r));
        out.push(clamp(yy + cr_r[r]));
        out.push(clamp(yy + ((cb_g[b] + cr_g[r]) >> SCALEBITS) as i32));
        out.push(clamp(yy + cb_b[b]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dc_only_block_is_flat() {
        let mut coef = [0i16; 64];
        coef[0] = 10;
        let mut quant = [1u16; 64];
        quant[0] = 16;
        let mut out = vec![0u8; 64];
        idct_islow(&coef, &quant, &mut out, 8, 0, 0);
        // 160 / 8 = 20 above mid-grey.
        assert!(out.iter().all(|&v| v == 148), "{out:?}");
    }

    #[test]
    fn range_limit_wraps_like_the_table() {
        assert_eq!(idct_range_limit(0), 128);
        assert_eq!(idct_range_limit(127), 255);
        assert_eq!(idct_range_limit(300), 255);
        assert_eq!(idct_range_limit(-128), 0);
        assert_eq!(idct_range_limit(-300), 0);
        assert_eq!(idct_range_limit(-1), 127);
    }

    #[test]
    fn grey_chroma_is_neutral() {
        assert_eq!(
            ycc_to_rgb(&[0, 77, 255], &[128; 3], &[128; 3]),
            vec![0, 0, 0, 77, 77, 77, 255, 255, 255]
        );
    }
}
