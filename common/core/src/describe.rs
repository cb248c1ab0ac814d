//! A render in words: the plan as `tessera plan` prints it (and `PlanJob` returns it), and the
//! generation parameters written into every PNG. Both are read by people and compared byte
//! for byte by the golden script, so their wording only changes on purpose.

use crate::plan::{Plan, StageEntry, StagePlan, StageSchedule};
use crate::spec::{BitDepth, RenderSpec};

impl RenderSpec {
    /// The generation parameters as `key: value` lines, for the PNG's metadata.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "prompt: {}\nnegative_prompt: {}\nsize: {}x{}\nsteps: {}\nguidance: {}\nseed: {}",
            self.prompt,
            self.negative_prompt.as_deref().unwrap_or(""),
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.seed
        );
        if let Some(k) = self.scheduler {
            s.push_str(&format!("\nscheduler: {k}"));
        }
        if self.output.bit_depth != BitDepth::Eight {
            s.push_str(&format!("\nbit_depth: {}", self.output.bit_depth));
        }
        s
    }
}

/// The PNG's `parameters` text: the spec, then what the plan resolved.
pub fn png_parameters(spec: &RenderSpec, plan: &Plan, model: &str) -> String {
    let stages: Vec<String> = plan
        .stages
        .iter()
        .map(|s| format!("{}x{}", s.size[0], s.size[1]))
        .collect();
    let ms = serde_json::to_string(&spec.method).unwrap_or_default();
    let mut s = spec.describe();
    if spec.scheduler.is_none() {
        let kind = match &plan.stages[0].schedule {
            StageSchedule::Schedule { scheduler, .. } => scheduler.to_string(),
            StageSchedule::Frecas { .. } => "ddim".to_string(),
            StageSchedule::FrecasFlow { .. } => "flow-euler".to_string(),
        };
        s.push_str(&format!("\nscheduler: {kind}"));
    }
    format!(
        "{s}\nmodel: {model}\nmethod: {}\nstages: {}\nmethod_flags: {ms}",
        plan.method,
        stages.join(",")
    )
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

/// The plan as text: a header, a block per stage, then the cluster hint and the totals.
pub fn plan_text(plan: &Plan) -> String {
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
        s.push_str(&stage_text(k, st, plan.view_batch));
    }
    s.push_str(&cluster_hint(plan));
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

/// One stage's block: its size and where it starts from, its timesteps, its views, and what
/// the method does in it.
fn stage_text(k: usize, st: &StagePlan, view_batch: usize) -> String {
    let mut s = format!(
        "stage {k}: {}x{} (latent {}x{})",
        st.size[0], st.size[1], st.latent[1], st.latent[0]
    );
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
        st.tasks_per_step(view_batch),
        st.evaluations_per_step,
        st.evaluations
    ));
    s.push_str(&format!("  {}\n", stage_extras(st).join("; ")));
    s
}

/// What the method adds to a stage, ending with its guidance.
fn stage_extras(st: &StagePlan) -> Vec<String> {
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
    extras
}

/// A hint for clusters, when a step's tasks are few enough that the last round matters.
fn cluster_hint(plan: &Plan) -> String {
    let tasks = plan
        .stages
        .iter()
        .map(|st| st.tasks_per_step(plan.view_batch))
        .max()
        .unwrap_or(0);
    if plan.view_batch <= 1 || tasks <= 1 {
        return String::new();
    }
    // A step's tasks go out in rounds, one per worker; the last round leaves the workers
    // without a task idle, which matters once the rounds are few.
    format!(
        "on a cluster: up to {tasks} tasks per step; with more than about {} workers, a smaller --view-batch (1: {} tasks) keeps them evenly busy\n",
        (tasks / 4).max(1),
        plan.stages
            .iter()
            .map(|st| st.tasks_per_step(1))
            .max()
            .unwrap_or(0)
    )
}
