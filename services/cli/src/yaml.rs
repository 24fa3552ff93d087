//! YAML manifests with yaml-rust2: [`items`] returns each element of the top-level sequence as JSON together with
//! the line where it starts. The values come from yaml-rust2's loader (YAML 1.2 core schema scalars); the lines
//! from a second pass over the parser's marked events.

use anyhow::{bail, Result};
use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;
use yaml_rust2::{Yaml, YamlLoader};

/// Records the line of every node that starts directly inside the top-level sequence.
#[derive(Default)]
struct ItemLines {
    depth: usize,
    lines: Vec<usize>,
}

impl MarkedEventReceiver for ItemLines {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let starts_node = matches!(
            ev,
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..) | Event::Alias(..)
        );
        if starts_node && self.depth == 1 {
            self.lines.push(mark.line());
        }
        match ev {
            Event::SequenceStart(..) | Event::MappingStart(..) => self.depth += 1,
            Event::SequenceEnd | Event::MappingEnd => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
    }
}

/// `(line, item as JSON or why it cannot be one)` for each element of the document's top-level sequence.
/// A document that does not parse, or is not a sequence, is an error for the whole file.
pub fn items(text: &str) -> Result<Vec<(usize, std::result::Result<Value, String>)>> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| anyhow::anyhow!("invalid YAML: {e}"))?;
    let seq = match docs.as_slice() {
        [] => return Ok(Vec::new()),
        [Yaml::Array(seq)] => seq,
        [Yaml::Null] => return Ok(Vec::new()),
        [_] => bail!("a YAML manifest must be a sequence of items (`- prompt: …`)"),
        _ => bail!("a YAML manifest must hold one document, found {}", docs.len()),
    };
    let mut lines = ItemLines::default();
    Parser::new_from_str(text)
        .load(&mut lines, false)
        .map_err(|e| anyhow::anyhow!("invalid YAML: {e}"))?;
    Ok(seq
        .iter()
        .enumerate()
        .map(|(i, y)| (lines.lines.get(i).copied().unwrap_or(0), to_json(y)))
        .collect())
}

/// A YAML value as JSON; mapping keys must be strings, aliases are refused.
fn to_json(y: &Yaml) -> std::result::Result<Value, String> {
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => {
            let f: f64 = r.parse().map_err(|_| format!("invalid number {r:?}"))?;
            Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| format!("number {r:?} is not finite"))?
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect::<std::result::Result<_, _>>()?),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let Yaml::String(k) = k else {
                    return Err(format!("mapping keys must be strings, got {k:?}"));
                };
                m.insert(k.clone(), to_json(v)?);
            }
            Value::Object(m)
        }
        Yaml::Alias(_) => return Err("YAML aliases are not supported".into()),
        Yaml::BadValue => return Err("invalid YAML value".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_with_their_lines() {
        let text = "# jobs\n- prompt: a cat\n  steps: 2\n  guidance: 4.5\n\n- prompt: a dog\n  subjects: [{name: dog, images: [d.png]}]\n- 3\n";
        let got = items(text).expect("parses");
        assert_eq!(got.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [2, 6, 8]);
        let first = got[0].1.as_ref().expect("json");
        assert_eq!(first["steps"], 2);
        assert_eq!(first["guidance"], 4.5);
        assert_eq!(got[1].1.as_ref().expect("json")["subjects"][0]["images"][0], "d.png");
        assert!(items("a: 1").is_err());
        assert!(items("- [unclosed").is_err());
    }
}
