//! `tessera bench unet`: steady-state speed of one UNet evaluation on a device, as achieved
//! TFLOP/s (FLOPs counted from the architecture) and as a fraction of the device's own
//! measured matrix-multiply peak in the same run; beside the wall time, the time until the
//! forward call returns (the host has queued every kernel by then): when that is close to the
//! wall time the GPU waits for the host (host-bound), when it is much shorter the GPU is the
//! bottleneck.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::device::{compute_dtype, open_device};
use crate::gpu::host;
use crate::gpu::switches::{self, Switches};
use crate::hooks::UNetHooks;
use crate::model::denoiser::{Conditioning, DenoiserConfig};
use crate::model::loader::ModelDir;

#[derive(Debug, Clone)]
pub struct UnetBenchOptions {
    pub model: PathBuf,
    pub device: String,
    /// Image size in pixels (height, width).
    pub size: (usize, usize),
    /// Samples per evaluation (2: conditional and unconditional, as CFG runs them).
    pub batch: usize,
    pub warmup: usize,
    pub iters: usize,
    /// Weights and activations; the device's default when absent (f16 on GPUs).
    pub dtype: Option<DType>,
    /// Also time a large bf16 matrix product to express the result as a fraction of the peak.
    pub measure_peak: bool,
    /// Open the profiler range (`ncu --profile-from-start off`) around the timed evaluations
    /// only, so a profile holds just those.
    pub profile_range: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UnetBenchResult {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub size: [usize; 2],
    pub batch: usize,
    pub iters: usize,
    /// Per evaluation (one batched forward), milliseconds.
    pub ms_median: f64,
    pub ms_mean: f64,
    pub ms_min: f64,
    /// Until the forward call returned (all work queued), median over the same evaluations.
    pub ms_enqueue_median: f64,
    /// `ms_enqueue_median / ms_median`: near 1, the GPU waits for the host.
    pub enqueue_fraction: f64,
    pub tflop_per_eval: f64,
    pub tflops: f64,
    /// Measured bf16 matrix-multiply throughput of this device, TFLOP/s.
    pub peak_tflops: Option<f64>,
    pub fraction_of_peak: Option<f64>,
    /// Most device memory in use during the timed evaluations (GPUs), GiB.
    pub peak_memory_gib: Option<f64>,
    /// The GPU speed levers this run had on (`TESSERA_GPU_*`).
    pub levers: Switches,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Model(#[from] crate::model::loader::ModelError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Compute(#[from] candle_core::Error),
}

pub fn run(
    opts: &UnetBenchOptions,
    mut report: impl FnMut(&str),
) -> Result<UnetBenchResult, BenchError> {
    let (h, w) = opts.size;
    if h == 0 || w == 0 || h % 8 != 0 || w % 8 != 0 {
        return Err(BenchError::Invalid(format!(
            "--size {h}x{w}: both sides must be positive multiples of 8"
        )));
    }
    if opts.batch == 0 || opts.iters == 0 {
        return Err(BenchError::Invalid(
            "--batch and --iters must be at least 1".into(),
        ));
    }
    let device = open_device(&opts.device)?;
    let dtype = opts.dtype.unwrap_or_else(|| compute_dtype(&device));
    let dir = ModelDir::open(&opts.model)?;
    let cfg = DenoiserConfig::read(&dir)?;
    report(&format!(
        "loading the denoiser of {} ({dtype:?})",
        opts.model.display()
    ));
    let denoiser = cfg.load(&dir, dtype, &device)?;

    let (lh, lw) = (h / 8, w / 8);
    let b = opts.batch;
    let sample =
        Tensor::randn(0f32, 1.0, (b, cfg.latent_channels(), lh, lw), &device)?.to_dtype(dtype)?;
    let tokens = cfg.text_tokens();
    let text =
        Tensor::randn(0f32, 1.0, (b, tokens, cfg.context_dim()?), &device)?.to_dtype(dtype)?;
    let pooled = match cfg.pooled_dim() {
        Some(p) => Some(Tensor::randn(0f32, 1.0, (b, p), &device)?.to_dtype(dtype)?),
        None => None,
    };
    let size_ids = if denoiser.info().conditioning.size_ids {
        let row = [h as f32, w as f32, 0.0, 0.0, h as f32, w as f32];
        let ids: Vec<f32> = (0..b).flat_map(|_| row).collect();
        Some(Tensor::from_vec(ids, (b, 6), &device)?)
    } else {
        None
    };
    let cond = Conditioning {
        text,
        pooled,
        size_ids,
    };
    // (ms until the forward call returned, ms until the device finished)
    let eval = || -> candle_core::Result<(f64, f64)> {
        let t = Instant::now();
        let mut hooks = UNetHooks::default();
        let out = denoiser.forward(&sample, 500.0, &cond, &mut hooks)?;
        let queued = t.elapsed().as_secs_f64() * 1e3;
        drop(out);
        device.synchronize()?;
        Ok((queued, t.elapsed().as_secs_f64() * 1e3))
    };
    report(&format!("warming up ({} evaluations)", opts.warmup));
    for _ in 0..opts.warmup {
        eval()?;
    }
    host::reset_peak(&device);
    if opts.profile_range {
        host::profiler_range(&device, true).map_err(BenchError::Invalid)?;
    }
    let mut times = Vec::with_capacity(opts.iters);
    let mut queued = Vec::with_capacity(opts.iters);
    for i in 0..opts.iters {
        let (q, t) = eval()?;
        times.push(t);
        queued.push(q);
        report(&format!(
            "evaluation {}/{}: {t:.1} ms ({q:.1} ms to queue)",
            i + 1,
            opts.iters
        ));
    }
    if opts.profile_range {
        host::profiler_range(&device, false).map_err(BenchError::Invalid)?;
    }
    let peak_memory = host::peak_memory(&device).map(|b| b as f64 / (1u64 << 30) as f64);
    let flops = cfg.flops(lh, lw, tokens)? * b as f64;
    let median = median_of(&times);
    let queued_median = median_of(&queued);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let tflops = flops / (median * 1e-3) / 1e12;
    let peak = if opts.measure_peak && !device.is_cpu() {
        report("measuring the bf16 matrix-multiply peak");
        Some(matmul_peak_tflops(&device)?)
    } else {
        None
    };
    Ok(UnetBenchResult {
        model: opts.model.display().to_string(),
        device: opts.device.clone(),
        dtype: format!("{dtype:?}").to_lowercase(),
        size: [h, w],
        batch: b,
        iters: opts.iters,
        ms_median: median,
        ms_mean: mean,
        ms_min: times.iter().copied().fold(f64::INFINITY, f64::min),
        ms_enqueue_median: queued_median,
        enqueue_fraction: queued_median / median,
        tflop_per_eval: flops / 1e12,
        tflops,
        peak_tflops: peak,
        fraction_of_peak: peak.map(|p| tflops / p),
        peak_memory_gib: peak_memory,
        levers: switches::get(),
    })
}

/// The median (the upper one of an even count, as the timings have always been reported).
fn median_of(v: &[f64]) -> f64 {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Throughput of an 8192³ bf16 matrix product (the usual way to read a GPU's dense peak),
/// median of ten after three warm-ups.
pub fn matmul_peak_tflops(device: &Device) -> candle_core::Result<f64> {
    let n = 8192;
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    let mut times = Vec::new();
    for i in 0..13 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        drop(c);
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (n as f64).powi(3) / times[times.len() / 2] / 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_reports_queued_beside_wall_time_and_the_levers_it_ran_with() {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/parity/fixtures/sdxl/model");
        let opts = UnetBenchOptions {
            model,
            device: "cpu".into(),
            size: (64, 64),
            batch: 2,
            warmup: 0,
            iters: 3,
            dtype: None,
            measure_peak: true,
            profile_range: true,
        };
        let mut lines = Vec::new();
        let r = run(&opts, |l| lines.push(l.to_string())).unwrap();
        assert_eq!(r.iters, 3);
        // Each evaluation is queued before it finishes, so the medians keep that order.
        assert!(r.ms_enqueue_median > 0.0 && r.ms_enqueue_median <= r.ms_median);
        assert!(r.enqueue_fraction > 0.0 && r.enqueue_fraction <= 1.0);
        assert!(r.ms_min <= r.ms_median);
        // No device pool and no matrix-multiply peak on the CPU.
        assert_eq!((r.peak_memory_gib, r.peak_tflops), (None, None));
        assert_eq!(r.levers, switches::get());
        assert!(lines.iter().any(|l| l.contains("to queue")), "{lines:?}");
        assert_eq!(median_of(&[3.0, 1.0, 2.0, 10.0]), 3.0);
    }
}
