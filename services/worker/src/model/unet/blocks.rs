//! The UNet's down, mid and up blocks (`DownBlock2D` / `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `UpBlock2D` / `CrossAttnUpBlock2D`), built from a resolved [`BlockPlan`], and the cursor that hands out the
//! adapter's `ip_adapter.<k>` weights in diffusers' processor order.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::attention::{CrossContext, Transformer2DModel, TransformerConfig};
use super::config::BlockPlan;
use super::merge::MergeWeights;
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};

/// Hands out adapter weights in the order diffusers numbers attention processors: every transformer block
/// takes two indices (`attn1`, then `attn2`); only `attn2` (the odd one) has weights.
pub struct AdapterCursor<'a> {
    vb: Option<VarBuilder<'a>>,
    next: usize,
}

impl<'a> AdapterCursor<'a> {
    /// `vb` points at the adapter's `ip_adapter` prefix; `None` for a plain UNet.
    pub fn new(vb: Option<VarBuilder<'a>>) -> Self {
        Self { vb, next: 0 }
    }

    /// The weights of the next transformer block's `attn2`.
    pub fn next_block(&mut self, hidden: usize, context_dim: usize) -> candle_core::Result<Option<MergeWeights>> {
        let k = self.next + 1;
        self.next += 2;
        match &self.vb {
            Some(vb) => Ok(Some(MergeWeights::new(vb.pp(k), hidden, context_dim)?)),
            None => Ok(None),
        }
    }

    /// The number of attention processors counted so far.
    pub fn count(&self) -> usize {
        self.next
    }
}

/// Shared numbers every block needs.
#[derive(Debug, Clone, Copy)]
pub struct BlockCommon {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub use_linear_projection: bool,
}

/// Resnets and (optional) transformers of one block.
#[derive(Debug, Clone)]
struct Layers {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl Layers {
    fn new(
        vb: &VarBuilder,
        plan: &BlockPlan,
        common: BlockCommon,
        output_scale_factor: f64,
        cursor: &mut AdapterCursor,
    ) -> candle_core::Result<Self> {
        let resnets = plan
            .resnets
            .iter()
            .enumerate()
            .map(|(j, &(in_channels, out_channels))| {
                let cfg = ResnetConfig {
                    in_channels,
                    out_channels,
                    temb_channels: common.temb_channels,
                    groups: common.groups,
                    eps: common.eps,
                    output_scale_factor,
                };
                ResnetBlock2D::new(vb.pp("resnets").pp(j), cfg)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut attentions = Vec::with_capacity(plan.layers.len());
        for (j, &layers) in plan.layers.iter().enumerate() {
            let cfg = TransformerConfig {
                channels: plan.out_channels,
                heads: plan.heads,
                layers,
                context_dim: plan.cross_attention_dim,
                groups: common.groups,
                use_linear_projection: common.use_linear_projection,
            };
            let merges = (0..layers)
                .map(|_| cursor.next_block(plan.out_channels, plan.cross_attention_dim))
                .collect::<candle_core::Result<Vec<_>>>()?;
            attentions.push(Transformer2DModel::new(vb.pp("attentions").pp(j), cfg, merges)?);
        }
        Ok(Self { resnets, attentions })
    }

    /// Resnet `j`, then transformer `j` when there is one.
    fn step(&self, j: usize, xs: &Tensor, temb: &Tensor, ctx: &CrossContext) -> candle_core::Result<Tensor> {
        let h = self.resnets[j].forward(xs, temb)?;
        match self.attentions.get(j) {
            Some(attn) => attn.forward(&h, ctx),
            None => Ok(h),
        }
    }
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`.
#[derive(Debug, Clone)]
pub struct DownBlock {
    layers: Layers,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(
        vb: VarBuilder,
        plan: &BlockPlan,
        common: BlockCommon,
        downsample_padding: usize,
        cursor: &mut AdapterCursor,
    ) -> candle_core::Result<Self> {
        let layers = Layers::new(&vb, plan, common, 1.0, cursor)?;
        let downsampler = if plan.resample {
            Some(Downsample2D::new(
                vb.pp("downsamplers").pp(0),
                plan.out_channels,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self { layers, downsampler })
    }

    /// Runs the block, pushing every intermediate output (the skip connections) onto `skips`.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &CrossContext,
        skips: &mut Vec<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut h = xs.clone();
        for j in 0..self.layers.resnets.len() {
            h = self.layers.step(j, &h, temb, ctx)?;
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
pub struct MidBlock {
    layers: Layers,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        plan: &BlockPlan,
        common: BlockCommon,
        output_scale_factor: f64,
        cursor: &mut AdapterCursor,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            layers: Layers::new(&vb, plan, common, output_scale_factor, cursor)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor, ctx: &CrossContext) -> candle_core::Result<Tensor> {
        let mut h = self.layers.resnets[0].forward(xs, temb)?;
        for (attn, resnet) in self.layers.attentions.iter().zip(&self.layers.resnets[1..]) {
            h = attn.forward(&h, ctx)?;
            h = resnet.forward(&h, temb)?;
        }
        Ok(h)
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    layers: Layers,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn new(
        vb: VarBuilder,
        plan: &BlockPlan,
        common: BlockCommon,
        cursor: &mut AdapterCursor,
    ) -> candle_core::Result<Self> {
        let layers = Layers::new(&vb, plan, common, 1.0, cursor)?;
        let upsampler = if plan.resample {
            Some(Upsample2D::new(vb.pp("upsamplers").pp(0), plan.out_channels)?)
        } else {
            None
        };
        Ok(Self { layers, upsampler })
    }

    /// Runs the block, popping one skip connection per resnet (concatenated after `xs` on channels); the
    /// upsampler resizes to the spatial size of the next skip left on the stack.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &CrossContext,
        skips: &mut Vec<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut h = xs.clone();
        for j in 0..self.layers.resnets.len() {
            let Some(skip) = skips.pop() else {
                candle_core::bail!("unet: ran out of skip connections");
            };
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = self.layers.step(j, &h, temb, ctx)?;
        }
        if let Some(up) = &self.upsampler {
            let size = match skips.last() {
                Some(s) => {
                    let (_, _, sh, sw) = s.dims4()?;
                    Some((sh, sw))
                }
                None => None,
            };
            h = up.forward(&h, size)?;
        }
        Ok(h)
    }
}
