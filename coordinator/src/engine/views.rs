//! One model evaluation of a whole stage latent, distributed: cut the latent into local tiles
//! and global strided views, hand them to workers in fixed batches, merge what comes back in
//! view order, and fuse the two scales (`tessera_core::method::fusion`; README, *Methods*).
//!
//! Every batch is the same whatever the number of workers, and merging follows view order, so
//! the result does not depend on who computed what or when.
//!
//! The step is pipelined so the coordinator's work overlaps the workers': a writer thread
//! hands each task out as soon as its input is in the store, and each result is read and
//! merged as it arrives (held back only until the tasks before it are merged). The global
//! views go out early (after a head of local views at the top of the latent), so the scale
//! fusion runs behind the local merge a band of rows at a time, and guidance and the
//! scheduler step behind the fusion ([`StepEnd`]). What remains between the last result and
//! the next step is the last merges and the last band's fusion, guidance and step — see
//! [`super::StepTimings::critical`] — and the next step's head has gone out before it: a
//! step is opened ([`open`]) while the one before still runs, its head waiting only for the
//! rows it needs ([`StepInput`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tessera_core::codec;
use tessera_core::method::camap::{CaMap, ViewPlacement};
use tessera_core::method::fusion::FusionBands;
use tessera_core::method::params::TileWeights;
use tessera_core::noise::{NoiseKey, NoisePurpose};
use tessera_core::plan::{Plan, StagePlan};
use tessera_core::task::{CamapInject, DenoiseTask, FusionHook, Task, TaskKind};
use tessera_core::tiling::{
    GlobalScatter, GlobalViews, LocalMerge, LocalViews, MergeBuffers, ViewWeighting,
};
use tessera_store::{get_f32s, get_tensor, keys, Store};

use super::step_end::StepEnd;
use super::step_input::{StepInput, StopOnDrop};
use super::{EngineError, Result, StepTimings};
use crate::dispatch::{Dispatch, DispatchError};
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
    /// The step's next latent and predicted clean latent, where its end ran behind the
    /// merge ([`StepEnd`]); `None` leaves guidance and the step to the caller.
    pub stepped: Option<(Tensor, Tensor)>,
    /// The stage's cross-attention map, when this step captured one.
    pub camap: Option<CaMap>,
    /// Where the coordinator's time went (the evaluation's share of [`StepTimings`]).
    pub timings: StepTimings,
    /// When the first task was handed to the dispatcher, and when the last result came in:
    /// the engine's critical path is what lies outside this span.
    pub first_handed_out: Option<Instant>,
    pub last_result: Option<Instant>,
}

/// A task's predictions as read: `(views, C, h, w)` f32 values each, the conditional and
/// (when guided) the unconditional ones.
struct TaskOutputs {
    dims: Vec<usize>,
    cond: Vec<f32>,
    uncond: Option<Vec<f32>>,
}

/// Which views a task holds.
enum Group {
    Local(Vec<usize>),
    Global(Vec<usize>),
}

impl Group {
    fn views(&self) -> &[usize] {
        match self {
            Group::Local(ix) | Group::Global(ix) => ix,
        }
    }
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

/// What a step's tasks are made from and sent to, beside its input.
pub struct StepSetup<'v> {
    pub store: &'v dyn Store,
    pub workers: &'v dyn Dispatch,
    pub plan: &'v Plan,
    pub stage: &'v StagePlan,
    pub views: &'v StepViews,
    pub at: StepAt<'v>,
    pub camap: Option<&'v CaMap>,
    /// Whether the step captures the stage's CA-map.
    pub capture: bool,
    /// Called with the number of views of each task that finishes.
    pub done: &'v (dyn Fn(usize) + Sync),
}

/// A step whose tasks are going out: the thread that writes them as their input becomes
/// known and hands them to the workers, and the merge of what comes back. Steps overlap at
/// their edge, so the next step is opened while this one runs (see `step_input.rs`).
pub struct Flight<'scope, 'v> {
    at: StepAt<'v>,
    plan: &'v Plan,
    stage: &'v StagePlan,
    store: &'v dyn Store,
    capture: bool,
    input: Arc<StepInput>,
    head_rows: usize,
    arrivals: Arc<Arrivals<'v>>,
    handle: std::thread::ScopedJoinHandle<'scope, HandOut>,
    /// Seconds spent setting the step up, and merging what arrived before it began.
    setup: f64,
    held: f64,
    _stop: StopOnDrop,
}

/// What [`hand_out`] returns.
type HandOut = (
    Result<f64>,
    Option<Instant>,
    std::result::Result<(), DispatchError>,
);

/// Opens step `setup.at`: its tasks are written and handed out as `input` makes their views
/// known. Results are held until the step begins ([`Flight::start_merge`]: the step before
/// has then handed back its merge's buffers), then merged as they arrive.
pub fn open<'scope, 'v>(
    scope: &'scope std::thread::Scope<'scope, 'v>,
    setup: StepSetup<'v>,
    input: Arc<StepInput>,
) -> Flight<'scope, 'v> {
    let clock = Instant::now();
    let StepSetup {
        store,
        workers,
        plan,
        stage,
        views,
        at,
        camap,
        capture,
        done,
    } = setup;
    let arrivals = Arc::new(Arrivals::new(store, at, plan.guided, stage, views, done));
    let inputs = TaskInputs {
        store,
        plan,
        stage,
        at,
        views,
        input: input.clone(),
        camap,
        capture,
        hooks: step_hooks(plan, stage, &at),
        view_dtype: workers.view_dtype(),
    };
    let merging = arrivals.clone();
    let handle = scope.spawn(move || {
        hand_out(workers, views.groups.len(), &|ti| inputs.task(ti), &|t| {
            merging.on_done(t)
        })
    });
    Flight {
        at,
        plan,
        stage,
        store,
        capture,
        head_rows: views.head_rows(),
        _stop: StopOnDrop(input.clone()),
        input,
        arrivals,
        handle,
        setup: clock.elapsed().as_secs_f64(),
        held: 0.0,
    }
}

impl Flight<'_, '_> {
    /// The step's input, for the step before it to publish its first rows to.
    pub fn input(&self) -> Arc<StepInput> {
        self.input.clone()
    }

    /// Rows of the input the step's first tasks need (0: they wait for all of it).
    pub fn head_rows(&self) -> usize {
        self.head_rows
    }

    /// Begins the step with its whole input (already scaled for the model): every task
    /// may now be written.
    pub fn begin(&self, input: &Tensor) -> Result<()> {
        self.input.set_whole(input)
    }

    /// Starts the merge into `buffers` (an earlier step's), merging what arrived before. With
    /// `end`, guidance and the scheduler step follow the merge down the latent, and the
    /// step's result carries the stepped latents.
    pub fn start_merge(&mut self, end: Option<StepEnd>, buffers: MergeBuffers) -> Result<()> {
        let clock = Instant::now();
        lock(&self.arrivals.merge).start(end, buffers)?;
        self.held += clock.elapsed().as_secs_f64();
        Ok(())
    }

    /// Waits for the step's last task, reads what could not be merged early, then fuses the
    /// scales and splits the guidance halves. Returns the predictions and the merge's buffers
    /// for a later step.
    pub fn close(self) -> Result<(Predictions, MergeBuffers)> {
        let mut timings = StepTimings {
            store_write: self.setup,
            ..StepTimings::default()
        };
        let (written, first_handed_out, dispatched) = self
            .handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        // The writers' seconds, less those spent waiting for the input's rows.
        timings.store_write += (written? - self.input.waited()).max(0.0);
        dispatched?;
        let arrivals = Arc::try_unwrap(self.arrivals)
            .map_err(|_| EngineError::Invalid("a step's results are still being merged".into()))?;
        let (merge, in_flight) = arrivals.finish();
        if let Some(e) = in_flight.error {
            return Err(e);
        }
        timings.store_read += in_flight.read;
        timings.merge += in_flight.merging + self.held;
        if merge.paused {
            return Err(EngineError::Invalid(
                "a step ended before its merge started".into(),
            ));
        }
        let mut buffers = MergeBuffers::default();
        let (merged_local, fusion, camap, end) = complete_merge(
            self.store,
            &self.at,
            self.plan.guided,
            merge,
            self.capture,
            &mut buffers,
            &mut timings,
        )?;
        let clock = Instant::now();
        let merged;
        (merged, buffers.sums) = fuse(merged_local, fusion)?;
        timings.fusion += clock.elapsed().as_secs_f64();
        let (h, w) = self.stage.latent_hw();
        let clock = Instant::now();
        let stepped = match end {
            Some(mut end) => {
                end.advance(&merged, h)?;
                Some(end.finish()?)
            }
            None => None,
        };
        timings.scheduler += clock.elapsed().as_secs_f64();
        let halves = if self.plan.guided { 2 } else { 1 };
        let channels = merged.len() / (halves * h * w).max(1);
        let merged = Tensor::from_vec(merged, vec![halves, channels, h, w], &Device::Cpu)?;
        let (cond, uncond) = split_halves(merged, self.plan.guided)?;
        let pred = Predictions {
            cond,
            uncond,
            stepped,
            camap,
            timings,
            first_handed_out,
            last_result: in_flight.last_result,
        };
        Ok((pred, buffers))
    }
}

/// A step's views and its tasks' groups of them, with the rows of the step's input each
/// group needs before it can be written (`None`: all of it).
pub struct StepViews {
    local: LocalViews,
    global: Option<GlobalViews>,
    groups: Vec<Group>,
    needs: Vec<Option<usize>>,
}

impl StepViews {
    /// The views of step `at`, in tasks of `batch`, the first (up to) `head` of local views
    /// at the top of the latent (see [`task_groups`]).
    pub fn new(stage: &StagePlan, at: &StepAt, batch: usize, head: usize) -> Result<Self> {
        let local = local_views(stage, at)?;
        let global = global_views(stage)?;
        let globals = global.as_ref().map_or(0, |g| g.len());
        let (groups, head) = task_groups(local.len(), globals, batch, head);
        let (h, vh) = (local.latent_size().0, local.window().0);
        let bottom = |i: usize| (local.rects()[i].top.max(0) as usize + vh).min(h);
        // The head's tasks need their views' rows; every other task the whole input.
        let needs = (groups.iter().enumerate())
            .map(|(ti, g)| (ti < head).then(|| g.views().iter().map(|&i| bottom(i)).max())?)
            .collect();
        Ok(Self {
            local,
            global,
            groups,
            needs,
        })
    }

    /// Rows of the input the head's tasks need (0 without a head).
    pub fn head_rows(&self) -> usize {
        self.needs.iter().flatten().copied().max().unwrap_or(0)
    }
}

/// What every view task of a step asks of the UNet beside its views.
struct StepHooks {
    /// FreeScale's in-UNet scale fusion, jittered per (seed, stage, step).
    fusion: Option<FusionHook>,
    /// Dilation of FreeScale's convs at this step.
    dilation: usize,
}

fn step_hooks(plan: &Plan, stage: &StagePlan, at: &StepAt) -> StepHooks {
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
    StepHooks {
        fusion,
        dilation: stage.dilation_schedule().dilation_at(at.step),
    }
}

/// Views cut for one task: the batch encoded for the store, a view's latent size, where each
/// sits in the stage.
struct CutViews {
    batch: Vec<u8>,
    view_hw: (usize, usize),
    placements: Vec<ViewPlacement>,
    local: bool,
}

/// What a step's tasks are made from: writes a task's input (and names its CA-map) in the
/// store and returns the task.
struct TaskInputs<'a> {
    store: &'a dyn Store,
    plan: &'a Plan,
    stage: &'a StagePlan,
    at: StepAt<'a>,
    views: &'a StepViews,
    /// The step's input, `(B, C, H, W)`, as it becomes known.
    input: Arc<StepInput>,
    camap: Option<&'a CaMap>,
    capture: bool,
    hooks: StepHooks,
    view_dtype: DType,
}

impl TaskInputs<'_> {
    fn task(&self, ti: usize) -> Result<Task> {
        let at = &self.at;
        let key = |part: &str| keys::task(at.job, at.stage, at.step, ti, part);
        let group = &self.views.groups[ti];
        let cut = self
            .input
            .with_rows(self.views.needs[ti], |latent| self.cut(latent, group))??;
        self.store.put(&key("in"), &cut.batch)?;
        Ok(Task {
            job: at.job.to_string(),
            id: task_id(at, ti),
            kind: TaskKind::Denoise(DenoiseTask {
                timestep: at.timestep,
                input: key("in"),
                output_cond: key("cond"),
                output_uncond: self.plan.guided.then(|| key("uncond")),
                size_conditioning: self.plan.size_conditioning,
                freeu: self.stage.freeu,
                dilation: self.hooks.dilation,
                scale_fusion: self.hooks.fusion.clone(),
                camap_capture: (self.capture && cut.local).then(|| key("capture")),
                camap_inject: self.camap_inject(cut.view_hw, cut.placements),
            }),
        })
    }

    /// The group's views cut from the step's input values `latent`.
    fn cut(&self, latent: &[f32], group: &Group) -> Result<CutViews> {
        Ok(match group {
            Group::Local(ix) => {
                let local = &self.views.local;
                let placements = ix
                    .iter()
                    .map(|&i| {
                        let r = local.rects()[i];
                        ViewPlacement::Window {
                            top: r.top,
                            left: r.left,
                        }
                    })
                    .collect();
                let view_hw = local.window();
                CutViews {
                    batch: self
                        .encode(ix, view_hw, &|i, row| local.for_each_row(latent, i, row))?,
                    view_hw,
                    placements,
                    local: true,
                }
            }
            Group::Global(ix) => {
                let Some(g) = self.views.global.as_ref() else {
                    return Err(EngineError::Invalid(
                        "global views without a global layout".into(),
                    ));
                };
                let mut placements = Vec::with_capacity(ix.len());
                for &i in ix {
                    placements.push(ViewPlacement::Strided {
                        phase: g.offset(i)?,
                        strides: g.strides(),
                    });
                }
                let view_hw = g.view_size();
                CutViews {
                    batch: self.encode(ix, view_hw, &|i, row| g.for_each_row(latent, i, row))?,
                    view_hw,
                    placements,
                    local: false,
                }
            }
        })
    }

    /// The views `ix` stacked on the batch axis and encoded as the workers' dtype, straight
    /// from the latent's rows: the bytes of cutting them as tensors, converting and encoding.
    fn encode(&self, ix: &[usize], (vh, vw): (usize, usize), rows: &ViewRows) -> Result<Vec<u8>> {
        let (batch, channels, _, _) = self.input.dims();
        let dims = [ix.len() * batch, channels, vh, vw];
        let mut out = codec::header(self.view_dtype, &dims).map_err(codec_error)?;
        let mut failed = None;
        for &i in ix {
            rows(i, &mut |row| {
                if let Err(e) = codec::push_f32_as(&mut out, self.view_dtype, row) {
                    failed.get_or_insert(e);
                }
            })?;
        }
        match failed {
            Some(e) => Err(codec_error(e)),
            None => Ok(out),
        }
    }

    /// The worker cuts its views' parts of the stage's map (stored once at the stage's entry)
    /// itself.
    fn camap_inject(
        &self,
        view_hw: (usize, usize),
        placements: Vec<ViewPlacement>,
    ) -> Option<CamapInject> {
        let (_, weight) = self.camap.zip(self.stage.camap_inject)?;
        let (h, w) = self.stage.latent_hw();
        Some(CamapInject {
            key: keys::stage(self.at.job, self.at.stage, CAMAP_IN),
            weight,
            stage_hw: [h, w],
            view_hw: [view_hw.0, view_hw.1],
            placements,
        })
    }
}

/// A view's rows, handed one by one to the callback (`for_each_row` of the views' layout).
type ViewRows<'r> = dyn Fn(usize, &mut dyn FnMut(&[f32])) -> tessera_core::error::Result<()> + 'r;

fn codec_error(e: codec::CodecError) -> EngineError {
    EngineError::Invalid(format!("encoding views: {e}"))
}

/// Hands the tasks to the dispatcher as soon as each one's input is in the store, so the
/// workers start on the first tasks while the later ones are written. [`MAX_WRITERS`] writer
/// threads cut, encode and write the inputs; the tasks still go out in
/// order, and each is the same whichever thread wrote it. Returns the writers' busy seconds
/// (summed), when the first task went out, and the dispatch's outcome.
fn hand_out(
    workers: &dyn Dispatch,
    count: usize,
    make_task: &(dyn Fn(usize) -> Result<Task> + Sync),
    on_done: &(dyn Fn(&Task) + Sync),
) -> (
    Result<f64>,
    Option<Instant>,
    std::result::Result<(), DispatchError>,
) {
    let first_handed_out = std::sync::OnceLock::new();
    let (next, stop, busy) = (AtomicUsize::new(0), AtomicBool::new(false), Mutex::new(0.0));
    let (error, dispatched) = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Result<Task>)>();
        for _ in 0..writer_threads(count) {
            let (tx, next, stop, busy) = (tx.clone(), &next, &stop, &busy);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ti = next.fetch_add(1, Ordering::Relaxed);
                    if ti >= count {
                        break;
                    }
                    let clock = Instant::now();
                    let task = make_task(ti);
                    *lock(busy) += clock.elapsed().as_secs_f64();
                    let failed = task.is_err();
                    if tx.send((ti, task)).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut ordered = InOrder::new(rx, &first_handed_out);
        let dispatched = workers.run_streamed(&mut ordered, on_done);
        stop.store(true, Ordering::Relaxed);
        (ordered.error, dispatched)
    });
    let written = match error {
        Some(e) => Err(e),
        None => Ok(busy.into_inner().unwrap_or_else(|e| e.into_inner())),
    };
    (written, first_handed_out.get().copied(), dispatched)
}

/// Writer threads a step uses: past a few, the store's connection is the limit. Not fewer on
/// a machine with fewer cores: a writer mostly waits for the store (four writers against two
/// on a 2-core machine: the wait before a worker's first task of a step 55-66 -> 44-54 ms at
/// 32 workers, BENCHMARKS.md).
const MAX_WRITERS: usize = 4;

fn writer_threads(count: usize) -> usize {
    MAX_WRITERS.min(count.max(1))
}

/// The writers' tasks in task order: early ones are held until their turn; the first failure
/// ends the hand-out (and is the step's error).
struct InOrder<'a> {
    rx: mpsc::Receiver<(usize, Result<Task>)>,
    pending: BTreeMap<usize, Task>,
    next: usize,
    error: Option<EngineError>,
    first_handed_out: &'a std::sync::OnceLock<Instant>,
}

impl<'a> InOrder<'a> {
    fn new(
        rx: mpsc::Receiver<(usize, Result<Task>)>,
        first_handed_out: &'a std::sync::OnceLock<Instant>,
    ) -> Self {
        Self {
            rx,
            pending: BTreeMap::new(),
            next: 0,
            error: None,
            first_handed_out,
        }
    }
}

impl Iterator for InOrder<'_> {
    type Item = Task;

    fn next(&mut self) -> Option<Task> {
        while self.error.is_none() {
            if let Some(task) = self.pending.remove(&self.next) {
                self.next += 1;
                let _ = self.first_handed_out.set(Instant::now());
                return Some(task);
            }
            match self.rx.recv() {
                Ok((ti, Ok(task))) => {
                    self.pending.insert(ti, task);
                }
                Ok((_, Err(e))) => self.error = Some(e),
                Err(_) => return None,
            }
        }
        None
    }
}

/// What the completion callbacks gathered: seconds spent reading outputs and merging, the
/// first error a merge met (a failed read is simply retried after the wait), and when the
/// last result came in.
#[derive(Default)]
struct InFlight {
    read: f64,
    merging: f64,
    error: Option<EngineError>,
    last_result: Option<Instant>,
}

/// The step's tasks as they finish: each one's outputs are read and every task that is now
/// next in order is merged, while the other tasks still compute.
struct Arrivals<'a> {
    store: &'a dyn Store,
    at: StepAt<'a>,
    guided: bool,
    groups: &'a [Group],
    index_of: HashMap<String, usize>,
    merge: Mutex<StepMerge<'a>>,
    in_flight: Mutex<InFlight>,
    done: &'a (dyn Fn(usize) + Sync),
}

impl<'a> Arrivals<'a> {
    fn new(
        store: &'a dyn Store,
        at: StepAt<'a>,
        guided: bool,
        stage: &StagePlan,
        views: &'a StepViews,
        done: &'a (dyn Fn(usize) + Sync),
    ) -> Self {
        let groups = &views.groups[..];
        let weighting = match stage.tile_weights {
            TileWeights::Uniform => ViewWeighting::Uniform,
            TileWeights::Gaussian => ViewWeighting::GAUSSIAN,
        };
        Self {
            store,
            at,
            guided,
            groups,
            index_of: (0..groups.len()).map(|ti| (task_id(&at, ti), ti)).collect(),
            merge: Mutex::new(StepMerge::new(
                groups,
                &views.local,
                views.global.as_ref(),
                weighting,
                stage.fusion_scale,
            )),
            in_flight: Mutex::new(InFlight::default()),
            done,
        }
    }

    fn on_done(&self, t: &Task) {
        let arrived = Instant::now();
        let index = self.index_of.get(t.id.as_str()).copied();
        (self.done)(index.map_or(0, |ti| self.groups[ti].views().len()));
        let Some(ti) = index else {
            return;
        };
        let clock = Instant::now();
        let outputs = read_outputs(self.store, &self.at, ti, self.guided);
        let read = clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        let merged = match outputs {
            Ok(outputs) => lock(&self.merge).arrive(ti, outputs),
            Err(_) => Ok(()),
        };
        let merging = clock.elapsed().as_secs_f64();
        let mut f = lock(&self.in_flight);
        f.read += read;
        f.merging += merging;
        if let Err(e) = merged {
            f.error.get_or_insert(e);
        }
        f.last_result = Some(f.last_result.map_or(arrived, |a| a.max(arrived)));
    }

    /// The merge so far and what the callbacks gathered.
    fn finish(self) -> (StepMerge<'a>, InFlight) {
        let merge = self.merge.into_inner().unwrap_or_else(|e| e.into_inner());
        let in_flight = self
            .in_flight
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        (merge, in_flight)
    }
}

/// A task's predictions from the store, as f32: both halves in one round trip, decoded
/// straight into the values the merge reads.
fn read_outputs(store: &dyn Store, at: &StepAt, ti: usize, guided: bool) -> Result<TaskOutputs> {
    let key = |part: &str| keys::task(at.job, at.stage, at.step, ti, part);
    let mut names = vec![key("cond")];
    if guided {
        names.push(key("uncond"));
    }
    let mut halves = get_f32s(store, &names)?.into_iter();
    let (dims, cond) = halves
        .next()
        .ok_or_else(|| EngineError::Invalid(format!("no output for task {ti}")))?;
    let uncond = match halves.next() {
        Some((d, _)) if d != dims => {
            return Err(EngineError::Invalid(format!(
                "task {ti}'s unconditional output is {d:?}, its conditional one {dims:?}"
            )))
        }
        Some((_, u)) => Some(u),
        None => None,
    };
    Ok(TaskOutputs { dims, cond, uncond })
}

/// The merge after the last task: what was not merged as it came in (and the captured
/// CA-maps) is read and merged now, then the merges finish (leaving the weight sums' buffer
/// in `buffers` for the next step). Returns the merged local predictions, the fusion, the
/// CA-map and the step end that ran behind the merge.
fn complete_merge<'a>(
    store: &dyn Store,
    at: &StepAt,
    guided: bool,
    mut merge: StepMerge<'a>,
    capture: bool,
    buffers: &mut MergeBuffers,
    timings: &mut StepTimings,
) -> Result<MergeDone<'a>> {
    let clock = Instant::now();
    // The captured maps are merged view by view in view order, never held all at once.
    let mut camap_merge = capture.then(|| CamapMerge::new(merge.local, merge.weighting));
    read_remaining(store, at, guided, &mut merge, camap_merge.as_mut())?;
    timings.store_read += clock.elapsed().as_secs_f64();
    let clock = Instant::now();
    let end = merge.end.take();
    let (merged_local, fusion);
    (merged_local, fusion, buffers.weights) = merge.finish()?;
    let camap = camap_merge.map(CamapMerge::finish).transpose()?;
    timings.merge += clock.elapsed().as_secs_f64();
    Ok((merged_local, fusion, camap, end))
}

/// What [`complete_merge`] leaves: the merged local predictions, the fusion, the CA-map and
/// the step end.
type MergeDone<'a> = (Vec<f32>, Option<Fusion>, Option<CaMap>, Option<StepEnd>);

/// Whatever could not be read early is read now, in order; with `camap`, each local task's
/// captured maps are read and merged view by view.
fn read_remaining(
    store: &dyn Store,
    at: &StepAt,
    guided: bool,
    merge: &mut StepMerge,
    mut camap: Option<&mut CamapMerge>,
) -> Result<()> {
    let groups = merge.groups;
    for (ti, group) in groups.iter().enumerate() {
        if ti >= merge.next && !merge.arrived.contains_key(&ti) {
            let outputs = read_outputs(store, at, ti, guided)?;
            merge.arrive(ti, outputs)?;
        }
        if let (Some(camap), Group::Local(ix)) = (camap.as_deref_mut(), group) {
            let key = keys::task(at.job, at.stage, at.step, ti, "capture");
            let map = get_tensor(store, &key, &Device::Cpu)?.to_dtype(DType::F32)?;
            camap.add_batch(&map, ix.len())?;
        }
    }
    Ok(())
}

/// The fusion's last rows (it ran behind the merge), or the local predictions alone without
/// global views: the `(halves, C, H, W)` values, with the local sums' buffer where the
/// fusion's result is elsewhere (the next step's merge reuses it).
fn fuse(mut merged_local: Vec<f32>, fusion: Option<Fusion>) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok(match fusion {
        Some((bands, global)) => (bands.finish(&mut merged_local, global)?, merged_local),
        None => (merged_local, Vec::new()),
    })
}

/// (cond, uncond) of the merged `[uncond; cond]` halves, or (cond, None) unguided.
fn split_halves(merged: Tensor, guided: bool) -> Result<(Tensor, Option<Tensor>)> {
    Ok(if guided {
        (merged.narrow(0, 1, 1)?, Some(merged.narrow(0, 0, 1)?))
    } else {
        (merged, None)
    })
}

/// The step's tasks, and how many of them are its head: up to `head` batches of local views
/// (at most half of them), then the batches of global views, then the other local views,
/// all in view order. The head's views lie at the top of the latent, so they can go out as
/// soon as the step before has stepped those rows (`step_input.rs`); once the global views
/// are merged, the fusion follows the local merge down the latent a band of rows at a time
/// (see [`StepMerge`]). Without a head: the global views first. The order does not change
/// the bytes.
fn task_groups(locals: usize, globals: usize, batch: usize, head: usize) -> (Vec<Group>, usize) {
    let chunks = |n: usize| {
        let ix: Vec<usize> = (0..n).collect();
        ix.chunks(batch.max(1))
            .map(<[usize]>::to_vec)
            .collect::<Vec<_>>()
    };
    let mut local = chunks(locals).into_iter().map(Group::Local);
    let head = head.min(local.len() / 2);
    let mut groups: Vec<Group> = local.by_ref().take(head).collect();
    groups.extend(chunks(globals).into_iter().map(Group::Global));
    groups.extend(local);
    (groups, head)
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
    /// Buffers for the local merge to sum into, taken when it starts.
    buffers: Option<MergeBuffers>,
    /// Arrivals are held, not merged, until the step begins ([`StepMerge::start`]).
    paused: bool,
    /// Guidance and the scheduler step, run on the rows the merge (and fusion) settle (their
    /// time counted as the merge's, as the fusion's is).
    end: Option<StepEnd>,
}

impl<'a> StepMerge<'a> {
    fn new(
        groups: &'a [Group],
        local: &'a LocalViews,
        global: Option<&'a GlobalViews>,
        weighting: ViewWeighting,
        fusion_scale: usize,
    ) -> Self {
        Self {
            groups,
            local,
            global,
            weighting,
            local_merge: None,
            global_scatter: None,
            fusion: None,
            fusion_scale,
            next: 0,
            arrived: BTreeMap::new(),
            buffers: None,
            paused: true,
            end: None,
        }
    }

    /// Merges into `buffers` from now on, with the step's `end` behind the merge.
    fn start(&mut self, end: Option<StepEnd>, buffers: MergeBuffers) -> Result<()> {
        (self.end, self.buffers, self.paused) = (end, Some(buffers), false);
        self.merge_in_order()
    }

    fn arrive(&mut self, ti: usize, outputs: TaskOutputs) -> Result<()> {
        if ti < self.next {
            return Ok(());
        }
        self.arrived.insert(ti, outputs);
        self.merge_in_order()
    }

    /// Merges every held task that is next in order (none while paused).
    fn merge_in_order(&mut self) -> Result<()> {
        if self.paused {
            return Ok(());
        }
        while let Some(outputs) = self.arrived.remove(&self.next) {
            self.add(self.next, outputs)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Adds task `ti`'s views, each as its `[uncond; cond]` planes (or `[cond]` unguided).
    fn add(&mut self, ti: usize, outputs: TaskOutputs) -> Result<()> {
        let ix = self.groups[ti].views();
        let &[n, c, _, _] = outputs.dims.as_slice() else {
            return Err(EngineError::Invalid(format!(
                "task {ti} returned outputs of shape {:?}, not (views, C, h, w)",
                outputs.dims
            )));
        };
        if n != ix.len() {
            return Err(EngineError::Invalid(format!(
                "task {ti} returned {n} views for {}",
                ix.len()
            )));
        }
        let halves = if outputs.uncond.is_some() { 2 } else { 1 };
        let per = outputs.cond.len() / n;
        for (v, &view) in ix.iter().enumerate() {
            let cond = &outputs.cond[v * per..(v + 1) * per];
            // Each view's planes are `[uncond; cond]` (or `[cond]`), read where they lie.
            let parts: Vec<&[f32]> = match &outputs.uncond {
                Some(u) => vec![&u[v * per..(v + 1) * per], cond],
                None => vec![cond],
            };
            match &self.groups[ti] {
                Group::Local(_) => self.add_local(view, &parts, halves * c)?,
                Group::Global(_) => self.add_global(view, &parts, halves * c)?,
            }
        }
        if let (Group::Local(_), Some(m)) = (&self.groups[ti], self.local_merge.as_mut()) {
            match (self.fusion.as_mut(), self.global) {
                // The fusion follows the settled rows, the step end the fused ones.
                (Some((bands, global)), _) => {
                    let (settled, local) = m.settle()?;
                    bands.advance(local, global, settled)?;
                    if let Some(end) = self.end.as_mut() {
                        end.advance(global, bands.fused_rows())?;
                    }
                }
                // Without global views the settled rows are the predictions.
                (None, None) => {
                    if let Some(end) = self.end.as_mut() {
                        let (settled, local) = m.settle()?;
                        end.advance(local, settled)?;
                    }
                }
                // The global views are not all in yet.
                (None, Some(_)) => {}
            }
        }
        Ok(())
    }

    /// Adds local view `view`'s `planes` planes to the merge, which takes them in view order.
    fn add_local(&mut self, view: usize, parts: &[&[f32]], planes: usize) -> Result<()> {
        if self.local_merge.is_none() {
            let buffers = self.buffers.take().unwrap_or_default();
            let merge = self
                .local
                .merge_in_order_reusing(planes, self.weighting, buffers)?;
            self.local_merge = Some(merge);
        }
        if let Some(m) = self.local_merge.as_mut() {
            debug_assert_eq!(m.next_view(), view);
            m.add_parts(parts)?;
        }
        Ok(())
    }

    /// Scatters global view `view`; once every global view is in, the fusion can start.
    fn add_global(&mut self, view: usize, parts: &[&[f32]], planes: usize) -> Result<()> {
        let Some(g) = self.global else {
            return Err(EngineError::Invalid(
                "global views without a global layout".into(),
            ));
        };
        let scatter = self.global_scatter.get_or_insert_with(|| g.scatter(planes));
        scatter.add_parts(view, parts)?;
        if scatter.is_complete() {
            if let Some(done) = self.global_scatter.take() {
                let hw = self.local.latent_size();
                let bands = FusionBands::new(planes, hw, self.fusion_scale)?;
                self.fusion = Some((bands, done.finish_vec()?));
            }
        }
        Ok(())
    }

    /// The merged local predictions, `(halves, C, H, W)` row-major values, the fusion with
    /// the merged global ones when the stage has global views, and the weight sums' buffer.
    fn finish(self) -> Result<(Vec<f32>, Option<Fusion>, Vec<f32>)> {
        let (local, weights) = self
            .local_merge
            .ok_or_else(|| EngineError::Invalid("no local view outputs".into()))?
            .finish_reusable()?;
        match (self.global, self.fusion) {
            (Some(_), None) => Err(EngineError::Invalid(
                "not every global view output was merged".into(),
            )),
            (_, fusion) => Ok((local, fusion, weights)),
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

impl<'a> CamapMerge<'a> {
    fn new(local: &'a LocalViews, weighting: ViewWeighting) -> Self {
        Self {
            local,
            weighting,
            merge: None,
            planes: (0, 0),
        }
    }

    /// Adds a task's maps: `views` views, their rows grouped by half (`[uncond…; cond…]`).
    fn add_batch(&mut self, map: &Tensor, views: usize) -> Result<()> {
        let halves = map.dim(0)? / views;
        for n in 0..views {
            let rows: Vec<Tensor> = (0..halves)
                .map(|h| map.narrow(0, h * views + n, 1))
                .collect::<candle_core::Result<_>>()?;
            self.add(&Tensor::cat(&rows, 0)?)?;
        }
        Ok(())
    }

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
    use tessera_core::method::params::{Method, MethodSpec};
    use tessera_core::plan::{plan, ArchInfo};
    use tessera_core::spec::RenderSpec;
    use tessera_core::tiling::{GlobalViewConfig, LocalViewConfig};

    /// Records the order tasks were handed out in.
    struct Recorder(Mutex<Vec<String>>);

    impl Dispatch for Recorder {
        fn run_streamed(
            &self,
            tasks: &mut (dyn Iterator<Item = Task> + Send),
            done: &(dyn Fn(&Task) + Sync),
        ) -> std::result::Result<(), DispatchError> {
            for t in tasks {
                lock(&self.0).push(t.id.clone());
                done(&t);
            }
            Ok(())
        }

        fn workers(&self) -> usize {
            1
        }
    }

    fn prompt_task(ti: usize) -> Task {
        Task {
            job: "j".into(),
            id: format!("task{ti}"),
            kind: TaskKind::EncodePrompt {
                prompt: String::new(),
                negative_prompt: None,
            },
        }
    }

    #[test]
    fn tasks_written_by_several_threads_go_out_in_order() {
        let recorder = Recorder(Mutex::new(Vec::new()));
        // Later tasks are quicker to write, so the writers finish them out of order.
        let make = |ti: usize| -> Result<Task> {
            std::thread::sleep(std::time::Duration::from_millis((20 - ti as u64) / 2));
            Ok(prompt_task(ti))
        };
        let (written, first, dispatched) = hand_out(&recorder, 20, &make, &|_| {});
        assert!(written.is_ok() && first.is_some() && dispatched.is_ok());
        let want: Vec<String> = (0..20).map(|ti| format!("task{ti}")).collect();
        assert_eq!(lock(&recorder.0).clone(), want);
    }

    #[test]
    fn a_failed_write_ends_the_hand_out_before_the_failed_task() {
        let recorder = Recorder(Mutex::new(Vec::new()));
        let make = |ti: usize| -> Result<Task> {
            if ti == 5 {
                return Err(EngineError::Invalid("no room".into()));
            }
            Ok(prompt_task(ti))
        };
        let (written, _, _) = hand_out(&recorder, 50, &make, &|_| {});
        assert!(matches!(written, Err(EngineError::Invalid(_))));
        let sent = lock(&recorder.0).clone();
        assert!(sent.len() <= 5, "{sent:?}");
        assert!(!sent.contains(&"task5".to_string()));
    }

    #[test]
    fn step_hooks_dilate_the_planned_steps_and_jitter_the_fusion_per_step() {
        let spec = RenderSpec {
            loras: Vec::new(),
            prompt: "a lighthouse".into(),
            negative_prompt: None,
            width: 2048,
            height: 2048,
            steps: 50,
            guidance: 7.5,
            scheduler: None,
            seed: 1,
            method: MethodSpec {
                method: Some(Method::Freescale),
                tile_size: Some(2048),
                ..Default::default()
            },
            output: Default::default(),
        };
        let p = plan(&spec, &ArchInfo::preset("sdxl").unwrap()).unwrap();
        let stage = &p.stages[1];
        let at = |step| StepAt {
            job: "j",
            seed: 1,
            stage: 1,
            step,
            timestep: 0.0,
        };
        // The stage starts at step 15 of 50; FreeScale dilates below step 35.
        assert_eq!(step_hooks(&p, stage, &at(19)).dilation, 2);
        assert_eq!(step_hooks(&p, stage, &at(20)).dilation, 1);
        let fusion = |step| step_hooks(&p, stage, &at(step)).fusion.unwrap();
        assert_eq!(fusion(0).train_latent, [128, 128]);
        assert_ne!(fusion(0).jitter_seed, fusion(1).jitter_seed);
        assert_eq!(fusion(3).jitter_seed, fusion(3).jitter_seed);
        assert!(step_hooks(&p, &p.stages[0], &at(0)).fusion.is_none());
    }

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
        // Globals first (the fusion follows the merge), a head of local views before them
        // (as overlapping steps run), and locals first (the fusion runs whole at the end):
        // the same bytes.
        let banded = task_groups(local.len(), global.len(), 3, 0).0;
        let headed = task_groups(local.len(), global.len(), 3, 4).0;
        let mut whole = task_groups(local.len(), 0, 3, 0).0;
        whole.extend(task_groups(0, global.len(), 3, 0).0);
        assert!(matches!(banded[0], Group::Global(_)) && matches!(whole[0], Group::Local(_)));
        let head = headed
            .iter()
            .take_while(|g| matches!(g, Group::Local(_)))
            .count();
        assert!(head > 0 && head <= 4 && matches!(headed[head], Group::Global(_)));
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
            let values = |parts: &[Tensor]| -> Result<Vec<f32>> {
                Ok(Tensor::cat(parts, 0)?.flatten_all()?.to_vec1::<f32>()?)
            };
            Ok(TaskOutputs {
                dims: Tensor::cat(&c, 0)?.dims().to_vec(),
                cond: values(&c)?,
                uncond: Some(values(&u)?),
            })
        };
        let scale = 3;
        let dims = [2, 4, h, w];
        // The step end follows the merge (DDIM, CFG) from this sample.
        let stepper =
            super::super::step_end::test_stepper(tessera_core::sched::SchedulerKind::Ddim);
        let sample = Tensor::randn(0f32, 1.0, (1, 4, h, w), &Device::Cpu)?;
        let cfg = tessera_core::plan::GuidancePlan::Cfg { scale: 5.0 };
        let (j, t) = (2, stepper.scheduler().timesteps()[2]);
        type Stepped = Option<(Tensor, Tensor)>;
        // The merge starts (as its step begins) after `held` tasks have arrived.
        let run = |groups: &[Group], order: &[usize], held: usize| -> Result<(Vec<f32>, Stepped)> {
            let mut m = StepMerge::new(
                groups,
                &local,
                Some(&global),
                ViewWeighting::GAUSSIAN,
                scale,
            );
            for (n, &ti) in order.iter().enumerate() {
                if n == held {
                    let end = StepEnd::new(&cfg, true, &stepper, (j, t), &sample);
                    m.start(end, MergeBuffers::default())?;
                }
                m.arrive(ti, per_task(&groups[ti])?)?;
            }
            let end = m.end.take();
            let (mut local, fusion, _) = m.finish()?;
            // Bands start once the global views are in, wherever they fall in the order.
            let (bands, global) = fusion.expect("the fusion started");
            let fused = bands.finish(&mut local, global)?;
            let mut end = end.expect("a step end");
            end.advance(&fused, h)?;
            Ok((fused, Some(end.finish()?)))
        };
        let n = banded.len();
        let forward: Vec<usize> = (0..n).collect();
        let backward: Vec<usize> = (0..n).rev().collect();
        let mut shuffled = forward.clone();
        shuffled.rotate_left(n / 3);
        shuffled.swap(0, n - 1);
        let (a, stepped) = run(&banded, &forward, 0)?;
        let bits = |s: &Stepped| -> Result<Vec<u32>> {
            let (z, x0) = s.as_ref().expect("stepped");
            let v = Tensor::cat(&[z, x0], 0)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.into_iter().map(f32::to_bits).collect())
        };
        for (groups, order, held) in [
            (&banded, &backward, 0),
            (&banded, &shuffled, 0),
            (&headed, &forward, 0),
            (&headed, &shuffled, n / 2),
            (&whole, &shuffled, 0),
        ] {
            let (b, s) = run(groups, order, held)?;
            assert_eq!(a, b);
            assert_eq!(bits(&stepped)?, bits(&s)?);
        }
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
        // And the step end that followed the merge is the whole latent's guided step.
        let merged = Tensor::from_vec(want, (2, 4, h, w), &Device::Cpu)?;
        let (cond, uncond) = split_halves(merged, true)?;
        let eps = super::super::guide_halves(&cfg, &cond, uncond.as_ref())?;
        let whole_step = stepper.step(&eps, j, t, &sample)?;
        assert_eq!(bits(&stepped)?, bits(&Some(whole_step))?);
        Ok(())
    }
}
