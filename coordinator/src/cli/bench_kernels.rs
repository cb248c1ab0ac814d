//! `tessera bench kernels`: the GPU time of a UNet evaluation by kernel category, tessera (an
//! ncu CSV) beside diffusers (the torch.profiler kernel table of
//! bench/gpu/diffusers_baseline.py), as bench/gpu/profile.sh runs it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::bench::{self, kernels};

#[derive(Debug, Args)]
pub struct KernelsArgs {
    /// An Nsight Compute CSV (`ncu --csv --metrics gpu__time_duration.sum …`); repeat for
    /// several (e.g. before and after a change).
    #[arg(long, value_name = "FILE")]
    pub ncu: Vec<PathBuf>,
    /// A torch.profiler kernel table (`kernel,launches,total_us`, written by
    /// bench/gpu/diffusers_baseline.py --profile); repeatable. Columns follow the ncu inputs.
    #[arg(long, value_name = "FILE")]
    pub torch: Vec<PathBuf>,
    /// Column labels, in input order (ncu files, then torch files) [default: file names].
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// The slowest kernels listed per input (0: none).
    #[arg(long, default_value_t = 12)]
    pub top: usize,
    #[command(flatten)]
    pub out: super::bench::MarkdownArg,
}

pub fn run(args: KernelsArgs) -> Result<()> {
    let inputs: Vec<(PathBuf, bool)> = args
        .ncu
        .into_iter()
        .map(|p| (p, true))
        .chain(args.torch.into_iter().map(|p| (p, false)))
        .collect();
    if inputs.is_empty() {
        bail!("give at least one --ncu or --torch file");
    }
    if !args.labels.is_empty() && args.labels.len() != inputs.len() {
        bail!(
            "--labels has {} names for {} inputs (ncu files first, then torch files)",
            args.labels.len(),
            inputs.len()
        );
    }
    let mut sides = Vec::new();
    for (i, (path, is_ncu)) in inputs.iter().enumerate() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let parsed = if *is_ncu {
            kernels::parse_ncu_csv(&text)
        } else {
            kernels::parse_torch_csv(&text)
        };
        let kernels = parsed.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let label = args.labels.get(i).cloned().unwrap_or_else(|| {
            path.file_stem()
                .map_or("input".into(), |s| s.to_string_lossy().into_owned())
        });
        sides.push(kernels::Side { label, kernels });
    }
    let report = kernels::report(&sides, args.top, bench::invocation());
    report.emit(args.out.markdown.as_deref())?;
    Ok(())
}
