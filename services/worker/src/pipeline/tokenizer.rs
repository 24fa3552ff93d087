//! CLIP tokenizer wrapper: loads a `tokenizer/` folder of a diffusers pipeline (a `tokenizer.json` of the
//! `tokenizers` crate, or `vocab.json` + `merges.txt` when it is absent), learns BOS / EOS / pad ids and the
//! maximum length from `tokenizer_config.json` / `special_tokens_map.json`, and encodes prompts the way
//! transformers' `CLIPTokenizer` does with `padding="max_length", truncation=True`.
//!
//! The tokenizer is always run without its own special tokens, truncation or padding: BOS, EOS, truncation to
//! `model_max_length` and padding are applied here, so a folder whose `tokenizer.json` lacks a post-processor
//! (or carries a different padding setting) still encodes identically.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{ModelError, Result};

/// CLIP's default BOS token.
const DEFAULT_BOS: &str = "<|startoftext|>";
/// CLIP's default EOS (and unknown) token.
const DEFAULT_EOS: &str = "<|endoftext|>";
/// CLIP's context length, used when the config gives none (or the "unbounded" sentinel).
const DEFAULT_MAX_LENGTH: usize = 77;
/// Largest `model_max_length` taken at face value; larger values are transformers' "no limit" sentinel.
const MAX_SANE_LENGTH: u64 = 1 << 20;
/// CLIP's pre-tokenization pattern (special tokens, contractions, letter runs, single digits, symbol runs).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP BPE tokenizer with its special ids and context length.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    dir: PathBuf,
}

/// The special tokens and length read from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Debug, Clone, PartialEq)]
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    max_length: usize,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder. `tokenizer.json` is preferred; without it the BPE is built from `vocab.json` and
    /// `merges.txt` with CLIP's normalizer and pre-tokenizer. Unreadable or malformed files give
    /// [`ModelError::Load`] naming the path; special tokens absent from the vocabulary give [`ModelError::Config`].
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let specials = read_special_tokens(dir)?;
        let json_path = dir.join("tokenizer.json");
        let mut tokenizer = if json_path.is_file() {
            Tokenizer::from_file(&json_path).map_err(|e| load_err(&json_path, e))?
        } else {
            build_from_vocab(dir, &specials)?
        };
        tokenizer.with_truncation(None).map_err(|e| load_err(&json_path, e))?;
        tokenizer.with_padding(None);
        let id = |token: &str, role: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| ModelError::Config {
                path: dir.to_path_buf(),
                message: format!("{role} token `{token}` is not in the vocabulary"),
            })
        };
        let bos_id = id(&specials.bos, "bos")?;
        let eos_id = id(&specials.eos, "eos")?;
        let pad_id = id(&specials.pad, "pad")?;
        if specials.max_length < 2 {
            return Err(ModelError::Config {
                path: dir.to_path_buf(),
                message: format!(
                    "model_max_length {} leaves no room for BOS and EOS",
                    specials.max_length
                ),
            });
        }
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            max_length: specials.max_length,
            dir: dir.to_path_buf(),
        })
    }

    /// The beginning-of-text id.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The end-of-text id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The padding id (`<|endoftext|>` for SDXL's first tokenizer, `!` = 0 for the second).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The context length (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The token ids of `text` without BOS / EOS, untruncated.
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| ModelError::Config {
            path: self.dir.clone(),
            message: format!("cannot tokenize: {e}"),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// `max_length` ids: BOS, the tokens truncated so that BOS + tokens + EOS fit, EOS, then padding.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_truncated(text)?;
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// BOS, the tokens truncated to `max_length - 2`, EOS; no padding.
    pub fn encode_truncated(&self, text: &str) -> Result<Vec<u32>> {
        let mut tokens = self.tokens(text)?;
        tokens.truncate(self.max_length - 2);
        Ok(self.wrap(tokens))
    }

    /// BOS, all the tokens, EOS: no truncation and no padding (as transformers'
    /// `tokenizer(text).input_ids` without `truncation=True`).
    pub fn encode_unpadded(&self, text: &str) -> Result<Vec<u32>> {
        let tokens = self.tokens(text)?;
        Ok(self.wrap(tokens))
    }

    /// The number of tokens of `text` without BOS / EOS and without truncation (a subject name's token length);
    /// 0 when the text cannot be tokenized.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokens(text).map(|t| t.len()).unwrap_or(0)
    }

    fn wrap(&self, tokens: Vec<u32>) -> Vec<u32> {
        let mut ids = Vec::with_capacity(tokens.len() + 2);
        ids.push(self.bos_id);
        ids.extend(tokens);
        ids.push(self.eos_id);
        ids
    }
}

fn load_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Reads an optional JSON object; `Ok(None)` when the file does not exist.
fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| load_err(path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| load_err(path, e))?;
    if !value.is_object() {
        return Err(load_err(path, "expected a JSON object"));
    }
    Ok(Some(value))
}

/// A special token given either as a string or as `{"content": "..."}` (older transformers).
fn token_field(sources: &[&Value], key: &str) -> Option<String> {
    sources.iter().find_map(|v| match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    })
}

fn read_special_tokens(dir: &Path) -> Result<SpecialTokens> {
    let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
    let map = read_optional_json(&dir.join("special_tokens_map.json"))?;
    let sources: Vec<&Value> = config.iter().chain(map.iter()).collect();
    let bos = token_field(&sources, "bos_token").unwrap_or_else(|| DEFAULT_BOS.to_owned());
    let eos = token_field(&sources, "eos_token").unwrap_or_else(|| DEFAULT_EOS.to_owned());
    let unk = token_field(&sources, "unk_token").unwrap_or_else(|| eos.clone());
    let pad = token_field(&sources, "pad_token").unwrap_or_else(|| eos.clone());
    let max_length = config
        .as_ref()
        .and_then(|c| c.get("model_max_length"))
        .and_then(Value::as_u64)
        .filter(|&n| n <= MAX_SANE_LENGTH)
        .map_or(DEFAULT_MAX_LENGTH, |n| n as usize);
    Ok(SpecialTokens {
        bos,
        eos,
        unk,
        pad,
        max_length,
    })
}

/// Builds CLIP's BPE tokenizer from `vocab.json` + `merges.txt`: NFC, whitespace collapsed, lowercase; CLIP's
/// split pattern then byte-level; `</w>` end-of-word suffix; the special tokens as added tokens.
fn build_from_vocab(dir: &Path, specials: &SpecialTokens) -> Result<Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for p in [&vocab, &merges] {
        if !p.is_file() {
            return Err(load_err(p, "file not found (and no tokenizer.json beside it)"));
        }
    }
    let path_str = |p: &Path| p.to_string_lossy().into_owned();
    let bpe = BPE::from_file(&path_str(&vocab), &path_str(&merges))
        .unk_token(specials.unk.clone())
        .end_of_word_suffix("</w>".to_owned())
        .build()
        .map_err(|e| load_err(&vocab, e))?;
    let replace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| load_err(&vocab, e))?;
    let normalizer = NormSequence::new(vec![NFC.into(), replace.into(), Lowercase.into()]);
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| load_err(&vocab, e))?;
    let pre = PreSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| load_err(&vocab, e))?
        .with_pre_tokenizer(Some(pre))
        .with_decoder(Some(ByteLevel::new(true, true, true)));
    let mut added: Vec<AddedToken> = Vec::new();
    for t in [&specials.bos, &specials.eos, &specials.unk, &specials.pad] {
        if !added.iter().any(|a| &a.content == t) {
            added.push(AddedToken::from(t.clone(), true));
        }
    }
    tokenizer.add_special_tokens(added).map_err(|e| load_err(&vocab, e))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::fixtures_dir;

    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids_1: Vec<u32>,
        ids_2: Vec<u32>,
        unpadded_1: Vec<u32>,
    }

    fn cases() -> Vec<Case> {
        let dir = fixtures_dir().expect("fixtures");
        let text = std::fs::read_to_string(dir.join("tokenizer_cases.json")).expect("cases");
        let cases: Vec<Case> = serde_json::from_str(&text).expect("parse cases");
        assert!(!cases.is_empty());
        cases
    }

    fn check_all(t1: &ClipTokenizer, t2: &ClipTokenizer, label: &str) {
        for c in cases() {
            let got1 = t1.encode_padded(&c.text).expect("encode 1");
            assert_eq!(got1, c.ids_1, "{label} ids_1 for {:?}", c.text);
            let got2 = t2.encode_padded(&c.text).expect("encode 2");
            assert_eq!(got2, c.ids_2, "{label} ids_2 for {:?}", c.text);
            let un = t1.encode_unpadded(&c.text).expect("unpadded");
            assert_eq!(un, c.unpadded_1, "{label} unpadded_1 for {:?}", c.text);
            assert_eq!(t1.count_tokens(&c.text), c.unpadded_1.len() - 2);
            let tr = t1.encode_truncated(&c.text).expect("truncated");
            assert_eq!(tr.len(), c.unpadded_1.len().min(77));
            println!("ok   {label} {:?} ({} tokens)", c.text, c.unpadded_1.len() - 2);
        }
    }

    #[test]
    fn tokenizer_json_matches_fixture_cases() {
        let dir = fixtures_dir().expect("fixtures").join("sdxl");
        let t1 = ClipTokenizer::from_dir(dir.join("tokenizer")).expect("tokenizer 1");
        let t2 = ClipTokenizer::from_dir(dir.join("tokenizer_2")).expect("tokenizer 2");
        assert_eq!(
            (t1.bos_id(), t1.eos_id(), t1.pad_id(), t1.max_length()),
            (49406, 49407, 49407, 77)
        );
        assert_eq!(
            (t2.bos_id(), t2.eos_id(), t2.pad_id(), t2.max_length()),
            (49406, 49407, 0, 77)
        );
        check_all(&t1, &t2, "tokenizer.json");
    }

    /// Copies a tokenizer folder without its `tokenizer.json`.
    fn vocab_only_copy(src: &Path, name: &str) -> PathBuf {
        let dst = std::env::temp_dir().join(format!("mip-tok-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dst).expect("mkdir");
        for f in [
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            std::fs::copy(src.join(f), dst.join(f)).expect("copy");
        }
        dst
    }

    #[test]
    fn vocab_and_merges_match_fixture_cases() {
        let dir = fixtures_dir().expect("fixtures").join("sdxl");
        let d1 = vocab_only_copy(&dir.join("tokenizer"), "1");
        let d2 = vocab_only_copy(&dir.join("tokenizer_2"), "2");
        let t1 = ClipTokenizer::from_dir(&d1).expect("tokenizer 1");
        let t2 = ClipTokenizer::from_dir(&d2).expect("tokenizer 2");
        check_all(&t1, &t2, "vocab+merges");
        let _ = std::fs::remove_dir_all(d1);
        let _ = std::fs::remove_dir_all(d2);
    }

    #[test]
    fn missing_and_bad_files_name_the_path() {
        let dst = std::env::temp_dir().join(format!("mip-tok-{}-bad", std::process::id()));
        std::fs::create_dir_all(&dst).expect("mkdir");
        match ClipTokenizer::from_dir(&dst) {
            Err(ModelError::Load { path, .. }) => assert!(path.ends_with("vocab.json"), "{path:?}"),
            other => panic!("expected Load error, got {other:?}"),
        }
        std::fs::write(dst.join("tokenizer.json"), "{not json").expect("write");
        match ClipTokenizer::from_dir(&dst) {
            Err(ModelError::Load { path, .. }) => {
                assert!(path.ends_with("tokenizer.json"), "{path:?}")
            }
            other => panic!("expected Load error, got {other:?}"),
        }
        std::fs::write(dst.join("tokenizer_config.json"), "[1, 2").expect("write");
        match ClipTokenizer::from_dir(&dst) {
            Err(ModelError::Load { path, .. }) => {
                assert!(path.ends_with("tokenizer_config.json"), "{path:?}")
            }
            other => panic!("expected Load error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(dst);
    }
}
