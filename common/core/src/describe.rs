//! A render in words: the plan as `tessera plan` prints it (and `PlanJob` returns it), and the
//! generation parameters written into every PNG. Both are read by people and compared byte
//! for byte by the golden script, so their wording only changes on purpose.

use crate::method::params::Method;
use crate::plan::{GuidancePlan, Plan, StageEntry, StagePlan, StageSchedule};
use crate::spec::{BitDepth, RenderSpec};
use crate::view_batch;

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
    // Before `model:`: a cluster appends the model's fingerprint to the last line.
    for l in &spec.loras {
        s.push_str(&format!("\nlora: {}:{} ({})", l.name, l.weight, l.sha256));
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
    s.push_str(&frecas_note(plan));
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
    let views = if st.local_views == 1 && st.global_views == 0 {
        format!("1, the whole {}x{} latent,", st.tile[1], st.tile[0])
    } else {
        format!(
            "{} local ({}x{} latent tiles) + {} global",
            st.local_views, st.tile[1], st.tile[0], st.global_views
        )
    };
    s.push_str(&format!(
        "  views per step: {views} in {}; {} model evaluations per step, {} in all\n",
        count(st.tasks_per_step(view_batch), "task"),
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
    extras.push(guidance_text(&st.guidance));
    extras
}

/// `n` and the noun, plural unless n is one.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn guidance_text(g: &GuidancePlan) -> String {
    match g {
        GuidancePlan::None => "no guidance (conditional prediction only)".into(),
        GuidancePlan::Cfg { scale } => format!("guidance {scale}"),
        GuidancePlan::FaCfg {
            high,
            low,
            low_latent,
        } => format!(
            "frequency-aware guidance {high} on high frequencies, {low} on those of the \
             previous stage's {}x{} latent",
            low_latent[1], low_latent[0]
        ),
    }
}

/// FreCaS with tiled stages: Tessera's tiles bring global views and scale fusion with them,
/// which the reference FreCaS (one whole-latent evaluation per step) does not have.
fn frecas_note(plan: &Plan) -> String {
    let tiled = plan.stages.iter().any(|st| st.global_views > 0);
    if plan.method != Method::Frecas || !tiled {
        return String::new();
    }
    "note: tiled stages add global views and scale fusion, which the reference FreCaS does not \
     have; --no-fusion turns them off (local tiles only)\n"
        .into()
}

/// A hint for clusters, when a step's tasks are few enough that the last round matters.
fn cluster_hint(plan: &Plan) -> String {
    let tasks = plan
        .stages
        .iter()
        .map(|st| st.tasks_per_step(plan.view_batch))
        .max()
        .unwrap_or(0);
    if tasks <= 1 {
        return String::new();
    }
    format!(
        "on a cluster: up to {tasks} tasks per step; `tessera plan --workers N` tells how busy they keep N workers and which --view-batch keeps them busiest\n"
    )
}

/// How busy the plan's tiled steps keep `workers` workers with its --view-batch, and the
/// batch that keeps them busiest ([`view_batch::recommend`]).
pub fn workers_text(plan: &Plan, workers: usize) -> String {
    let on = count(workers, "worker");
    let (Some(own), Some(best)) = (
        view_batch::fit(plan, plan.view_batch, workers),
        view_batch::recommend(plan, workers),
    ) else {
        return format!(
            "on {on}: every step is one view, so --view-batch does not matter; more workers speed up other jobs beside this one, not this one\n"
        );
    };
    let them = if workers == 1 { "it" } else { "them" };
    let busy = |f: view_batch::Fit| format!("{them} {:.0}%", 100.0 * f.busy);
    if own.busy >= best.busy - view_batch::TOLERANCE {
        format!(
            "on {on}: --view-batch {} keeps {} busy in the tiled steps, as well as any batch from 1 to {}\n",
            own.view_batch,
            busy(own),
            view_batch::MAX_RECOMMENDED.max(own.view_batch)
        )
    } else {
        format!(
            "on {on}: --view-batch {} keeps {} busy in the tiled steps; --view-batch {} keeps {} busy (recommended)\n",
            own.view_batch,
            busy(own),
            best.view_batch,
            busy(best)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::params::MethodSpec;
    use crate::plan::{plan, ArchInfo};
    use crate::spec::{JobRequest, Size};

    fn plan_of(size: u32, method: Method, no_fusion: bool) -> Plan {
        let request = JobRequest {
            prompt: "a lighthouse".into(),
            size: Some(Size {
                width: size,
                height: size,
            }),
            method: MethodSpec {
                method: Some(method),
                no_fusion,
                ..Default::default()
            },
            ..JobRequest::default()
        };
        let arch = ArchInfo::preset("sdxl").unwrap();
        plan(&request.to_spec(arch.training_size, || 0).unwrap(), &arch).unwrap()
    }

    #[test]
    fn the_workers_line_names_the_batch_that_keeps_them_busiest() {
        let mut p = plan_of(8192, Method::Freescale, false);
        let text = plan_text(&p);
        assert!(text.contains("`tessera plan --workers N`"), "{text}");
        let on8 = workers_text(&p, 8);
        assert!(
            on8.starts_with("on 8 workers: --view-batch 4 keeps them "),
            "{on8}"
        );
        let best = view_batch::recommend(&p, 32).unwrap();
        let on32 = workers_text(&p, 32);
        assert!(
            on32.contains(&format!("--view-batch {} keeps them", best.view_batch))
                == (best.view_batch != 4),
            "{on32}"
        );
        p.view_batch = best.view_batch;
        let taken = workers_text(&p, 32);
        assert!(
            taken.contains("as well as any batch from 1 to 8"),
            "{taken}"
        );
        let whole = workers_text(&plan_of(1024, Method::Freescale, false), 1);
        assert!(whole.contains("does not matter"), "{whole}");
    }

    #[test]
    fn the_plan_reads_as_words_not_rust_values() {
        let text = plan_text(&plan_of(2048, Method::Frecas, false));
        for rust in ["{", "}", "Cfg", " 1 tasks", " 1 workers"] {
            assert!(!text.contains(rust), "{rust:?} in\n{text}");
        }
        for want in [
            "views per step: 1, the whole 128x128 latent, in 1 task;",
            "guidance 7.5",
            "frequency-aware guidance 35 on high frequencies, 7.5 on those of the previous \
             stage's 128x128 latent",
            "tasks per step; `tessera plan --workers N` tells",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
    }

    #[test]
    fn frecas_with_tiled_stages_says_what_it_adds_to_the_reference() {
        let note = "tiled stages add global views and scale fusion";
        assert!(plan_text(&plan_of(2048, Method::Frecas, false)).contains(note));
        // Nothing to say without global views, or for the methods that fuse by design.
        assert!(!plan_text(&plan_of(2048, Method::Frecas, true)).contains(note));
        assert!(!plan_text(&plan_of(2048, Method::Hybrid, false)).contains(note));
    }
}
