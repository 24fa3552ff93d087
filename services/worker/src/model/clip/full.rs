//! transformers `CLIPModel` (the layout of `openai/clip-vit-base-patch32`): the text and vision towers with their
//! projections, as the CLIP-T and CLIP-I evaluation uses them. Both towers are our [`ClipTextModel`] and
//! [`ClipVisionModel`] over the one checkpoint; `logit_scale` is read (strict loading) and not used, as the
//! metrics are plain cosines.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::{ClipTextConfig, ClipTextModel, ClipVisionConfig, ClipVisionModel};

/// `CLIPModel`: `get_text_features` and `get_image_features`.
#[derive(Debug, Clone)]
pub struct ClipModel {
    text: ClipTextModel,
    vision: ClipVisionModel,
}

impl ClipModel {
    /// Builds both towers from the checkpoint root (`text_model.*`, `vision_model.*`, `text_projection.weight`,
    /// `visual_projection.weight`, `logit_scale`).
    pub fn new(vb: VarBuilder, text: &ClipTextConfig, vision: &ClipVisionConfig) -> Result<Self> {
        if vb.contains_tensor("logit_scale") {
            vb.get_with_hints_dtype((), "logit_scale", Default::default(), DType::F32)?;
        }
        Ok(Self {
            text: ClipTextModel::new(vb.clone(), text, true)?,
            vision: ClipVisionModel::new(vb, vision)?,
        })
    }

    /// `text_projection(final_layer_norm(last)[eos])` for `input_ids` (B, S) u32: (B, P), not normalised.
    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        match self.text.forward(input_ids)?.pooled {
            Some(p) => Ok(p),
            None => candle_core::bail!("CLIP text tower without a projection"),
        }
    }

    /// `visual_projection(post_layernorm(last[:, 0]))` for `pixel_values` (B, 3, S, S): (B, P), not normalised.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.vision.forward(pixel_values)?.image_embeds)
    }

    /// The vision tower's input side.
    pub fn image_size(&self) -> usize {
        self.vision.config().image_size
    }
}
