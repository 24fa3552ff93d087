//! The CLIP image encoder of IP-Adapter (`CLIPVisionModelWithProjection`): patch embedding (conv, no bias) with a
//! class token, `pre_layrnorm` (sic), the encoder, `post_layernorm` on the class token and `visual_projection`.
//! `image_embeds` feeds the plain IP-Adapter projection; `hidden_states[-2]` feeds the plus Resampler.

use candle_core::{DType, IndexOp, Module, Result, Tensor};
use candle_nn::{linear_no_bias, Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::{add_positions, class_and_patches, ClipVisionConfig, Encoder, EncoderDims, LayerNorm32};

/// What one forward pass of the image encoder returns.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// `visual_projection(post_layernorm(last[:, 0]))`: (B, P).
    pub image_embeds: Tensor,
    /// `hidden_states[-2]`: (B, 1 + patches, H).
    pub penultimate: Tensor,
}

/// `CLIPVisionModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm32,
    encoder: Encoder,
    post_layernorm: LayerNorm32,
    visual_projection: Linear,
    cfg: ClipVisionConfig,
}

impl ClipVisionModel {
    /// Builds the model from `vb` (the root of the checkpoint: `vision_model.*`, `visual_projection.weight`).
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        let positions = cfg.grid() * cfg.grid() + 1;
        let weight = emb.get((h, cfg.num_channels, p, p), "patch_embedding.weight")?;
        let conv_cfg = Conv2dConfig {
            stride: p,
            ..Default::default()
        };
        if emb.contains_tensor("position_ids") {
            // A buffer of older checkpoints (arange): consumed, not needed.
            emb.get_unchecked_dtype("position_ids", DType::F32)?;
        }
        let dims = EncoderDims {
            hidden: h,
            intermediate: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        Ok(Self {
            class_embedding: emb.get(h, "class_embedding")?,
            patch_embedding: Conv2d::new(weight, None, conv_cfg),
            position_embedding: emb.get((positions, h), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm32::new(h, cfg.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            encoder: Encoder::new(vm.pp("encoder"), &dims)?,
            post_layernorm: LayerNorm32::new(h, cfg.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection: linear_no_bias(h, cfg.projection_dim, vb.pp("visual_projection"))?,
            cfg: cfg.clone(),
        })
    }

    /// The config the model was built with.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// Class token + patch embeddings + positions, then `pre_layrnorm`: the encoder's input (B, 1 + N, H).
    fn embed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (cfg, what) = (&self.cfg, "image encoder");
        let x = class_and_patches(
            pixel_values,
            &self.patch_embedding,
            &self.class_embedding,
            cfg.num_channels,
            cfg.image_size,
            what,
        )?;
        self.pre_layrnorm.forward(&add_positions(&x, &self.position_embedding)?)
    }

    /// Both outputs for `pixel_values` (B, C, S, S).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let x = self.embed(pixel_values)?;
        let (last, penultimate) = self.encoder.forward(&x, None)?;
        let pooled = self.post_layernorm.forward(&last.i((.., 0))?)?;
        Ok(ClipVisionOutput {
            image_embeds: self.visual_projection.forward(&pooled)?,
            penultimate,
        })
    }

    /// Only `hidden_states[-2]` (skips the last layer): what the plus Resampler consumes.
    pub fn penultimate_hidden_states(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.embed(pixel_values)?;
        let n = self.cfg.num_hidden_layers;
        self.encoder.forward_n(&x, None, n.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::{find_weights, WeightSet};
    use crate::parity::{compare, fixtures_dir, Tolerance};
    use candle_core::Device;
    use std::sync::Arc;

    /// Loads `image_encoder` or `image_encoder_plus` strictly.
    pub(crate) fn load(folder: &str) -> ClipVisionModel {
        let dir = fixtures_dir().expect("fixtures").join(folder);
        let cfg = ClipVisionConfig::from_file(&dir.join("config.json")).expect("config");
        let ws = Arc::new(WeightSet::from_safetensors(&find_weights(&dir, &["model"]).expect("w")).expect("ws"));
        let m = ws
            .build(DType::F32, &Device::Cpu, |vb| ClipVisionModel::new(vb, &cfg))
            .expect("build");
        ws.ensure_all_used().expect("strict");
        m
    }

    #[test]
    fn image_embeds_and_penultimate_states() {
        let root = fixtures_dir().expect("fixtures").join("cases");
        let t = |case: &str| {
            candle_core::safetensors::load(root.join(case).join("tensors.safetensors"), &Device::Cpu).expect("t")
        };
        let mut checks = Vec::new();
        let want = t("sdxl_two_objects");
        let out = load("image_encoder")
            .forward(&want["ref.pixel_values"])
            .expect("forward");
        checks.push(compare(
            "ref.image_embeds",
            &out.image_embeds,
            &want["ref.image_embeds"],
            Tolerance::MODEL,
        ));

        let want = t("sdxl_plus_two_objects_multi_ref");
        let enc = load("image_encoder_plus");
        let px = &want["ref.pixel_values"];
        let out = enc.forward(px).expect("forward");
        let key = "ref.penultimate_hidden_states";
        checks.push(compare(key, &out.penultimate, &want[key], Tolerance::MODEL));
        let only = enc.penultimate_hidden_states(px).expect("penultimate");
        checks.push(compare(
            "penultimate_hidden_states (short path)",
            &only,
            &want[key],
            Tolerance::MODEL,
        ));
        let zeros = px.zeros_like().expect("zeros").narrow(0, 0, 2).expect("narrow");
        let key = "ref.uncond_penultimate_hidden_states";
        let got = enc.penultimate_hidden_states(&zeros).expect("uncond");
        checks.push(compare(key, &got, &want[key], Tolerance::MODEL));
        for c in &checks {
            println!("{}", c.line());
        }
        for c in &checks {
            assert!(c.ok, "{}", c.line());
        }
    }

    #[test]
    fn rejects_wrong_image_size() {
        let enc = load("image_encoder");
        let px = Tensor::zeros((1, 3, 200, 200), DType::F32, &Device::Cpu).expect("zeros");
        assert!(enc.forward(&px).is_err());
    }
}
