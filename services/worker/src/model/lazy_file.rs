//! A `.safetensors` file read one tensor at a time. Opening reads only the header (names, dtypes, shapes, byte
//! ranges, checked against the file's length); a tensor's bytes are read when a module asks for it, and can be
//! dropped as soon as they are converted and on the device. A multi-gigabyte checkpoint therefore never sits in host
//! memory whole, beside its converted copy, as it does with a whole-file load.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// Headers larger than this are refused (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Debug, Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// One tensor's place in the file.
#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// The header of a safetensors file, and where to read each tensor from.
#[derive(Debug)]
pub struct LazyFile {
    path: PathBuf,
    entries: HashMap<String, Entry>,
}

fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl LazyFile {
    /// Reads and checks the header of `path`.
    pub fn open(path: &Path) -> Result<Self, String> {
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let file_len = f.metadata().map_err(|e| e.to_string())?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .map_err(|e| format!("reading the header length: {e}"))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || 8 + n > file_len {
            return Err(format!("header length {n} does not fit the file ({file_len} bytes)"));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header)
            .map_err(|e| format!("reading the header: {e}"))?;
        let raw: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| format!("header is not JSON: {e}"))?;
        let data_start = 8 + n;
        let mut entries = HashMap::with_capacity(raw.len());
        for (name, v) in raw {
            if name == "__metadata__" {
                continue;
            }
            let e: RawEntry = serde_json::from_value(v).map_err(|e| format!("tensor `{name}`: {e}"))?;
            let dtype = dtype_of(&e.dtype).ok_or_else(|| format!("tensor `{name}`: unsupported dtype {}", e.dtype))?;
            let [begin, end] = e.data_offsets;
            let want = e.shape.iter().product::<usize>() * dtype.size_in_bytes();
            if end < begin || (end - begin) as usize != want || data_start + end > file_len {
                return Err(format!(
                    "tensor `{name}`: bytes {begin}..{end} do not hold a {:?} {:?} inside the file",
                    e.dtype, e.shape
                ));
            }
            entries.insert(
                name,
                Entry {
                    dtype,
                    shape: e.shape,
                    start: data_start + begin,
                    len: want,
                },
            );
        }
        Ok(Self {
            path: path.to_owned(),
            entries,
        })
    }

    /// The tensor names.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// A tensor's shape, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Reads one tensor into host memory in its stored dtype.
    pub fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}` in {}", self.path.display())))?;
        let io = |err: std::io::Error| candle_core::Error::Msg(format!("{}: `{name}`: {err}", self.path.display()));
        let mut f = File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(e.start)).map_err(io)?;
        let mut bytes = vec![0u8; e.len];
        f.read_exact(&mut bytes).map_err(io)?;
        Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_candle_wrote_and_refuses_bad_headers() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("t.safetensors");
        let a = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .and_then(|t| t.reshape((3, 4)))
            .expect("a");
        let b = Tensor::new(&[1u8, 2, 3], &Device::Cpu).expect("b");
        let c = a.to_dtype(DType::F16).expect("c");
        let map: HashMap<String, Tensor> = [
            ("a".to_owned(), a.clone()),
            ("b".to_owned(), b.clone()),
            ("c".to_owned(), c.clone()),
        ]
        .into();
        candle_core::safetensors::save(&map, &path).expect("save");
        let f = LazyFile::open(&path).expect("open");
        let mut names: Vec<&String> = f.names().collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(f.shape("a"), Some(&[3usize, 4][..]));
        for (name, want) in [("a", &a), ("b", &b), ("c", &c)] {
            let got = f.read(name).expect("read");
            assert_eq!(got.dtype(), want.dtype());
            let diff = got
                .to_dtype(DType::F32)
                .and_then(|g| g.sub(&want.to_dtype(DType::F32)?))
                .expect("diff");
            let max = diff
                .abs()
                .and_then(|d| d.flatten_all()?.max(0)?.to_scalar::<f32>())
                .expect("max");
            assert_eq!(max, 0.0, "{name}");
        }
        assert!(f.read("zz").is_err());

        // Truncated file: the last tensor's bytes are no longer inside it.
        let bytes = std::fs::read(&path).expect("read");
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 2]).expect("write");
        assert!(LazyFile::open(&cut).expect_err("truncated").contains("inside the file"));
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, [255u8; 16]).expect("write");
        assert!(LazyFile::open(&junk).is_err());
    }
}
