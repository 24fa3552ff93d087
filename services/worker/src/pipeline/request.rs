//! Generation requests and their validation: a raw [`GenerateRequest`] becomes a [`ValidRequest`] (defaults filled,
//! seed fixed, ranges checked) before anything touches the model. Errors name the field, the rule and the value.

use crate::error::InvalidInput;

/// Most subjects one request may carry.
pub const MAX_SUBJECTS: usize = 8;
/// Most reference images per subject.
pub const MAX_IMAGES_PER_SUBJECT: usize = 8;
/// Most denoising steps.
pub const MAX_STEPS: usize = 200;
/// Smallest and largest image side in pixels.
pub const SIDE_RANGE: (usize, usize) = (64, 4096);
/// Most characters in a prompt.
pub const MAX_PROMPT_CHARS: usize = 2000;

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
    /// Checks every field; `default_scale` is the loaded variant's image-prompt scale.
    pub fn validate(self, default_scale: f64) -> Result<ValidRequest, InvalidInput> {
        check_text("prompt", &self.prompt, true)?;
        if let Some(n) = &self.negative_prompt {
            check_text("negative_prompt", n, false)?;
        }
        check_subjects(&self.subjects)?;
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if v % 8 != 0 || v < SIDE_RANGE.0 || v > SIDE_RANGE.1 {
                return Err(InvalidInput::new(
                    field,
                    format!("must be a multiple of 8 in {}..={}", SIDE_RANGE.0, SIDE_RANGE.1),
                    v,
                ));
            }
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(InvalidInput::new(
                "steps",
                format!("must be in 1..={MAX_STEPS}"),
                self.steps,
            ));
        }
        check_finite("guidance", self.guidance, 0.0, 50.0)?;
        let scale = self.scale.unwrap_or(default_scale);
        check_finite("scale", scale, 0.0, 10.0)?;
        let scheduler = self.scheduler.parse().map_err(|_| {
            InvalidInput::new(
                "scheduler",
                "must be one of euler, ddim, dpmpp_2m_karras",
                &self.scheduler,
            )
        })?;
        let seed = self.seed.unwrap_or_else(rand::random);
        Ok(ValidRequest {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            subjects: self.subjects,
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            scale,
            scheduler,
            seed,
        })
    }
}

fn check_text(field: &str, text: &str, required: bool) -> Result<(), InvalidInput> {
    let chars = text.chars().count();
    if required && text.trim().is_empty() {
        return Err(InvalidInput::new(field, "must not be empty", "\"\""));
    }
    if chars > MAX_PROMPT_CHARS {
        return Err(InvalidInput::new(
            field,
            format!("must be at most {MAX_PROMPT_CHARS} characters"),
            format!("{chars} characters"),
        ));
    }
    if text.contains('\0') {
        return Err(InvalidInput::new(field, "must not contain NUL characters", "a NUL"));
    }
    Ok(())
}

fn check_subjects(subjects: &[SubjectRequest]) -> Result<(), InvalidInput> {
    if subjects.is_empty() || subjects.len() > MAX_SUBJECTS {
        return Err(InvalidInput::new(
            "subjects",
            format!("must hold 1..={MAX_SUBJECTS} subjects"),
            subjects.len(),
        ));
    }
    for (i, s) in subjects.iter().enumerate() {
        if s.name.trim().is_empty() {
            return Err(InvalidInput::new(
                format!("subjects[{i}].name"),
                "must not be empty",
                "\"\"",
            ));
        }
        check_text(&format!("subjects[{i}].name"), &s.name, true)?;
        if s.images.is_empty() || s.images.len() > MAX_IMAGES_PER_SUBJECT {
            return Err(InvalidInput::new(
                format!("subjects[{i}].images"),
                format!("must hold 1..={MAX_IMAGES_PER_SUBJECT} images"),
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

fn check_finite(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), InvalidInput> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(InvalidInput::new(
            field,
            format!("must be a finite number in {lo}..={hi}"),
            v,
        ));
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
