//! A whole generation request: [`validate_generation`] turns a proto [`GenerationRequest`] into a
//! [`ValidGeneration`] (zero fields replaced by their defaults, every field within the limits, every image checked)
//! or the first [`InvalidInput`]. The per-field checks are public so the pipeline's own API applies the very same
//! rules with [`Limits::HARD`].

use mip_proto::v1::{GenerationRequest, Subject};

use crate::image::{check_image, ImageCheck};
use crate::limits::{DEFAULT_STEPS, MAX_KEY_CHARS, SUBJECT_KEY_PREFIX};
use crate::{InvalidInput, Limits, SchedulerKind};

/// Classifier-free guidance when a request gives none.
pub const DEFAULT_GUIDANCE: f64 = 5.0;
/// Accepted classifier-free guidance.
pub const GUIDANCE_RANGE: (f64, f64) = (0.0, 50.0);
/// Accepted image-prompt scale.
pub const SCALE_RANGE: (f64, f64) = (0.0, 10.0);

/// What zero or absent fields become: the model's size and its variant's image-prompt scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    /// `[width, height]`.
    pub size: [usize; 2],
    pub scale: f64,
}

/// Where a subject's tokens come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SubjectInput {
    /// Encoded reference images, each checked.
    Images(Vec<Vec<u8>>),
    /// A key from an earlier `EncodeSubjects` (used when no images are given).
    Key(String),
}

/// One subject of a request, checked against the limits.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectSpec {
    pub name: String,
    pub input: SubjectInput,
}

/// A generation request that passed every check; only the seed may still be open (drawn by the worker).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGeneration {
    pub prompt: String,
    /// `None`: zero negative embeddings (SDXL's `force_zeros_for_empty_prompt`).
    pub negative_prompt: Option<String>,
    pub subjects: Vec<SubjectSpec>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scale: f64,
    pub scheduler: SchedulerKind,
    pub seed: Option<u64>,
    /// Score the image with the evaluation models.
    pub score: bool,
}

/// Checks every field of `r` against `limits`; images as deep as `images` says.
pub fn validate_generation(
    r: GenerationRequest,
    limits: &Limits,
    defaults: &Defaults,
    images: ImageCheck,
) -> Result<ValidGeneration, InvalidInput> {
    check_text("prompt", &r.prompt, true, limits.max_prompt_chars)?;
    if let Some(n) = &r.negative_prompt {
        check_text("negative_prompt", n, false, limits.max_prompt_chars)?;
    }
    let subjects = validate_subjects(r.subjects, limits, true, images)?;
    let width = check_side("width", or_default(r.width, defaults.size[0]), limits)?;
    let height = check_side("height", or_default(r.height, defaults.size[1]), limits)?;
    let steps = check_steps(or_default(r.steps, DEFAULT_STEPS.min(limits.max_steps)), limits)?;
    let guidance = check_finite("guidance", r.guidance.unwrap_or(DEFAULT_GUIDANCE), GUIDANCE_RANGE)?;
    let scale = check_finite("scale", r.scale.unwrap_or(defaults.scale), SCALE_RANGE)?;
    let scheduler = if r.scheduler.is_empty() {
        SchedulerKind::default()
    } else {
        r.scheduler.parse()?
    };
    Ok(ValidGeneration {
        prompt: r.prompt,
        negative_prompt: r.negative_prompt,
        subjects,
        width,
        height,
        steps,
        guidance,
        scale,
        scheduler,
        seed: r.seed,
        score: r.score,
    })
}

fn or_default(v: u32, default: usize) -> usize {
    if v == 0 {
        default
    } else {
        v as usize
    }
}

/// Checks a request's subjects: their count, names (required when `require_names`), images or keys.
pub fn validate_subjects(
    subjects: Vec<Subject>,
    limits: &Limits,
    require_names: bool,
    images: ImageCheck,
) -> Result<Vec<SubjectSpec>, InvalidInput> {
    if subjects.is_empty() || subjects.len() > limits.max_subjects {
        return Err(InvalidInput::new(
            "subjects",
            format!("must hold 1..={} subjects", limits.max_subjects),
            subjects.len(),
        ));
    }
    subjects
        .into_iter()
        .enumerate()
        .map(|(i, s)| validate_subject(i, s, limits, require_names, images))
        .collect()
}

fn validate_subject(
    i: usize,
    s: Subject,
    limits: &Limits,
    require_name: bool,
    images: ImageCheck,
) -> Result<SubjectSpec, InvalidInput> {
    check_text(
        &format!("subjects[{i}].name"),
        &s.name,
        require_name,
        limits.max_prompt_chars,
    )?;
    if s.images.is_empty() {
        let key = s.subject_key;
        if key.is_empty() {
            return Err(InvalidInput::new(
                format!("subjects[{i}].images"),
                format!(
                    "must hold 1..={} images (or give subjects[{i}].subject_key)",
                    limits.max_images_per_subject
                ),
                0,
            ));
        }
        check_key(&format!("subjects[{i}].subject_key"), &key)?;
        return Ok(SubjectSpec {
            name: s.name,
            input: SubjectInput::Key(key),
        });
    }
    if s.images.len() > limits.max_images_per_subject {
        return Err(InvalidInput::new(
            format!("subjects[{i}].images"),
            format!("must hold 1..={} images", limits.max_images_per_subject),
            s.images.len(),
        ));
    }
    for (j, b) in s.images.iter().enumerate() {
        check_image(b, &format!("subjects[{i}].images[{j}]"), limits, images)?;
    }
    Ok(SubjectSpec {
        name: s.name,
        input: SubjectInput::Images(s.images),
    })
}

/// A subject key must look like one `EncodeSubjects` returns.
pub fn check_key(field: &str, key: &str) -> Result<(), InvalidInput> {
    if !key.starts_with(SUBJECT_KEY_PREFIX) || key.len() > MAX_KEY_CHARS || key.chars().any(char::is_control) {
        return Err(InvalidInput::new(
            field,
            format!(
                "must be a key returned by EncodeSubjects (`{SUBJECT_KEY_PREFIX}…`, at most {MAX_KEY_CHARS} characters)"
            ),
            format!("{:?}", key.chars().take(64).collect::<String>()),
        ));
    }
    Ok(())
}

/// A prompt, negative prompt or name: non-blank when `required`, at most `max_chars` characters, no NUL.
pub fn check_text(field: &str, text: &str, required: bool, max_chars: usize) -> Result<(), InvalidInput> {
    if required && text.trim().is_empty() {
        return Err(InvalidInput::new(
            field,
            "must not be empty or only spaces",
            format!("{text:?}"),
        ));
    }
    let chars = text.chars().count();
    if chars > max_chars {
        return Err(InvalidInput::new(
            field,
            format!("must be at most {max_chars} characters"),
            format!("{chars} characters"),
        ));
    }
    if text.contains('\0') {
        return Err(InvalidInput::new(field, "must not contain NUL characters", "a NUL"));
    }
    Ok(())
}

/// An image side: a multiple of 8 within the limits.
pub fn check_side(field: &str, v: usize, limits: &Limits) -> Result<usize, InvalidInput> {
    if !v.is_multiple_of(8) || v < limits.min_side || v > limits.max_side {
        return Err(InvalidInput::new(
            field,
            format!("must be a multiple of 8 in {}..={}", limits.min_side, limits.max_side),
            v,
        ));
    }
    Ok(v)
}

/// Denoising steps within the limits.
pub fn check_steps(steps: usize, limits: &Limits) -> Result<usize, InvalidInput> {
    if steps == 0 || steps > limits.max_steps {
        return Err(InvalidInput::new(
            "steps",
            format!("must be in 1..={}", limits.max_steps),
            steps,
        ));
    }
    Ok(steps)
}

/// A finite number in `lo..=hi`.
pub fn check_finite(field: &str, v: f64, (lo, hi): (f64, f64)) -> Result<f64, InvalidInput> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(InvalidInput::new(
            field,
            format!("must be a finite number in {lo}..={hi}"),
            v,
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
