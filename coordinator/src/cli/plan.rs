//! `tessera plan`: the cascade a render would run — stages, timesteps, views, model
//! evaluations and memory estimates — without loading weights or running anything.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use tessera_core::plan::{self, ArchInfo, Plan, StageEntry};
use tessera_worker::model::arch::arch_info;

use super::job::JobArgs;

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Read the architecture from this model directory (configs and weight headers only).
    #[arg(long, conflicts_with = "arch")]
    pub model: Option<PathBuf>,
    /// A built-in architecture: sd21 (768, v-prediction), sd21-base (512) or sdxl.
    #[arg(long)]
    pub arch: Option<String>,
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

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 1.0 {
        format!("{g:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn ranges(ts: &[f64]) -> String {
    let shown: Vec<String> = ts.iter().map(|t| format!("{t}")).collect();
    if shown.len() <= 12 {
        shown.join(", ")
    } else {
        format!(
            "{}, … , {} ({} timesteps)",
            shown[..6].join(", "),
            shown[shown.len() - 3..].join(", "),
            shown.len()
        )
    }
}

/// The plan as text, a block per stage.
pub fn render_text(plan: &Plan) -> String {
    let mut s = format!(
        "method {} on {} (training size {}), {} stage{}, {} views per model call\n",
        plan.method,
        plan.arch,
        plan.training_size,
        plan.stages.len(),
        if plan.stages.len() == 1 { "" } else { "s" },
        plan.view_batch
    );
    for (k, st) in plan.stages.iter().enumerate() {
        s.push_str(&format!(
            "stage {k}: {}x{} (latent {}x{})",
            st.size[0], st.size[1], st.latent[1], st.latent[0]
        ));
        match &st.entry {
            StageEntry::Noise => s.push_str(", from noise\n"),
            StageEntry::InitImage { filter } => {
                s.push_str(&format!(", from --init-image ({filter} resize)\n"))
            }
            StageEntry::Previous {
                from_predicted_x0,
                filter,
            } => s.push_str(&format!(
                ", from the previous stage's {} ({filter} resize)\n",
                if *from_predicted_x0 {
                    "predicted clean latent"
                } else {
                    "latent"
                }
            )),
        }
        if !st.timesteps.is_empty() {
            s.push_str(&format!("  timesteps: {}\n", ranges(&st.timesteps)));
        }
        s.push_str(&format!(
            "  views per step: {} local ({}x{} latent tiles) + {} global in {} tasks; {} model evaluations per step, {} in all\n",
            st.local_views,
            st.tile[1],
            st.tile[0],
            st.global_views,
            st.tasks_per_step(plan.view_batch),
            st.evaluations_per_step,
            st.evaluations
        ));
        let mut extras = Vec::new();
        if st.in_unet_fusion {
            extras.push("in-UNet scale fusion".to_string());
        }
        if st.dilated_steps > 0 {
            extras.push(format!(
                "dilation {} for {} steps",
                st.dilation, st.dilated_steps
            ));
        }
        if let Some(r) = &st.restraint {
            extras.push(format!(
                "restrained structure (cosine scale {})",
                r.cosine_scale
            ));
        }
        if st.freeu {
            extras.push("FreeU".into());
        }
        if st.camap_capture {
            extras.push("captures attention maps".into());
        }
        if let Some(w) = st.camap_inject {
            extras.push(format!("reuses attention maps (weight {w})"));
        }
        extras.push(format!("guidance {:?}", st.guidance));
        s.push_str(&format!("  {}\n", extras.join("; ")));
    }
    let tasks = plan
        .stages
        .iter()
        .map(|st| st.tasks_per_step(plan.view_batch))
        .max()
        .unwrap_or(0);
    if plan.view_batch > 1 && tasks > 1 {
        // A step's tasks go out in rounds, one per worker; the last round leaves the workers
        // without a task idle, which matters once the rounds are few.
        s.push_str(&format!(
            "on a cluster: up to {tasks} tasks per step; with more than about {} workers, a smaller --view-batch (1: {} tasks) keeps them evenly busy\n",
            (tasks / 4).max(1),
            plan.stages
                .iter()
                .map(|st| st.tasks_per_step(1))
                .max()
                .unwrap_or(0)
        ));
    }
    s.push_str(&format!(
        "total model evaluations: {}\npeak memory (estimate): coordinator {}, worker {} ({} weights + {} activations)\n",
        plan.total_evaluations,
        gib(plan.memory.coordinator_bytes),
        gib(plan.memory.worker_bytes),
        gib(plan.memory.worker_weights_bytes),
        gib(plan.memory.worker_activation_bytes)
    ));
    s
}

pub fn run(args: PlanArgs) -> Result<()> {
    if args.weight_bytes != 2 && args.weight_bytes != 4 {
        bail!(
            "--weight-bytes {}: use 2 (f16) or 4 (f32)",
            args.weight_bytes
        );
    }
    let arch = match (&args.model, &args.arch) {
        (Some(dir), None) => arch_info(dir, args.weight_bytes)?,
        (None, Some(name)) => {
            let mut a = ArchInfo::preset(name)?;
            a.weight_bytes = args.weight_bytes;
            a
        }
        _ => bail!("tell plan the architecture: --arch sd21|sd21-base|sdxl or --model DIR"),
    };
    let spec = args
        .job
        .to_spec(arch.training_size, false, args.job.seed.unwrap_or(0))?;
    let plan = plan::plan(&spec, &arch)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", render_text(&plan));
    }
    Ok(())
}
