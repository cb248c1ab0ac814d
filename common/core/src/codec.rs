//! Tensors as bytes for the store and the wire: a small header (magic, dtype, shape) followed
//! by the elements in little-endian order. Self-describing, so a reader never needs to know
//! the shape in advance, and a truncated value is detected rather than misread.

use candle_core::{DType, Device, Tensor};

const MAGIC: &[u8; 4] = b"TSR1";
/// Ranks above this are not used anywhere in Tessera; the bound keeps a corrupt header from
/// asking for absurd allocations.
const MAX_RANK: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("tensor bytes are corrupt: {0}")]
    Corrupt(String),
    #[error("tensor dtype {0:?} cannot be stored (f32, f16, bf16, u8 can)")]
    Unsupported(DType),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CodecError>;

fn dtype_code(dtype: DType) -> Result<u8> {
    Ok(match dtype {
        DType::F32 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::U8 => 4,
        other => return Err(CodecError::Unsupported(other)),
    })
}

fn code_dtype(code: u8) -> Result<DType> {
    Ok(match code {
        1 => DType::F32,
        2 => DType::F16,
        3 => DType::BF16,
        4 => DType::U8,
        other => return Err(CodecError::Corrupt(format!("unknown dtype code {other}"))),
    })
}

/// Encodes a tensor (any device) as header + little-endian elements.
pub fn encode(t: &Tensor) -> Result<Vec<u8>> {
    let code = dtype_code(t.dtype())?;
    let dims = t.dims();
    if dims.len() > MAX_RANK {
        return Err(CodecError::Corrupt(format!(
            "rank {} > {MAX_RANK}",
            dims.len()
        )));
    }
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    let n = flat.elem_count();
    let mut out = Vec::with_capacity(6 + 8 * dims.len() + n * t.dtype().size_in_bytes());
    out.extend_from_slice(MAGIC);
    out.push(code);
    out.push(dims.len() as u8);
    for &d in dims {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    // The values are read out a slice at a time, so a gigapixel latent is not copied whole
    // once more before it is written.
    const SLICE: usize = 1 << 20;
    let mut start = 0;
    while start < n {
        let part = flat.narrow(0, start, SLICE.min(n - start))?;
        match t.dtype() {
            DType::F32 => {
                for v in part.to_vec1::<f32>()? {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            DType::F16 => {
                for v in part.to_vec1::<half::f16>()? {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            DType::BF16 => {
                for v in part.to_vec1::<half::bf16>()? {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            DType::U8 => out.extend_from_slice(&part.to_vec1::<u8>()?),
            other => return Err(CodecError::Unsupported(other)),
        }
        start += SLICE;
    }
    Ok(out)
}

/// Decodes bytes written by [`encode`] onto `device`.
pub fn decode(bytes: &[u8], device: &Device) -> Result<Tensor> {
    let corrupt = |m: String| CodecError::Corrupt(m);
    if bytes.len() < 6 || &bytes[..4] != MAGIC {
        return Err(corrupt("missing TSR1 header".into()));
    }
    let dtype = code_dtype(bytes[4])?;
    let rank = bytes[5] as usize;
    if rank > MAX_RANK {
        return Err(corrupt(format!("rank {rank} > {MAX_RANK}")));
    }
    let data_at = 6 + 8 * rank;
    if bytes.len() < data_at {
        return Err(corrupt("header cut short".into()));
    }
    let mut dims = Vec::with_capacity(rank);
    let mut n: usize = 1;
    for i in 0..rank {
        let at = 6 + 8 * i;
        let d = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize;
        n = n
            .checked_mul(d)
            .ok_or_else(|| corrupt("shape overflows".into()))?;
        dims.push(d);
    }
    let data = &bytes[data_at..];
    let want = n
        .checked_mul(dtype.size_in_bytes())
        .ok_or_else(|| corrupt("shape overflows".into()))?;
    if data.len() != want {
        return Err(corrupt(format!(
            "shape {dims:?} needs {want} bytes of {dtype:?}, found {}",
            data.len()
        )));
    }
    let t = match dtype {
        DType::F32 => {
            let v: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            Tensor::from_vec(v, dims, device)?
        }
        DType::F16 => {
            let v: Vec<half::f16> = data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(c.try_into().expect("2 bytes")))
                .collect();
            Tensor::from_vec(v, dims, device)?
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().expect("2 bytes")))
                .collect();
            Tensor::from_vec(v, dims, device)?
        }
        DType::U8 => Tensor::from_vec(data.to_vec(), dims, device)?,
        other => return Err(CodecError::Unsupported(other)),
    };
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype_bit_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let base = Tensor::new(
            &[[1.5f32, -0.0, f32::MIN_POSITIVE], [3.25, -7.0, 1e-30]],
            &dev,
        )?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = base.to_dtype(dtype)?;
            let back = decode(&encode(&t)?, &dev)?;
            assert_eq!(back.dtype(), dtype);
            assert_eq!(back.dims(), &[2, 3]);
            let (a, b) = (
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                back.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b));
        }
        let u = Tensor::new(&[7u8, 0, 255], &dev)?;
        assert_eq!(
            decode(&encode(&u)?, &dev)?.to_vec1::<u8>()?,
            vec![7, 0, 255]
        );
        let scalar = Tensor::new(2.5f32, &dev)?;
        assert_eq!(decode(&encode(&scalar)?, &dev)?.to_scalar::<f32>()?, 2.5);
        Ok(())
    }

    #[test]
    fn truncated_or_foreign_bytes_are_rejected() -> Result<()> {
        let t = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
        let bytes = encode(&t)?;
        for bad in [&bytes[..bytes.len() - 1], &bytes[..10], b"nope".as_slice()] {
            let err = decode(bad, &Device::Cpu).unwrap_err();
            assert!(matches!(err, CodecError::Corrupt(_)), "{err}");
        }
        let mut wrong = bytes.clone();
        wrong[4] = 99;
        assert!(decode(&wrong, &Device::Cpu).is_err());
        Ok(())
    }
}
