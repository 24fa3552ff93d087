//! Writing generated weights as `.safetensors`, one tensor at a time: the header is computed from the shapes, then
//! each tensor's values are drawn, converted to the stored dtype and written before the next is drawn, so a file of
//! several gigabytes is written with one tensor in memory. Also the sharded form `save_pretrained` writes (numbered
//! shards plus a `.index.json` weight map, with the `variant` naming of diffusers and transformers).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use safetensors::View;
use serde_json::{json, Value};

use crate::error::{ModelError, Result};

/// Draws the values of one tensor by name and shape.
pub type Values<'a> = dyn Fn(&str, &[usize]) -> candle_core::Result<Tensor> + 'a;

/// Where and how to shard a checkpoint: `{dir}/{stem}[.{variant}]-0000i-of-0000n.safetensors` and the index
/// `{dir}/{stem}.safetensors.index[.{variant}].json`.
#[derive(Debug, Clone)]
pub struct Sharding {
    pub dir: PathBuf,
    pub stem: String,
    pub variant: Option<String>,
    pub max_bytes: u64,
}

impl Sharding {
    /// The index file's path.
    pub fn index_path(&self) -> PathBuf {
        match &self.variant {
            Some(v) => self.dir.join(format!("{}.safetensors.index.{v}.json", self.stem)),
            None => self.dir.join(format!("{}.safetensors.index.json", self.stem)),
        }
    }

    fn shard_name(&self, i: usize, n: usize) -> String {
        match &self.variant {
            Some(v) => format!("{}.{v}-{:05}-of-{n:05}.safetensors", self.stem, i + 1),
            None => format!("{}-{:05}-of-{n:05}.safetensors", self.stem, i + 1),
        }
    }
}

fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F32 => "F32",
        other => {
            return Err(ModelError::Config {
                path: PathBuf::new(),
                message: format!("cannot store generated weights as {other:?}"),
            })
        }
    })
}

/// Writes `entries` (name, shape), sorted by name, to one file. Returns the file's size.
pub fn write_safetensors(path: &Path, dtype: DType, entries: &[(String, Vec<usize>)], values: &Values) -> Result<u64> {
    let mut sorted = entries.to_vec();
    sorted.sort();
    let elem = dtype.size_in_bytes();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in &sorted {
        let len = shape.iter().product::<usize>() * elem;
        header.insert(
            name.clone(),
            json!({"dtype": dtype_name(dtype)?, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut text = Value::Object(header).to_string().into_bytes();
    // The data starts on an 8-byte boundary (the format pads the header with spaces).
    text.resize(text.len().div_ceil(8) * 8, b' ');
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| write_err(path, e))?;
    }
    let file = File::create(path).map_err(|e| write_err(path, e))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    out.write_all(&(text.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(&text))
        .map_err(|e| write_err(path, e))?;
    for (name, shape) in &sorted {
        let t = values(name, shape)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| write_err(path, format!("drawing `{name}`: {e}")))?;
        out.write_all(&t.data()).map_err(|e| write_err(path, e))?;
    }
    out.flush().map_err(|e| write_err(path, e))?;
    Ok(8 + text.len() as u64 + offset as u64)
}

/// Writes `entries` as shards of at most `sharding.max_bytes` (a tensor larger than that gets a shard of its own)
/// and the index naming each tensor's shard. Returns the bytes of all shards.
pub fn write_sharded(
    sharding: &Sharding,
    dtype: DType,
    entries: &[(String, Vec<usize>)],
    values: &Values,
) -> Result<u64> {
    let mut sorted = entries.to_vec();
    sorted.sort();
    let elem = dtype.size_in_bytes() as u64;
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, shape) in sorted {
        let len = shape.iter().product::<usize>() as u64 * elem;
        let current = shards.last().map_or(0, Vec::len);
        if current > 0 && size + len > sharding.max_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += len;
        if let Some(last) = shards.last_mut() {
            last.push((name, shape));
        }
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    let mut written = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = sharding.shard_name(i, n);
        for (name, shape) in shard {
            weight_map.insert(name.clone(), file.clone());
            total += shape.iter().product::<usize>() as u64 * elem;
        }
        written += write_safetensors(&sharding.dir.join(&file), dtype, shard, values)?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = sharding.index_path();
    let text = serde_json::to_string_pretty(&index).map_err(|e| write_err(&path, e))?;
    std::fs::write(&path, text).map_err(|e| write_err(&path, e))?;
    Ok(written)
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.to_owned(),
        message: format!("cannot write: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::weights::WeightSet;

    fn values(name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let base = name.len() as f32;
        Tensor::from_vec(
            (0..n).map(|i| base + i as f32 / 4.0).collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        )
    }

    fn entries() -> Vec<(String, Vec<usize>)> {
        vec![
            ("b.w".into(), vec![3, 2]),
            ("a".into(), vec![5]),
            ("ccc".into(), vec![2, 2, 2]),
        ]
    }

    #[test]
    fn one_file_reads_back_with_candle_and_our_loader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.fp16.safetensors");
        let size = write_safetensors(&path, DType::F16, &entries(), &values).expect("write");
        assert_eq!(size, std::fs::metadata(&path).expect("meta").len());
        let read = candle_core::safetensors::load(&path, &Device::Cpu).expect("candle reads it");
        for (name, shape) in entries() {
            let t = &read[&name];
            assert_eq!(t.dtype(), DType::F16);
            let want = values(&name, &shape)
                .and_then(|t| t.to_dtype(DType::F16))
                .expect("values");
            let diff = (t.to_dtype(DType::F32).expect("f32") - want.to_dtype(DType::F32).expect("f32"))
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(diff, 0.0, "{name}");
        }
    }

    #[test]
    fn shards_follow_the_size_limit_and_the_index_names_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sharding = Sharding {
            dir: dir.path().to_owned(),
            stem: "diffusion_pytorch_model".into(),
            variant: Some("fp16".into()),
            max_bytes: 16,
        };
        write_sharded(&sharding, DType::F16, &entries(), &values).expect("write");
        let index = sharding.index_path();
        assert!(index.ends_with("diffusion_pytorch_model.safetensors.index.fp16.json"));
        // a (10 bytes) fits one shard; b.w (12) and ccc (16) each need their own.
        for i in 1..=3 {
            let shard = dir
                .path()
                .join(format!("diffusion_pytorch_model.fp16-0000{i}-of-00003.safetensors"));
            assert!(shard.is_file(), "{}", shard.display());
        }
        let ws = WeightSet::from_safetensors(&index).expect("index loads");
        assert_eq!(ws.keys(), vec!["a", "b.w", "ccc"]);
        assert_eq!(ws.dims("ccc"), Some(vec![2, 2, 2]));
    }
}
