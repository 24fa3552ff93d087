//! The demo model's config files, in the published formats (diffusers / transformers JSON), sized small enough to
//! generate a 256x256 image in seconds on a CPU.

use serde_json::{json, Value};

/// Hidden size of each demo text encoder (the UNet's context is their concatenation).
pub const TEXT_HIDDEN: usize = 32;
/// Width of the pooled / projected text and image vectors.
pub const PROJECTION_DIM: usize = 32;
/// Image tokens per subject of the demo adapter.
pub const NUM_TOKENS: usize = 4;

pub fn text_encoder(vocab_size: usize, act: &str, with_projection: bool) -> Value {
    json!({
        "architectures": [if with_projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "model_type": "clip_text_model", "hidden_act": act, "hidden_size": TEXT_HIDDEN, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 3, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
        "projection_dim": PROJECTION_DIM, "vocab_size": vocab_size, "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1, "pad_token_id": 1,
    })
}

pub fn image_encoder() -> Value {
    json!({
        "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", "hidden_act": "gelu",
        "hidden_size": 32, "image_size": 224, "intermediate_size": 64, "layer_norm_eps": 1e-5,
        "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 3, "patch_size": 32,
        "projection_dim": PROJECTION_DIM,
    })
}

pub fn preprocessor() -> Value {
    json!({
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": true, "do_convert_rgb": true,
        "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 224},
    })
}

pub fn unet() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 8, "attention_head_dim": [2, 4, 8],
        "block_out_channels": [32, 64, 128], "center_input_sample": false, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": 2 * TEXT_HIDDEN,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5,
        "norm_num_groups": 32, "num_attention_heads": null, "out_channels": 4,
        "projection_class_embeddings_input_dim": PROJECTION_DIM + 6 * 8, "resnet_time_scale_shift": "default",
        "sample_size": 32, "time_embedding_type": "positional", "transformer_layers_per_block": [1, 1, 2],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": true,
    })
}

pub fn vae() -> Value {
    json!({
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [32, 32, 64, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "force_upcast": true, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "mid_block_add_attention": true, "norm_num_groups": 32, "sample_size": 256, "scaling_factor": 0.13025,
        "shift_factor": null, "use_post_quant_conv": true, "use_quant_conv": true,
    })
}

pub fn scheduler() -> Value {
    json!({
        "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "final_sigmas_type": "zero", "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
        "timestep_type": "discrete", "use_karras_sigmas": false,
    })
}

pub fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": true,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// The demo's evaluation CLIP (`CLIPConfig`): tiny text and vision towers, ViT-B/32's patch size and input side.
pub fn eval_clip(vocab_size: usize) -> Value {
    json!({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu", "vocab_size": vocab_size,
            "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu"},
    })
}

/// The demo's evaluation DINO (`ViTConfig`): a tiny ViT with DINO ViT-S/16's patch size and input side.
pub fn eval_dino() -> Value {
    json!({
        "architectures": ["ViTModel"], "model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": true,
    })
}
