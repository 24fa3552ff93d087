//! The DINO evaluation model: transformers' `ViTModel` (the layout of `facebook/dino-vits16`), whose feature is the
//! class token of the last hidden state after the final layer norm. Patch embedding (a strided convolution with
//! bias), a learned class token and position table, the pre-norm encoder shared with CLIP (ViT's key names,
//! [`VIT_KEYS`]), and `layernorm`. A `pooler.dense` present in the checkpoint is read (so strict loading passes)
//! and not used, as the evaluation does not use it.

use std::path::Path;

use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use serde::Deserialize;

use super::clip::{add_positions, class_and_patches, Activation, Encoder, EncoderDims, LayerNorm32, VIT_KEYS};
use crate::error::{ModelError, Result as ModelResult};

fn gelu() -> Activation {
    Activation::Gelu
}
fn eps() -> f64 {
    1e-12
}
fn yes() -> bool {
    true
}
fn three() -> usize {
    3
}

/// `config.json` of a `ViTModel` (unknown fields ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VitConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: Activation,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
}

impl VitConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> ModelResult<Self> {
        let cfg: Self = crate::model::weights::read_json(path)?;
        let err = |message: &str| ModelError::Config {
            path: path.to_owned(),
            message: message.to_owned(),
        };
        if cfg.hidden_size.checked_rem(cfg.num_attention_heads) != Some(0) {
            return Err(err("`hidden_size` must be a multiple of `num_attention_heads`"));
        }
        if cfg.image_size.checked_rem(cfg.patch_size) != Some(0) {
            return Err(err("`image_size` must be a multiple of `patch_size`"));
        }
        if !cfg.qkv_bias {
            return Err(err("`qkv_bias: false` is not supported"));
        }
        Ok(cfg)
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// transformers `ViTModel`, up to the final layer norm.
#[derive(Debug, Clone)]
pub struct VitModel {
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch_embedding: Conv2d,
    encoder: Encoder,
    layernorm: LayerNorm32,
    cfg: VitConfig,
}

impl VitModel {
    /// Builds the model from `vb` (the root of the checkpoint: `embeddings.*`, `encoder.layer.*`, `layernorm.*`).
    pub fn new(vb: VarBuilder, cfg: &VitConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        let positions = cfg.grid() * cfg.grid() + 1;
        let emb = vb.pp("embeddings");
        let proj = emb.pp("patch_embeddings.projection");
        let patch_embedding = Conv2d::new(
            proj.get((h, cfg.num_channels, p, p), "weight")?,
            Some(proj.get(h, "bias")?),
            Conv2dConfig {
                stride: p,
                ..Default::default()
            },
        );
        let dims = EncoderDims {
            hidden: h,
            intermediate: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        if vb.contains_tensor("pooler.dense.weight") {
            vb.get((h, h), "pooler.dense.weight")?;
            vb.get(h, "pooler.dense.bias")?;
        }
        Ok(Self {
            cls_token: emb.get((1, 1, h), "cls_token")?,
            position_embeddings: emb.get((1, positions, h), "position_embeddings")?.squeeze(0)?,
            patch_embedding,
            encoder: Encoder::with_keys(vb.pp("encoder"), &dims, &VIT_KEYS)?,
            layernorm: LayerNorm32::new(h, cfg.layer_norm_eps, vb.pp("layernorm"))?,
            cfg: cfg.clone(),
        })
    }

    /// The config the model was built with.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// `layernorm(encoder(embeddings))` for `pixel_values` (B, C, S, S): (B, 1 + N, H).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let x = class_and_patches(
            pixel_values,
            &self.patch_embedding,
            &self.cls_token,
            cfg.num_channels,
            cfg.image_size,
            "ViT",
        )?;
        let x = add_positions(&x, &self.position_embeddings)?;
        let (last, _) = self.encoder.forward(&x, None)?;
        self.layernorm.forward(&last)
    }

    /// The DINO feature: the class token of [`Self::forward`], (B, H).
    pub fn cls_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward(pixel_values)?.i((.., 0))
    }
}
