//! `tessera bench <scenario>`: Tessera's own costs, measured. Each scenario prints a table and
//! a markdown block for BENCHMARKS.md (`--markdown FILE` appends it there).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use crate::bench::{self, e2e, load, memory, scale, step};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// High-resolution steps per second of an 8K SDXL-geometry stage on 1..32 simulated
    /// workers (benchmark doubles) over real Redis, coordinator and worker processes, with the
    /// efficiency against the ideal; plus a mixed-speed set.
    Scale(ScaleArgs),
    /// The coordinator's own cost per high-resolution step at 8K and 32K (merge, fusion,
    /// guidance, scheduler, store I/O), measured in the engine's step loop over a real Redis,
    /// as a share of the simulated step time at N workers; and one tiny-model evaluation.
    Step(StepArgs),
    /// Peak resident memory of the coordinator and the workers for whole jobs (default 8K and
    /// 32K) through a loopback cluster, with the output files checked.
    Memory(MemoryArgs),
    /// Wall time of one whole tiny-model render (default 4K), embedded and through a
    /// loopback cluster of N workers, with the two images' pixels compared.
    E2e(E2eArgs),
    /// UNet speed on one device: ms per evaluation, achieved TFLOP/s and the fraction of the
    /// device's measured bf16 peak (compare with bench/gpu/diffusers_baseline.py).
    Unet(super::bench_unet::UnetArgs),
    /// GPU time per kernel category of one UNet evaluation, tessera (an ncu CSV) beside
    /// diffusers (a torch.profiler kernel table), from the files bench/gpu/profile.sh writes.
    Kernels(super::bench_kernels::KernelsArgs),
    /// The web dashboard with many jobs and workers (default 1,000 and 64 simulated): time
    /// to first render in a headless Chromium and the payload sizes.
    Dashboard(DashboardArgs),
    /// Wall time and peak memory of loading whole models on the CPU until ready to denoise
    /// (e.g. a diffusers directory against its single-file checkpoint), each load in a fresh
    /// process, with the page cache warm and cold.
    Load(LoadArgs),
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// A model to load: a diffusers directory or a single-file .safetensors; repeat the flag
    /// to compare (ratios are against the first).
    #[arg(long, required = true)]
    pub model: Vec<PathBuf>,
    /// Loads per model and cache state; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// The type the weights are loaded in (f16 holds SDXL in ~7 GB; f32 needs twice that).
    #[arg(long, default_value = "f16", value_parser = clap::builder::PossibleValuesParser::new(["f16", "bf16", "f32"]))]
    pub dtype: String,
    /// Measure with a warm page cache only (else also cold: the model's files evicted
    /// before each load).
    #[arg(long)]
    pub warm_only: bool,
    /// A LoRA, FILE[:WEIGHT] (repeatable): each model is also loaded (warm) with the LoRAs
    /// merged, which measures the merge (what a worker pays per new LoRA set).
    #[arg(long)]
    pub lora: Vec<String>,
    /// Run one load in this process and print its figures (how each measured load runs).
    #[arg(long, hide = true)]
    pub child: bool,
    #[command(flatten)]
    pub out: MarkdownArg,
}

#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Jobs queued in the store.
    #[arg(long, default_value_t = 1000)]
    pub jobs: usize,
    /// Simulated workers (benchmark doubles, real processes).
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// The simulated workers' milliseconds per evaluation.
    #[arg(long, default_value_t = 2000.0)]
    pub eval_ms: f64,
    /// Page loads timed, after one warm-up.
    #[arg(long, default_value_t = 5)]
    pub loads: usize,
    #[command(flatten)]
    pub out: MarkdownArg,
}

#[derive(Debug, Args)]
pub struct StepArgs {
    /// Image sides in pixels, one high-resolution stage each.
    #[arg(long, value_delimiter = ',', default_value = "8192,32768")]
    pub sizes: Vec<u32>,
    /// Steps timed per size (one more runs first as a warm-up).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Simulated evaluation time the cost is compared with.
    #[arg(long, default_value_t = 100.0)]
    pub eval_ms: f64,
    /// Simulated worker count the cost is compared with.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Views per task (the job's --view-batch).
    #[arg(long, default_value_t = 4)]
    pub view_batch: usize,
    #[command(flatten)]
    pub out: MarkdownArg,
}

#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// Output sides in pixels, one job each.
    #[arg(long, value_delimiter = ',', default_value = "8192,32768")]
    pub sizes: Vec<u32>,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Benchmark-double workers at this many ms per evaluation instead of the tiny model (real
    /// model code, slow on a CPU: hours at 32K).
    #[arg(long)]
    pub simulate_eval_ms: Option<f64>,
    /// High-resolution steps of each stage after the first (FreCaS timing needs 2 or more).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Keep the rendered files (PNG, Deep Zoom pyramid, viewer) under this directory.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// The tiny model's training size in pixels: 1024 is SDXL's geometry; a smaller one
    /// (e.g. 256) makes the tiny model's views and VAE tiles cheap enough to render 8K on a
    /// small CPU host in well under an hour.
    #[arg(long, default_value_t = 1024)]
    pub training_size: u32,
    #[command(flatten)]
    pub out: MarkdownArg,
}

#[derive(Debug, Args)]
pub struct E2eArgs {
    /// Output side in pixels.
    #[arg(long, default_value_t = 4096)]
    pub size: u32,
    /// Worker processes of the cluster run.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// High-resolution steps of each stage after the first.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// The tiny model's training size in pixels (as `bench memory --training-size`); the
    /// default keeps a 4K render to minutes on a small CPU host.
    #[arg(long, default_value_t = 256)]
    pub training_size: u32,
    #[command(flatten)]
    pub out: MarkdownArg,
}

/// Where to append the markdown block.
#[derive(Debug, Args)]
pub struct MarkdownArg {
    /// Append the markdown block to this file (e.g. BENCHMARKS.md).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Worker counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub workers: Vec<usize>,
    /// Milliseconds per training-size evaluation (with CFG) of the simulated workers (the GPU
    /// figure in BENCHMARKS.md).
    #[arg(long, default_value_t = 50.0)]
    pub eval_ms: f64,
    /// Link speeds in Gbit/s to run every configuration over, 0 for unlimited: each runs the
    /// whole loopback cluster in a network namespace whose loopback is rate-limited with tc
    /// (needs root or CAP_SYS_ADMIN/CAP_NET_ADMIN); left out, the host's loopback is used.
    #[arg(long, value_delimiter = ',')]
    pub link_gbit: Vec<f64>,
    /// With --link-gbit: give each Redis node a link of its own of that speed (its traffic in
    /// and out, as a node on its own host has) instead of one link for the whole loopback;
    /// the coordinator's and workers' gRPC traffic is then not limited.
    #[arg(long, requires = "link_gbit")]
    pub link_per_node: bool,
    /// Inside a --link-per-node namespace: the link each Redis node gets (how the parent hands
    /// it to the child).
    #[arg(long, hide = true)]
    pub node_link_gbit: Option<f64>,
    /// Cores the coordinator may use, one run each: numbers, or "all" (it is pinned with
    /// taskset; its threads per step follow).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub coordinator_cores: Vec<String>,
    /// Write the runs as JSON to this file instead of a report (how a --link-gbit run hands
    /// its figures back from inside the namespace).
    #[arg(long, hide = true)]
    pub runs_json: Option<PathBuf>,
    /// The mixed set: FAST,SLOW workers, the slow ones --slow-factor times slower; "none" skips it.
    #[arg(long, default_value = "6,2")]
    pub mixed: String,
    #[arg(long, default_value_t = 4.0)]
    pub slow_factor: f64,
    /// Side of the image in pixels (one high-resolution stage).
    #[arg(long, default_value_t = 8192)]
    pub size: u32,
    /// Steps to run per configuration [default: enough for about 6 s of timed steps].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Views per task (the job's --view-batch), or "auto": for each worker count the batch
    /// `tessera plan --workers N` recommends.
    #[arg(long, default_value = "4", value_parser = parse_view_batch)]
    pub view_batch: ViewBatchArg,
    /// Stores to run every configuration on: redis (one Redis), cluster (a Redis Cluster of
    /// 3 masters on the same link).
    #[arg(long, value_delimiter = ',', default_value = "redis")]
    pub store: Vec<String>,
    /// Runs of every configuration, in rounds (each round runs every configuration once):
    /// with more than one, a second table gives each configuration's median efficiency, its
    /// range and every run's.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: u32,
    #[command(flatten)]
    pub out: MarkdownArg,
}

/// `bench scale --view-batch`: a count, or `auto` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewBatchArg(pub Option<usize>);

fn parse_view_batch(s: &str) -> Result<ViewBatchArg, String> {
    match s.trim() {
        "auto" => Ok(ViewBatchArg(None)),
        n => match n.parse::<usize>() {
            Ok(n) if (1..=256).contains(&n) => Ok(ViewBatchArg(Some(n))),
            _ => Err(format!(
                "{s:?}: use a count from 1 to 256, or auto (the batch `tessera plan --workers N` recommends)"
            )),
        },
    }
}

/// `--store` names as shard counts (0: one Redis).
fn parse_stores(names: &[String]) -> Result<Vec<usize>> {
    names
        .iter()
        .map(|n| match n.trim() {
            "redis" => Ok(0),
            "cluster" => Ok(scale::CLUSTER_SHARDS),
            other => {
                bail!("--store takes redis and/or cluster (e.g. redis,cluster), not {other:?}")
            }
        })
        .collect()
}

/// The flags `memory` and `e2e` share: whole jobs on N workers with the tiny model.
fn check_tiny_job(workers: usize, steps: usize, training_size: u32) -> Result<()> {
    if workers == 0 || steps < 2 {
        bail!("--workers must be at least 1 and --steps at least 2");
    }
    if training_size < 128 || !training_size.is_multiple_of(64) {
        bail!("--training-size takes pixels, a multiple of 64 from 128, e.g. 1024 or 256");
    }
    Ok(())
}

/// `--coordinator-cores`: counts from 1 up to this machine's cores, or "all" (`None`).
fn parse_cores(list: &[String]) -> Result<Vec<Option<usize>>> {
    let max = std::thread::available_parallelism().map_or(1, |n| n.get());
    list.iter()
        .map(|c| match c.trim() {
            "all" => Ok(None),
            n => match n.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
                _ => {
                    bail!("--coordinator-cores takes counts from 1 to {max} or \"all\", e.g. 2,all")
                }
            },
        })
        .collect()
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    let command = bench::invocation();
    match cmd {
        BenchCommand::Unet(a) => super::bench_unet::run(a),
        BenchCommand::Kernels(a) => super::bench_kernels::run(a),
        BenchCommand::Dashboard(a) => run_dashboard(a, command),
        BenchCommand::Load(a) => run_load(a, command),
        BenchCommand::E2e(a) => {
            if a.size < 64 || a.size % 64 != 0 {
                bail!("--size takes a side in pixels, a multiple of 64, e.g. 4096");
            }
            check_tiny_job(a.workers, a.steps, a.training_size)?;
            let opts = e2e::E2eOptions {
                size: a.size,
                workers: a.workers,
                steps: a.steps,
                training: a.training_size,
            };
            let (_, report) = e2e::run(&opts, command)?;
            report.emit(a.out.markdown.as_deref())?;
            Ok(())
        }
        BenchCommand::Memory(a) => {
            if a.sizes.is_empty() || a.sizes.iter().any(|&s| s < 64 || s % 64 != 0) {
                bail!("--sizes takes sides in pixels, multiples of 64, e.g. 8192,32768");
            }
            check_tiny_job(a.workers, a.steps, a.training_size)?;
            if a.simulate_eval_ms
                .is_some_and(|ms| !(ms >= 0.0 && ms.is_finite()))
            {
                bail!("--simulate-eval-ms must be 0 or more");
            }
            let opts = memory::MemoryOptions {
                sizes: a.sizes,
                workers: a.workers,
                simulate_ms: a.simulate_eval_ms,
                steps: a.steps,
                keep: a.keep,
                training: a.training_size,
            };
            let (_, report) = memory::run(&opts, command)?;
            report.emit(a.out.markdown.as_deref())?;
            Ok(())
        }
        BenchCommand::Step(a) => {
            if a.sizes.is_empty() || a.steps == 0 || a.workers == 0 || a.eval_ms <= 0.0 {
                bail!("--sizes, --steps, --workers and --eval-ms must be positive");
            }
            let opts = step::StepOptions {
                sizes: a.sizes,
                steps: a.steps,
                eval_ms: a.eval_ms,
                workers: a.workers,
                view_batch: a.view_batch,
                markdown: a.out.markdown.clone(),
            };
            let (_, report) = step::run(&opts, command)?;
            report.emit(a.out.markdown.as_deref())?;
            Ok(())
        }
        BenchCommand::Scale(a) => run_scale(a, command),
    }
}

fn run_dashboard(a: DashboardArgs, command: String) -> Result<()> {
    if a.jobs == 0 || a.workers == 0 || a.loads == 0 || a.eval_ms.is_nan() || a.eval_ms <= 0.0 {
        bail!("--jobs, --workers, --loads and --eval-ms must be positive");
    }
    let opts = crate::bench::dashboard::DashboardOptions {
        jobs: a.jobs,
        workers: a.workers,
        eval_ms: a.eval_ms,
        loads: a.loads,
    };
    let (_, report) = crate::bench::dashboard::run(&opts, command)?;
    report.emit(a.out.markdown.as_deref())?;
    Ok(())
}

fn run_load(a: LoadArgs, command: String) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "bf16" => candle_core::DType::BF16,
        "f32" => candle_core::DType::F32,
        _ => candle_core::DType::F16,
    };
    if a.child {
        let [model] = &a.model[..] else {
            bail!("--child loads one --model");
        };
        return Ok(load::child(model, dtype, &a.lora)?);
    }
    if a.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let opts = load::LoadOptions {
        models: a.model,
        repeats: a.repeats,
        dtype,
        cold: !a.warm_only,
        loras: a.lora,
    };
    let (_, report) = load::run(&opts, command)?;
    report.emit(a.out.markdown.as_deref())?;
    Ok(())
}

fn run_scale(a: ScaleArgs, command: String) -> Result<()> {
    if a.workers.is_empty() || a.workers.contains(&0) {
        bail!("--workers needs counts of at least 1, e.g. 1,2,4");
    }
    if !(a.eval_ms > 0.0 && a.slow_factor >= 1.0) {
        bail!("--eval-ms must be positive and --slow-factor at least 1");
    }
    let mixed = if a.mixed == "none" {
        None
    } else {
        let parts: Vec<usize> = a
            .mixed
            .split(',')
            .map(|p| p.trim().parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| anyhow::anyhow!("--mixed takes FAST,SLOW (e.g. 6,2) or none"))?;
        match parts[..] {
            [fast, slow] if fast + slow > 0 => Some(scale::MixedSet {
                fast,
                slow,
                slow_factor: a.slow_factor,
            }),
            _ => bail!("--mixed takes FAST,SLOW (e.g. 6,2) or none"),
        }
    };
    if a.link_gbit.iter().any(|g| !(g.is_finite() && *g >= 0.0)) {
        bail!("--link-gbit takes speeds in Gbit/s, 0 for unlimited, e.g. 0,10,2");
    }
    if a.node_link_gbit
        .is_some_and(|g| !(g.is_finite() && g > 0.0))
    {
        bail!("--node-link-gbit takes a speed in Gbit/s above 0");
    }
    let coordinator_cores = parse_cores(&a.coordinator_cores)?;
    let opts = scale::ScaleOptions {
        coordinator_cores,
        stores: parse_stores(&a.store)?,
        workers: a.workers,
        eval_ms: a.eval_ms,
        mixed,
        size: a.size,
        steps: a.steps,
        view_batch: a.view_batch.0,
        links: a
            .link_gbit
            .iter()
            .map(|&g| (g > 0.0).then_some(g))
            .collect(),
        link_per_node: a.link_per_node,
        node_link: a.node_link_gbit,
        repeat: a.repeat as usize,
        markdown: a.out.markdown.clone(),
    };
    if let Some(file) = &a.runs_json {
        let runs = scale::measure(&opts)?;
        return Ok(scale::write_runs(&runs, file)?);
    }
    let (_, report) = scale::run(&opts, command)?;
    report.emit(a.out.markdown.as_deref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A `--link-gbit` run hands its options to a child inside the namespace as flags; they
    /// must parse back to the same configuration.
    #[test]
    fn a_link_runs_child_gets_the_same_options_back() {
        let opts = scale::ScaleOptions {
            workers: vec![8, 16],
            eval_ms: 50.0,
            mixed: Some(scale::MixedSet {
                fast: 6,
                slow: 2,
                slow_factor: 4.0,
            }),
            size: 4096,
            steps: Some(3),
            view_batch: None,
            coordinator_cores: vec![Some(1), None],
            links: vec![Some(2.0)],
            stores: vec![0, 3],
            link_per_node: true,
            node_link: Some(2.0),
            repeat: 3,
            markdown: None,
        };
        let args = scale::child_args(&opts, std::path::Path::new("/tmp/runs.json"));
        let cli =
            crate::cli::Cli::try_parse_from(std::iter::once("tessera".to_string()).chain(args))
                .expect("the child's flags parse");
        let crate::cli::Command::Bench(BenchCommand::Scale(a)) = cli.command else {
            panic!("not bench scale");
        };
        assert_eq!(a.workers, vec![8, 16]);
        assert_eq!(
            (a.eval_ms, a.size, a.steps, a.view_batch),
            (50.0, 4096, Some(3), ViewBatchArg(None))
        );
        assert_eq!((a.mixed.as_str(), a.slow_factor), ("6,2", 4.0));
        assert_eq!(
            parse_cores(&a.coordinator_cores).unwrap(),
            vec![Some(1), None]
        );
        assert!(
            a.link_gbit.is_empty(),
            "the child runs inside the link it was given"
        );
        assert_eq!(
            a.runs_json.as_deref(),
            Some(std::path::Path::new("/tmp/runs.json"))
        );
        assert_eq!(parse_stores(&a.store).unwrap(), vec![0, 3]);
        assert_eq!(a.node_link_gbit, Some(2.0));
        assert_eq!(a.repeat, 3);
        assert!(parse_stores(&["sharded".into()]).is_err());
        assert!(parse_cores(&["0".into()]).is_err());
        assert!(parse_cores(&["many".into()]).is_err());
    }
}
