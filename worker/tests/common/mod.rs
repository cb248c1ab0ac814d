//! What the parity tests share: where the diffusers fixtures live, how to read them, and the
//! error measure. The fixtures are made by tests/parity/make_fixtures.py.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// Relative L2 error allowed per component in f32 (the bar).
pub const TOLERANCE: f64 = 1e-4;

/// `tests/parity/fixtures`, or `TESSERA_PARITY_FIXTURES` when set (to check other models).
pub fn fixtures_root() -> PathBuf {
    match std::env::var_os("TESSERA_PARITY_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/parity/fixtures"),
    }
}

/// The fixture folder of one architecture (`sd21`, `sdxl`).
pub fn fixture_dir(arch: &str) -> PathBuf {
    fixtures_root().join(arch)
}

/// All tensors of `<arch>/reference.safetensors`.
pub fn references(arch: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixture_dir(arch).join("reference.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("{}", path.display()))
}

/// ||a − b|| / ||b||, accumulated in f64.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((num / den.max(1e-300)).sqrt())
}
