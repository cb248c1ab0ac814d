//! `--device cpu|cuda:N` parsing, and the compute dtype each device uses.

use candle_core::{DType, Device};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?} is not understood: use cpu or cuda:N (e.g. cuda:0)")]
    Unknown(String),
    #[error("device {0} needs a CUDA build of tessera (cargo build --release --features cuda); this one runs on cpu only")]
    NoCudaSupport(String),
    #[error("device {name}: {message}")]
    Unavailable { name: String, message: String },
    #[error("device {name}: {message}")]
    Setup { name: String, message: String },
}

/// Opens the named device. CUDA availability is checked before candle touches the driver, so a
/// machine without one gets this error rather than a panic from deep inside the CUDA bindings.
/// A GPU gets the host-side speed levers its `TESSERA_GPU_*` switches select
/// ([`crate::gpu::switches`]); an invalid switch is an error naming it.
pub fn open_device(name: &str) -> Result<Device, DeviceError> {
    let name = name.trim();
    if name.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = name
        .strip_prefix("cuda:")
        .or_else(|| (name == "cuda").then_some("0"))
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| DeviceError::Unknown(name.to_string()))?;
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::NoCudaSupport(name.to_string()));
    }
    let setup = |message: String| DeviceError::Setup {
        name: name.to_string(),
        message,
    };
    let switches = crate::gpu::switches::load().map_err(setup)?;
    let device = Device::new_cuda(ordinal).map_err(|e| DeviceError::Unavailable {
        name: name.to_string(),
        message: e.to_string().lines().next().unwrap_or_default().to_string(),
    })?;
    crate::gpu::host::configure(&device, switches).map_err(setup)?;
    Ok(device)
}

/// f32 on the CPU (no fast half-precision kernels there, and exact parity with diffusers'
/// float32 runs); f16 on GPUs.
pub fn compute_dtype(device: &Device) -> DType {
    // TESSERA_COMPUTE_DTYPE (f16, bf16, f32) overrides the choice; tests use it to run the
    // half-precision paths on the CPU.
    match std::env::var("TESSERA_COMPUTE_DTYPE").as_deref() {
        Ok("f16") => return DType::F16,
        Ok("bf16") => return DType::BF16,
        Ok("f32") => return DType::F32,
        _ => {}
    }
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_with_clear_errors() {
        assert!(open_device("cpu").unwrap().is_cpu());
        assert!(open_device("CPU").unwrap().is_cpu());
        let e = open_device("gpu0").unwrap_err().to_string();
        assert!(e.contains("use cpu or cuda:N"), "{e}");
        let e = open_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("use cpu or cuda:N"), "{e}");
        if !candle_core::utils::cuda_is_available() {
            let e = open_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
