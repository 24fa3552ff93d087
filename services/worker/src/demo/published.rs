//! The configs of the published full-size models, field for field as their repositories ship them: SDXL base 1.0
//! (diffusers), the IP-Adapter image encoders (transformers `CLIPVisionModelWithProjection`: ViT-bigG/14 for the
//! `sdxl` adapters, ViT-H/14 for `sdxl_plus`). [`super::full_size`] writes random weights beside them.

use serde_json::{json, Value};

/// Vocabulary of the published CLIP tokenizers and text encoders.
pub const CLIP_VOCAB: usize = 49408;

pub fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
        "feature_extractor": [null, null], "force_zeros_for_empty_prompt": true, "image_encoder": [null, null],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

pub fn scheduler() -> Value {
    json!({
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null,
        "use_karras_sigmas": false,
    })
}

/// `text_encoder` (CLIP ViT-L/14 text) and `text_encoder_2` (OpenCLIP bigG text, with projection).
pub fn text_encoder(second: bool) -> Value {
    let (arch, act, hidden, inter, layers, heads, proj) = if second {
        ("CLIPTextModelWithProjection", "gelu", 1280, 5120, 32, 20, 1280)
    } else {
        ("CLIPTextModel", "quick_gelu", 768, 3072, 12, 12, 768)
    };
    json!({
        "architectures": [arch], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
        "hidden_act": act, "hidden_size": hidden, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": inter, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
        "model_type": "clip_text_model", "num_attention_heads": heads, "num_hidden_layers": layers, "pad_token_id": 1,
        "projection_dim": proj, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0",
        "vocab_size": CLIP_VOCAB,
    })
}

pub fn unet() -> Value {
    // Two halves: one `json!` of every field exceeds the macro's recursion limit.
    let mut v = json!({
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
        "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": false,
        "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": 2048, "cross_attention_norm": null,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null, "encoder_hid_dim_type": null,
        "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    });
    let rest = json!({
        "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": null, "num_class_embeds": null,
        "only_cross_attention": false, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false, "resnet_time_scale_shift": "default",
        "sample_size": 128, "time_cond_proj_dim": null, "time_embedding_act_fn": null, "time_embedding_dim": null,
        "time_embedding_type": "positional", "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": null,
        "use_linear_projection": true,
    });
    if let (Some(all), Value::Object(rest)) = (v.as_object_mut(), rest) {
        all.extend(rest);
    }
    v
}

pub fn vae() -> Value {
    json!({
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "force_upcast": true, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    })
}

/// The IP-Adapter image encoder: ViT-bigG/14 (`sdxl_models/image_encoder`) or ViT-H/14 (`models/image_encoder`).
pub fn image_encoder(vit_h: bool) -> Value {
    let (hidden, inter, layers, proj) = if vit_h {
        (1280, 5120, 32, 1024)
    } else {
        (1664, 8192, 48, 1280)
    };
    json!({
        "architectures": ["CLIPVisionModelWithProjection"], "attention_dropout": 0.0, "dropout": 0.0,
        "hidden_act": "gelu", "hidden_size": hidden, "image_size": 224, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": inter, "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": layers,
        "patch_size": 14, "projection_dim": proj, "torch_dtype": "float16", "transformers_version": "4.28.0.dev0",
    })
}
