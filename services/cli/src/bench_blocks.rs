//! Block profile for `mip bench --sdxl`: one `BasicTransformerBlock` at each attention level of the SDXL UNet
//! (4096 tokens x 640 channels, 1024 x 1280), plain and with the weighted merge, and one `ResnetBlock2D` at each
//! resolution (128² x 320, 64² x 640, 32² x 1280), with how many of each one UNet call runs. `count x ms` summed
//! against the measured UNet step shows where a step's time goes, and the merge's cost per block.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mip_worker::model::unet::attention::{BasicTransformerBlock, CrossContext};
use mip_worker::model::unet::merge::{MergeWeights, PreparedMerge};
use mip_worker::model::unet::resnet::{ResnetBlock2D, ResnetConfig};
use mip_worker::model::unet::MergeCond;
use serde_json::{json, Value};

use crate::bench_ops::{median_ms, rand};

/// Transformer levels: latent side, channels, heads, blocks per UNet call (down + mid + up).
const TRANSFORMERS: [(usize, usize, usize, usize); 2] = [(64, 640, 10, 10), (32, 1280, 20, 60)];
/// Resnet levels: latent side, channels, resnets per UNet call.
const RESNETS: [(usize, usize, usize); 3] = [(128, 320, 5), (64, 640, 5), (32, 1280, 7)];
/// Cross-attention width, time-embedding width, subjects and image tokens per subject of the SDXL bench.
const CROSS: usize = 2048;
const TEMB: usize = 1280;
const SUBJECTS: usize = 2;
const TOKENS: usize = 4;

/// Times the blocks with weights from `vb` (`tiny`: channels / 8, sides / 4).
pub fn block_profile(vb: &VarBuilder, dev: &Device, dt: DType, iters: usize, tiny: bool) -> Result<Value> {
    let (c_div, s_div, cross) = if tiny { (8, 4, 64) } else { (1, 1, CROSS) };
    let rand = |shape: &[usize]| rand(shape, dt, dev);
    let text = rand(&[2, 77, cross])?;
    let context = Tensor::cat(&[&text, &rand(&[2, SUBJECTS * TOKENS, cross])?], 1)?;
    let cond = MergeCond {
        entity_text_embeds: rand(&[2, SUBJECTS, 77, cross])?,
        entity_token_lens: (0..SUBJECTS).map(|i| 1 + i % 2).collect(),
        num_tokens: TOKENS,
        scale: 0.75,
        capture: None,
    };
    let mut res = serde_json::Map::new();
    let (mut sum_plain, mut sum_merge) = (0.0, 0.0);
    for (i, (side, c, heads, count)) in TRANSFORMERS.into_iter().enumerate() {
        let (side, c) = (side / s_div, c / c_div);
        let vbi = vb.pp(format!("profile_transformer_{i}"));
        let merge = MergeWeights::new(vbi.pp("ip"), c, cross)?;
        let block = BasicTransformerBlock::new(vbi, c, heads, cross, Some(merge))?;
        let xs = rand(&[2, side * side, c])?;
        let plain_ctx = CrossContext {
            encoder_hidden_states: text.clone(),
            merge: None,
        };
        let merge_ctx = CrossContext {
            encoder_hidden_states: context.clone(),
            merge: Some(PreparedMerge::new(&cond, &context)?),
        };
        let plain = median_ms(dev, iters, || Ok(block.forward(&xs, &plain_ctx)?))?;
        let merged = median_ms(dev, iters, || Ok(block.forward(&xs, &merge_ctx)?))?;
        sum_plain += plain * count as f64;
        sum_merge += merged * count as f64;
        res.insert(
            format!("transformer_block_{}tokens_{c}ch", side * side),
            json!({"plain_ms": plain, "merge_ms": merged, "count": count}),
        );
    }
    for (i, (side, c, count)) in RESNETS.into_iter().enumerate() {
        let (side, c) = (side / s_div, c / c_div);
        let temb_c = TEMB / c_div;
        let cfg = ResnetConfig {
            in_channels: c,
            out_channels: c,
            temb_channels: temb_c,
            groups: if tiny { 8 } else { 32 },
            eps: 1e-5,
            output_scale_factor: 1.0,
        };
        let block = ResnetBlock2D::new(vb.pp(format!("profile_resnet_{i}")), cfg)?;
        let (xs, temb) = (rand(&[2, c, side, side])?, rand(&[2, temb_c])?);
        let ms = median_ms(dev, iters, || Ok(block.forward(&xs, &temb)?))?;
        sum_plain += ms * count as f64;
        sum_merge += ms * count as f64;
        res.insert(format!("resnet_{side}x{side}_{c}ch"), json!({"ms": ms, "count": count}));
    }
    res.insert("sum_count_x_ms_plain".into(), json!(sum_plain));
    res.insert("sum_count_x_ms_merge".into(), json!(sum_merge));
    Ok(Value::Object(res))
}
