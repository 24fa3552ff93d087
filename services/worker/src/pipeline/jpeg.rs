//! A baseline (sequential, Huffman, 8-bit) JPEG decoder that reproduces libjpeg-turbo's default output, i.e. what
//! Pillow hands to transformers: the `image` crate's decoder differs by a few levels (its IDCT, upsampling and
//! colour conversion round differently), which is more than CLIP preprocessing tolerates.
//!
//! [`decode_baseline`] returns `None` for anything it does not handle exactly (progressive or arithmetic coding,
//! 12-bit samples, CMYK, unusual sampling factors, corrupt streams); the caller then falls back to the `image`
//! crate. It never panics on malformed input: every index is checked.

use super::image_decode::RgbImage;
use super::jpeg_idct::{idct_islow, upsample, ycc_to_rgb, Plane};

/// Natural-order index of the k-th zig-zag coefficient.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63,
];

/// A canonical Huffman table (JPEG Annex F.2.2.3 decoding procedure).
#[derive(Clone, Default)]
struct Huffman {
    maxcode: [i32; 17],
    valptr: [i32; 17],
    mincode: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Option<Self> {
        let mut t = Huffman {
            maxcode: [-1; 17],
            values,
            ..Default::default()
        };
        let (mut code, mut k) = (0i32, 0i32);
        for l in 1..=16 {
            let n = i32::from(counts[l - 1]);
            t.valptr[l] = k;
            t.mincode[l] = code;
            if n > 0 {
                code += n;
                k += n;
                t.maxcode[l] = code - 1;
            }
            if code > (1 << l) {
                return None;
            }
            code <<= 1;
        }
        (k as usize <= t.values.len()).then_some(t)
    }
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    blocks_w: usize,
    blocks_h: usize,
    coefs: Vec<[i16; 64]>,
    dc_table: usize,
    ac_table: usize,
    /// Whether a scan carried this component.
    seen: bool,
}

/// Reads entropy-coded bits, removing stuffed zero bytes and feeding zeros once a marker or the end is reached
/// (as libjpeg does for a truncated scan).
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
    at_marker: bool,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            acc: 0,
            n: 0,
            at_marker: false,
        }
    }

    fn fill(&mut self) {
        while self.n <= 56 {
            let mut byte = 0u8;
            if !self.at_marker {
                match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
                    (Some(0xFF), Some(0x00)) => {
                        byte = 0xFF;
                        self.pos += 2;
                    }
                    (Some(0xFF), _) | (None, _) => self.at_marker = true,
                    (Some(&b), _) => {
                        byte = b;
                        self.pos += 1;
                    }
                }
            }
            self.acc |= u64::from(byte) << (56 - self.n);
            self.n += 8;
        }
    }

    fn bits(&mut self, count: u32) -> i32 {
        if count == 0 {
            return 0;
        }
        self.fill();
        let v = (self.acc >> (64 - count)) as i32;
        self.acc <<= count;
        self.n -= count;
        v
    }

    fn decode(&mut self, t: &Huffman) -> Option<u8> {
        let mut code = 0i32;
        for l in 1..=16 {
            code = (code << 1) | self.bits(1);
            if code <= t.maxcode[l] {
                let idx = t.valptr[l] + code - t.mincode[l];
                return t.values.get(usize::try_from(idx).ok()?).copied();
            }
        }
        None
    }

    /// `HUFF_EXTEND(receive(s), s)`.
    fn receive_extend(&mut self, s: u8) -> Option<i32> {
        if s > 16 {
            return None;
        }
        let s = u32::from(s);
        let v = self.bits(s);
        Some(if s > 0 && v < (1 << (s - 1)) {
            v - (1 << s) + 1
        } else {
            v
        })
    }

    /// Drops buffered bits and skips an expected RSTn marker.
    fn restart(&mut self) -> Option<()> {
        self.acc = 0;
        self.n = 0;
        self.at_marker = false;
        match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
            (Some(0xFF), Some(m)) if (0xD0..=0xD7).contains(m) => {
                self.pos += 2;
                Some(())
            }
            _ => None,
        }
    }
}

#[derive(Default)]
struct State {
    width: usize,
    height: usize,
    hmax: usize,
    vmax: usize,
    comps: Vec<Component>,
    quant: [Option<[u16; 64]>; 4],
    dc: [Option<Huffman>; 4],
    ac: [Option<Huffman>; 4],
    restart_interval: usize,
    adobe_transform: Option<u8>,
    saw_jfif: bool,
}

fn be16(d: &[u8], i: usize) -> Option<usize> {
    Some(usize::from(*d.get(i)?) << 8 | usize::from(*d.get(i + 1)?))
}

/// Decodes a baseline JPEG exactly as libjpeg-turbo; `None` when unsupported or malformed.
pub fn decode_baseline(data: &[u8]) -> Option<RgbImage> {
    if data.get(0..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut st = State::default();
    let mut pos = 2;
    loop {
        while *data.get(pos)? != 0xFF {
            pos += 1;
        }
        while *data.get(pos)? == 0xFF {
            pos += 1;
        }
        let marker = *data.get(pos)?;
        pos += 1;
        if marker == 0xD9 {
            break;
        }
        if (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            continue;
        }
        let len = be16(data, pos)?;
        let seg = data.get(pos + 2..pos + len.checked_sub(2)? + 2)?;
        match marker {
            0xC0 | 0xC1 => parse_sof(&mut st, seg)?,
            0xC2..=0xCF if marker != 0xC4 && marker != 0xC8 && marker != 0xCC => return None,
            0xC4 => parse_dht(&mut st, seg)?,
            0xDB => parse_dqt(&mut st, seg)?,
            0xDD => st.restart_interval = be16(seg, 0)?,
            0xE0 if seg.starts_with(b"JFIF\0") => st.saw_jfif = true,
            0xEE if seg.starts_with(b"Adobe") => st.adobe_transform = seg.get(11).copied(),
            0xDA => {
                pos = decode_scan(&mut st, seg, data, pos + len)?;
                continue;
            }
            _ => {}
        }
        pos += len;
    }
    finish(&st)
}

fn parse_sof(st: &mut State, seg: &[u8]) -> Option<()> {
    if *seg.first()? != 8 || !st.comps.is_empty() {
        return None;
    }
    st.height = be16(seg, 1)?;
    st.width = be16(seg, 3)?;
    let n = usize::from(*seg.get(5)?);
    if st.width == 0 || st.height == 0 || !(n == 1 || n == 3) {
        return None;
    }
    for i in 0..n {
        let c = seg.get(6 + 3 * i..9 + 3 * i)?;
        let (h, v) = (usize::from(c[1] >> 4), usize::from(c[1] & 15));
        if !(1..=4).contains(&h) || !(1..=4).contains(&v) || c[2] > 3 {
            return None;
        }
        st.comps.push(Component {
            id: c[0],
            h,
            v,
            tq: usize::from(c[2]),
            blocks_w: 0,
            blocks_h: 0,
            coefs: Vec::new(),
            dc_table: 0,
            ac_table: 0,
            seen: false,
        });
    }
    st.hmax = st.comps.iter().map(|c| c.h).max()?;
    st.vmax = st.comps.iter().map(|c| c.v).max()?;
    let mcux = st.width.div_ceil(8 * st.hmax);
    let mcuy = st.height.div_ceil(8 * st.vmax);
    for c in &mut st.comps {
        if !st.hmax.is_multiple_of(c.h) || !st.vmax.is_multiple_of(c.v) {
            return None;
        }
        c.blocks_w = mcux * c.h;
        c.blocks_h = mcuy * c.v;
        c.coefs = vec![[0i16; 64]; c.blocks_w * c.blocks_h];
    }
    Some(())
}

fn parse_dht(st: &mut State, mut seg: &[u8]) -> Option<()> {
    while !seg.is_empty() {
        let (class, id) = (seg[0] >> 4, usize::from(seg[0] & 15));
        let counts: [u8; 16] = seg.get(1..17)?.try_into().ok()?;
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        let values = seg.get(17..17 + total)?.to_vec();
        let table = Huffman::new(&counts, values)?;
        match (class, id) {
            (0, 0..=3) => st.dc[id] = Some(table),
            (1, 0..=3) => st.ac[id] = Some(table),
            _ => return None,
        }
        seg = &seg[17 + total..];
    }
    Some(())
}

fn parse_dqt(st: &mut State, mut seg: &[u8]) -> Option<()> {
    while !seg.is_empty() {
        let (prec, id) = (seg[0] >> 4, usize::from(seg[0] & 15));
        if id > 3 || prec > 1 {
            return None;
        }
        let size = if prec == 0 { 64 } else { 128 };
        let body = seg.get(1..1 + size)?;
        let mut q = [0u16; 64];
        for (k, &zz) in ZIGZAG.iter().enumerate() {
            q[zz] = if prec == 0 {
                u16::from(body[k])
            } else {
                u16::from(body[2 * k]) << 8 | u16::from(body[2 * k + 1])
            };
        }
        st.quant[id] = Some(q);
        seg = &seg[1 + size..];
    }
    Some(())
}

/// Decodes one scan; returns the position of the marker that follows its entropy-coded data.
fn decode_scan(st: &mut State, seg: &[u8], data: &[u8], start: usize) -> Option<usize> {
    let ns = usize::from(*seg.first()?);
    let mut scan: Vec<usize> = Vec::with_capacity(ns);
    for i in 0..ns {
        let s = seg.get(1 + 2 * i..3 + 2 * i)?;
        let ci = st.comps.iter().position(|c| c.id == s[0])?;
        st.comps[ci].dc_table = usize::from(s[1] >> 4);
        st.comps[ci].ac_table = usize::from(s[1] & 15);
        st.comps[ci].seen = true;
        scan.push(ci);
    }
    let tail = seg.get(1 + 2 * ns..4 + 2 * ns)?;
    if ns == 0 || tail != [0, 63, 0] {
        return None;
    }
    // Units: MCUs of the interleaved scan, or single blocks of a one-component scan.
    let (units_w, units_h) = if ns == 1 {
        let c = &st.comps[scan[0]];
        let bw = (st.width * c.h).div_ceil(st.hmax).div_ceil(8);
        let bh = (st.height * c.v).div_ceil(st.vmax).div_ceil(8);
        (bw, bh)
    } else {
        (st.width.div_ceil(8 * st.hmax), st.height.div_ceil(8 * st.vmax))
    };
    let mut bits = Bits::new(data, start);
    let mut pred = vec![0i32; st.comps.len()];
    for u in 0..units_w * units_h {
        if st.restart_interval > 0 && u > 0 && u % st.restart_interval == 0 {
            bits.restart()?;
            pred.iter_mut().for_each(|p| *p = 0);
        }
        let (ux, uy) = (u % units_w, u / units_w);
        if ns == 1 {
            decode_block(st, &mut bits, &mut pred, scan[0], ux, uy)?;
            continue;
        }
        for &ci in &scan {
            let (h, v) = (st.comps[ci].h, st.comps[ci].v);
            for by in 0..v {
                for bx in 0..h {
                    decode_block(st, &mut bits, &mut pred, ci, ux * h + bx, uy * v + by)?;
                }
            }
        }
    }
    // Skip to the next real marker.
    let mut p = bits.pos;
    loop {
        if *data.get(p)? == 0xFF {
            let m = *data.get(p + 1)?;
            if m != 0 && !(0xD0..=0xD7).contains(&m) {
                return Some(p);
            }
        }
        p += 1;
    }
}

fn decode_block(st: &mut State, bits: &mut Bits, pred: &mut [i32], ci: usize, x: usize, y: usize) -> Option<()> {
    let c = &st.comps[ci];
    let dc = st.dc.get(c.dc_table)?.as_ref()?;
    let ac = st.ac.get(c.ac_table)?.as_ref()?;
    let mut block = [0i16; 64];
    let s = bits.decode(dc)?;
    let diff = bits.receive_extend(s)?;
    pred[ci] = pred[ci].wrapping_add(diff);
    block[0] = pred[ci] as i16;
    let mut k = 1;
    while k < 64 {
        let rs = bits.decode(ac)?;
        let (r, s) = (usize::from(rs >> 4), rs & 15);
        if s == 0 {
            if r != 15 {
                break;
            }
            k += 16;
            continue;
        }
        k += r;
        let v = bits.receive_extend(s)?;
        *block.get_mut(*ZIGZAG.get(k)?)? = v as i16;
        k += 1;
    }
    let idx = y * c.blocks_w + x;
    *st.comps[ci].coefs.get_mut(idx)? = block;
    Some(())
}

/// IDCT, upsampling and colour conversion of the decoded coefficients.
fn finish(st: &State) -> Option<RgbImage> {
    let (w, h) = (st.width, st.height);
    if st.comps.is_empty() || st.comps.iter().any(|c| !c.seen) {
        return None;
    }
    let mut planes = Vec::with_capacity(st.comps.len());
    for c in &st.comps {
        let quant = st.quant.get(c.tq)?.as_ref()?;
        let stride = c.blocks_w * 8;
        let mut data = vec![0u8; stride * c.blocks_h * 8];
        for by in 0..c.blocks_h {
            for bx in 0..c.blocks_w {
                idct_islow(&c.coefs[by * c.blocks_w + bx], quant, &mut data, stride, bx * 8, by * 8);
            }
        }
        let plane = Plane {
            data,
            stride,
            width: (w * c.h).div_ceil(st.hmax),
            height: (h * c.v).div_ceil(st.vmax),
        };
        planes.push(upsample(&plane, st.hmax / c.h, st.vmax / c.v, w, h));
    }
    let data = match planes.as_slice() {
        [g] => g.iter().flat_map(|&v| [v, v, v]).collect(),
        [a, b, c] => {
            // libjpeg's guess of the colour space (`default_decompress_parms`).
            let rgb_ids = st.comps.iter().map(|c| c.id).eq([b'R', b'G', b'B']);
            let is_rgb = !st.saw_jfif && st.adobe_transform.map_or(rgb_ids, |t| t == 0);
            if is_rgb {
                a.iter().zip(b).zip(c).flat_map(|((&r, &g), &b)| [r, g, b]).collect()
            } else {
                ycc_to_rgb(a, b, c)
            }
        }
        _ => return None,
    };
    Some(RgbImage {
        width: w,
        height: h,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::fixtures_dir;
    use image::DynamicImage;
    use std::io::Cursor;

    fn encode(img: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).expect("encode jpeg");
        out.into_inner()
    }

    fn max_diff(a: &[u8], b: &[u8]) -> u8 {
        a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
    }

    #[test]
    fn agrees_with_the_image_crate_within_rounding() {
        let rgb = image::RgbImage::from_fn(37, 23, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x * y) % 256) as u8])
        });
        let bytes = encode(DynamicImage::ImageRgb8(rgb));
        let ours = decode_baseline(&bytes).expect("baseline");
        let theirs = image::load_from_memory(&bytes).expect("image").to_rgb8();
        assert_eq!((ours.width, ours.height), (37, 23));
        let d = max_diff(&ours.data, theirs.as_raw());
        println!("rgb jpeg: max diff vs image crate {d}");
        assert!(d <= 12, "{d}");
        let grey = image::GrayImage::from_fn(19, 9, |x, y| image::Luma([(x * 13 + y * 5) as u8]));
        let bytes = encode(DynamicImage::ImageLuma8(grey));
        let ours = decode_baseline(&bytes).expect("grey baseline");
        let theirs = image::load_from_memory(&bytes).expect("image").to_rgb8();
        let d = max_diff(&ours.data, theirs.as_raw());
        println!("grey jpeg: max diff vs image crate {d}");
        assert!(d <= 2, "{d}");
    }

    #[test]
    fn corrupt_streams_never_panic() {
        let path = fixtures_dir()
            .expect("fixtures")
            .join("cases/preprocess/img6_333x222_RGB.jpg");
        let bytes = std::fs::read(path).expect("jpeg");
        assert!(decode_baseline(&bytes).is_some());
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for i in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..1 + i % 8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed % b.len() as u64) as usize;
                b[at] = (seed >> 32) as u8;
            }
            let cut = if i % 3 == 0 {
                b.len() * (i % 97 + 1) / 100
            } else {
                b.len()
            };
            let _ = decode_baseline(&b[..cut]);
        }
        assert!(decode_baseline(&[0xFF, 0xD8, 0xFF]).is_none());
        assert!(decode_baseline(b"not a jpeg").is_none());
    }
}
