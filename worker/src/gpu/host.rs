//! The host-side levers (what the CPU does per op and per allocation), the device's memory
//! high-water mark, and the profiler range `ncu --profile-from-start off` captures. Everything
//! here is a no-op on the CPU and in builds without CUDA.

use candle_core::Device;

use super::switches::Switches;

/// Applies the host-side levers to a device just opened, before any tensor lives on it.
pub fn configure(device: &Device, s: Switches) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if s.events_off {
            // SAFETY: cudarc only records and waits on these events in its multi-stream mode,
            // which starts when a second stream is created (`CudaContext::new_stream`); candle
            // runs each thread's work on that thread's default stream and creates none. So the
            // two events made per allocation are never used: turning them off changes no
            // ordering, it only saves two event creations and destructions per tensor.
            unsafe { dev.disable_event_tracking() };
        }
        if s.pool_keep {
            cuda::set_pool_attribute(dev, cuda::Attr::ReleaseThreshold, u64::MAX)?;
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (device, s);
    Ok(())
}

/// While alive, candle reuses device copies of the small host parameter arrays (shapes and
/// strides of strided ops, and other uploads up to 4 KiB) made on this thread, instead of a
/// pageable host-to-device copy per op. `Denoiser::forward` holds one around every
/// evaluation, on the thread that runs it. Entries are keyed by content, so the cache grows only with distinct shapes and
/// distinct small uploads (e.g. timesteps).
pub struct ParamCache {
    _guard: Option<Box<dyn std::any::Any>>,
}

/// A [`ParamCache`] for `device` when the lever is on and the device is a GPU.
pub fn param_cache(device: &Device) -> ParamCache {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if super::switches::get().param_cache {
            return ParamCache {
                _guard: Some(Box::new(dev.enable_cuda_graph_htod_cache())),
            };
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    ParamCache { _guard: None }
}

/// The most memory the device's pool has handed out (bytes) since the last [`reset_peak`];
/// `None` on the CPU.
pub fn peak_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return cuda::get_pool_attribute(dev, cuda::Attr::UsedHigh).ok();
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    None
}

/// The memory the device's pool has handed out now (bytes); `None` on the CPU or where the
/// device does not say (the Prometheus gauge is then left out rather than shown as zero).
pub fn used_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return cuda::get_pool_attribute(dev, cuda::Attr::UsedCurrent).ok();
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    None
}

/// Starts a new peak for [`peak_memory`].
pub fn reset_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        // Resetting is best effort: a failure only leaves the previous peak in place.
        let _ = cuda::set_pool_attribute(dev, cuda::Attr::UsedHigh, 0);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// Starts (`true`) or stops the range a profiler started with `--profile-from-start off`
/// records (`cuProfilerStart`/`Stop`; no effect without a profiler attached).
pub fn profiler_range(device: &Device, on: bool) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return cuda::profiler(dev, on);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (device, on);
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::CudaDevice;

    #[derive(Clone, Copy)]
    pub enum Attr {
        ReleaseThreshold,
        UsedHigh,
        UsedCurrent,
    }

    fn attr(a: Attr) -> sys::CUmemPool_attribute {
        match a {
            Attr::ReleaseThreshold => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            Attr::UsedHigh => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            Attr::UsedCurrent => sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        }
    }

    /// The device's default memory pool, the one cudarc's stream-ordered allocations use.
    fn default_pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool, String> {
        let ctx = dev.cuda_stream().context().clone();
        if !ctx.has_async_alloc() {
            return Err("the device has no stream-ordered memory pool".into());
        }
        ctx.bind_to_thread().map_err(|e| e.to_string())?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live context.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .map_err(|e| format!("cuDeviceGetDefaultMemPool: {e}"))?;
        Ok(pool)
    }

    pub fn set_pool_attribute(dev: &CudaDevice, a: Attr, value: u64) -> Result<(), String> {
        let pool = default_pool(dev)?;
        let mut v = value;
        // SAFETY: both attributes take a cuuint64_t, which `v` is.
        unsafe { sys::cuMemPoolSetAttribute(pool, attr(a), (&mut v as *mut u64).cast()) }
            .result()
            .map_err(|e| format!("cuMemPoolSetAttribute: {e}"))
    }

    pub fn get_pool_attribute(dev: &CudaDevice, a: Attr) -> Result<u64, String> {
        let pool = default_pool(dev)?;
        let mut v = 0u64;
        // SAFETY: as above.
        unsafe { sys::cuMemPoolGetAttribute(pool, attr(a), (&mut v as *mut u64).cast()) }
            .result()
            .map_err(|e| format!("cuMemPoolGetAttribute: {e}"))?;
        Ok(v)
    }

    pub fn profiler(dev: &CudaDevice, on: bool) -> Result<(), String> {
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(|e| e.to_string())?;
        // SAFETY: plain driver calls on the current context.
        let r = unsafe {
            if on {
                sys::cuProfilerStart()
            } else {
                sys::cuProfilerStop()
            }
        };
        r.result().map_err(|e| format!("cuProfiler: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_levers_do_nothing_on_the_cpu() {
        let cpu = Device::Cpu;
        configure(&cpu, Switches::ALL).unwrap();
        let _cache = param_cache(&cpu);
        assert!(_cache._guard.is_none());
        assert_eq!(peak_memory(&cpu), None);
        assert_eq!(used_memory(&cpu), None);
        reset_peak(&cpu);
        profiler_range(&cpu, true).unwrap();
    }
}
