//! `tessera plan`: the cascade a render would run — stages, timesteps, views, model
//! evaluations and memory estimates — without loading weights or running anything.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::builder::PossibleValuesParser;
use clap::Args;
use tessera_core::describe;
use tessera_core::family::{PlanPreset, PLAN_PRESETS};
use tessera_core::plan::{self, ArchInfo};
use tessera_core::view_batch;
use tessera_worker::model::arch::arch_info_with;

use super::job::{JobArgs, MissingPrompt};
use super::model_flags::ModelFlags;

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Read the architecture from this model directory or single-file checkpoint (configs
    /// and weight headers only).
    #[arg(long, conflicts_with = "arch")]
    pub model: Option<PathBuf>,
    /// A built-in architecture: SD 2.1 (768, v-prediction), SD 2.1 base (512), SDXL base 1.0
    /// or SD3 medium.
    #[arg(long, value_parser = PossibleValuesParser::new(PLAN_PRESETS.map(|p| p.name)))]
    pub arch: Option<String>,
    #[command(flatten)]
    pub model_flags: ModelFlags,
    #[command(flatten)]
    pub job: JobArgs,
    /// Bytes per weight on the workers for the memory estimate: 2 (f16 on a GPU) or 4 (f32
    /// on a CPU).
    #[arg(long, default_value_t = 2)]
    pub weight_bytes: u64,
    /// Also say how busy this plan's tiled steps keep N equal workers with its --view-batch,
    /// and which batch keeps them busiest (JSON: a "workers" object).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub workers: Option<u32>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PlanArgs) -> Result<()> {
    if args.weight_bytes != 2 && args.weight_bytes != 4 {
        bail!(
            "--weight-bytes {}: use 2 (f16) or 4 (f32)",
            args.weight_bytes
        );
    }
    let arch = match (&args.model, &args.arch) {
        (Some(dir), None) => arch_info_with(dir, args.weight_bytes, args.model_flags.prediction())?,
        (None, Some(name)) => {
            let mut a = ArchInfo::preset(name)?;
            a.weight_bytes = args.weight_bytes;
            a
        }
        _ => bail!(
            "tell plan the architecture: --model DIR, or --arch with one of {}",
            PlanPreset::names()
        ),
    };
    let spec = args
        .job
        .to_request(MissingPrompt::Use("(plan)"))?
        .to_spec(arch.training_size, || 0)?;
    let plan = plan::plan(&spec, &arch)?;
    let workers = args.workers.map(|n| n as usize);
    if args.json {
        let mut json = serde_json::to_value(&plan)?;
        if let (Some(n), Some(obj)) = (workers, json.as_object_mut()) {
            obj.insert("workers".into(), workers_json(&plan, n));
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", describe::plan_text(&plan));
        if let Some(n) = workers {
            print!("{}", describe::workers_text(&plan, n));
        }
    }
    Ok(())
}

/// `--workers N --json`: the plan's batch and the recommended one, with how busy each keeps
/// the workers in the tiled steps (null where every step is one view).
fn workers_json(plan: &plan::Plan, n: usize) -> serde_json::Value {
    let own = view_batch::fit(plan, plan.view_batch, n);
    let best = view_batch::recommend(plan, n);
    serde_json::json!({
        "workers": n,
        "view_batch": plan.view_batch,
        "busy": own.map(|f| f.busy),
        "recommended_view_batch": best.map(|f| f.view_batch),
        "recommended_busy": best.map(|f| f.busy),
    })
}
