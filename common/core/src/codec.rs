//! Tensors as bytes for the store and the wire: a small header (magic, dtype, shape) followed
//! by the elements in little-endian order. Self-describing, so a reader never needs to know
//! the shape in advance, and a truncated value is detected rather than misread.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::slice::HalfFloatSliceExt;

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

/// The header of a tensor of `dtype` and `dims`, in a buffer with room for its elements.
pub fn header(dtype: DType, dims: &[usize]) -> Result<Vec<u8>> {
    let code = dtype_code(dtype)?;
    if dims.len() > MAX_RANK {
        return Err(CodecError::Corrupt(format!(
            "rank {} > {MAX_RANK}",
            dims.len()
        )));
    }
    let n: usize = dims.iter().product();
    let mut out = Vec::with_capacity(6 + 8 * dims.len() + n * dtype.size_in_bytes());
    out.extend_from_slice(MAGIC);
    out.push(code);
    out.push(dims.len() as u8);
    for &d in dims {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    Ok(out)
}

/// Elements converted per pass through a stack buffer (the f16 conversions are vectorised).
const CHUNK: usize = 512;

/// Appends `vals` to an encoding as `dtype` elements: the same bytes as converting a tensor
/// with candle's `to_dtype` (both round to nearest even, element by element) and encoding
/// it, without the intermediate tensors.
pub fn push_f32_as(out: &mut Vec<u8>, dtype: DType, vals: &[f32]) -> Result<()> {
    match dtype {
        DType::F32 => push_le(out, vals, |v| v.to_le_bytes()),
        DType::F16 => {
            let mut buf = [half::f16::ZERO; CHUNK];
            for part in vals.chunks(CHUNK) {
                let buf = &mut buf[..part.len()];
                buf.convert_from_f32_slice(part);
                push_le(out, buf, |v| v.to_le_bytes());
            }
        }
        DType::BF16 => {
            let mut buf = [half::bf16::ZERO; CHUNK];
            for part in vals.chunks(CHUNK) {
                let buf = &mut buf[..part.len()];
                buf.convert_from_f32_slice(part);
                push_le(out, buf, |v| v.to_le_bytes());
            }
        }
        other => return Err(CodecError::Unsupported(other)),
    }
    Ok(())
}

/// Appends each value's little-endian bytes (resized once, then filled: the loop vectorises).
fn push_le<T: Copy, const N: usize>(out: &mut Vec<u8>, vals: &[T], bytes: impl Fn(T) -> [u8; N]) {
    let at = out.len();
    out.resize(at + N * vals.len(), 0);
    for (dst, &v) in out[at..].chunks_exact_mut(N).zip(vals) {
        dst.copy_from_slice(&bytes(v));
    }
}

/// Encodes a tensor (any device) as header + little-endian elements.
pub fn encode(t: &Tensor) -> Result<Vec<u8>> {
    let mut out = header(t.dtype(), t.dims())?;
    if push_in_place(&mut out, t) {
        return Ok(out);
    }
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    let n = flat.elem_count();
    // The values are read out a slice at a time, so a gigapixel latent is not copied whole
    // once more before it is written.
    const SLICE: usize = 1 << 20;
    let mut start = 0;
    while start < n {
        let part = flat.narrow(0, start, SLICE.min(n - start))?;
        match t.dtype() {
            DType::F32 => push_le(&mut out, &part.to_vec1::<f32>()?, f32::to_le_bytes),
            DType::F16 => push_le(&mut out, &part.to_vec1::<half::f16>()?, |v| v.to_le_bytes()),
            DType::BF16 => push_le(&mut out, &part.to_vec1::<half::bf16>()?, |v| {
                v.to_le_bytes()
            }),
            DType::U8 => out.extend_from_slice(&part.to_vec1::<u8>()?),
            other => return Err(CodecError::Unsupported(other)),
        }
        start += SLICE;
    }
    Ok(out)
}

/// `f` over the values of a contiguous f32 CPU tensor, read where they lie; `None` for any
/// other tensor.
pub fn with_f32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((from, to))) => Some(f(&v[from..to])),
        _ => None,
    }
}

/// Appends a contiguous CPU tensor's elements straight from its storage (a checkpointed
/// stage latent is not copied out first); false, with nothing written, for any other tensor.
fn push_in_place(out: &mut Vec<u8>, t: &Tensor) -> bool {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((from, to))) = (&*storage, layout.contiguous_offsets()) else {
        return false;
    };
    match cpu {
        CpuStorage::F32(v) => push_le(out, &v[from..to], f32::to_le_bytes),
        CpuStorage::F16(v) => push_le(out, &v[from..to], |x| x.to_le_bytes()),
        CpuStorage::BF16(v) => push_le(out, &v[from..to], |x| x.to_le_bytes()),
        CpuStorage::U8(v) => out.extend_from_slice(&v[from..to]),
        _ => return false,
    }
    true
}

/// The dtype, dims and element bytes of an encoding, checked against each other.
fn parse(bytes: &[u8]) -> Result<(DType, Vec<usize>, &[u8])> {
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
    Ok((dtype, dims, data))
}

/// Decodes bytes written by [`encode`] onto `device`.
pub fn decode(bytes: &[u8], device: &Device) -> Result<Tensor> {
    let (dtype, dims, data) = parse(bytes)?;
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

/// Decodes a floating-point encoding straight to f32 values with its dims: the same values
/// as [`decode`] then `to_dtype(F32)` (widening is exact), without the intermediate tensors.
pub fn decode_f32(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    let (dtype, dims, data) = parse(bytes)?;
    let n = data.len() / dtype.size_in_bytes().max(1);
    // Filled as it is decoded, not zeroed first: a step reads a megabyte of predictions per
    // task, and zeroing each buffer before overwriting it was a pass over all of them.
    let mut out = Vec::with_capacity(n);
    match dtype {
        DType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))),
        ),
        DType::F16 => widen::<half::f16>(data, &mut out),
        DType::BF16 => widen::<half::bf16>(data, &mut out),
        other => return Err(CodecError::Unsupported(other)),
    }
    Ok((dims, out))
}

/// Two-byte floats to f32, appended to `out`, through stack buffers (the slice conversion is
/// vectorised).
fn widen<T: Copy + Default>(data: &[u8], out: &mut Vec<f32>)
where
    [T]: HalfFloatSliceExt,
{
    let (mut narrow, mut wide) = ([T::default(); CHUNK], [0f32; CHUNK]);
    for src in data.chunks(2 * CHUNK) {
        let n = src.len() / 2;
        for (b, c) in narrow[..n]
            .reinterpret_cast_mut()
            .iter_mut()
            .zip(src.chunks_exact(2))
        {
            *b = u16::from_le_bytes([c[0], c[1]]);
        }
        narrow[..n].convert_to_f32_slice(&mut wide[..n]);
        out.extend_from_slice(&wide[..n]);
    }
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

    /// Values that round, overflow, underflow to subnormals or are not numbers.
    fn awkward_values() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0 / 3.0,
            65504.0,
            65520.0,
            1e6,
            -1e-7,
            5.96e-8,
            2.98e-8,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.000_976_6,
            1.000_488_3,
        ];
        v.extend((0..1500).map(|k| ((k as f32) * 0.731).sin() * 10f32.powi(k % 9 - 4)));
        v
    }

    #[test]
    fn values_pushed_as_a_dtype_are_the_bytes_of_converting_the_tensor() -> Result<()> {
        let vals = awkward_values();
        let t = Tensor::from_vec(vals.clone(), (2, vals.len() / 2), &Device::Cpu)?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut pushed = header(dtype, t.dims())?;
            push_f32_as(&mut pushed, dtype, &vals)?;
            assert_eq!(pushed, encode(&t.to_dtype(dtype)?)?, "{dtype:?}");
        }
        assert!(push_f32_as(&mut Vec::new(), DType::U8, &vals).is_err());
        Ok(())
    }

    #[test]
    fn decoding_to_f32_gives_the_values_of_decoding_then_converting() -> Result<()> {
        let vals = awkward_values();
        let t = Tensor::from_vec(vals.clone(), (vals.len() / 2, 2), &Device::Cpu)?;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let bytes = encode(&t.to_dtype(dtype)?)?;
            let (dims, got) = decode_f32(&bytes)?;
            let want = decode(&bytes, &Device::Cpu)?.to_dtype(DType::F32)?;
            assert_eq!(dims, want.dims());
            assert_eq!(bits(&got), bits(&want.flatten_all()?.to_vec1::<f32>()?));
            assert!(decode_f32(&bytes[..bytes.len() - 2]).is_err());
        }
        let u = encode(&Tensor::new(&[1u8, 2], &Device::Cpu)?)?;
        assert!(matches!(decode_f32(&u), Err(CodecError::Unsupported(_))));
        Ok(())
    }

    #[test]
    fn a_strided_tensor_encodes_as_its_contiguous_copy() -> Result<()> {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((2, 3, 4))?;
        for view in [t.transpose(1, 2)?, t.narrow(2, 1, 2)?, t.narrow(0, 1, 1)?] {
            assert_eq!(encode(&view)?, encode(&view.contiguous()?.copy()?)?);
        }
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
