//! Layered configuration: defaults from the struct, then an optional file (YAML or TOML by extension), then
//! environment variables `MIP_SECTION__FIELD=value` (double underscore between levels, e.g. `MIP_REDIS__URL`).
//! Tests pass explicit overrides instead of mutating the process environment.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors of configuration loading; the message names the source and the field.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

/// Loads `T`: its `Default`, then `file`, then the `MIP_` environment, then `overrides` (`"redis.url"`, value).
pub fn load<T>(file: Option<&Path>, use_env: bool, overrides: &[(&str, &str)]) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let defaults = ::config::Config::try_from(&T::default()).map_err(|e| ConfigError(e.to_string()))?;
    let mut b = ::config::Config::builder().add_source(defaults);
    if let Some(f) = file {
        if !f.is_file() {
            return Err(ConfigError(format!("file `{}` not found", f.display())));
        }
        b = b.add_source(::config::File::from(f));
    }
    if use_env {
        // Only `MIP_SECTION__FIELD` variables are configuration; other `MIP_…` variables (e.g. `MIP_FIXTURES`,
        // `MIP_DEMO_DIR`) belong to other tools and must not be read as unknown top-level fields.
        let vars: std::collections::HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.strip_prefix("MIP_").is_some_and(|rest| rest.contains("__")))
            .collect();
        b = b.add_source(
            ::config::Environment::with_prefix("MIP")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(vars)),
        );
    }
    for (k, v) in overrides {
        b = b
            .set_override(*k, *v)
            .map_err(|e| ConfigError(format!("override `{k}`: {e}")))?;
    }
    let cfg = b.build().map_err(|e| ConfigError(e.to_string()))?;
    cfg.try_deserialize().map_err(|e| ConfigError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        redis: Redis,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Redis {
        url: String,
        ttl_seconds: u64,
    }

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "redis:\n  url: redis://a\n  ttl_seconds: 5\n").expect("write");
        let c: Cfg = load(Some(&f), false, &[("redis.ttl_seconds", "9")]).expect("loads");
        assert_eq!(c.redis.url, "redis://a");
        assert_eq!(c.redis.ttl_seconds, 9);
    }

    #[test]
    fn unknown_field_and_missing_file_are_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[redis]\nurl = \"x\"\nbogus = 1\n").expect("write");
        let e = load::<Cfg>(Some(&f), false, &[]).expect_err("unknown field");
        assert!(e.to_string().contains("bogus"), "{e}");
        assert!(load::<Cfg>(Some(&dir.path().join("nope.yaml")), false, &[]).is_err());
    }
}
