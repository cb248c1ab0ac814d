//! What the parity tests share: where the diffusers fixtures live, how to read them, and the
//! error measure. The fixtures are made by tests/parity/make_fixtures.py.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// Relative L2 error allowed per component in f32 (the bar).
pub const TOLERANCE: f64 = 1e-4;
/// ... and in half precision, on a GPU.
pub const HALF_TOLERANCE: f64 = 1e-2;

/// Where the parity tests run: `TESSERA_TEST_DEVICE` (e.g. cuda:0, with a CUDA build), else
/// the CPU. The references are always diffusers' f32 results.
pub fn device() -> Device {
    // Opened once: on a GPU each open would make a new context.
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| match std::env::var("TESSERA_TEST_DEVICE") {
            Ok(name) => tessera_worker::device::open_device(&name)
                .unwrap_or_else(|e| panic!("TESSERA_TEST_DEVICE={name}: {e}")),
            Err(_) => Device::Cpu,
        })
        .clone()
}

/// f32 on the CPU; on a GPU `TESSERA_TEST_DTYPE` (f16, bf16 or f32), f16 by default.
pub fn dtype() -> DType {
    if device().is_cpu() {
        return DType::F32;
    }
    match std::env::var("TESSERA_TEST_DTYPE").as_deref() {
        Ok("bf16") => DType::BF16,
        Ok("f32") => DType::F32,
        _ => DType::F16,
    }
}

/// The bar for the current [`dtype`].
pub fn tolerance() -> f64 {
    if dtype() == DType::F32 {
        TOLERANCE
    } else {
        HALF_TOLERANCE
    }
}

/// A reference tensor as a model input on the test device: floats in the test dtype, integer
/// ids unchanged.
pub fn to_test_device(t: &Tensor) -> candle_core::Result<Tensor> {
    let t = t.to_device(&device())?;
    if t.dtype().is_float() {
        t.to_dtype(dtype())
    } else {
        Ok(t)
    }
}

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
    let refs = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("{}", path.display()))?;
    refs.into_iter()
        .map(|(k, v)| Ok((k, to_test_device(&v)?)))
        .collect()
}

/// ||a − b|| / ||b||, accumulated in f64.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((num / den.max(1e-300)).sqrt())
}
