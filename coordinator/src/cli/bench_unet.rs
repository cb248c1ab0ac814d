//! `tessera bench unet`: milliseconds per UNet evaluation, achieved TFLOP/s and the fraction of
//! the device's measured bf16 peak (the figures BENCHMARKS.md compares with diffusers).

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;
use indicatif::ProgressBar;
use tessera_core::spec::Size;
use tessera_worker::unet_bench::{self, UnetBenchOptions};

#[derive(Debug, Args)]
pub struct UnetArgs {
    /// Model directory, or synthetic:sdxl / synthetic:sd21 (the full architecture with random
    /// weights made on the device: nothing to download).
    #[arg(long, default_value = "synthetic:sdxl")]
    pub model: PathBuf,
    /// Where to run: cpu or cuda:N.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Image size WIDTHxHEIGHT in pixels (the latent is an eighth of it).
    #[arg(long, default_value = "1024x1024")]
    pub size: Size,
    /// Samples per evaluation; 2 is one guided (CFG) evaluation.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Untimed evaluations first (kernel loading, allocator warm-up).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed evaluations; the median is reported.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// f16, bf16 or f32 [default: f16 on GPUs, f32 on the CPU].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Skip timing the bf16 matrix-multiply peak.
    #[arg(long)]
    pub no_peak: bool,
    /// Open the CUDA profiler range around the timed evaluations only (for
    /// `ncu --profile-from-start off`, as bench/gpu/profile.sh runs it).
    #[arg(long)]
    pub profile_range: bool,
    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: UnetArgs) -> Result<()> {
    let dtype = match args.dtype.as_deref() {
        None => None,
        Some("f16") => Some(DType::F16),
        Some("bf16") => Some(DType::BF16),
        Some("f32") => Some(DType::F32),
        Some(other) => bail!("--dtype {other:?}: use f16, bf16 or f32"),
    };
    let opts = UnetBenchOptions {
        model: args.model,
        device: args.device,
        size: (args.size.height as usize, args.size.width as usize),
        batch: args.batch,
        warmup: args.warmup,
        iters: args.iters,
        dtype,
        measure_peak: !args.no_peak,
        profile_range: args.profile_range,
    };
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let r = unet_bench::run(&opts, |m| bar.set_message(m.to_string()))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!("model            {}", r.model);
    println!("device, dtype    {}, {}", r.device, r.dtype);
    println!("size, batch      {}x{}, {}", r.size[1], r.size[0], r.batch);
    println!(
        "ms/evaluation    {:.2} median, {:.2} mean, {:.2} min ({} timed)",
        r.ms_median, r.ms_mean, r.ms_min, r.iters
    );
    println!(
        "queued in        {:.2} ms median ({:.0}% of the wall time: {})",
        r.ms_enqueue_median,
        r.enqueue_fraction * 100.0,
        if r.enqueue_fraction > 0.9 {
            "host-bound, the device waits for the host"
        } else {
            "device-bound"
        }
    );
    println!("TFLOP/evaluation {:.2}", r.tflop_per_eval);
    println!("achieved         {:.1} TFLOP/s", r.tflops);
    if let (Some(p), Some(f)) = (r.peak_tflops, r.fraction_of_peak) {
        println!(
            "bf16 peak        {p:.1} TFLOP/s measured; {:.1}% of it",
            f * 100.0
        );
    }
    if let Some(gib) = r.peak_memory_gib {
        println!("peak memory      {gib:.2} GiB (device pool, timed evaluations)");
    }
    let on = r.levers.on();
    println!(
        "GPU levers on    {}",
        if on.is_empty() {
            "none".into()
        } else {
            on.join(", ")
        }
    );
    Ok(())
}
