//! Launch plans of the CUDA kernels: kernel names, grid/block dims, the argument list in the order of each
//! `extern "C"` signature in `cuda/*.cu`, and the buffer sizes. Always compiled (no CUDA needed), so the CUDA ops
//! (`cuda_ops.rs`) and the CPU emulation test (`tests/emulated.rs`, which runs the `.cu` sources under `emu/`)
//! use the very same plan.

use candle_core::{DType, Layout, Result};

use crate::FLASH_HEAD_DIMS;

/// Query rows per block of the attention kernel (4 warps x 16 rows), and its block size.
pub const FLASH_BR: usize = 64;
pub const FLASH_THREADS: u32 = 128;
/// Threads per block of the GroupNorm statistics and apply kernels, and the target length of one statistics chunk.
pub const GN_THREADS: u32 = 256;
pub const GN_CHUNK: usize = 8192;
/// Most statistics chunks per group.
pub const GN_MAX_CHUNKS: usize = 512;
/// Threads per block of `gn_finalize` (one thread per group).
pub const GN_FINALIZE_THREADS: u32 = 128;
/// Largest grid y (the `(b, c)` planes of `gn_apply`, the groups of `gn_stats`, the channels of `im2col`) and grid
/// z (the images of `im2col`).
pub const GRID_Y_MAX: usize = 65_535;
/// Threads per block of the im2col kernel (one output position each).
pub const IM2COL_THREADS: u32 = 256;

/// A device buffer a kernel argument points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buf {
    /// Attention inputs, each at its layout's start offset, and the `(B, Lq, H*D)` output.
    Q,
    K,
    V,
    Out,
    /// GroupNorm input, partial statistics `(B*G, chunks, 3)`, statistics `(B*G, 2)`, f32 gamma/beta `(C,)`,
    /// output.
    X,
    Part,
    Stats,
    Gamma,
    Beta,
    Y,
    /// The im2col column matrix `(B, K, P)` (its input is [`Buf::X`]).
    Col,
}

/// One kernel argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Buf(Buf),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// One kernel launch: `kernel<<<grid, block>>>(args...)`, no dynamic shared memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub args: Vec<Arg>,
}

/// The attention launch and its buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct FlashPlan {
    pub launch: Launch,
    /// Element offsets of the q, k and v views in their storages (the kernel gets pointers to these elements).
    pub in_offsets: [usize; 3],
    /// Elements of the output `(B, Lq, H*D)`.
    pub out_len: usize,
    pub out_shape: (usize, usize, usize),
}

/// The three GroupNorm launches (statistics, finalize, apply) and their buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupNormPlan {
    pub stats: Launch,
    pub finalize: Launch,
    pub apply: Launch,
    /// Elements (f32) of [`Buf::Part`] and [`Buf::Stats`], and of the input/output (`B*C*spatial`).
    pub part_len: usize,
    pub stats_len: usize,
    pub len: usize,
    /// Channels (the length of gamma and beta).
    pub channels: usize,
}

/// One im2col: a `kh x kw` kernel with `stride` and `padding` zeros on every side (dilation 1), over the output
/// rows `row_start .. row_start + rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Im2Col {
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub row_start: usize,
    pub rows: usize,
}

/// The im2col launch and its buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct Im2ColPlan {
    pub launch: Launch,
    /// Element offset of the input in its storage, and its elements.
    pub in_offset: usize,
    pub in_len: usize,
    /// Elements of the output, and its shape `(B, C*kh*kw, rows*W_out)`.
    pub out_len: usize,
    pub out_shape: (usize, usize, usize),
}

/// Output height and width of a convolution of an `h x w` input with a `kh x kw` kernel, `stride` and `padding`
/// (dilation 1); an error when the stride is 0 or the kernel is larger than the padded input.
pub fn conv_out_size(
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
) -> Result<(usize, usize)> {
    let (ph, pw) = (h + 2 * padding, w + 2 * padding);
    if stride == 0 || kh == 0 || kw == 0 || kh > ph || kw > pw {
        candle_core::bail!(
            "conv2d: kernel {kh}x{kw} with stride {stride} over a padded {ph}x{pw} input (stride >= 1, kernel <= input)"
        );
    }
    Ok(((ph - kh) / stride + 1, (pw - kw) / stride + 1))
}

/// The plan of `im2col_<dt>` over a contiguous `(B, C, H, W)` input (any start offset).
pub fn im2col(dtype: DType, x: &Layout, g: &Im2Col) -> Result<Im2ColPlan> {
    let (b, c, h, w) = x.shape().dims4()?;
    if !x.is_contiguous() || b * c * h * w == 0 {
        candle_core::bail!("im2col plan: input {:?} must be contiguous and non-empty", x.dims());
    }
    let (h_out, w_out) = conv_out_size(h, w, g.kh, g.kw, g.stride, g.padding)?;
    if g.rows == 0 || g.row_start + g.rows > h_out {
        candle_core::bail!(
            "im2col plan: rows {}..{} outside the {h_out} output rows",
            g.row_start,
            g.row_start + g.rows
        );
    }
    if c > GRID_Y_MAX || b > GRID_Y_MAX {
        candle_core::bail!("im2col plan: {c} channels or {b} images exceed the grid limit {GRID_Y_MAX}");
    }
    // The kernel's 32-bit index math: positions within a plane of the input and of one column-matrix row.
    to_i32("H*W", h * w)?;
    to_i32("H + 2*padding", h + 2 * g.padding)?;
    to_i32("W + 2*padding", w + 2 * g.padding)?;
    let positions = g.rows * w_out;
    let k = c * g.kh * g.kw;
    let launch = Launch {
        kernel: format!("im2col_{}", dtype_suffix(dtype)?),
        grid: (
            to_u32("position blocks", positions.div_ceil(IM2COL_THREADS as usize))?,
            to_u32("channels", c)?,
            to_u32("images", b)?,
        ),
        block: (IM2COL_THREADS, 1, 1),
        args: vec![
            Arg::Buf(Buf::X),
            Arg::Buf(Buf::Col),
            Arg::I32(to_i32("H", h)?),
            Arg::I32(to_i32("W", w)?),
            Arg::I32(to_i32("kh", g.kh)?),
            Arg::I32(to_i32("kw", g.kw)?),
            Arg::I32(to_i32("stride", g.stride)?),
            Arg::I32(to_i32("padding", g.padding)?),
            Arg::I32(to_i32("W_out", w_out)?),
            Arg::I32(to_i32("row_start", g.row_start)?),
            Arg::I32(to_i32("rows*W_out", positions)?),
        ],
    };
    Ok(Im2ColPlan {
        launch,
        in_offset: x.start_offset(),
        in_len: b * c * h * w,
        out_len: b * k * positions,
        out_shape: (b, k, positions),
    })
}

/// The kernel-name suffix of a storage dtype.
pub fn dtype_suffix(dt: DType) -> Result<&'static str> {
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

fn to_i64(name: &str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| candle_core::Error::Msg(format!("mip-kernels: {name} = {v} exceeds i64")))
}

/// Whether a `(B, H, L, D)` layout is what the attention kernel reads directly: a contiguous last axis and every
/// row start 16-byte aligned for 16-bit elements (offset and strides multiples of 8 elements).
pub fn flash_layout_ok(l: &Layout) -> bool {
    let stride = l.stride();
    stride.last() == Some(&1)
        && l.start_offset().is_multiple_of(8)
        && stride.iter().rev().skip(1).all(|s| s.is_multiple_of(8))
}

/// The plan of `flash_attn_<dt>_d<D>` for q `(B, H, Lq, D)` and k/v `(B, H, Lk, D)` with the given layouts.
pub fn flash_attn(dtype: DType, q: &Layout, k: &Layout, v: &Layout, scale: f32) -> Result<FlashPlan> {
    let (b, h, lq, d) = q.shape().dims4()?;
    let (kb, kh, lk, kd) = k.shape().dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
        candle_core::bail!(
            "flash_attn plan: q {:?}, k {:?}, v {:?} must be (B, H, L, D) with equal B, H, D",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if !matches!(dtype, DType::F16 | DType::BF16) || !FLASH_HEAD_DIMS.contains(&d) || lq == 0 || lk == 0 {
        candle_core::bail!(
            "flash_attn plan: {dtype:?} head dim {d} Lq {lq} Lk {lk} (f16/bf16, D in {FLASH_HEAD_DIMS:?}, L > 0)"
        );
    }
    for (name, l) in [("q", q), ("k", k), ("v", v)] {
        if !flash_layout_ok(l) {
            candle_core::bail!(
                "flash_attn plan: {name} offset {} strides {:?} not 16-byte aligned rows with a contiguous last axis",
                l.start_offset(),
                l.stride()
            );
        }
    }
    let mut args = vec![Arg::Buf(Buf::Q), Arg::Buf(Buf::K), Arg::Buf(Buf::V), Arg::Buf(Buf::Out)];
    args.extend([
        Arg::I32(to_i32("heads", h)?),
        Arg::I32(to_i32("Lq", lq)?),
        Arg::I32(to_i32("Lk", lk)?),
        Arg::F32(scale),
    ]);
    for l in [q, k, v] {
        for s in &l.stride()[..3] {
            args.push(Arg::I64(to_i64("stride", *s)?));
        }
    }
    let launch = Launch {
        kernel: format!("flash_attn_{}_d{d}", dtype_suffix(dtype)?),
        grid: (to_u32("query blocks", lq.div_ceil(FLASH_BR))?, to_u32("B*H", b * h)?, 1),
        block: (FLASH_THREADS, 1, 1),
        args,
    };
    if b * h > GRID_Y_MAX {
        candle_core::bail!("flash_attn plan: B*H = {} exceeds the grid limit {GRID_Y_MAX}", b * h);
    }
    Ok(FlashPlan {
        launch,
        in_offsets: [q.start_offset(), k.start_offset(), v.start_offset()],
        out_len: b * lq * h * d,
        out_shape: (b, lq, h * d),
    })
}

/// The plan of GroupNorm (+ SiLU) over `groups` groups of a contiguous `(B, C, ...)` input.
pub fn group_norm(dtype: DType, x: &Layout, groups: usize, eps: f64, silu: bool) -> Result<GroupNormPlan> {
    let dims = x.dims();
    if dims.len() < 3 || !x.is_contiguous() {
        candle_core::bail!("group_norm plan: input {dims:?} must be contiguous (B, C, spatial...)");
    }
    let (b, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    let len = b * c * spatial;
    if len == 0 || groups == 0 || !c.is_multiple_of(groups) {
        candle_core::bail!("group_norm plan: input {dims:?} with {groups} groups (non-empty, C divisible)");
    }
    let n_groups = b * groups;
    let group_len = c / groups * spatial;
    let chunks = group_len.div_ceil(GN_CHUNK).clamp(1, GN_MAX_CHUNKS);
    let chunk_len = group_len.div_ceil(chunks);
    if b * c > GRID_Y_MAX || n_groups > GRID_Y_MAX {
        candle_core::bail!(
            "group_norm plan: B*C = {} planes exceed the grid limit {GRID_Y_MAX}",
            b * c
        );
    }
    let suffix = dtype_suffix(dtype)?;
    let stats = Launch {
        kernel: format!("gn_stats_{suffix}"),
        grid: (to_u32("chunks", chunks)?, to_u32("B*groups", n_groups)?, 1),
        block: (GN_THREADS, 1, 1),
        args: vec![
            Arg::Buf(Buf::X),
            Arg::Buf(Buf::Part),
            Arg::I64(to_i64("group length", group_len)?),
            Arg::I32(to_i32("chunk length", chunk_len)?),
        ],
    };
    let finalize = Launch {
        kernel: "gn_finalize".to_owned(),
        grid: (to_u32("groups", n_groups.div_ceil(GN_FINALIZE_THREADS as usize))?, 1, 1),
        block: (GN_FINALIZE_THREADS, 1, 1),
        args: vec![
            Arg::Buf(Buf::Part),
            Arg::Buf(Buf::Stats),
            Arg::I32(to_i32("B*groups", n_groups)?),
            Arg::I32(to_i32("chunks", chunks)?),
            Arg::F32(eps as f32),
        ],
    };
    let per_plane = spatial.div_ceil(GN_THREADS as usize * 4).max(1);
    let apply = Launch {
        kernel: format!("gn_apply_{suffix}"),
        grid: (to_u32("blocks per plane", per_plane)?, to_u32("B*C planes", b * c)?, 1),
        block: (GN_THREADS, 1, 1),
        args: vec![
            Arg::Buf(Buf::X),
            Arg::Buf(Buf::Stats),
            Arg::Buf(Buf::Gamma),
            Arg::Buf(Buf::Beta),
            Arg::Buf(Buf::Y),
            Arg::I64(to_i64("spatial", spatial)?),
            Arg::I32(to_i32("channels", c)?),
            Arg::I32(to_i32("channels per group", c / groups)?),
            Arg::I32(i32::from(silu)),
        ],
    };
    Ok(GroupNormPlan {
        stats,
        finalize,
        apply,
        part_len: n_groups * chunks * 3,
        stats_len: n_groups * 2,
        len,
        channels: c,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Shape;

    #[test]
    fn group_norm_plan_splits_long_groups_into_chunks() {
        let l = Layout::contiguous(Shape::from((1, 32, 100, 100)));
        let p = group_norm(DType::F16, &l, 8, 1e-5, true).expect("plan");
        assert_eq!(p.stats.grid, (5, 8, 1));
        assert_eq!(p.stats.args[3], Arg::I32(8000));
        assert_eq!(p.apply.grid, (10, 32, 1));
        assert_eq!(p.apply.args[8], Arg::I32(1));
        assert_eq!((p.part_len, p.stats_len, p.len), (120, 16, 320_000));
    }

    #[test]
    fn im2col_plan_covers_every_position_and_checks_the_rows() {
        let l = Layout::contiguous_with_offset(Shape::from((2, 3, 9, 11)), 5);
        let g = Im2Col {
            kh: 3,
            kw: 3,
            stride: 2,
            padding: 1,
            row_start: 1,
            rows: 3,
        };
        let p = im2col(DType::F16, &l, &g).expect("plan");
        // 5 x 6 output; rows 1..4 give 18 positions.
        assert_eq!(p.launch.kernel, "im2col_f16");
        assert_eq!(p.launch.grid, (1, 3, 2));
        assert_eq!(p.launch.args[8..], [Arg::I32(6), Arg::I32(1), Arg::I32(18)]);
        assert_eq!(
            (p.in_offset, p.in_len, p.out_len, p.out_shape),
            (5, 594, 972, (2, 27, 18))
        );
        assert!(im2col(DType::F16, &l, &Im2Col { rows: 5, ..g }).is_err());
        assert!(im2col(DType::F16, &l, &Im2Col { stride: 0, ..g }).is_err());
        assert_eq!(conv_out_size(1024, 1024, 3, 3, 1, 1).expect("size"), (1024, 1024));
        assert_eq!(conv_out_size(129, 129, 3, 3, 2, 0).expect("size"), (64, 64));
        assert!(conv_out_size(2, 2, 3, 3, 1, 0).is_err());
    }

    #[test]
    fn flash_plan_takes_strided_views_and_rejects_misaligned_ones() {
        // (B, L, H*D) = (2, 100, 4*16) viewed as (B, H, L, D).
        let l = Layout::contiguous(Shape::from((2, 100, 4, 16)))
            .transpose(1, 2)
            .expect("t");
        let p = flash_attn(DType::BF16, &l, &l, &l, 0.25).expect("plan");
        assert_eq!(p.launch.kernel, "flash_attn_bf16_d16");
        assert_eq!(p.launch.grid, (2, 8, 1));
        assert_eq!(&p.launch.args[8..11], &[Arg::I64(6400), Arg::I64(16), Arg::I64(64)]);
        let odd = Layout::contiguous_with_offset(Shape::from((1, 1, 4, 16)), 4);
        assert!(flash_attn(DType::F16, &odd, &odd, &odd, 1.0).is_err());
    }
}
