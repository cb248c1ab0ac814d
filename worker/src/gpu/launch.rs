//! One kernel launch described as data — kernel name, grid, block and arguments — so the same
//! description runs on a GPU (cudarc, from the committed PTX) and, in the tests, through the
//! CPU emulation of the kernel sources ([`super::emulator`]).

use candle_core::{DType, Result};

/// The PTX of `cuda/kernels.cu` (made by `cuda/build_ptx.sh`, committed).
#[cfg(feature = "cuda")]
pub const PTX: &str = include_str!("ptx/kernels.ptx");
/// The module name the PTX is loaded under (once per device).
#[cfg(feature = "cuda")]
const MODULE: &str = "tessera_kernels";

/// A kernel argument: a buffer (index into the launch's buffer list) or a scalar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Buf(usize),
    I32(i32),
    I64(i64),
    F32(f32),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub threads: u32,
    pub args: Vec<Arg>,
}

/// The kernel-name suffix of an element type.
pub fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("tessera's fused kernels take f32, f16 or bf16, not {other:?}"),
    })
}

/// A value as a kernel's `int`, or an error naming it.
pub fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} is too large")))
}

/// A grid dimension (y and z are limited to 65535 by CUDA).
pub fn grid_dim(what: &str, v: usize, max: usize) -> Result<u32> {
    if v == 0 || v > max {
        candle_core::bail!("{what} = {v}: a launch needs 1 to {max}");
    }
    Ok(v as u32)
}

#[cfg(feature = "cuda")]
pub mod cuda {
    use super::{Arg, Launch, MODULE, PTX};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, DType, Result};

    /// A device buffer's address `elements` elements in, for reading, with the guard that
    /// records the read (it matters only in cudarc's multi-stream mode, which candle never
    /// enters).
    pub fn address<'a>(
        slice: &'a CudaStorageSlice,
        elements: usize,
        stream: &'a CudaStream,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        let ((ptr, guard), size) = match slice {
            CudaStorageSlice::F32(s) => (s.device_ptr(stream), 4),
            CudaStorageSlice::F16(s) => (s.device_ptr(stream), 2),
            CudaStorageSlice::BF16(s) => (s.device_ptr(stream), 2),
            _ => candle_core::bail!("tessera's fused kernels take f32, f16 or bf16 buffers"),
        };
        Ok((ptr + (elements * size) as u64, guard))
    }

    /// The same for a buffer the kernel writes.
    pub fn address_mut<'a>(
        slice: &'a mut CudaStorageSlice,
        stream: &'a CudaStream,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        Ok(match slice {
            CudaStorageSlice::F32(s) => s.device_ptr_mut(stream),
            CudaStorageSlice::F16(s) => s.device_ptr_mut(stream),
            CudaStorageSlice::BF16(s) => s.device_ptr_mut(stream),
            _ => candle_core::bail!("no fused kernel writes this element type"),
        })
    }

    /// A new uninitialised device buffer of `len` elements.
    pub fn alloc(dev: &CudaDevice, dtype: DType, len: usize) -> Result<CudaStorageSlice> {
        // SAFETY: every element is written by the kernel that produces it before it is read.
        unsafe {
            Ok(match dtype {
                DType::F32 => CudaStorageSlice::F32(dev.alloc::<f32>(len)?),
                DType::F16 => CudaStorageSlice::F16(dev.alloc::<half::f16>(len)?),
                DType::BF16 => CudaStorageSlice::BF16(dev.alloc::<half::bf16>(len)?),
                other => candle_core::bail!("no fused kernel writes {other:?}"),
            })
        }
    }

    /// Launches `l` on `dev`'s stream with the given buffer addresses.
    pub fn run(l: &Launch, dev: &CudaDevice, buffers: &[u64]) -> Result<()> {
        let func = dev.get_or_load_custom_func(&l.kernel, MODULE, PTX)?;
        // The values must outlive the builder, which holds references to them.
        let mut ptrs = Vec::new();
        let mut i32s = Vec::new();
        let mut i64s = Vec::new();
        let mut f32s = Vec::new();
        for a in &l.args {
            match *a {
                Arg::Buf(i) => ptrs.push(buffers[i]),
                Arg::I32(v) => i32s.push(v),
                Arg::I64(v) => i64s.push(v),
                Arg::F32(v) => f32s.push(v),
            }
        }
        let mut builder = func.builder();
        let (mut p, mut i, mut j, mut f) = (0, 0, 0, 0);
        for a in &l.args {
            match a {
                Arg::Buf(_) => {
                    builder.arg(&ptrs[p]);
                    p += 1;
                }
                Arg::I32(_) => {
                    builder.arg(&i32s[i]);
                    i += 1;
                }
                Arg::I64(_) => {
                    builder.arg(&i64s[j]);
                    j += 1;
                }
                Arg::F32(_) => {
                    builder.arg(&f32s[f]);
                    f += 1;
                }
            }
        }
        let cfg = LaunchConfig {
            grid_dim: l.grid,
            block_dim: (l.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature (each kernel module builds
        // it from the signature in cuda/*.cuh, and the emulator tests run the same list), and
        // every buffer holds what the launch description says it holds.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }
}
