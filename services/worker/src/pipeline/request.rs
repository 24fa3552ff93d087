//! Generation requests and their validation: a raw [`GenerateRequest`] becomes a [`ValidRequest`] (defaults filled,
//! seed fixed, ranges checked) before anything touches the model. Errors name the field, the rule and the value.

use mip_admission::generation::{check_finite, check_side, check_steps, check_text, GUIDANCE_RANGE, SCALE_RANGE};
use mip_admission::Limits;

pub use mip_admission::limits::{MAX_IMAGES_PER_SUBJECT, MAX_PROMPT_CHARS, MAX_STEPS, MAX_SUBJECTS, SIDE_RANGE};

use crate::error::InvalidInput;

/// One subject: its name as written in the prompt and its reference images (encoded bytes).
#[derive(Debug, Clone, Default)]
pub struct SubjectRequest {
    pub name: String,
    pub images: Vec<Vec<u8>>,
}

/// What a caller asks for; every optional field has a documented default.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    /// `None`: zero negative embeddings (SDXL's `force_zeros_for_empty_prompt`); `Some("")` encodes "".
    pub negative_prompt: Option<String>,
    pub subjects: Vec<SubjectRequest>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale (default 5.0).
    pub guidance: f64,
    /// Image-prompt scale; `None` picks the variant's default (0.75 sdxl, 0.65 plus).
    pub scale: Option<f64>,
    pub scheduler: String,
    /// `None`: a seed is drawn and returned.
    pub seed: Option<u64>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            subjects: Vec::new(),
            width: 1024,
            height: 1024,
            steps: 30,
            guidance: 5.0,
            scale: None,
            scheduler: "euler".to_owned(),
            seed: None,
        }
    }
}

/// A request that passed validation; the pipeline takes only this.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub subjects: Vec<SubjectRequest>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scale: f64,
    pub scheduler: super::scheduler::SchedulerKind,
    pub seed: u64,
}

impl GenerateRequest {
    /// Checks every field with the cluster's rules at the pipeline's hard maxima ([`Limits::HARD`]);
    /// `default_scale` is the loaded variant's image-prompt scale.
    pub fn validate(self, default_scale: f64) -> Result<ValidRequest, InvalidInput> {
        let hard = Limits::HARD;
        check_text("prompt", &self.prompt, true, hard.max_prompt_chars)?;
        if let Some(n) = &self.negative_prompt {
            check_text("negative_prompt", n, false, hard.max_prompt_chars)?;
        }
        check_subjects(&self.subjects, &hard)?;
        let width = check_side("width", self.width, &hard)?;
        let height = check_side("height", self.height, &hard)?;
        let steps = check_steps(self.steps, &hard)?;
        let guidance = check_finite("guidance", self.guidance, GUIDANCE_RANGE)?;
        let scale = check_finite("scale", self.scale.unwrap_or(default_scale), SCALE_RANGE)?;
        let scheduler = self.scheduler.parse()?;
        let seed = self.seed.unwrap_or_else(rand::random);
        Ok(ValidRequest {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            subjects: self.subjects,
            width,
            height,
            steps,
            guidance,
            scale,
            scheduler,
            seed,
        })
    }
}

/// Subject count, names, image counts and non-empty images (the bytes themselves are checked when decoded).
fn check_subjects(subjects: &[SubjectRequest], limits: &Limits) -> Result<(), InvalidInput> {
    if subjects.is_empty() || subjects.len() > limits.max_subjects {
        return Err(InvalidInput::new(
            "subjects",
            format!("must hold 1..={} subjects", limits.max_subjects),
            subjects.len(),
        ));
    }
    for (i, s) in subjects.iter().enumerate() {
        check_text(&format!("subjects[{i}].name"), &s.name, true, limits.max_prompt_chars)?;
        if s.images.is_empty() || s.images.len() > limits.max_images_per_subject {
            return Err(InvalidInput::new(
                format!("subjects[{i}].images"),
                format!("must hold 1..={} images", limits.max_images_per_subject),
                s.images.len(),
            ));
        }
        if let Some(j) = s.images.iter().position(|b| b.is_empty()) {
            return Err(InvalidInput::new(
                format!("subjects[{i}].images[{j}]"),
                "must not be empty",
                "0 bytes",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> GenerateRequest {
        GenerateRequest {
            prompt: "a cat wearing a jacket".into(),
            subjects: vec![SubjectRequest {
                name: "cat".into(),
                images: vec![vec![1, 2, 3]],
            }],
            width: 128,
            height: 64,
            steps: 4,
            seed: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn valid_request_passes_with_defaults() {
        let v = ok().validate(0.75).expect("valid");
        assert_eq!(v.scale, 0.75);
        assert_eq!(v.seed, 1);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutate = Box<dyn Fn(&mut GenerateRequest)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("prompt", Box::new(|r| r.prompt = " ".into())),
            ("subjects", Box::new(|r| r.subjects.clear())),
            ("subjects[0].name", Box::new(|r| r.subjects[0].name = String::new())),
            ("subjects[0].images", Box::new(|r| r.subjects[0].images.clear())),
            ("subjects[0].images[0]", Box::new(|r| r.subjects[0].images[0].clear())),
            ("width", Box::new(|r| r.width = 100)),
            ("height", Box::new(|r| r.height = 8)),
            ("steps", Box::new(|r| r.steps = 0)),
            ("guidance", Box::new(|r| r.guidance = f64::NAN)),
            ("scale", Box::new(|r| r.scale = Some(f64::NAN))),
            ("scheduler", Box::new(|r| r.scheduler = "heun".into())),
        ];
        for (field, mutate) in cases {
            let mut r = ok();
            mutate(&mut r);
            let err = r.validate(0.75).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }
}
