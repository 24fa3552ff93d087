//! The worker's edge: a proto request becomes a typed, valid value ([`ValidTask`], [`SubjectSpec`]) or an
//! [`InvalidInput`] naming the field, the limit and the value. The rules and the configurable [`Limits`] are
//! `mip-admission`'s, the very ones the coordinator runs before it queues anything, so the two services cannot
//! disagree. Images are checked to their header here (the preprocessing decodes them right after); token-level
//! checks (a name's token count) need the model and run later, with the same error type.

pub use mip_admission::limits::{DEFAULT_STEPS, MAX_KEY_CHARS, SUBJECT_KEY_PREFIX};
use mip_admission::{Defaults, ImageCheck};
pub use mip_admission::{Limits, LimitsConfig, SubjectInput, SubjectSpec};
use mip_proto::v1::{GenerationRequest, Subject};

use crate::error::InvalidInput;
use crate::pipeline::request::{SubjectRequest, ValidRequest};

/// A generation request that passed every request-level check. `request.subjects` carries the names only (no
/// image bytes); the images or keys are in `subjects`.
#[derive(Debug, Clone)]
pub struct ValidTask {
    pub request: ValidRequest,
    pub subjects: Vec<SubjectSpec>,
    /// Score the image (`GenerationRequest.score`).
    pub score: bool,
}

/// Checks a request's subjects: their count, names (when `require_names`), images or keys.
pub fn validate_subjects(
    subjects: Vec<Subject>,
    limits: &Limits,
    require_names: bool,
) -> Result<Vec<SubjectSpec>, InvalidInput> {
    mip_admission::validate_subjects(subjects, limits, require_names, ImageCheck::Header)
}

/// Turns a proto request into a [`ValidTask`], drawing a seed when it has none. `default_size` is the model's
/// `[width, height]` for zero sides; `default_scale` the variant's image scale.
pub fn validate_generation(
    r: GenerationRequest,
    limits: &Limits,
    default_size: [usize; 2],
    default_scale: f64,
) -> Result<ValidTask, InvalidInput> {
    let defaults = Defaults {
        size: default_size,
        scale: default_scale,
    };
    let v = mip_admission::validate_generation(r, limits, &defaults, ImageCheck::Header)?;
    let names = v
        .subjects
        .iter()
        .map(|s| SubjectRequest {
            name: s.name.clone(),
            images: Vec::new(),
        })
        .collect();
    let request = ValidRequest {
        prompt: v.prompt,
        negative_prompt: v.negative_prompt,
        subjects: names,
        width: v.width,
        height: v.height,
        steps: v.steps,
        guidance: v.guidance,
        scale: v.scale,
        scheduler: v.scheduler,
        seed: v.seed.unwrap_or_else(rand::random),
    };
    Ok(ValidTask {
        request,
        subjects: v.subjects,
        score: v.score,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_rules_apply_and_a_seed_is_drawn() {
        let png = std::fs::read(
            crate::parity::fixtures_dir()
                .expect("fixtures")
                .join("cases/sdxl_two_objects/refs/cat_0.png"),
        )
        .expect("png");
        let ok = GenerationRequest {
            prompt: "a cat".into(),
            subjects: vec![Subject {
                name: "cat".into(),
                images: vec![png.clone()],
                subject_key: String::new(),
            }],
            ..Default::default()
        };
        let t = validate_generation(ok.clone(), &Limits::default(), [128, 64], 0.75).expect("valid");
        assert_eq!(
            (t.request.width, t.request.height, t.request.steps),
            (128, 64, DEFAULT_STEPS)
        );
        assert!(t.request.subjects[0].images.is_empty());
        assert_eq!(t.subjects[0].input, SubjectInput::Images(vec![png]));
        let mut bad = ok;
        bad.subjects[0].images[0] = b"not an image".to_vec();
        let e = validate_generation(bad, &Limits::default(), [64, 64], 0.75).expect_err("garbage");
        assert_eq!(e.field, "subjects[0].images[0]");
    }
}
