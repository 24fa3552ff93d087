//! Shared helpers of the integration tests: the fixture folder and a pipeline loaded from it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use mip_worker::parity::fixtures_dir;
use mip_worker::pipeline::{GenerateRequest, MipPipeline, ModelSpec, SubjectRequest};

/// The fixture folder, or a panic telling how to point at it.
pub fn fixtures() -> PathBuf {
    fixtures_dir().unwrap_or_else(|e| panic!("{e}"))
}

/// The `sdxl` variant of the fixture model.
pub fn sdxl_spec(dir: &Path) -> ModelSpec {
    ModelSpec {
        base: dir.join("sdxl"),
        image_encoder: dir.join("image_encoder"),
        adapter: dir.join("adapter/mip_sdxl_2obj.safetensors"),
        resampler: None,
        default_size: None,
        eval: None,
    }
}

pub fn load_sdxl() -> MipPipeline {
    MipPipeline::load(&sdxl_spec(&fixtures()), &Device::Cpu, DType::F32).expect("fixture model loads")
}

/// A reference image of the `sdxl_two_objects` case.
pub fn ref_image(name: &str) -> Vec<u8> {
    let path = fixtures().join("cases/sdxl_two_objects/refs").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn subject(name: &str, image: &str) -> SubjectRequest {
    SubjectRequest {
        name: name.into(),
        images: vec![ref_image(image)],
    }
}

/// A small valid request with the given subjects.
pub fn request(subjects: Vec<SubjectRequest>) -> GenerateRequest {
    GenerateRequest {
        prompt: "a cat wearing a jacket next to a dog".into(),
        negative_prompt: Some("low quality".into()),
        subjects,
        width: 128,
        height: 128,
        steps: 3,
        seed: Some(7),
        ..Default::default()
    }
}
