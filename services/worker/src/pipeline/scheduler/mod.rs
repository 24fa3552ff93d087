//! (placeholder until the scheduler lands)
#[derive(Debug, Clone, Copy)]
pub enum SchedulerKind { Euler }
impl std::str::FromStr for SchedulerKind { type Err = (); fn from_str(s: &str) -> Result<Self, ()> { if s == "euler" { Ok(Self::Euler) } else { Err(()) } } }
