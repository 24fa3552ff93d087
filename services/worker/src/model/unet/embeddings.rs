//! Time conditioning of the UNet: the sinusoidal timestep features (diffusers `get_timestep_embedding`), the
//! `time_embedding` MLP, and SDXL's `add_embedding` over `[text_embeds | features of the 6 time_ids]`.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};

use super::config::UNetConfig;

/// Sinusoidal features of `timesteps` (shape `(B,)`), computed in f32 like diffusers:
/// `freq_i = exp(-ln(10000) * i / (half - shift))`, `[sin(t f), cos(t f)]`, swapped to `[cos, sin]` when
/// `flip_sin_to_cos`, zero-padded to an odd `dim`. Returns `(B, dim)` in f32.
pub fn timestep_features(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let log_period = -(10000f64.ln() as f32);
    let denom = half as f32 - shift as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((log_period * i as f32) / denom).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[&cos, &sin], D::Minus1)?
    } else {
        Tensor::cat(&[&sin, &cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2
            .forward(&candle_nn::ops::silu(&self.linear_1.forward(xs)?)?)
    }
}

/// SDXL's `text_time` additional embedding: sizes and the MLP.
#[derive(Debug, Clone)]
struct AddEmbedding {
    time_dim: usize,
    mlp: TimestepEmbedding,
}

/// The UNet's `emb`: `time_embedding(features(t))` plus, for SDXL, `add_embedding([text_embeds | features(time_ids)])`.
#[derive(Debug, Clone)]
pub struct UNetEmbeddings {
    features_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<AddEmbedding>,
}

impl UNetEmbeddings {
    /// Loads `time_embedding.*` and (with `addition_embed_type: text_time`) `add_embedding.*` from the UNet root.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig, time_embed_dim: usize) -> candle_core::Result<Self> {
        let features_dim = cfg.block_out_channels[0];
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), features_dim, time_embed_dim)?;
        let add_embedding = match cfg.text_time()? {
            None => None,
            Some((time_dim, proj_dim)) => Some(AddEmbedding {
                time_dim,
                mlp: TimestepEmbedding::new(vb.pp("add_embedding"), proj_dim, time_embed_dim)?,
            }),
        };
        Ok(Self {
            features_dim,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            time_embedding,
            add_embedding,
        })
    }

    /// `emb` of shape `(B, time_embed_dim)` in `dtype`. `text_embeds` `(B, pooled)` and `time_ids` `(B, k)` are
    /// required for SDXL (`text_time`) and ignored otherwise.
    pub fn forward(
        &self,
        timestep: f64,
        batch: usize,
        text_embeds: &Tensor,
        time_ids: &Tensor,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = Tensor::full(timestep as f32, batch, device)?;
        let t_feat = timestep_features(&t, self.features_dim, self.flip_sin_to_cos, self.freq_shift)?;
        let emb = self.time_embedding.forward(&t_feat.to_dtype(dtype)?)?;
        let Some(add) = &self.add_embedding else {
            return Ok(emb);
        };
        let (b_ids, _) = time_ids.dims2()?;
        let (b_txt, _) = text_embeds.dims2()?;
        if b_ids != batch || b_txt != batch {
            candle_core::bail!(
                "unet: time_ids ({b_ids}) and text_embeds ({b_txt}) batch must equal the sample batch {batch}"
            );
        }
        let ids = time_ids.flatten_all()?;
        let ids_feat = timestep_features(&ids, add.time_dim, self.flip_sin_to_cos, self.freq_shift)?;
        let ids_feat = ids_feat.reshape((batch, ()))?;
        let add_in = Tensor::cat(&[&text_embeds.to_dtype(DType::F32)?, &ids_feat], D::Minus1)?;
        let aug = add.mlp.forward(&add_in.to_dtype(dtype)?)?;
        emb + aug
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_match_closed_form() {
        let t = Tensor::new(&[500f32, 1.0], &Device::Cpu).expect("t");
        let f = timestep_features(&t, 8, true, 0.0).expect("features");
        assert_eq!(f.dims(), &[2, 8]);
        let v = f.to_vec2::<f32>().expect("vec");
        // flip_sin_to_cos: first half cos, second half sin; freq_1 = 10000^(-1/4) = 0.1.
        assert!((v[0][0] - 500f32.cos()).abs() < 1e-5);
        assert!((v[0][4] - 500f32.sin()).abs() < 1e-5);
        assert!((v[1][1] - 0.1f32.cos()).abs() < 1e-6);
        assert!((v[1][5] - 0.1f32.sin()).abs() < 1e-6);
        let odd = timestep_features(&t, 7, false, 1.0).expect("odd");
        assert_eq!(odd.dims(), &[2, 7]);
    }
}
