//! The samplers a request may name, with their names in requests and configurations.

use std::fmt;
use std::str::FromStr;

use crate::InvalidInput;

/// The samplers a request may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SchedulerKind {
    /// `"euler"`: diffusers `EulerDiscreteScheduler` (SDXL's default).
    #[default]
    Euler,
    /// `"ddim"`: diffusers `DDIMScheduler`, eta 0.
    Ddim,
    /// `"dpmpp_2m_karras"`: DPM-Solver++(2M) with Karras sigmas.
    DpmPp2mKarras,
}

impl SchedulerKind {
    /// Every kind, in a stable order.
    pub const ALL: [SchedulerKind; 3] = [Self::Euler, Self::Ddim, Self::DpmPp2mKarras];

    /// The name used in requests and configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::Ddim => "ddim",
            Self::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerKind {
    type Err = InvalidInput;

    fn from_str(s: &str) -> std::result::Result<Self, InvalidInput> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            InvalidInput::new(
                "scheduler",
                "must be one of \"euler\", \"ddim\", \"dpmpp_2m_karras\"",
                format!("{s:?}"),
            )
        })
    }
}
