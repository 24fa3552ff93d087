//! Scoring while serving: both evaluation models behind one [`Scorer`], the reference features of a subject as
//! one cache value ([`ReferenceFeatures`]), and the scores of one generated image ([`ImageScores`]) computed as
//! `mip eval` computes them from the saved PNG (the image is scored from the very 8-bit pixels the PNG holds).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::metrics::{clip_t, mean, set_similarity};
use super::preprocess::{CLIP_EVAL, DINO_EVAL};
use super::{ClipEval, DinoEval};
use crate::error::{ForwardContext, ModelError, Result};
use crate::pipeline::embedding;
use crate::pipeline::image_decode::{decode_rgb_with, Alpha, RgbImage};

/// One image prepared for both models: CLIP's and DINO's normalised (3, 224, 224) tensors, on the CPU.
#[derive(Debug, Clone)]
pub struct EvalPixels {
    pub clip: Tensor,
    pub dino: Tensor,
}

impl EvalPixels {
    /// Both transforms of one decoded image; `field` names it in errors.
    pub fn of(img: &RgbImage, field: &str) -> Result<Self> {
        Ok(Self {
            clip: CLIP_EVAL.tensor_of(img, field)?,
            dino: DINO_EVAL.tensor_of(img, field)?,
        })
    }

    /// Decodes `bytes` once (alpha dropped, as `convert("RGB")`) for both transforms.
    pub fn decode(bytes: &[u8], field: &str, max_pixels: u64) -> Result<Self> {
        Self::of(&decode_rgb_with(bytes, field, max_pixels, Alpha::Drop)?, field)
    }
}

/// A subject's reference images as the scores need them: one CLIP and one DINO feature row per image.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceFeatures {
    pub clip: Vec<Vec<f32>>,
    pub dino: Vec<Vec<f32>>,
}

impl ReferenceFeatures {
    /// The cache value: an f32 tensor `[N, Pc + Pd]`, each row an image's CLIP features then its DINO features.
    pub fn to_value(&self) -> Result<Vec<u8>> {
        let rows: Vec<f32> = self
            .clip
            .iter()
            .zip(&self.dino)
            .flat_map(|(c, d)| c.iter().chain(d).copied())
            .collect();
        let width = self.clip.first().map_or(0, Vec::len) + self.dino.first().map_or(0, Vec::len);
        Tensor::from_vec(rows, (self.clip.len(), width), &Device::Cpu)
            .and_then(|t| embedding::encode(&t))
            .stage("reference features")
    }

    /// Reads a cache value written for feature widths `dims` = (Pc, Pd); `None` when it does not decode or has
    /// another shape.
    pub fn from_value(bytes: &[u8], dims: (usize, usize)) -> Option<Self> {
        let t = embedding::decode(bytes, &Device::Cpu).ok()?;
        let (n, width) = t.dims2().ok()?;
        if n == 0 || width != dims.0 + dims.1 {
            return None;
        }
        let rows = t.to_dtype(DType::F32).ok()?.to_vec2::<f32>().ok()?;
        let (clip, dino) = rows
            .into_iter()
            .map(|r| (r[..dims.0].to_vec(), r[dims.0..].to_vec()))
            .unzip();
        Some(Self { clip, dino })
    }
}

/// One subject's similarity to its own references.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectScore {
    pub name: String,
    pub clip_i: f64,
    pub dino: f64,
}

/// The scores of one image: CLIP-T against the prompt; CLIP-I and DINO averaged over the subjects (`None`
/// without subjects).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScores {
    pub clip_t: f64,
    pub clip_i: Option<f64>,
    pub dino: Option<f64>,
    pub subjects: Vec<SubjectScore>,
}

impl ImageScores {
    /// PNG text chunks (`clip_t`, `clip_i`, `dino`), each value printed so it reads back exactly.
    pub fn text_chunks(&self) -> Vec<(String, String)> {
        let mut out = vec![("clip_t".to_owned(), self.clip_t.to_string())];
        for (key, v) in [("clip_i", self.clip_i), ("dino", self.dino)] {
            if let Some(v) = v {
                out.push((key.to_owned(), v.to_string()));
            }
        }
        out
    }
}

/// The evaluation models of a worker.
pub struct Scorer {
    clip: ClipEval,
    dino: DinoEval,
    dims: (usize, usize),
}

impl Scorer {
    /// Loads both models strictly and runs one real forward of each (which also gives the feature widths).
    pub fn load(clip_dir: &Path, dino_dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let clip = ClipEval::load(clip_dir, device, dtype)?;
        let dino = DinoEval::load(dino_dir, device, dtype)?;
        let probe = EvalPixels::of(&RgbImage::zeros(8, 8), "warm-up")?;
        let batch = |t: &Tensor| t.unsqueeze(0).stage("warm-up");
        let pc = clip.image_features(&batch(&probe.clip)?)?.dim(1).stage("warm-up")?;
        let pd = dino.features(&batch(&probe.dino)?)?.dim(1).stage("warm-up")?;
        let pt = clip.text_features("")?.dim(1).stage("warm-up")?;
        if pt != pc {
            return Err(ModelError::Config {
                path: clip_dir.join("config.json"),
                message: format!("text features ({pt}) and image features ({pc}) differ in width"),
            });
        }
        Ok(Self {
            clip,
            dino,
            dims: (pc, pd),
        })
    }

    /// The feature widths (CLIP projection, DINO hidden size).
    pub fn dims(&self) -> (usize, usize) {
        self.dims
    }

    /// Features of one subject's prepared reference images (one batch per model).
    pub fn reference_features(&self, images: &[EvalPixels]) -> Result<ReferenceFeatures> {
        let stack = |f: fn(&EvalPixels) -> &Tensor| {
            Tensor::stack(&images.iter().map(f).collect::<Vec<_>>(), 0).stage("reference features")
        };
        let clip = self.clip.image_features(&stack(|p| &p.clip)?)?;
        let dino = self.dino.features(&stack(|p| &p.dino)?)?;
        Ok(ReferenceFeatures {
            clip: clip.to_vec2().stage("reference features")?,
            dino: dino.to_vec2().stage("reference features")?,
        })
    }

    /// The CLIP and DINO image features of prepared pixels, one row each.
    pub fn features(&self, px: &EvalPixels) -> Result<(Vec<f32>, Vec<f32>)> {
        let batch = |t: &Tensor| t.unsqueeze(0).stage("features");
        Ok((
            row(self.clip.image_features(&batch(&px.clip)?)?)?,
            row(self.dino.features(&batch(&px.dino)?)?)?,
        ))
    }

    /// The CLIP text features of a caption (tokenised with truncation).
    pub fn text_features(&self, caption: &str) -> Result<Vec<f32>> {
        row(self.clip.text_features(caption)?)
    }

    /// Scores a generated image against its prompt and each subject's references.
    pub fn score(&self, img: &RgbImage, prompt: &str, subjects: &[(String, ReferenceFeatures)]) -> Result<ImageScores> {
        let (clip, dino) = self.features(&EvalPixels::of(img, "image")?)?;
        let text = self.text_features(prompt)?;
        let per_subject: Vec<SubjectScore> = subjects
            .iter()
            .map(|(name, refs)| SubjectScore {
                name: name.clone(),
                clip_i: set_similarity(std::slice::from_ref(&clip), &refs.clip).unwrap_or(0.0),
                dino: set_similarity(std::slice::from_ref(&dino), &refs.dino).unwrap_or(0.0),
            })
            .collect();
        Ok(ImageScores {
            clip_t: clip_t(&clip, &text),
            clip_i: mean(per_subject.iter().map(|s| s.clip_i)),
            dino: mean(per_subject.iter().map(|s| s.dino)),
            subjects: per_subject,
        })
    }
}

/// A (1, P) feature tensor as a row.
fn row(t: Tensor) -> Result<Vec<f32>> {
    t.flatten_all().and_then(|t| t.to_vec1()).stage("features")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_features_round_trip_through_the_cache_value() {
        let refs = ReferenceFeatures {
            clip: vec![vec![1.0, 2.0], vec![3.0, 4.0]],
            dino: vec![vec![5.0, 6.0, 7.0], vec![8.0, 9.0, 10.0]],
        };
        let v = refs.to_value().expect("encodes");
        assert_eq!(ReferenceFeatures::from_value(&v, (2, 3)), Some(refs));
        assert_eq!(ReferenceFeatures::from_value(&v, (3, 3)), None);
        assert_eq!(ReferenceFeatures::from_value(b"junk", (2, 3)), None);
    }

    #[test]
    fn absent_subject_scores_are_none_and_chunks_name_what_is_present() {
        let s = ImageScores {
            clip_t: 0.5,
            clip_i: None,
            dino: None,
            subjects: vec![],
        };
        assert_eq!(s.text_chunks(), vec![("clip_t".to_owned(), "0.5".to_owned())]);
    }
}
