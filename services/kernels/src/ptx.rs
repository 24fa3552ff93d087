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
