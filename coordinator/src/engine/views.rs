//! One model evaluation of a whole stage latent, distributed: cut the latent into local tiles
//! and global strided views, hand them to workers in fixed batches, merge what comes back in
//! view order, and fuse the two scales (DESIGN.md, "Tiled scale fusion").
//!
//! Every batch is the same whatever the number of workers, and merging follows view order, so
//! the result does not depend on who computed what or when.

use candle_core::{DType, Device, Tensor};
use tessera_common::method::camap::{CaMap, ViewPlacement};
use tessera_common::method::fusion::{fuse_scales_with, BlurAxes};
use tessera_common::method::params::TileWeights;
use tessera_common::noise::{NoiseKey, NoisePurpose};
use tessera_common::plan::{Plan, StagePlan};
use tessera_common::store::{get_tensor, keys, put_tensor, Store};
use tessera_common::task::{CamapInject, DenoiseTask, FusionHook, Task, TaskKind};
use tessera_common::tiling::{GlobalViews, LocalViews, ViewWeighting};

use super::{EngineError, Result, StepTimings};
use crate::dispatch::Dispatch;

/// Where a step is: job, stage, step index within the stage, timestep.
#[derive(Debug, Clone, Copy)]
pub struct StepAt<'a> {
    pub job: &'a str,
    pub seed: u64,
    pub stage: usize,
    pub step: usize,
    pub timestep: f64,
}

/// Merged predictions over the whole stage latent, (1, C, H, W) f32 each.
#[derive(Debug)]
pub struct Predictions {
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
    /// The stage's cross-attention map, when this step captured one.
    pub camap: Option<CaMap>,
    /// Where the coordinator's time went (the evaluation's share of [`StepTimings`]).
    pub timings: StepTimings,
}

/// A task's conditional and (when guided) unconditional predictions.
type TaskOutputs = (Tensor, Option<Tensor>);

/// Which views a task holds.
enum Group {
    Local(Vec<usize>),
    Global(Vec<usize>),
}

/// The local tiles of a step: jittered by a generator keyed by (seed, stage, step), so a
/// retried or resumed step sees the same windows. A whole-latent stage is one view.
pub fn local_views(stage: &StagePlan, at: &StepAt) -> Result<LocalViews> {
    let (h, w) = stage.latent_hw();
    let cfg = stage.local_config();
    let seed = NoiseKey {
        seed: at.seed,
        stage: at.stage as u32,
        step: at.step as u32,
        purpose: NoisePurpose::ViewJitter,
    }
    .derive_seed(0);
    Ok(LocalViews::new(h, w, &cfg, Some(seed))?)
}

fn global_views(stage: &StagePlan) -> Result<Option<GlobalViews>> {
    if stage.global_views == 0 {
        return Ok(None);
    }
    let (h, w) = stage.latent_hw();
    Ok(Some(GlobalViews::new(h, w, &stage.global_config())?))
}

/// The part of the previous stage's CA-map each view of a batch sees, laid out like the
/// batch: `[uncond × N, cond × N]` (or `[cond × N]` unguided), each `(view_h, view_w, 77)`.
fn camap_for_batch(
    map: &CaMap,
    stage_hw: (usize, usize),
    view_hw: (usize, usize),
    placements: &[ViewPlacement],
) -> Result<Tensor> {
    let mut per_view = Vec::with_capacity(placements.len());
    for &p in placements {
        let m = map.for_view(stage_hw, view_hw, view_hw, p)?;
        let (b, _, t) = m.dims3()?;
        per_view.push(m.reshape((b, view_hw.0, view_hw.1, t))?);
    }
    let halves = per_view[0].dim(0)?;
    let mut rows = Vec::with_capacity(halves * per_view.len());
    for half in 0..halves {
        for m in &per_view {
            rows.push(m.narrow(0, half, 1)?);
        }
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// Evaluates the model over the whole stage latent `input` (already scaled for the model) at
/// one step, as the plan lays the stage out.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    store: &dyn Store,
    workers: &dyn Dispatch,
    plan: &Plan,
    stage: &StagePlan,
    at: StepAt,
    input: &Tensor,
    camap: Option<&CaMap>,
    capture: bool,
    done: &(dyn Fn(usize) + Sync),
) -> Result<Predictions> {
    let mut timings = StepTimings::default();
    let clock = std::time::Instant::now();
    let stage_hw = stage.latent_hw();
    let local = local_views(stage, &at)?;
    let global = global_views(stage)?;
    let guided = plan.guided;
    let batch = plan.view_batch;
    let b = (plan.training_size / 8) as usize;
    let fusion = stage.in_unet_fusion.then(|| FusionHook {
        train_latent: [b, b],
        fast: stage.fast,
        jitter_seed: Some(
            NoiseKey {
                seed: at.seed,
                stage: at.stage as u32,
                step: at.step as u32,
                purpose: NoisePurpose::FusionJitter,
            }
            .derive_seed(0),
        ),
    });
    let dilation = if at.step < stage.dilated_steps {
        stage.dilation
    } else {
        1
    };

    let mut groups = Vec::new();
    let locals: Vec<usize> = (0..local.len()).collect();
    for chunk in locals.chunks(batch) {
        groups.push(Group::Local(chunk.to_vec()));
    }
    if let Some(g) = &global {
        let globals: Vec<usize> = (0..g.len()).collect();
        for chunk in globals.chunks(batch) {
            groups.push(Group::Global(chunk.to_vec()));
        }
    }

    let mut tasks = Vec::with_capacity(groups.len());
    for (ti, group) in groups.iter().enumerate() {
        let key = |part: &str| keys::task(at.job, at.stage, at.step, ti, part);
        let (views, view_hw, placements, is_local) = match group {
            Group::Local(ix) => {
                let (wh, ww) = local.window();
                let places = ix
                    .iter()
                    .map(|&i| {
                        let r = local.rects()[i];
                        ViewPlacement::Window {
                            top: r.top,
                            left: r.left,
                        }
                    })
                    .collect::<Vec<_>>();
                (local.extract_batch(input, ix)?, (wh, ww), places, true)
            }
            Group::Global(ix) => {
                let Some(g) = global.as_ref() else {
                    return Err(EngineError::Invalid(
                        "global views without a global layout".into(),
                    ));
                };
                let mut places = Vec::with_capacity(ix.len());
                for &i in ix {
                    places.push(ViewPlacement::Strided {
                        phase: g.offset(i)?,
                        strides: g.strides(),
                    });
                }
                (g.extract_batch(input, ix)?, g.view_size(), places, false)
            }
        };
        put_tensor(store, &key("in"), &views)?;
        let camap_inject = match (camap, stage.camap_inject) {
            (Some(map), Some(weight)) => {
                let m = camap_for_batch(map, stage_hw, view_hw, &placements)?;
                put_tensor(store, &key("camap"), &m)?;
                Some(CamapInject {
                    key: key("camap"),
                    weight,
                })
            }
            _ => None,
        };
        tasks.push(Task {
            job: at.job.to_string(),
            id: format!("s{}:t{}:task{ti}", at.stage, at.step),
            kind: TaskKind::Denoise(DenoiseTask {
                timestep: at.timestep,
                input: key("in"),
                output_cond: key("cond"),
                output_uncond: guided.then(|| key("uncond")),
                size_conditioning: plan.size_conditioning,
                freeu: stage.freeu,
                dilation,
                scale_fusion: fusion.clone(),
                camap_inject,
                camap_capture: (capture && is_local).then(|| key("capture")),
            }),
        });
    }

    let sizes: Vec<usize> = groups
        .iter()
        .map(|g| match g {
            Group::Local(ix) | Group::Global(ix) => ix.len(),
        })
        .collect();
    let views_of: std::collections::HashMap<&str, usize> = tasks
        .iter()
        .zip(&sizes)
        .map(|(t, &n)| (t.id.as_str(), n))
        .collect();
    timings.store_write += clock.elapsed().as_secs_f64();
    let clock = std::time::Instant::now();
    // Each task's outputs are read as soon as it finishes, while the others still compute, so
    // only the last few reads stay on the step's critical path. Merging below still follows
    // view order, whatever the order of arrival.
    let cpu = Device::Cpu;
    let index_of: std::collections::HashMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id.as_str(), i))
        .collect();
    let read_outputs = |ti: usize| -> Result<TaskOutputs> {
        let key = |part: &str| keys::task(at.job, at.stage, at.step, ti, part);
        let cond = get_tensor(store, &key("cond"), &cpu)?.to_dtype(DType::F32)?;
        let uncond = if guided {
            Some(get_tensor(store, &key("uncond"), &cpu)?.to_dtype(DType::F32)?)
        } else {
            None
        };
        Ok((cond, uncond))
    };
    let early: Vec<std::sync::Mutex<Option<TaskOutputs>>> = (0..tasks.len())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    workers.run(&tasks, &|t: &Task| {
        done(views_of.get(t.id.as_str()).copied().unwrap_or(0));
        if let Some(&ti) = index_of.get(t.id.as_str()) {
            // A failed early read is simply retried after the wait.
            if let Ok(outputs) = read_outputs(ti) {
                *early[ti].lock().unwrap_or_else(|e| e.into_inner()) = Some(outputs);
            }
        }
    })?;
    timings.workers += clock.elapsed().as_secs_f64();
    let clock = std::time::Instant::now();

    // Gather per view [uncond; cond] (2 rows, or 1 unguided), in view order.
    let mut local_out: Vec<Tensor> = Vec::with_capacity(local.len());
    let mut global_out: Vec<Tensor> = Vec::new();
    let mut captured: Vec<Tensor> = Vec::new();
    for (ti, group) in groups.iter().enumerate() {
        let key = |part: &str| keys::task(at.job, at.stage, at.step, ti, part);
        let early = early[ti].lock().unwrap_or_else(|e| e.into_inner()).take();
        let (cond, uncond) = match early {
            Some(outputs) => outputs,
            None => read_outputs(ti)?,
        };
        let (ix, out) = match group {
            Group::Local(ix) => (ix, &mut local_out),
            Group::Global(ix) => (ix, &mut global_out),
        };
        for n in 0..ix.len() {
            let c = cond.narrow(0, n, 1)?;
            out.push(match &uncond {
                Some(u) => Tensor::cat(&[&u.narrow(0, n, 1)?, &c], 0)?,
                None => c,
            });
        }
        if capture && matches!(group, Group::Local(_)) {
            let map = get_tensor(store, &key("capture"), &cpu)?.to_dtype(DType::F32)?;
            let halves = map.dim(0)? / ix.len();
            for n in 0..ix.len() {
                let rows: Vec<Tensor> = (0..halves)
                    .map(|h| map.narrow(0, h * ix.len() + n, 1))
                    .collect::<candle_core::Result<_>>()?;
                captured.push(Tensor::cat(&rows, 0)?);
            }
        }
    }
    timings.store_read += clock.elapsed().as_secs_f64();
    let clock = std::time::Instant::now();
    let weighting = match stage.tile_weights {
        TileWeights::Uniform => ViewWeighting::Uniform,
        TileWeights::Gaussian => ViewWeighting::GAUSSIAN,
    };
    let merged_local = local.merge(&local_out, weighting)?;
    let merged_global = global.as_ref().map(|g| g.merge(&global_out)).transpose()?;
    let camap = if capture {
        Some(merge_camaps(&local, &captured, weighting)?)
    } else {
        None
    };
    timings.merge += clock.elapsed().as_secs_f64();
    let clock = std::time::Instant::now();
    let merged = match merged_global {
        Some(merged_global) => fuse_scales_with(
            &merged_local,
            &merged_global,
            stage.fusion_scale,
            BlurAxes::Spatial,
        )?,
        None => merged_local,
    };
    timings.fusion += clock.elapsed().as_secs_f64();
    let clock = std::time::Instant::now();
    store.delete_prefix(&keys::step_prefix(at.job, at.stage, at.step))?;
    timings.store_write += clock.elapsed().as_secs_f64();
    let (cond, uncond) = if guided {
        (merged.narrow(0, 1, 1)?, Some(merged.narrow(0, 0, 1)?))
    } else {
        (merged, None)
    };
    Ok(Predictions {
        cond,
        uncond,
        camap,
        timings,
    })
}

/// One CA-map over the stage from the per-view maps `(halves, h0, w0, 77)`: each resized to
/// its view's latent size and merged like the predictions.
fn merge_camaps(local: &LocalViews, maps: &[Tensor], weighting: ViewWeighting) -> Result<CaMap> {
    let (vh, vw) = local.window();
    let mut spatial = Vec::with_capacity(maps.len());
    for m in maps {
        let resized = CaMap::from_tensor(m.clone())?.resize((vh, vw))?;
        spatial.push(resized.tensor().permute((0, 3, 1, 2))?.contiguous()?);
    }
    let merged = local.merge(&spatial, weighting)?;
    Ok(CaMap::from_tensor(
        merged.permute((0, 2, 3, 1))?.contiguous()?,
    )?)
}
