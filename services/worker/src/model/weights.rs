//! Strict weight loading: every tensor a module asks for must exist with the right shape, and every tensor in
//! the checkpoint must be asked for. Stock candle ignores unused keys; this backend records which keys were read
//! so that a checkpoint that does not match the code is an error naming the key and the file.
//!
//! Safetensors files are read one tensor at a time ([`LazyFile`]) when a module asks for the tensor, which is then
//! converted to the module's dtype and moved to its device: loading never holds a whole file in host memory.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::lazy_file::LazyFile;
use crate::error::{ModelError, Result};

/// Where a tensor's values are: in memory (tests), or in a safetensors file or torch pickle, read on demand.
enum Source {
    Loaded(Tensor),
    File(Arc<LazyFile>),
    Pickle(Arc<PthTensors>),
}

impl Source {
    fn dims(&self, name: &str) -> Vec<usize> {
        match self {
            Self::Loaded(t) => t.dims().to_vec(),
            Self::File(f) => f.shape(name).map(<[usize]>::to_vec).unwrap_or_default(),
            Self::Pickle(p) => p
                .tensor_infos()
                .get(name)
                .map(|info| info.layout.dims().to_vec())
                .unwrap_or_default(),
        }
    }

    fn tensor(&self, name: &str) -> candle_core::Result<Tensor> {
        match self {
            Self::Loaded(t) => Ok(t.clone()),
            Self::File(f) => f.read(name),
            Self::Pickle(p) => p
                .get(name)?
                .ok_or_else(|| candle_core::Error::Msg(format!("`{name}` is not in the pickle"))),
        }
    }
}

/// A named set of tensors from one or more files, each tensor read from its file when a module asks for it.
pub struct WeightSet {
    /// Key → (where the values are, the key in that file, the file's name for errors).
    tensors: HashMap<String, (Source, String, Arc<str>)>,
    used: Mutex<BTreeSet<String>>,
    first_error: Mutex<Option<ModelError>>,
    label: String,
}

impl WeightSet {
    /// An empty set; `label` names it in errors (usually the file path).
    pub fn empty(label: impl Into<String>) -> Self {
        Self {
            tensors: HashMap::new(),
            used: Mutex::new(BTreeSet::new()),
            first_error: Mutex::new(None),
            label: label.into(),
        }
    }

    /// The tensors of a `.safetensors` file (or of a shard index, `.safetensors.index[.variant].json`), read when
    /// asked for.
    pub fn from_safetensors(path: &Path) -> Result<Self> {
        let mut set = Self::empty(path.display().to_string());
        set.add_safetensors(path, "")?;
        Ok(set)
    }

    /// Adds the tensors of a safetensors file (or shard index), each key prefixed with `prefix`.
    pub fn add_safetensors(&mut self, path: &Path, prefix: &str) -> Result<()> {
        let name = path.to_string_lossy();
        // A shard index: `{stem}.safetensors.index.json`, or `….index.fp16.json` for a variant.
        if path.extension().is_some_and(|e| e == "json") {
            for shard in shard_files(path)? {
                self.add_safetensors(&shard, prefix)?;
            }
            return Ok(());
        }
        let file = Arc::new(LazyFile::open(path).map_err(|e| load_err(path, e))?);
        let origin: Arc<str> = Arc::from(name.as_ref());
        for k in file.names() {
            let source = Source::File(file.clone());
            self.tensors
                .insert(format!("{prefix}{k}"), (source, k.clone(), origin.clone()));
        }
        Ok(())
    }

    /// Adds the tensors of a torch pickle (`.bin`/`.pt`), optionally taking the sub-dict `key`, each key
    /// prefixed with `prefix`.
    pub fn add_pickle(&mut self, path: &Path, key: Option<&str>, prefix: &str) -> Result<()> {
        // Only the pickle is parsed here; each tensor's bytes are read from the zip when asked for.
        let pth = Arc::new(PthTensors::new(path, key).map_err(|e| load_err(path, e))?);
        if pth.tensor_infos().is_empty() {
            return Err(ModelError::Load {
                path: path.to_owned(),
                message: format!("no tensors under key {key:?}"),
            });
        }
        let origin: Arc<str> = Arc::from(path.to_string_lossy().as_ref());
        for k in pth.tensor_infos().keys() {
            let source = Source::Pickle(pth.clone());
            self.tensors
                .insert(format!("{prefix}{k}"), (source, k.clone(), origin.clone()));
        }
        Ok(())
    }

    /// Inserts one tensor by hand (tests, generated models).
    pub fn insert(&mut self, key: impl Into<String>, tensor: Tensor) {
        let origin: Arc<str> = Arc::from(self.label.as_str());
        let key = key.into();
        self.tensors.insert(key.clone(), (Source::Loaded(tensor), key, origin));
    }

    /// Removes one tensor (tests of strict loading).
    pub fn remove(&mut self, key: &str) -> Option<Tensor> {
        let (source, name, _) = self.tensors.remove(key)?;
        source.tensor(&name).ok()
    }

    /// The keys held, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<_> = self.tensors.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Whether a key is present.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// A tensor by key, if present and readable (does not mark it used; reads it from its file if need be).
    pub fn peek(&self, key: &str) -> Option<Tensor> {
        let (source, name, _) = self.tensors.get(key)?;
        source.tensor(name).ok()
    }

    /// Bytes of all the tensors' values in `dtype` (what the device holds once they are loaded in it).
    pub fn bytes_in(&self, dtype: DType) -> u64 {
        let values: u64 = self
            .tensors
            .values()
            .map(|(source, name, _)| source.dims(name).iter().product::<usize>() as u64)
            .sum();
        values * dtype.size_in_bytes() as u64
    }

    /// A tensor's shape by key, without reading its values.
    pub fn dims(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|(source, name, _)| source.dims(name))
    }

    /// A candle `VarBuilder` over this set that converts to `dtype` and moves to `device` on demand.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(Strict(self.clone()));
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    /// Builds a module with `f`, turning a missing or misshapen tensor into a typed error.
    pub fn build<T>(
        self: &Arc<Self>,
        dtype: DType,
        device: &Device,
        f: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
    ) -> Result<T> {
        match f(self.var_builder(dtype, device)) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.take_error().unwrap_or_else(|| ModelError::Load {
                path: PathBuf::from(&self.label),
                message: e.to_string(),
            })),
        }
    }

    /// Fails with the first (sorted) key that no module read.
    pub fn ensure_all_used(&self) -> Result<()> {
        let used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let mut unused: Vec<_> = self.tensors.iter().filter(|(k, _)| !used.contains(*k)).collect();
        unused.sort_by(|a, b| a.0.cmp(b.0));
        match unused.first() {
            None => Ok(()),
            Some((k, (_, _, file))) => Err(ModelError::UnusedKey {
                key: (*k).clone(),
                file: file.to_string(),
            }),
        }
    }

    /// The first missing or misshapen tensor recorded while building from this set, if any. A module built over
    /// two sets (the UNet over its own weights and the adapter's) fails through one; ask the other with this.
    pub fn take_error(&self) -> Option<ModelError> {
        self.first_error.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn record(&self, err: ModelError) -> candle_core::Error {
        let msg = err.to_string();
        let mut slot = self.first_error.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(err);
        }
        candle_core::Error::Msg(msg)
    }

    fn fetch(&self, name: &str, shape: Option<&Shape>, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((source, stored, file)) = self.tensors.get(name) else {
            return Err(self.record(ModelError::MissingKey {
                key: name.to_owned(),
                file: self.label.clone(),
            }));
        };
        if let Some(shape) = shape {
            let found = source.dims(stored);
            if found != shape.dims() {
                return Err(self.record(ModelError::ShapeMismatch {
                    key: name.to_owned(),
                    file: file.to_string(),
                    expected: shape.dims().to_vec(),
                    found,
                }));
            }
        }
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned());
        // Read (from the file, for safetensors), convert, move: the stored bytes live only this long.
        source.tensor(stored)?.to_dtype(dtype)?.to_device(dev)
    }
}

struct Strict(Arc<WeightSet>);

impl SimpleBackend for Strict {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.fetch(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.fetch(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}

fn load_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| load_err(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| load_err(index, e))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| load_err(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<_> = map.values().filter_map(|v| v.as_str()).collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Finds the weights file of a diffusers/transformers component folder: `{stem}.safetensors`, then the
/// `{stem}.fp16.safetensors` variant, then a sharded `{stem}.safetensors.index.json`, then its fp16 variant
/// (`{stem}.safetensors.index.fp16.json` as `save_pretrained(variant="fp16")` names it, or the older
/// `{stem}.fp16.safetensors.index.json`).
pub fn find_weights(dir: &Path, stems: &[&str]) -> Result<PathBuf> {
    let mut tried = Vec::new();
    for stem in stems {
        for name in [
            format!("{stem}.safetensors"),
            format!("{stem}.fp16.safetensors"),
            format!("{stem}.safetensors.index.json"),
            format!("{stem}.safetensors.index.fp16.json"),
            format!("{stem}.fp16.safetensors.index.json"),
        ] {
            let p = dir.join(&name);
            if p.is_file() {
                return Ok(p);
            }
            tried.push(name);
        }
    }
    Err(ModelError::Load {
        path: dir.to_owned(),
        message: format!("no weights file found (tried {})", tried.join(", ")),
    })
}

/// Reads and parses a JSON config file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| load_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Arc<WeightSet> {
        let mut ws = WeightSet::empty("mem");
        ws.insert(
            "a.weight",
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).expect("zeros"),
        );
        ws.insert("b.weight", Tensor::zeros(3, DType::F32, &Device::Cpu).expect("zeros"));
        Arc::new(ws)
    }

    #[test]
    fn missing_key_is_named() {
        let ws = set();
        let err = ws
            .build(DType::F32, &Device::Cpu, |vb| vb.get((2, 3), "c.weight"))
            .expect_err("missing");
        assert!(
            matches!(err, ModelError::MissingKey { ref key, .. } if key == "c.weight"),
            "{err}"
        );
    }

    #[test]
    fn unused_key_is_named() {
        let ws = set();
        ws.build(DType::F32, &Device::Cpu, |vb| vb.get((2, 3), "a.weight"))
            .expect("present");
        let err = ws.ensure_all_used().expect_err("b unused");
        assert!(
            matches!(err, ModelError::UnusedKey { ref key, .. } if key == "b.weight"),
            "{err}"
        );
    }

    #[test]
    fn wrong_shape_is_named() {
        let ws = set();
        let err = ws
            .build(DType::F32, &Device::Cpu, |vb| vb.get((3, 2), "a.weight"))
            .expect_err("shape");
        assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err}");
    }
}
