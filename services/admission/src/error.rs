//! The one error of this crate: a request value that breaks a rule.

/// A request value that breaks a rule; names the field, the rule and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{field}` {rule}, got {value}")]
pub struct InvalidInput {
    /// The offending field, e.g. `subjects[1].name` (the coordinator prefixes `requests[i].`).
    pub field: String,
    /// The rule it breaks, e.g. `must be a multiple of 8 in 64..=4096`.
    pub rule: String,
    /// The value received, rendered for humans.
    pub value: String,
}

impl InvalidInput {
    pub fn new(field: impl Into<String>, rule: impl Into<String>, value: impl ToString) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
            value: value.to_string(),
        }
    }

    /// The same error with `prefix` before its field (`requests[2].` + `steps`).
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}{}", self.field);
        self
    }
}
