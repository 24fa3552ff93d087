//! Request limits from the configuration, and the edge of the worker: a proto request becomes a typed, valid value
//! ([`ValidTask`], [`SubjectSpec`]) or an [`InvalidInput`] naming the field, the limit and the value. The configured
//! limits are checked first; the pipeline's own validation (`GenerateRequest::validate`: guidance, scale,
//! scheduler, defaults, seed) runs after, so both rule sets hold. Token-level checks (a name's token count) and image
//! decoding (the pixel limit) need the model and run later, with the same error type.

use serde::{Deserialize, Serialize};

use crate::config::ConfigInvalid;
use crate::error::InvalidInput;
use crate::pipeline::image_decode::DEFAULT_MAX_PIXELS;
use crate::pipeline::request::{self as req, GenerateRequest, SubjectRequest, ValidRequest};
use mip_proto::v1::{GenerationRequest, Subject};

/// Longest accepted `subject_key`.
pub const MAX_KEY_CHARS: usize = 256;
/// Prefix of every subject key.
pub const SUBJECT_KEY_PREFIX: &str = "mip:subject:";
/// Steps when a request gives 0.
pub const DEFAULT_STEPS: usize = 30;

/// `limits`: the serde shape in the configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub max_subjects: usize,
    pub max_images_per_subject: usize,
    pub max_prompt_chars: usize,
    pub min_side: usize,
    pub max_side: usize,
    pub max_steps: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_image_bytes: 16 << 20,
            max_image_pixels: DEFAULT_MAX_PIXELS,
            max_subjects: req::MAX_SUBJECTS,
            max_images_per_subject: req::MAX_IMAGES_PER_SUBJECT,
            max_prompt_chars: req::MAX_PROMPT_CHARS,
            min_side: req::SIDE_RANGE.0,
            max_side: 2048,
            max_steps: 100,
        }
    }
}

/// Validated limits: each within the pipeline's hard maxima.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub max_subjects: usize,
    pub max_images_per_subject: usize,
    pub max_prompt_chars: usize,
    pub min_side: usize,
    pub max_side: usize,
    pub max_steps: usize,
}

fn within(field: &str, v: usize, lo: usize, hi: usize) -> Result<usize, ConfigInvalid> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigInvalid::new(
            format!("limits.{field}"),
            format!("must be in {lo}..={hi}"),
            v,
        ))
    }
}

impl Limits {
    /// Checks the configured limits against the pipeline's hard maxima.
    pub fn from_config(c: &LimitsConfig) -> Result<Self, ConfigInvalid> {
        let (side_lo, side_hi) = req::SIDE_RANGE;
        let min_side = within("min_side", c.min_side, side_lo, side_hi)?;
        let max_side = within("max_side", c.max_side, min_side, side_hi)?;
        if min_side % 8 != 0 || max_side % 8 != 0 {
            return Err(ConfigInvalid::new(
                "limits.min_side / limits.max_side",
                "must be multiples of 8",
                format!("{min_side} / {max_side}"),
            ));
        }
        if c.max_image_pixels == 0 || c.max_image_pixels > DEFAULT_MAX_PIXELS {
            return Err(ConfigInvalid::new(
                "limits.max_image_pixels",
                format!("must be in 1..={DEFAULT_MAX_PIXELS}"),
                c.max_image_pixels,
            ));
        }
        Ok(Self {
            max_image_bytes: within("max_image_bytes", c.max_image_bytes, 1, 1 << 30)?,
            max_image_pixels: c.max_image_pixels,
            max_subjects: within("max_subjects", c.max_subjects, 1, req::MAX_SUBJECTS)?,
            max_images_per_subject: within(
                "max_images_per_subject",
                c.max_images_per_subject,
                1,
                req::MAX_IMAGES_PER_SUBJECT,
            )?,
            max_prompt_chars: within("max_prompt_chars", c.max_prompt_chars, 1, req::MAX_PROMPT_CHARS)?,
            min_side,
            max_side,
            max_steps: within("max_steps", c.max_steps, 1, req::MAX_STEPS)?,
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        let c = LimitsConfig::default();
        Self {
            max_image_bytes: c.max_image_bytes,
            max_image_pixels: c.max_image_pixels,
            max_subjects: c.max_subjects,
            max_images_per_subject: c.max_images_per_subject,
            max_prompt_chars: c.max_prompt_chars,
            min_side: c.min_side,
            max_side: c.max_side,
            max_steps: c.max_steps,
        }
    }
}

/// Where a subject's tokens come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SubjectInput {
    /// Encoded reference images (each within the byte limit, none empty).
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

/// A generation request that passed every request-level check. `request.subjects` carries the names only (no
/// image bytes); the images or keys are in `subjects`.
#[derive(Debug, Clone)]
pub struct ValidTask {
    pub request: ValidRequest,
    pub subjects: Vec<SubjectSpec>,
}

fn check_text(field: &str, text: &str, required: bool, limits: &Limits) -> Result<(), InvalidInput> {
    if required && text.trim().is_empty() {
        return Err(InvalidInput::new(
            field,
            "must not be empty or only spaces",
            format!("{text:?}"),
        ));
    }
    let chars = text.chars().count();
    if chars > limits.max_prompt_chars {
        return Err(InvalidInput::new(
            field,
            format!("must be at most {} characters", limits.max_prompt_chars),
            format!("{chars} characters"),
        ));
    }
    if text.contains('\0') {
        return Err(InvalidInput::new(field, "must not contain NUL characters", "a NUL"));
    }
    Ok(())
}

/// Checks a request's subjects: their count, names (when `require_names`), images or keys.
pub fn validate_subjects(
    subjects: Vec<Subject>,
    limits: &Limits,
    require_names: bool,
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
        .map(|(i, s)| validate_subject(i, s, limits, require_names))
        .collect()
}

fn validate_subject(i: usize, s: Subject, limits: &Limits, require_name: bool) -> Result<SubjectSpec, InvalidInput> {
    check_text(&format!("subjects[{i}].name"), &s.name, require_name, limits)?;
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
        if !key.starts_with(SUBJECT_KEY_PREFIX) || key.len() > MAX_KEY_CHARS || key.chars().any(char::is_control) {
            return Err(InvalidInput::new(
                format!("subjects[{i}].subject_key"),
                format!("must be a key returned by EncodeSubjects (`{SUBJECT_KEY_PREFIX}…`, at most {MAX_KEY_CHARS} characters)"),
                format!("{:?}", key.chars().take(64).collect::<String>()),
            ));
        }
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
        if b.is_empty() {
            return Err(InvalidInput::new(
                format!("subjects[{i}].images[{j}]"),
                "must not be empty",
                "0 bytes",
            ));
        }
        if b.len() > limits.max_image_bytes {
            return Err(InvalidInput::new(
                format!("subjects[{i}].images[{j}]"),
                format!("must be at most {} bytes", limits.max_image_bytes),
                format!("{} bytes", b.len()),
            ));
        }
    }
    Ok(SubjectSpec {
        name: s.name,
        input: SubjectInput::Images(s.images),
    })
}

fn side(field: &str, v: u32, default: usize, limits: &Limits) -> Result<usize, InvalidInput> {
    let v = if v == 0 { default } else { v as usize };
    if v % 8 != 0 || v < limits.min_side || v > limits.max_side {
        return Err(InvalidInput::new(
            field,
            format!("must be a multiple of 8 in {}..={}", limits.min_side, limits.max_side),
            v,
        ));
    }
    Ok(v)
}

/// Turns a proto request into a [`ValidTask`]: configured limits first, then the pipeline's validation.
/// `default_size` is the model's `[width, height]` for zero sides; `default_scale` the variant's image scale.
pub fn validate_generation(
    r: GenerationRequest,
    limits: &Limits,
    default_size: [usize; 2],
    default_scale: f64,
) -> Result<ValidTask, InvalidInput> {
    check_text("prompt", &r.prompt, true, limits)?;
    if let Some(n) = &r.negative_prompt {
        check_text("negative_prompt", n, false, limits)?;
    }
    let subjects = validate_subjects(r.subjects, limits, true)?;
    let width = side("width", r.width, default_size[0], limits)?;
    let height = side("height", r.height, default_size[1], limits)?;
    let steps = if r.steps == 0 {
        DEFAULT_STEPS.min(limits.max_steps)
    } else {
        r.steps as usize
    };
    if steps > limits.max_steps {
        return Err(InvalidInput::new(
            "steps",
            format!("must be in 1..={}", limits.max_steps),
            steps,
        ));
    }
    // The pipeline's own rules (guidance, scale, scheduler, seed); images were checked above, so each subject
    // stands in with a placeholder image and gets its name back afterwards.
    let placeholder = subjects
        .iter()
        .map(|s| SubjectRequest {
            name: s.name.clone(),
            images: vec![vec![0]],
        })
        .collect();
    let mut request = GenerateRequest {
        prompt: r.prompt,
        negative_prompt: r.negative_prompt,
        subjects: placeholder,
        width,
        height,
        steps,
        guidance: r.guidance.unwrap_or(5.0),
        scale: r.scale,
        scheduler: if r.scheduler.is_empty() {
            "euler".into()
        } else {
            r.scheduler
        },
        seed: r.seed,
    }
    .validate(default_scale)?;
    for s in &mut request.subjects {
        s.images.clear();
    }
    Ok(ValidTask { request, subjects })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> GenerationRequest {
        GenerationRequest {
            prompt: "a cat".into(),
            subjects: vec![Subject {
                name: "cat".into(),
                images: vec![vec![1, 2, 3]],
                subject_key: String::new(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_zero_fields() {
        let t = validate_generation(ok(), &Limits::default(), [128, 64], 0.75).expect("valid");
        assert_eq!(
            (t.request.width, t.request.height, t.request.steps),
            (128, 64, DEFAULT_STEPS)
        );
        assert_eq!(t.request.scale, 0.75);
        assert!(t.request.subjects[0].images.is_empty());
        assert_eq!(t.subjects[0].input, SubjectInput::Images(vec![vec![1, 2, 3]]));
    }

    #[test]
    fn configured_limits_name_the_field() {
        let limits = Limits {
            max_image_bytes: 2,
            ..Limits::default()
        };
        let e = validate_generation(ok(), &limits, [128, 128], 0.75).expect_err("too big");
        assert_eq!(e.field, "subjects[0].images[0]");
        assert!(e.rule.contains("at most 2 bytes"), "{e}");
        let mut r = ok();
        r.steps = 101;
        assert_eq!(
            validate_generation(r, &Limits::default(), [64, 64], 0.75)
                .expect_err("steps")
                .field,
            "steps"
        );
        let mut r = ok();
        r.guidance = Some(f64::NAN);
        assert_eq!(
            validate_generation(r, &Limits::default(), [64, 64], 0.75)
                .expect_err("g")
                .field,
            "guidance"
        );
    }

    #[test]
    fn config_limits_are_bounded_by_the_pipeline() {
        let c = LimitsConfig {
            max_subjects: 9,
            ..LimitsConfig::default()
        };
        assert_eq!(Limits::from_config(&c).expect_err("9").field, "limits.max_subjects");
        assert_eq!(
            Limits::from_config(&LimitsConfig::default()).expect("ok"),
            Limits::default()
        );
    }
}
