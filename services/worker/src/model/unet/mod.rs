//! The SDXL `UNet2DConditionModel` with MIP-Adapter weighted-merge cross-attention.
//!
//! Layout: [`config`] (config.json and the resolved per-block sizes), [`embeddings`] (timestep features,
//! `time_embedding`, SDXL `add_embedding`), [`resnet`] (ResnetBlock2D, Downsample2D, Upsample2D),
//! [`attention`] (Attention, GEGLU FeedForward, BasicTransformerBlock, Transformer2DModel), [`merge`] (the
//! weighted-merge cross-attention and its per-call conditioning), [`blocks`] (down / mid / up blocks), and
//! here the model itself.
//!
//! Weights: the UNet from diffusers keys (`conv_in`, `down_blocks.1.attentions.0...`), the adapter from a
//! separate var builder pointed at `ip_adapter` (`<k>.to_k_ip`, `<k>.to_v_ip`, `<k>.text_to_weight`, k odd,
//! numbered down blocks, then up blocks, then the mid block).

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod merge;
pub mod resnet;

#[cfg(test)]
mod tests;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::model::conv::{conv2d, Conv2d};
use crate::model::norm::{group_norm, GroupNormAct};

use attention::CrossContext;
use blocks::{AdapterCursor, BlockCommon, DownBlock, MidBlock, UpBlock};
use embeddings::UNetEmbeddings;

pub use config::{UNetConfig, UNetPlan};
pub use merge::{CaptureSlot, MergeCapture, MergeCond};

/// The adapter's weighted-merge weights: a var builder pointed at the checkpoint's `ip_adapter` prefix (usually
/// over its own `WeightSet`: `adapter_vb.pp("ip_adapter")`).
pub struct AdapterWeights<'a> {
    vb: VarBuilder<'a>,
}

impl<'a> AdapterWeights<'a> {
    pub fn new(vb: VarBuilder<'a>) -> Self {
        Self { vb }
    }
}

/// The conditioning of one UNet call.
#[derive(Debug, Clone)]
pub struct UNetCond {
    /// `(B, S, C)`: 77 text tokens, followed by N*T image tokens when `merge` is set.
    pub encoder_hidden_states: Tensor,
    /// `(B, pooled)`: pooled text embedding of text_encoder_2 (SDXL).
    pub text_embeds: Tensor,
    /// `(B, 6)`: `[h, w, crop top, crop left, target h, target w]` (SDXL).
    pub time_ids: Tensor,
    /// `None`: plain cross-attention over the whole context.
    pub merge: Option<MergeCond>,
}

/// diffusers `UNet2DConditionModel` (SDXL flavour) with optional weighted-merge adapter layers.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    embeddings: UNetEmbeddings,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNormAct,
    conv_out: Conv2d,
    num_processors: usize,
    has_adapter: bool,
}

fn conv_k(c_in: usize, c_out: usize, k: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    conv2d(c_in, c_out, k, 1, (k - 1) / 2, vb)
}

impl UNet2DConditionModel {
    /// Loads the UNet from `vb` (diffusers keys) and, with `adapter`, the weighted-merge weights of every `attn2`.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig, adapter: Option<AdapterWeights>) -> candle_core::Result<Self> {
        let plan = cfg.plan()?;
        let ch = &cfg.block_out_channels;
        let common = BlockCommon {
            temb_channels: plan.time_embed_dim,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            use_linear_projection: cfg.use_linear_projection,
        };
        let has_adapter = adapter.is_some();
        let mut cursor = AdapterCursor::new(adapter.map(|a| a.vb));
        // Adapter indices follow diffusers' processor order: down blocks, up blocks, then the mid block.
        let down_blocks = plan
            .down
            .iter()
            .enumerate()
            .map(|(i, p)| {
                DownBlock::new(
                    vb.pp("down_blocks").pp(i),
                    p,
                    common,
                    cfg.downsample_padding,
                    &mut cursor,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let up_blocks = plan
            .up
            .iter()
            .enumerate()
            .map(|(i, p)| UpBlock::new(vb.pp("up_blocks").pp(i), p, common, &mut cursor))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            &plan.mid,
            common,
            cfg.mid_block_scale_factor,
            &mut cursor,
        )?;
        Ok(Self {
            conv_in: conv_k(cfg.in_channels, ch[0], cfg.conv_in_kernel, vb.pp("conv_in"))?,
            embeddings: UNetEmbeddings::new(vb.clone(), cfg, plan.time_embed_dim)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(cfg.norm_num_groups, ch[0], cfg.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv_k(ch[0], cfg.out_channels, cfg.conv_out_kernel, vb.pp("conv_out"))?,
            num_processors: cursor.count(),
            has_adapter,
        })
    }

    /// The number of attention processors (twice the number of transformer blocks), i.e. the length of the
    /// adapter's `ip_adapter.<k>` numbering.
    pub fn num_attention_processors(&self) -> usize {
        self.num_processors
    }

    /// Whether weighted-merge adapter weights are loaded.
    pub fn has_adapter(&self) -> bool {
        self.has_adapter
    }

    /// Predicts the noise of `sample` `(B, C_in, H, W)` at `timestep`.
    pub fn forward(&self, sample: &Tensor, timestep: f64, cond: &UNetCond) -> candle_core::Result<Tensor> {
        let (batch, _, _, _) = sample.dims4()?;
        let ctx_batch = cond.encoder_hidden_states.dim(0)?;
        if ctx_batch != batch {
            candle_core::bail!("unet: encoder_hidden_states batch {ctx_batch} differs from the sample batch {batch}");
        }
        // Computed in the weights' dtype whatever the sample's.
        let dtype = self.conv_in.weight().dtype();
        let sample = &sample.to_dtype(dtype)?;
        let context = cond.encoder_hidden_states.to_dtype(dtype)?;
        let merge = match &cond.merge {
            Some(_) if !self.has_adapter => {
                candle_core::bail!("unet: a weighted merge was requested but no adapter weights are loaded")
            }
            Some(m) => Some(merge::PreparedMerge::new(m, &context)?),
            None => None,
        };
        let ctx = CrossContext {
            encoder_hidden_states: context,
            merge,
        };
        let temb = self.embeddings.forward(
            timestep,
            batch,
            &cond.text_embeds,
            &cond.time_ids,
            dtype,
            sample.device(),
        )?;

        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &temb, &ctx, &mut skips)?;
        }
        h = self.mid_block.forward(&h, &temb, &ctx)?;
        for block in &self.up_blocks {
            h = block.forward(&h, &temb, &ctx, &mut skips)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}
