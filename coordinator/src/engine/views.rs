//! One model evaluation of a whole stage latent, distributed: cut the latent into local tiles
//! and global strided views, hand them to workers in fixed batches, merge what comes back in
//! view order, and fuse the two scales (DESIGN.md, "Tiled scale fusion").
//!
//! Every batch is the same whatever the number of workers, and merging follows view order, so
//! the result does not depend on who computed what or when.
//!
//! The step is pipelined so the coordinator's work overlaps the workers': a writer thread
//! hands each task out as soon as its input is in the store, and each result is read and
//! merged as it arrives (held back only until the tasks before it are merged). The global
//! views go out first, so the scale fusion runs behind the local merge a band of rows at a
//! time. What remains between the last result and the next step is the last merges, the
//! fusion's last band, guidance and the scheduler — see [`super::StepTimings::critical`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tessera_core::method::camap::{CaMap, ViewPlacement};
use tessera_core::method::fusion::FusionBands;
use tessera_core::method::params::TileWeights;
use tessera_core::noise::{NoiseKey, NoisePurpose};
use tessera_core::plan::{Plan, StagePlan};
use tessera_core::task::{CamapInject, DenoiseTask, FusionHook, Task, TaskKind};
use tessera_core::tiling::{GlobalScatter, GlobalViews, LocalMerge, LocalViews, ViewWeighting};
use tessera_store::{get_tensor, keys, put_tensor, Store};

use super::{EngineError, Result, StepTimings};
use crate::dispatch::Dispatch;
use crate::sync::lock;

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
    /// When the first task was handed to the dispatcher, and when the last result came in:
    /// the engine's critical path is what lies outside this span.
    pub first_handed_out: Option<Instant>,
    pub last_result: Option<Instant>,
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

/// Part name of a stage's incoming CA-map (`keys::stage(job, stage, CAMAP_IN)`), written at
/// the stage's entry; view tasks name it and the workers cut their views from it.
pub const CAMAP_IN: &str = "camap_in";

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
    let clock = Instant::now();
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

    let groups = task_groups(local.len(), global.as_ref().map_or(0, |g| g.len()), batch);
    let view_dtype = workers.view_dtype();

    // Writes task `ti`'s input (and CA-map) to the store and returns the task.
    let make_task = |ti: usize| -> Result<Task> {
        let key = |part: &str| keys::task(at.job, at.stage, at.step, ti, part);
        let (views, view_hw, placements, is_local) = match &groups[ti] {
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
        put_tensor(store, &key("in"), &views.to_dtype(view_dtype)?)?;
        // The worker cuts its views' parts of the stage's map (stored once at the stage's
        // entry) itself.
        let camap_inject = match (camap, stage.camap_inject) {
            (Some(_), Some(weight)) => Some(CamapInject {
                key: keys::stage(at.job, at.stage, CAMAP_IN),
                weight,
                stage_hw: [stage_hw.0, stage_hw.1],
                view_hw: [view_hw.0, view_hw.1],
                placements,
            }),
            _ => None,
        };
        Ok(Task {
            job: at.job.to_string(),
            id: task_id(&at, ti),
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
        })
    };

    let index_of: HashMap<String, usize> =
        (0..groups.len()).map(|ti| (task_id(&at, ti), ti)).collect();
    let cpu = Device::Cpu;
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
    let read_capture = |ti: usize| -> Result<Tensor> {
        let key = keys::task(at.job, at.stage, at.step, ti, "capture");
        Ok(get_tensor(store, &key, &cpu)?.to_dtype(DType::F32)?)
    };
    let weighting = match stage.tile_weights {
        TileWeights::Uniform => ViewWeighting::Uniform,
        TileWeights::Gaussian => ViewWeighting::GAUSSIAN,
    };
    let merge = Mutex::new(StepMerge {
        groups: &groups,
        local: &local,
        global: global.as_ref(),
        weighting,
        local_merge: None,
        global_scatter: None,
        fusion: None,
        fusion_scale: stage.fusion_scale,
        next: 0,
        arrived: BTreeMap::new(),
    });
    let views_of = |t: &Task| -> usize {
        index_of
            .get(t.id.as_str())
            .map(|&ti| match &groups[ti] {
                Group::Local(ix) | Group::Global(ix) => ix.len(),
            })
            .unwrap_or(0)
    };
    // Seconds spent reading outputs and merging inside the completion callbacks, and the
    // first error a merge met there (a failed read is simply retried after the wait).
    let in_flight = Mutex::new((0f64, 0f64, None::<EngineError>, None::<Instant>));
    // Reads a finished task's outputs and merges every task that is now next in order,
    // while the other tasks still compute.
    let on_done = |t: &Task| {
        let arrived = Instant::now();
        done(views_of(t));
        let Some(&ti) = index_of.get(t.id.as_str()) else {
            return;
        };
        let clock = Instant::now();
        let outputs = read_outputs(ti);
        let read = clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        let merged = match outputs {
            Ok(outputs) => lock(&merge).arrive(ti, outputs),
            Err(_) => Ok(()),
        };
        let merging = clock.elapsed().as_secs_f64();
        let mut f = lock(&in_flight);
        f.0 += read;
        f.1 += merging;
        if let Err(e) = merged {
            f.2.get_or_insert(e);
        }
        f.3 = Some(f.3.map_or(arrived, |a| a.max(arrived)));
    };
    timings.store_write += clock.elapsed().as_secs_f64();

    // The writer thread hands each task to the dispatcher as soon as its input is in the
    // store, so the workers start on the first tasks while the later ones are written.
    let first_handed_out = std::sync::OnceLock::new();
    let (written, dispatched) = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Task>();
        let (make_task, first_handed_out, count) = (&make_task, &first_handed_out, groups.len());
        let writer = scope.spawn(move || -> Result<f64> {
            let mut busy = 0.0;
            for ti in 0..count {
                let clock = Instant::now();
                let task = make_task(ti)?;
                busy += clock.elapsed().as_secs_f64();
                let _ = first_handed_out.set(Instant::now());
                if tx.send(task).is_err() {
                    break;
                }
            }
            Ok(busy)
        });
        let dispatched = workers.run_streamed(&mut rx.into_iter(), &on_done);
        let written = writer
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (written, dispatched)
    });
    timings.store_write += written?;
    dispatched?;
    let (read, merging, error, last_result) =
        std::mem::replace(&mut *lock(&in_flight), (0.0, 0.0, None, None));
    if let Some(e) = error {
        return Err(e);
    }
    timings.store_read += read;
    timings.merge += merging;

    // Whatever could not be read early is read now, in order.
    let clock = Instant::now();
    let mut merge = merge.into_inner().unwrap_or_else(|e| e.into_inner());
    // The captured maps are merged view by view in view order, never held all at once.
    let mut camap_merge = CamapMerge {
        local: &local,
        weighting,
        merge: None,
        planes: (0, 0),
    };
    for (ti, group) in groups.iter().enumerate() {
        if ti >= merge.next && !merge.arrived.contains_key(&ti) {
            let outputs = read_outputs(ti)?;
            merge.arrive(ti, outputs)?;
        }
        if capture {
            if let Group::Local(ix) = group {
                let map = read_capture(ti)?;
                let halves = map.dim(0)? / ix.len();
                for n in 0..ix.len() {
                    let rows: Vec<Tensor> = (0..halves)
                        .map(|h| map.narrow(0, h * ix.len() + n, 1))
                        .collect::<candle_core::Result<_>>()?;
                    camap_merge.add(&Tensor::cat(&rows, 0)?)?;
                }
            }
        }
    }
    timings.store_read += clock.elapsed().as_secs_f64();
    let clock = Instant::now();
    let halves = if guided { 2 } else { 1 };
    let (mut merged_local, fusion) = merge.finish()?;
    let camap = if capture {
        Some(camap_merge.finish()?)
    } else {
        None
    };
    timings.merge += clock.elapsed().as_secs_f64();
    let clock = Instant::now();
    let channels = merged_local.len() / (halves * stage_hw.0 * stage_hw.1).max(1);
    let dims = [halves, channels, stage_hw.0, stage_hw.1];
    // The fusion's last rows (it ran behind the merge); the local predictions alone without
    // global views.
    let merged = match fusion {
        Some((bands, global)) => bands.finish(&mut merged_local, global)?,
        None => merged_local,
    };
    let merged = Tensor::from_vec(merged, dims.to_vec(), &Device::Cpu)?;
    timings.fusion += clock.elapsed().as_secs_f64();
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
        first_handed_out: first_handed_out.get().copied(),
        last_result,
    })
}

/// The step's tasks: batches of global views first, then of local views in view order. Once
/// the global views are merged, the fusion can follow the local merge down the latent a band
/// of rows at a time (see [`StepMerge`]).
fn task_groups(locals: usize, globals: usize, batch: usize) -> Vec<Group> {
    let chunks = |n: usize| {
        let ix: Vec<usize> = (0..n).collect();
        ix.chunks(batch.max(1))
            .map(<[usize]>::to_vec)
            .collect::<Vec<_>>()
    };
    let mut groups: Vec<Group> = chunks(globals).into_iter().map(Group::Global).collect();
    groups.extend(chunks(locals).into_iter().map(Group::Local));
    groups
}

fn task_id(at: &StepAt, ti: usize) -> String {
    format!("s{}:t{}:task{ti}", at.stage, at.step)
}

/// The fusion's bands with the merged global predictions they fuse into.
type Fusion = (FusionBands, Vec<f32>);

/// A step's merge while its tasks come back: outputs may arrive in any order, but they are
/// merged strictly in task (and so view) order, the early arrivals held until their turn, so
/// the sums — and the bytes — are the same whoever computed what, and when.
struct StepMerge<'a> {
    groups: &'a [Group],
    local: &'a LocalViews,
    global: Option<&'a GlobalViews>,
    weighting: ViewWeighting,
    local_merge: Option<LocalMerge<'a>>,
    /// The global views' scatter while they come in.
    global_scatter: Option<GlobalScatter<'a>>,
    /// The fusion, run behind the local merge once the global views are all in (they are
    /// the first tasks): rows the merge has settled are fused while later views compute.
    fusion: Option<Fusion>,
    fusion_scale: usize,
    /// The next task to merge.
    next: usize,
    arrived: BTreeMap<usize, TaskOutputs>,
}

impl StepMerge<'_> {
    fn arrive(&mut self, ti: usize, outputs: TaskOutputs) -> Result<()> {
        if ti < self.next {
            return Ok(());
        }
        self.arrived.insert(ti, outputs);
        while let Some(outputs) = self.arrived.remove(&self.next) {
            self.add(self.next, outputs)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Adds task `ti`'s views, each as its `[uncond; cond]` planes (or `[cond]` unguided).
    fn add(&mut self, ti: usize, (cond, uncond): TaskOutputs) -> Result<()> {
        let ix = match &self.groups[ti] {
            Group::Local(ix) | Group::Global(ix) => ix,
        };
        let (n, c, _, _) = cond.dims4()?;
        if n != ix.len() {
            return Err(EngineError::Invalid(format!(
                "task {ti} returned {n} views for {}",
                ix.len()
            )));
        }
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let cond = flat(&cond)?;
        let uncond = uncond.as_ref().map(flat).transpose()?;
        let halves = if uncond.is_some() { 2 } else { 1 };
        let per = cond.len() / n;
        let mut vals = Vec::with_capacity(halves * per);
        for (v, &view) in ix.iter().enumerate() {
            vals.clear();
            if let Some(u) = &uncond {
                vals.extend_from_slice(&u[v * per..(v + 1) * per]);
            }
            vals.extend_from_slice(&cond[v * per..(v + 1) * per]);
            match &self.groups[ti] {
                Group::Local(_) => {
                    if self.local_merge.is_none() {
                        self.local_merge =
                            Some(self.local.merge_in_order(halves * c, self.weighting)?);
                    }
                    if let Some(m) = self.local_merge.as_mut() {
                        debug_assert_eq!(m.next_view(), view);
                        m.add(&vals)?;
                    }
                }
                Group::Global(_) => {
                    let Some(g) = self.global else {
                        return Err(EngineError::Invalid(
                            "global views without a global layout".into(),
                        ));
                    };
                    let scatter = self
                        .global_scatter
                        .get_or_insert_with(|| g.scatter(halves * c));
                    scatter.add(view, &vals)?;
                    if scatter.is_complete() {
                        if let Some(done) = self.global_scatter.take() {
                            let hw = self.local.latent_size();
                            let bands = FusionBands::new(halves * c, hw, self.fusion_scale)?;
                            self.fusion = Some((bands, done.finish_vec()?));
                        }
                    }
                }
            }
        }
        if let (Group::Local(_), Some(m), Some((bands, global))) = (
            &self.groups[ti],
            self.local_merge.as_mut(),
            self.fusion.as_mut(),
        ) {
            let (settled, local) = m.settle()?;
            bands.advance(local, global, settled)?;
        }
        Ok(())
    }

    /// The merged local predictions, `(halves, C, H, W)` row-major values, and the fusion
    /// with the merged global ones when the stage has global views.
    fn finish(self) -> Result<(Vec<f32>, Option<Fusion>)> {
        let local = self
            .local_merge
            .ok_or_else(|| EngineError::Invalid("no local view outputs".into()))?
            .finish_vec()?;
        match (self.global, self.fusion) {
            (Some(_), None) => Err(EngineError::Invalid(
                "not every global view output was merged".into(),
            )),
            (_, fusion) => Ok((local, fusion)),
        }
    }
}

/// One CA-map over the stage from the local views' maps `(halves, h0, w0, 77)`, added one at a
/// time in view order: each resized to its view's latent size and merged like the
/// predictions, so only the stage's accumulators are held, not every view's map.
struct CamapMerge<'a> {
    local: &'a LocalViews,
    weighting: ViewWeighting,
    merge: Option<LocalMerge<'a>>,
    /// (halves, text tokens) of the maps.
    planes: (usize, usize),
}

impl CamapMerge<'_> {
    fn add(&mut self, map: &Tensor) -> Result<()> {
        let resized = CaMap::from_tensor(map.clone())?.resize(self.local.window())?;
        let (halves, _, _, tokens) = resized.tensor().dims4()?;
        let spatial = resized.tensor().permute((0, 3, 1, 2))?.contiguous()?;
        let vals = spatial.flatten_all()?.to_vec1::<f32>()?;
        if self.merge.is_none() {
            self.planes = (halves, tokens);
            self.merge = Some(self.local.merge_in_order(halves * tokens, self.weighting)?);
        }
        if self.planes != (halves, tokens) {
            return Err(EngineError::Invalid(format!(
                "captured CA-maps differ in shape: {:?} then {:?}",
                self.planes,
                (halves, tokens)
            )));
        }
        if let Some(m) = self.merge.as_mut() {
            m.add(&vals)?;
        }
        Ok(())
    }

    fn finish(self) -> Result<CaMap> {
        let merge = self
            .merge
            .ok_or_else(|| EngineError::Invalid("no captured CA-maps".into()))?;
        let merged = merge.finish()?;
        let (h, w) = self.local.latent_size();
        let (halves, tokens) = self.planes;
        Ok(CaMap::from_tensor(
            merged
                .reshape((halves, tokens, h, w))?
                .permute((0, 2, 3, 1))?
                .contiguous()?,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::method::fusion::{fuse_scales_once_in_place, BlurAxes};
    use tessera_core::tiling::{GlobalViewConfig, LocalViewConfig};

    #[test]
    fn step_merge_and_fusion_give_the_same_bytes_in_any_arrival_order() -> Result<()> {
        let (h, w) = (96, 80);
        let local = LocalViews::new(h, w, &LocalViewConfig::for_training_size(32), Some(5))?;
        let global = GlobalViews::new(h, w, &GlobalViewConfig::for_training_size(32))?;
        // A smooth (uncond, cond) × 4-channel prediction field; a task's outputs are its
        // views cut from it, as an identity model would return them.
        let field = Tensor::arange(0f32, (2 * 4 * h * w) as f32, &Device::Cpu)?
            .reshape((2, 4, h, w))?
            .affine(1e-4, -1.0)?
            .sin()?;
        // Globals first, as steps run (the fusion follows the merge), and locals first (the
        // fusion runs whole at the end): the same bytes.
        let banded = task_groups(local.len(), global.len(), 3);
        let mut whole = task_groups(local.len(), 0, 3);
        whole.extend(task_groups(0, global.len(), 3));
        assert!(matches!(banded[0], Group::Global(_)) && matches!(whole[0], Group::Local(_)));
        // Each view's batch rows are [uncond, cond] of the field: split them per task.
        let per_task = |g: &Group| -> Result<TaskOutputs> {
            let ix = match g {
                Group::Local(ix) | Group::Global(ix) => ix.clone(),
            };
            let mut c = Vec::new();
            let mut u = Vec::new();
            for &i in &ix {
                let v = match g {
                    Group::Local(_) => local.extract(&field, i)?,
                    Group::Global(_) => global.extract(&field, i)?,
                };
                u.push(v.narrow(0, 0, 1)?);
                c.push(v.narrow(0, 1, 1)?);
            }
            Ok((Tensor::cat(&c, 0)?, Some(Tensor::cat(&u, 0)?)))
        };
        let scale = 3;
        let dims = [2, 4, h, w];
        let run = |groups: &[Group], order: &[usize]| -> Result<Vec<f32>> {
            let mut m = StepMerge {
                groups,
                local: &local,
                global: Some(&global),
                weighting: ViewWeighting::GAUSSIAN,
                local_merge: None,
                global_scatter: None,
                fusion: None,
                fusion_scale: scale,
                next: 0,
                arrived: BTreeMap::new(),
            };
            for &ti in order {
                m.arrive(ti, per_task(&groups[ti])?)?;
            }
            let (mut local, fusion) = m.finish()?;
            // Bands start once the global views are in, wherever they fall in the order.
            let (bands, global) = fusion.expect("the fusion started");
            Ok(bands.finish(&mut local, global)?)
        };
        let n = banded.len();
        let forward: Vec<usize> = (0..n).collect();
        let backward: Vec<usize> = (0..n).rev().collect();
        let mut shuffled = forward.clone();
        shuffled.rotate_left(n / 3);
        shuffled.swap(0, n - 1);
        let a = run(&banded, &forward)?;
        assert_eq!(a, run(&banded, &backward)?);
        assert_eq!(a, run(&banded, &shuffled)?);
        assert_eq!(a, run(&whole, &shuffled)?);
        // And it is what the all-at-once merges give.
        let views_out = |count: usize, f: &dyn Fn(usize) -> Result<Tensor>| {
            (0..count).map(f).collect::<Result<Vec<_>>>()
        };
        let lo = views_out(local.len(), &|i| Ok(local.extract(&field, i)?))?;
        let go = views_out(global.len(), &|i| Ok(global.extract(&field, i)?))?;
        let want = fuse_scales_once_in_place(
            local
                .merge(&lo, ViewWeighting::GAUSSIAN)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            global.merge(&go)?.flatten_all()?.to_vec1::<f32>()?,
            dims,
            scale,
            BlurAxes::Spatial,
        )?;
        assert_eq!(a.len(), want.len());
        assert!(a.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()));
        Ok(())
    }
}
