//! The PTX that `build.rs` compiled from `cuda/*.cu`, embedded in the binary (loaded once per device by name).

/// Module name and PTX of the fused attention kernels.
pub const FLASH_ATTN: (&str, &str) = (
    "mip_flash_attn",
    include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx")),
);
/// Module name and PTX of the GroupNorm kernels.
pub const GROUP_NORM: (&str, &str) = (
    "mip_group_norm",
    include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx")),
);
/// Module name and PTX of the im2col kernels.
pub const IM2COL: (&str, &str) = ("mip_im2col", include_str!(concat!(env!("OUT_DIR"), "/im2col.ptx")));
