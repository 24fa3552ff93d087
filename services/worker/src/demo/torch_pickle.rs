//! Writing generated weights as a torch checkpoint (`torch.save`'s zip format): `{name}/data.pkl` holds a
//! protocol-2 pickle of a dict of state dicts (`{"image_proj": OrderedDict, "ip_adapter": OrderedDict}` for an
//! IP-Adapter checkpoint), each tensor a `torch._utils._rebuild_tensor_v2` call on a persistent storage
//! `("storage", torch.HalfStorage, key, "cpu", numel)`; the storages are the entries `{name}/data/{key}`, stored
//! uncompressed and 64-byte aligned as torch writes them, and each is drawn and written one at a time.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::DType;
use safetensors::View;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use super::safetensors_out::Values;
use crate::error::{ModelError, Result};

/// One state dict of the checkpoint: its key in the top-level dict and its tensors (name, shape), in order.
pub struct StateDict {
    pub key: String,
    pub entries: Vec<(String, Vec<usize>)>,
}

fn storage_class(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F32 => "FloatStorage",
        other => {
            return Err(ModelError::Config {
                path: Default::default(),
                message: format!("cannot store generated weights as {other:?}"),
            })
        }
    })
}

/// A protocol-2 pickle writer with just the opcodes a state dict needs.
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) -> &mut Self {
        self.0.push(op);
        self
    }

    fn text(&mut self, s: &str) -> &mut Self {
        // BINUNICODE: u32 length, UTF-8 bytes.
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    fn int(&mut self, v: usize) -> &mut Self {
        match i32::try_from(v) {
            // BININT: signed 32-bit.
            Ok(v) => {
                self.0.push(b'J');
                self.0.extend_from_slice(&v.to_le_bytes());
            }
            // LONG1: a length byte, then little-endian two's complement (a zero byte keeps it positive).
            Err(_) => {
                let mut bytes = (v as u64).to_le_bytes().to_vec();
                while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] & 0x80 == 0 {
                    bytes.pop();
                }
                self.0.extend_from_slice(&[0x8a, bytes.len() as u8]);
                self.0.extend_from_slice(&bytes);
            }
        }
        self
    }

    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }

    fn ints(&mut self, values: &[usize]) -> &mut Self {
        self.op(b'(');
        for &v in values {
            self.int(v);
        }
        self.op(b't')
    }

    fn ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(b')').op(b'R')
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The pickle of `dicts`, storages numbered in order from 0.
fn pickle(dicts: &[StateDict], dtype: DType) -> Result<Vec<u8>> {
    let storage = storage_class(dtype)?;
    let mut p = Pickle(vec![0x80, 2]);
    p.op(b'}').op(b'(');
    let mut key = 0usize;
    for dict in dicts {
        p.text(&dict.key).ordered_dict().op(b'(');
        for (name, shape) in &dict.entries {
            let numel: usize = shape.iter().product();
            p.text(name).global("torch._utils", "_rebuild_tensor_v2").op(b'(');
            p.op(b'(')
                .text("storage")
                .global("torch", storage)
                .text(&key.to_string())
                .text("cpu")
                .int(numel)
                .op(b't')
                .op(b'Q');
            p.int(0).ints(shape).ints(&strides(shape)).op(0x89).ordered_dict();
            p.op(b't').op(b'R');
            key += 1;
        }
        p.op(b'u');
    }
    p.op(b'u').op(b'.');
    Ok(p.0)
}

/// Writes `dicts` as a torch checkpoint at `path`, values stored as `dtype`. Returns the file's size.
pub fn write_torch_checkpoint(path: &Path, dicts: &[StateDict], dtype: DType, values: &Values) -> Result<u64> {
    let err = |e: &dyn std::fmt::Display| ModelError::Load {
        path: path.to_owned(),
        message: format!("cannot write: {e}"),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    }
    let archive = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("archive");
    let file = File::create(path).map_err(|e| err(&e))?;
    let mut zip = ZipWriter::new(BufWriter::with_capacity(8 << 20, file));
    let opts = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .large_file(true)
        .with_alignment(64);
    let put = |zip: &mut ZipWriter<_>, name: String, bytes: &[u8]| -> Result<()> {
        zip.start_file(name, opts).map_err(|e| err(&e))?;
        zip.write_all(bytes).map_err(|e| err(&e))
    };
    put(&mut zip, format!("{archive}/data.pkl"), &pickle(dicts, dtype)?)?;
    put(&mut zip, format!("{archive}/byteorder"), b"little")?;
    let mut key = 0usize;
    for dict in dicts {
        for (name, shape) in &dict.entries {
            let t = values(&format!("{}.{name}", dict.key), shape)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| err(&format!("drawing `{}.{name}`: {e}", dict.key)))?;
            put(&mut zip, format!("{archive}/data/{key}"), &t.data())?;
            key += 1;
        }
    }
    put(&mut zip, format!("{archive}/version"), b"3\n")?;
    let mut out = zip.finish().map_err(|e| err(&e))?;
    out.flush().map_err(|e| err(&e))?;
    std::fs::metadata(path).map(|m| m.len()).map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::image_proj::load_adapter_weights;

    fn values(name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let base = name.len() as f32;
        Tensor::from_vec(
            (0..n).map(|i| base - i as f32 / 8.0).collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        )
    }

    #[test]
    fn large_integers_are_long1() {
        let mut p = Pickle(Vec::new());
        p.int(7).int(1 << 31).int(u32::MAX as usize + 2);
        assert_eq!(&p.0[..5], &[b'J', 7, 0, 0, 0]);
        // 2^31 needs a fifth byte to stay positive; 2^32 + 1 too.
        assert_eq!(&p.0[5..12], &[0x8a, 5, 0, 0, 0, 0x80, 0]);
        assert_eq!(&p.0[12..], &[0x8a, 5, 1, 0, 0, 0, 1]);
    }

    #[test]
    fn adapter_pickle_reads_back_with_the_adapter_loader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model_sdxl.bin");
        let dicts = [
            StateDict {
                key: "image_proj".into(),
                entries: vec![("proj.weight".into(), vec![8, 4]), ("norm.bias".into(), vec![2])],
            },
            StateDict {
                key: "ip_adapter".into(),
                entries: vec![("1.to_k_ip.weight".into(), vec![3, 2, 2])],
            },
        ];
        write_torch_checkpoint(&path, &dicts, DType::F16, &values).expect("write");
        let ws = load_adapter_weights(&path).expect("our loader reads it");
        assert_eq!(
            ws.keys(),
            vec![
                "image_proj.norm.bias",
                "image_proj.proj.weight",
                "ip_adapter.1.to_k_ip.weight"
            ]
        );
        for (key, shape) in [
            ("image_proj.proj.weight", vec![8, 4]),
            ("ip_adapter.1.to_k_ip.weight", vec![3, 2, 2]),
        ] {
            let got = ws.peek(key).expect("present");
            assert_eq!(got.dtype(), DType::F16);
            let want = values(key, &shape)
                .and_then(|t| t.to_dtype(DType::F16))
                .expect("values");
            let diff = (got.to_dtype(DType::F32).expect("f32") - want.to_dtype(DType::F32).expect("f32"))
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(diff, 0.0, "{key}");
        }
    }
}
