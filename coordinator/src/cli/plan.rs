//! `tessera plan`: the cascade a render would run — stages, timesteps, views, model
//! evaluations and memory estimates — without loading weights or running anything.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::builder::PossibleValuesParser;
use clap::Args;
use tessera_core::describe;
use tessera_core::family::{PlanPreset, PLAN_PRESETS};
use tessera_core::plan::{self, ArchInfo};
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
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", describe::plan_text(&plan));
    }
    Ok(())
}
