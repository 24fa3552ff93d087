//! A stored form of an embedding (a subject's image tokens, a name's text embedding) that restores bit-exactly:
//! a small header — magic, format version, dtype, shape — then the little-endian element bytes and a checksum of
//! everything before it. A value that fails any check is reported as corrupt, never half-decoded.

use candle_core::{DType, Device, Tensor};

const MAGIC: &[u8; 4] = b"MIPE";
/// Version of the byte layout; bump it when the layout changes.
pub const FORMAT_VERSION: u8 = 1;

/// Why bytes could not be turned back into a tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("embedding value is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("embedding value has format version {0}, expected {FORMAT_VERSION}")]
    Version(u8),
}

fn dtype_code(d: DType) -> Option<u8> {
    match d {
        DType::F32 => Some(0),
        DType::F16 => Some(1),
        DType::BF16 => Some(2),
        _ => None,
    }
}

fn code_dtype(c: u8) -> Option<DType> {
    [DType::F32, DType::F16, DType::BF16].get(usize::from(c)).copied()
}

/// FNV-1a, 64 bit: detects truncation and bit flips of a stored value (not an adversary).
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Serialises a float tensor (f32, f16 or bf16) of any shape.
pub fn encode(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let code = dtype_code(t.dtype()).ok_or_else(|| candle_core::Error::Msg(format!("cannot store {:?}", t.dtype())))?;
    let dims = t.dims();
    let mut out = Vec::with_capacity(16 + 4 * dims.len() + t.elem_count() * t.dtype().size_in_bytes());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.push(code);
    out.push(u8::try_from(dims.len()).map_err(|_| candle_core::Error::Msg("too many dimensions".into()))?);
    for &d in dims {
        out.extend_from_slice(
            &u32::try_from(d)
                .map_err(|_| candle_core::Error::Msg("dimension too large".into()))?
                .to_le_bytes(),
        );
    }
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        _ => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
    }
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// Restores a tensor written by [`encode`] onto `device`.
pub fn decode(bytes: &[u8], device: &Device) -> Result<Tensor, DecodeError> {
    let corrupt = DecodeError::Corrupt;
    if bytes.len() < 15 || &bytes[..4] != MAGIC {
        return Err(corrupt("bad magic or too short"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    let sum = u64::from_le_bytes(sum.try_into().map_err(|_| corrupt("checksum"))?);
    if checksum(body) != sum {
        return Err(corrupt("checksum mismatch"));
    }
    if body[4] != FORMAT_VERSION {
        return Err(DecodeError::Version(body[4]));
    }
    let dtype = code_dtype(body[5]).ok_or(corrupt("unknown dtype"))?;
    let ndim = usize::from(body[6]);
    let mut pos = 7;
    let mut dims = Vec::with_capacity(ndim);
    for _ in 0..ndim {
        let d = body.get(pos..pos + 4).ok_or(corrupt("truncated shape"))?;
        dims.push(u32::from_le_bytes(d.try_into().map_err(|_| corrupt("shape"))?) as usize);
        pos += 4;
    }
    let payload = &body[pos..];
    let count: usize = dims.iter().product();
    if payload.len() != count * dtype.size_in_bytes() {
        return Err(corrupt("payload length does not match the shape"));
    }
    let t = match dtype {
        DType::F32 => {
            let v: Vec<f32> = payload
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, dims, device)
        }
        DType::F16 => {
            let v: Vec<half::f16> = payload
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, dims, device)
        }
        _ => {
            let v: Vec<half::bf16> = payload
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, dims, device)
        }
    };
    t.map_err(|_| corrupt("tensor construction"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dtype: DType) -> Tensor {
        let t = Tensor::randn(0f32, 1.0, (4, 3, 2), &Device::Cpu).expect("randn");
        t.to_dtype(dtype).expect("dtype")
    }

    #[test]
    fn round_trip_is_bit_exact() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = sample(dtype);
            let back = decode(&encode(&t).expect("encode"), &Device::Cpu).expect("decode");
            assert_eq!(back.dims(), t.dims());
            assert_eq!(back.dtype(), dtype);
            let a = t
                .to_dtype(DType::F32)
                .and_then(|x| x.flatten_all())
                .and_then(|x| x.to_vec1::<f32>())
                .expect("a");
            let b = back
                .to_dtype(DType::F32)
                .and_then(|x| x.flatten_all())
                .and_then(|x| x.to_vec1::<f32>())
                .expect("b");
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[test]
    fn damage_is_detected() {
        let bytes = encode(&sample(DType::F32)).expect("encode");
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert_eq!(
            decode(&flipped, &Device::Cpu).err(),
            Some(DecodeError::Corrupt("checksum mismatch"))
        );
        assert!(decode(&bytes[..bytes.len() - 3], &Device::Cpu).is_err());
        assert!(decode(b"", &Device::Cpu).is_err());
        assert!(decode(b"garbage-garbage-garbage", &Device::Cpu).is_err());
    }
}
