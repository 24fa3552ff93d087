//! Request limits: the pipeline's hard maxima (constants) and the configurable [`Limits`] within them, the same
//! `limits` section in the worker's and the coordinator's configuration (with the same defaults).

use serde::{Deserialize, Serialize};

use crate::InvalidInput;

/// Most subjects one request may carry.
pub const MAX_SUBJECTS: usize = 8;
/// Most reference images per subject.
pub const MAX_IMAGES_PER_SUBJECT: usize = 8;
/// Most denoising steps.
pub const MAX_STEPS: usize = 200;
/// Smallest and largest image side in pixels.
pub const SIDE_RANGE: (usize, usize) = (64, 4096);
/// Most characters in a prompt, a negative prompt or a subject name.
pub const MAX_PROMPT_CHARS: usize = 2000;
/// Pillow's `Image.MAX_IMAGE_PIXELS` (its decompression-bomb threshold): the most pixels of a reference image.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;
/// Most bytes of one encoded reference image that a limit may allow.
pub const MAX_IMAGE_BYTES: usize = 1 << 30;
/// Steps when a request gives 0.
pub const DEFAULT_STEPS: usize = 30;
/// Longest accepted `subject_key`.
pub const MAX_KEY_CHARS: usize = 256;
/// Prefix of every subject key.
pub const SUBJECT_KEY_PREFIX: &str = "mip:subject:";

/// `limits`: the serde shape in a configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
        let l = Limits::default();
        Self {
            max_image_bytes: l.max_image_bytes,
            max_image_pixels: l.max_image_pixels,
            max_subjects: l.max_subjects,
            max_images_per_subject: l.max_images_per_subject,
            max_prompt_chars: l.max_prompt_chars,
            min_side: l.min_side,
            max_side: l.max_side,
            max_steps: l.max_steps,
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

impl Default for Limits {
    /// The defaults of both services' `limits` section.
    fn default() -> Self {
        Self {
            max_image_bytes: 16 << 20,
            max_image_pixels: DEFAULT_MAX_PIXELS,
            max_subjects: MAX_SUBJECTS,
            max_images_per_subject: MAX_IMAGES_PER_SUBJECT,
            max_prompt_chars: MAX_PROMPT_CHARS,
            min_side: SIDE_RANGE.0,
            max_side: 2048,
            max_steps: 100,
        }
    }
}

fn within(field: &str, v: usize, lo: usize, hi: usize) -> Result<usize, InvalidInput> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(InvalidInput::new(
            format!("limits.{field}"),
            format!("must be in {lo}..={hi}"),
            v,
        ))
    }
}

impl Limits {
    /// The pipeline's hard maxima: what the model code itself accepts (its own API, with no configuration).
    pub const HARD: Limits = Limits {
        max_image_bytes: MAX_IMAGE_BYTES,
        max_image_pixels: DEFAULT_MAX_PIXELS,
        max_subjects: MAX_SUBJECTS,
        max_images_per_subject: MAX_IMAGES_PER_SUBJECT,
        max_prompt_chars: MAX_PROMPT_CHARS,
        min_side: SIDE_RANGE.0,
        max_side: SIDE_RANGE.1,
        max_steps: MAX_STEPS,
    };

    /// Checks configured limits against the hard maxima; the error names `limits.<field>`.
    pub fn from_config(c: &LimitsConfig) -> Result<Self, InvalidInput> {
        let (side_lo, side_hi) = SIDE_RANGE;
        let min_side = within("min_side", c.min_side, side_lo, side_hi)?;
        let max_side = within("max_side", c.max_side, min_side, side_hi)?;
        if !min_side.is_multiple_of(8) || !max_side.is_multiple_of(8) {
            return Err(InvalidInput::new(
                "limits.min_side / limits.max_side",
                "must be multiples of 8",
                format!("{min_side} / {max_side}"),
            ));
        }
        if c.max_image_pixels == 0 || c.max_image_pixels > DEFAULT_MAX_PIXELS {
            return Err(InvalidInput::new(
                "limits.max_image_pixels",
                format!("must be in 1..={DEFAULT_MAX_PIXELS}"),
                c.max_image_pixels,
            ));
        }
        Ok(Self {
            max_image_bytes: within("max_image_bytes", c.max_image_bytes, 1, MAX_IMAGE_BYTES)?,
            max_image_pixels: c.max_image_pixels,
            max_subjects: within("max_subjects", c.max_subjects, 1, MAX_SUBJECTS)?,
            max_images_per_subject: within(
                "max_images_per_subject",
                c.max_images_per_subject,
                1,
                MAX_IMAGES_PER_SUBJECT,
            )?,
            max_prompt_chars: within("max_prompt_chars", c.max_prompt_chars, 1, MAX_PROMPT_CHARS)?,
            min_side,
            max_side,
            max_steps: within("max_steps", c.max_steps, 1, MAX_STEPS)?,
        })
    }

    /// The proto form, as a worker reports it in `Info`.
    pub fn to_proto(&self) -> mip_proto::v1::RequestLimits {
        mip_proto::v1::RequestLimits {
            max_image_bytes: self.max_image_bytes as u64,
            max_image_pixels: self.max_image_pixels,
            max_subjects: self.max_subjects as u32,
            max_images_per_subject: self.max_images_per_subject as u32,
            max_prompt_chars: self.max_prompt_chars as u32,
            min_side: self.min_side as u32,
            max_side: self.max_side as u32,
            max_steps: self.max_steps as u32,
        }
    }

    /// Limits a worker reported in `Info`, checked like a configuration (`None` if they are not valid limits).
    pub fn from_proto(p: &mip_proto::v1::RequestLimits) -> Option<Self> {
        let c = LimitsConfig {
            max_image_bytes: usize::try_from(p.max_image_bytes).ok()?,
            max_image_pixels: p.max_image_pixels,
            max_subjects: p.max_subjects as usize,
            max_images_per_subject: p.max_images_per_subject as usize,
            max_prompt_chars: p.max_prompt_chars as usize,
            min_side: p.min_side as usize,
            max_side: p.max_side as usize,
            max_steps: p.max_steps as usize,
        };
        Self::from_config(&c).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            Limits::from_config(&LimitsConfig {
                min_side: 60,
                ..LimitsConfig::default()
            })
            .expect_err("60")
            .field,
            "limits.min_side"
        );
    }

    #[test]
    fn proto_round_trip() {
        let l = Limits {
            max_steps: 12,
            ..Limits::default()
        };
        assert_eq!(Limits::from_proto(&l.to_proto()), Some(l));
        assert_eq!(Limits::from_proto(&mip_proto::v1::RequestLimits::default()), None);
    }
}
