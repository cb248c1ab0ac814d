//! A safetensors file written one tensor at a time: the header is computed from the shapes
//! alone, then each tensor's values are made, encoded and written before the next is made,
//! so a 7 GB model never sits in memory. The file is written under a temporary name beside
//! its destination and renamed when complete: an interrupted write leaves no file that looks
//! like a model.
//!
//! The format (as the `safetensors` crate reads it): an 8-byte little-endian header length,
//! the JSON header (each tensor's `dtype`, `shape` and `[begin, end)` byte offsets into the
//! data, plus `__metadata__`), padded with spaces to a multiple of 8, then the data.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{json, Map, Value};
use tessera_core::partial::partial_path;

use super::diffusers_dir::io_err;
use crate::model::loader::{ModelError, Result};

/// The element type of a written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F16,
    Bf16,
    F32,
}

impl WeightDtype {
    /// `f16`, `bf16` or `f32`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f16" | "fp16" => Some(Self::F16),
            "bf16" => Some(Self::Bf16),
            "f32" | "fp32" => Some(Self::F32),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }

    /// The header's spelling.
    fn header_name(self) -> &'static str {
        match self {
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::F32 => "F32",
        }
    }

    /// `values` as little-endian bytes of this type (rounded to nearest, as torch casts).
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(values.len() * self.size());
        match self {
            Self::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|v| out.extend(half::f16::from_f32(*v).to_le_bytes())),
            Self::Bf16 => values
                .iter()
                .for_each(|v| out.extend(half::bf16::from_f32(*v).to_le_bytes())),
        }
    }
}

/// One tensor of a file to be written: its key and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The header bytes (length prefix included) of a file holding `tensors` in this order.
pub fn header(
    tensors: &[PlannedTensor],
    dtype: WeightDtype,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut map = Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for t in tensors {
        let end = offset + t.elements() * dtype.size();
        map.insert(
            t.name.clone(),
            json!({ "dtype": dtype.header_name(), "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut text = Value::Object(map).to_string().into_bytes();
    // Padded so the data starts 8-byte aligned, as the reference writer does.
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out
}

/// Bytes of the data (the file less its header).
pub fn data_size(tensors: &[PlannedTensor], dtype: WeightDtype) -> u64 {
    let data: usize = tensors.iter().map(|t| t.elements() * dtype.size()).sum();
    data as u64
}

/// Writes `tensors` to `path`, asking `values` for each one's f32 values in turn, and calling
/// `progress` with the bytes of data written after each tensor.
pub fn write_streamed(
    path: &Path,
    tensors: &[PlannedTensor],
    dtype: WeightDtype,
    metadata: &BTreeMap<String, String>,
    mut values: impl FnMut(&PlannedTensor) -> Result<Vec<f32>>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let partial = partial_path(path);
    let io = |e| io_err(&partial, e);
    let file = fs::File::create(&partial).map_err(io)?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    out.write_all(&header(tensors, dtype, metadata))
        .map_err(io)?;
    let mut bytes = Vec::new();
    for t in tensors {
        let v = values(t)?;
        if v.len() != t.elements() {
            let _ = fs::remove_file(&partial);
            return Err(ModelError::Other(format!(
                "{}: {} values for shape {:?}",
                t.name,
                v.len(),
                t.shape
            )));
        }
        dtype.encode(&v, &mut bytes);
        out.write_all(&bytes).map_err(io)?;
        progress(bytes.len() as u64);
    }
    out.flush().map_err(io)?;
    drop(out);
    fs::rename(&partial, path).map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_file_reads_back_with_the_safetensors_crate() {
        let path =
            std::env::temp_dir().join(format!("tessera-stream-{}.safetensors", std::process::id()));
        let tensors = vec![
            PlannedTensor {
                name: "b".into(),
                shape: vec![3],
            },
            PlannedTensor {
                name: "a".into(),
                shape: vec![2, 2],
            },
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        for dtype in [WeightDtype::F16, WeightDtype::Bf16, WeightDtype::F32] {
            let mut done = 0;
            write_streamed(
                &path,
                &tensors,
                dtype,
                &meta,
                |t| Ok((0..t.elements()).map(|i| i as f32 + 0.5).collect()),
                &mut |n| done += n,
            )
            .unwrap();
            assert_eq!(done, data_size(&tensors, dtype));
            let bytes = fs::read(&path).unwrap();
            let head = header(&tensors, dtype, &meta);
            assert_eq!(head.len() % 8, 0);
            assert_eq!(bytes.len() as u64, head.len() as u64 + done);
            let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(m.metadata().as_ref().unwrap()["format"], "pt");
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let a = st.tensor("a").unwrap();
            assert_eq!((a.shape(), a.data().len()), (&[2, 2][..], 4 * dtype.size()));
            let b = candle_core::safetensors::Load::load(
                &st.tensor("b").unwrap(),
                &candle_core::Device::Cpu,
            )
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
            assert_eq!(
                b.to_vec1::<f32>().unwrap(),
                vec![0.5, 1.5, 2.5],
                "{dtype:?}"
            );
        }
        assert!(!partial_path(&path).exists());
        let _ = fs::remove_file(&path);
    }
}
