//! `unet/config.json` of a diffusers `UNet2DConditionModel`, and the per-block sizes derived from it.
//!
//! The published SDXL config uses a few legacy spellings: `attention_head_dim` holds the number of *heads* per
//! block when `num_attention_heads` is null; `transformer_layers_per_block` is an int or a per-down-block list
//! (up blocks use it reversed); several fields are either one value or one value per block. [`UNetConfig::plan`]
//! resolves all of that into a [`UNetPlan`] with explicit per-block numbers.

use serde::Deserialize;

/// One value for every block, or one value per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The per-block values for `n` blocks; a list must have exactly `n` entries.
    pub fn per_block(&self, n: usize, field: &str) -> candle_core::Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Many(v) if v.len() == n => Ok(v.clone()),
            Self::Many(v) => candle_core::bail!("unet config `{field}` has {} entries, expected {n}", v.len()),
        }
    }
}

/// Per-up-block transformer depths: one int per up block, or one list (per attention) per up block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum LayersPerUpBlock {
    Flat(Vec<usize>),
    Nested(Vec<Vec<usize>>),
}

fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_one() -> f64 {
    1.0
}
fn default_kernel() -> usize {
    3
}
fn default_padding() -> usize {
    1
}
fn default_true() -> bool {
    true
}

/// The fields of `unet/config.json` this implementation reads (unknown fields are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    pub layers_per_block: OneOrMany<usize>,
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "default_layers")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<LayersPerUpBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default = "default_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_padding")]
    pub downsample_padding: usize,
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    pub dual_cross_attention: Option<bool>,
    #[serde(default)]
    pub act_fn: Option<String>,
}

fn default_layers() -> OneOrMany<usize> {
    OneOrMany::One(1)
}

/// The sizes of one down or up block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockPlan {
    /// Whether the block has transformers after its resnets.
    pub cross_attn: bool,
    /// (in, out) channels of each resnet (an up block's `in` already includes the skip connection).
    pub resnets: Vec<(usize, usize)>,
    /// Transformer depth of each attention (empty for blocks without cross-attention).
    pub layers: Vec<usize>,
    pub heads: usize,
    pub cross_attention_dim: usize,
    pub out_channels: usize,
    /// Down blocks: a stride-2 conv at the end; up blocks: a nearest x2 upsample + conv at the end.
    pub resample: bool,
}

/// The resolved architecture: per-block numbers, no more legacy spellings.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetPlan {
    pub down: Vec<BlockPlan>,
    pub mid: BlockPlan,
    pub up: Vec<BlockPlan>,
    /// Channels of the time embedding (`block_out_channels[0] * 4` unless set).
    pub time_embed_dim: usize,
}

impl UNetConfig {
    /// Checks the features this implementation supports and derives the per-block sizes.
    pub fn plan(&self) -> candle_core::Result<UNetPlan> {
        self.check_supported()?;
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!(
                "unet config: block_out_channels, down_block_types and up_block_types must have equal, non-zero length"
            );
        }
        let heads = match &self.num_attention_heads {
            Some(h) => h.per_block(n, "num_attention_heads")?,
            None => self.attention_head_dim.per_block(n, "attention_head_dim")?,
        };
        let layers_per_block = self.layers_per_block.per_block(n, "layers_per_block")?;
        let tlayers = self
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?;
        let xdim = self.cross_attention_dim.per_block(n, "cross_attention_dim")?;
        let ch = &self.block_out_channels;

        let mut down = Vec::with_capacity(n);
        let mut prev = ch[0];
        for i in 0..n {
            let cross_attn = is_cross(&self.down_block_types[i], "Down")?;
            let out = ch[i];
            let resnets = (0..layers_per_block[i])
                .map(|j| (if j == 0 { prev } else { out }, out))
                .collect();
            let layers = if cross_attn {
                vec![tlayers[i]; layers_per_block[i]]
            } else {
                vec![]
            };
            down.push(BlockPlan {
                cross_attn,
                resnets,
                layers,
                heads: heads[i],
                cross_attention_dim: xdim[i],
                out_channels: out,
                resample: i + 1 < n,
            });
            prev = out;
        }

        let mid_type = self.mid_block_type.as_deref().unwrap_or("UNetMidBlock2DCrossAttn");
        if mid_type != "UNetMidBlock2DCrossAttn" {
            candle_core::bail!("unet config: unsupported mid_block_type `{mid_type}`");
        }
        let top = ch[n - 1];
        let mid = BlockPlan {
            cross_attn: true,
            resnets: vec![(top, top); 2],
            layers: vec![tlayers[n - 1]],
            heads: heads[n - 1],
            cross_attention_dim: xdim[n - 1],
            out_channels: top,
            resample: false,
        };

        let up = self.plan_up(&heads, &layers_per_block, &tlayers, &xdim)?;
        Ok(UNetPlan {
            down,
            mid,
            up,
            time_embed_dim: self.time_embedding_dim.unwrap_or(ch[0] * 4),
        })
    }

    fn plan_up(
        &self,
        heads: &[usize],
        layers_per_block: &[usize],
        tlayers: &[usize],
        xdim: &[usize],
    ) -> candle_core::Result<Vec<BlockPlan>> {
        let n = self.block_out_channels.len();
        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let (rch, rheads, rlpb, rxdim) = (
            rev(&self.block_out_channels),
            rev(heads),
            rev(layers_per_block),
            rev(xdim),
        );
        let rtl = rev(tlayers);
        let mut up = Vec::with_capacity(n);
        let mut prev_out = rch[0];
        for i in 0..n {
            let cross_attn = is_cross(&self.up_block_types[i], "Up")?;
            let out = rch[i];
            let input = rch[(i + 1).min(n - 1)];
            let count = rlpb[i] + 1;
            let resnets = (0..count)
                .map(|j| {
                    let skip = if j == count - 1 { input } else { out };
                    let res_in = if j == 0 { prev_out } else { out };
                    (res_in + skip, out)
                })
                .collect();
            let layers = match (&self.reverse_transformer_layers_per_block, cross_attn) {
                (_, false) => vec![],
                (None, true) => vec![rtl[i]; count],
                (Some(LayersPerUpBlock::Flat(v)), true) => vec![*get(v, i)?; count],
                (Some(LayersPerUpBlock::Nested(v)), true) => {
                    let l = get(v, i)?.clone();
                    if l.len() != count {
                        candle_core::bail!(
                            "unet config: reverse_transformer_layers_per_block[{i}] needs {count} entries"
                        );
                    }
                    l
                }
            };
            up.push(BlockPlan {
                cross_attn,
                resnets,
                layers,
                heads: rheads[i],
                cross_attention_dim: rxdim[i],
                out_channels: out,
                resample: i + 1 < n,
            });
            prev_out = out;
        }
        Ok(up)
    }

    fn check_supported(&self) -> candle_core::Result<()> {
        let unsupported = |what: &str| candle_core::bail!("unet config: unsupported {what}");
        if self.class_embed_type.is_some() {
            return unsupported("class_embed_type");
        }
        if self.encoder_hid_dim_type.is_some() {
            return unsupported("encoder_hid_dim_type");
        }
        if self.resnet_time_scale_shift.as_deref().is_some_and(|s| s != "default") {
            return unsupported("resnet_time_scale_shift");
        }
        if self.time_embedding_type.as_deref().is_some_and(|s| s != "positional") {
            return unsupported("time_embedding_type");
        }
        if self.time_embedding_act_fn.is_some() {
            return unsupported("time_embedding_act_fn");
        }
        if self.act_fn.as_deref().is_some_and(|s| s != "silu") {
            return unsupported("act_fn");
        }
        if self.dual_cross_attention == Some(true) {
            return unsupported("dual_cross_attention");
        }
        let only_cross = match &self.only_cross_attention {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Array(a)) => a.iter().any(|v| v.as_bool() == Some(true)),
            Some(_) => true,
        };
        if only_cross {
            return unsupported("only_cross_attention");
        }
        match self.addition_embed_type.as_deref() {
            None | Some("text_time") => Ok(()),
            Some(other) => {
                candle_core::bail!("unet config: unsupported addition_embed_type `{other}`")
            }
        }
    }

    /// `(addition_time_embed_dim, projection_class_embeddings_input_dim)` when `addition_embed_type` is
    /// `text_time` (SDXL), else `None`.
    pub fn text_time(&self) -> candle_core::Result<Option<(usize, usize)>> {
        if self.addition_embed_type.as_deref() != Some("text_time") {
            return Ok(None);
        }
        match (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) {
            (Some(t), Some(p)) => Ok(Some((t, p))),
            _ => candle_core::bail!(
                "unet config: text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim"
            ),
        }
    }
}

fn get<T>(v: &[T], i: usize) -> candle_core::Result<&T> {
    v.get(i).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "unet config: reverse_transformer_layers_per_block has no entry {i}"
        ))
    })
}

fn is_cross(block_type: &str, dir: &str) -> candle_core::Result<bool> {
    if block_type == format!("CrossAttn{dir}Block2D") {
        Ok(true)
    } else if block_type == format!("{dir}Block2D") {
        Ok(false)
    } else {
        candle_core::bail!("unet config: unsupported block type `{block_type}`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl_base() -> UNetConfig {
        let json = r#"{
            "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": 2,
            "attention_head_dim": [5, 10, 20], "num_attention_heads": null, "cross_attention_dim": 2048,
            "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "flip_sin_to_cos": true, "freq_shift": 0,
            "norm_num_groups": 32, "norm_eps": 1e-5, "only_cross_attention": false
        }"#;
        serde_json::from_str(json).expect("config")
    }

    #[test]
    fn sdxl_base_plan() {
        let plan = sdxl_base().plan().expect("plan");
        assert_eq!(plan.time_embed_dim, 1280);
        assert_eq!(plan.down[2].layers, vec![10, 10]);
        assert_eq!(plan.down[2].heads, 20);
        assert!(!plan.down[2].resample && plan.down[0].resample);
        assert_eq!(plan.down[1].resnets, vec![(320, 640), (640, 640)]);
        assert_eq!(plan.mid.layers, vec![10]);
        assert_eq!(plan.up[0].layers, vec![10, 10, 10]);
        assert_eq!(plan.up[0].resnets, vec![(2560, 1280), (2560, 1280), (1920, 1280)]);
        assert_eq!(plan.up[1].resnets, vec![(1920, 640), (1280, 640), (960, 640)]);
        assert_eq!(plan.up[2].resnets, vec![(960, 320), (640, 320), (640, 320)]);
        assert!(!plan.up[2].cross_attn && plan.up[2].layers.is_empty());
        // SDXL base has 70 transformer blocks (140 attention processors in the IP-Adapter checkpoints).
        let blocks: usize = plan
            .down
            .iter()
            .chain(&plan.up)
            .chain([&plan.mid])
            .flat_map(|b| &b.layers)
            .sum();
        assert_eq!(blocks, 70);
    }

    #[test]
    fn list_length_mismatch_is_an_error() {
        let mut cfg = sdxl_base();
        cfg.transformer_layers_per_block = OneOrMany::Many(vec![1, 2]);
        assert!(cfg.plan().is_err());
    }
}
