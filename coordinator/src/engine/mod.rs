//! Runs a job's whole cascade over the store: the coordinator's side of every stage (entry,
//! guidance, restrained structure, scheduler steps, checkpoints, transitions) with the model
//! work handed to workers as tasks. The embedded `tessera render` and the cluster drive this
//! same loop; only the [`Dispatch`] and the [`Store`] differ.

pub mod vae;
pub mod views;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tessera_core::method::camap::CaMap;
use tessera_core::method::facfg::{fa_cfg, FaCfgWeights};
use tessera_core::method::freescale::{
    binarize_mask, exponent_map, restrain, restrain_with_map, restraint_weight,
    restraint_weight_map,
};
use tessera_core::method::guidance;
use tessera_core::noise::{NoiseKey, NoisePurpose};
use tessera_core::plan::{GuidancePlan, Plan, StageEntry, StagePlan, StageSchedule};
use tessera_core::resize::Resizer;
use tessera_core::sched::{Scheduler, SchedulerConfig, SchedulerKind};
use tessera_core::spec::{RenderSpec, PIXELS_PER_LATENT};
use tessera_core::task::{Task, TaskKind, VaeNoise};
use tessera_core::tiling::vae::VaeTiling;
use tessera_store::{get_json, get_tensor, keys, put_json, put_tensor, Store};

use crate::dispatch::{Dispatch, DispatchError};
use vae::{Pixels, RowSink};
use views::StepAt;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("model: {0}")]
    Model(String),
    #[error("store: {0}")]
    Store(String),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error("computation failed: {0}")]
    Compute(#[from] candle_core::Error),
    /// Writing the output failed (disk full, a bad path).
    #[error("writing the output: {0}")]
    Output(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl From<tessera_store::StoreError> for EngineError {
    fn from(e: tessera_store::StoreError) -> Self {
        EngineError::Store(e.to_string())
    }
}

impl From<tessera_core::error::MathError> for EngineError {
    fn from(e: tessera_core::error::MathError) -> Self {
        EngineError::Compute(candle_core::Error::Msg(e.to_string()))
    }
}

impl From<tessera_core::sched::SchedulerError> for EngineError {
    fn from(e: tessera_core::sched::SchedulerError) -> Self {
        EngineError::Compute(candle_core::Error::Msg(e.to_string()))
    }
}

/// What the engine reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// A stage begins: its index, the stage count, its size and step count.
    Stage {
        stage: usize,
        stages: usize,
        size: [u32; 2],
        steps: usize,
    },
    /// A step of the current stage finished, and where the coordinator's time went.
    Step {
        stage: usize,
        step: usize,
        steps: usize,
        timestep: f64,
        timings: StepTimings,
    },
    /// This many more view evaluations finished (for the bar; the plan has the total).
    Views(usize),
    /// Decoding the final latent.
    Decoding,
    /// The job picked up from a checkpoint: stage index and steps of it already done.
    Resumed { stage: usize, step: usize },
}

/// Wall-clock seconds one denoising step spent in each part of the coordinator's step code,
/// measured in the engine's real loop (`tessera bench step` reports them).
///
/// The parts (`store_write` … `checkpoint`) are the coordinator's work, wherever it runs;
/// most of it now overlaps the workers: inputs are written while earlier tasks compute,
/// outputs are read and merged as tasks finish, checkpoints are written during the next
/// step. What holds a step up is [`StepTimings::critical`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepTimings {
    /// Cutting the views out of the latent, encoding them and writing them (and CA-maps) to
    /// the store (on the writer thread, overlapping the workers after the first task).
    pub store_write: f64,
    /// Waiting for the workers (dispatch until the last task's result is in the store).
    pub workers: f64,
    /// Reading and decoding the task outputs.
    pub store_read: f64,
    /// Weighted merge of the local views, scatter of the global views (and CA-maps).
    pub merge: f64,
    /// Scale fusion `G(local) + (global − G(global))`.
    pub fusion: f64,
    /// Restrained structure, input scaling, CFG or FA-CFG.
    pub guidance: f64,
    /// The scheduler step.
    pub scheduler: f64,
    /// Waiting for the previous checkpoint (if still being written) and starting this one;
    /// the writing itself (latent, x0 at a stage's end, dropping the previous checkpoint and
    /// the step's task keys) runs during the next step.
    pub checkpoint: f64,
    /// The step's critical path: the coordinator's time during which none of the step's tasks
    /// is out, so no worker can be computing for it. It is the head (from the step's start —
    /// the previous step's end — until its first task is handed to the dispatcher:
    /// restraint, input scaling, cutting and writing the first task's views) plus the tail
    /// (from the last task's result coming in until the step's end: the merges still
    /// pending, fusion, guidance, the scheduler step, starting the checkpoint). Time a
    /// worker waits while later inputs are still being written is not in it; `tessera bench
    /// step` measures that separately by comparing `wall` with the workers' own time.
    pub critical: f64,
    /// The step's wall-clock seconds, from its start to its end as above.
    pub wall: f64,
}

impl StepTimings {
    /// The coordinator's own seconds of work in the step, overlapped or not: all parts but
    /// waiting for workers.
    pub fn coordinator(&self) -> f64 {
        self.store_write
            + self.store_read
            + self.merge
            + self.fusion
            + self.guidance
            + self.scheduler
            + self.checkpoint
    }

    /// Part of the store traffic: writes, reads and the checkpoint.
    pub fn store_io(&self) -> f64 {
        self.store_write + self.store_read + self.checkpoint
    }
}

/// Inputs that travel beside the spec.
#[derive(Debug, Default)]
pub struct JobInputs {
    /// The first stage's initial noise (1, C, h, w), replacing the seeded draw.
    pub initial_latents: Option<Tensor>,
    /// `--init-image`: (1, 3, H, W) in [-1, 1].
    pub init_image: Option<Tensor>,
    /// `--mask`: (H, W), non-zero = keep the structure with `--cosine-scale`.
    pub mask: Option<Tensor>,
    /// Called after every step with the step's predicted clean latent, for live previews. It
    /// runs beside the next step (with the checkpoint), never between steps.
    pub preview: Option<PreviewHook>,
}

/// Takes a step's predicted clean latent: see [`JobInputs::preview`].
pub type PreviewFn = dyn Fn(&Tensor) + Send + Sync;

/// See [`JobInputs::preview`].
pub struct PreviewHook(pub Box<PreviewFn>);

impl std::fmt::Debug for PreviewHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreviewHook")
    }
}

#[derive(Debug)]
pub struct RenderOutput {
    /// The final latent (1, C, h, w) f32, before the VAE's scaling is undone; decode it with
    /// [`Engine::decode_output`].
    pub latents: Tensor,
}

/// The coordinator's view of a model: what the loop needs without the weights.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub scheduler: SchedulerConfig,
    pub latent_channels: usize,
}

pub struct Engine<'a> {
    pub store: &'a dyn Store,
    pub workers: &'a dyn Dispatch,
    pub model: ModelInfo,
}

/// A stage's stepping rule, built from its plan.
struct Stepper {
    scheduler: Scheduler,
    schedule: StageSchedule,
}

impl Stepper {
    fn new(stage: &StagePlan, cfg: &SchedulerConfig) -> Result<Self> {
        let scheduler = match &stage.schedule {
            StageSchedule::Schedule {
                scheduler, steps, ..
            } => Scheduler::new(*scheduler, cfg, *steps)?,
            StageSchedule::Frecas { inference_steps } => {
                Scheduler::new(SchedulerKind::Ddim, cfg, *inference_steps)?
            }
        };
        Ok(Self {
            scheduler,
            schedule: stage.schedule.clone(),
        })
    }

    /// Index into the scheduler's own schedule of the stage's step `j`.
    fn index(&self, j: usize) -> usize {
        match &self.schedule {
            StageSchedule::Schedule { start, .. } => start + j,
            StageSchedule::Frecas { .. } => j,
        }
    }

    fn scale_input(&self, z: &Tensor, j: usize) -> Result<Tensor> {
        Ok(match &self.schedule {
            StageSchedule::Schedule { .. } => self.scheduler.scale_model_input(z, self.index(j))?,
            StageSchedule::Frecas { .. } => z.clone(),
        })
    }

    /// (next latent, predicted clean latent).
    fn step(&self, eps: &Tensor, j: usize, t: f64, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = match &self.schedule {
            StageSchedule::Schedule { .. } => self.scheduler.step(eps, self.index(j), z)?,
            StageSchedule::Frecas { .. } => self.scheduler.ddim_step_from(eps, t, z)?,
        };
        Ok((out.prev_sample, out.pred_original_sample))
    }
}

/// Where a job's last checkpoint is: `step` steps of `stage` done; `complete` when the stage
/// is finished (its checkpoint then also holds x0 and the captured CA-map).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    stage: usize,
    step: usize,
    complete: bool,
}

/// What a stage leaves for the next: its final latent and its last predicted clean latent.
struct StageResult {
    latent: Tensor,
    x0: Tensor,
    camap: Option<CaMap>,
}

impl Engine<'_> {
    /// Runs `job`'s cascade to its final latent; [`Engine::decode_output`] then writes the
    /// picture. `spec` must be the one `plan` was made from.
    pub fn run(
        &self,
        job: &str,
        spec: &RenderSpec,
        plan: &Plan,
        inputs: JobInputs,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<RenderOutput> {
        put_json(self.store, &keys::spec(job), spec)?;
        put_json(self.store, &keys::plan(job), plan)?;
        // A resumed job already has its embeddings.
        if !self.store.exists(&keys::embedding(job, "cond"))? {
            self.dispatch_one(
                job,
                "prompt",
                TaskKind::EncodePrompt {
                    prompt: spec.prompt.clone(),
                    negative_prompt: spec.negative_prompt.clone(),
                },
            )?;
        }

        let resume = self.load_checkpoint(job, plan)?;
        let mut prev: Option<StageResult> = None;
        let mut first = 0;
        let mut resume_at = None;
        if let Some(c) = &resume {
            progress(Progress::Resumed {
                stage: c.stage,
                step: c.step,
            });
            if c.complete {
                prev = Some(self.load_stage_result(job, c)?);
                first = c.stage + 1;
            } else {
                first = c.stage;
                resume_at = Some(c.step);
            }
        }
        let mut inputs = inputs;
        for (k, stage) in plan.stages.iter().enumerate().skip(first) {
            progress(Progress::Stage {
                stage: k,
                stages: plan.stages.len(),
                size: stage.size,
                steps: stage.timesteps.len(),
            });
            let at = if k == first { resume_at } else { None };
            let result =
                self.run_stage(job, spec, plan, k, prev.take(), at, &mut inputs, progress)?;
            prev = Some(result);
        }
        let last = prev.ok_or_else(|| EngineError::Invalid("the plan has no stages".into()))?;
        Ok(RenderOutput {
            latents: last.latent,
        })
    }

    /// Decodes the final latent in VAE tiles on the workers and streams the blended pixel
    /// rows, top to bottom, into `sink` (a PNG, a tile pyramid): the whole picture is never
    /// held, only about two bands of tiles.
    pub fn decode_output(
        &self,
        job: &str,
        plan: &Plan,
        latent: &Tensor,
        sink: &mut dyn RowSink,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<()> {
        progress(Progress::Decoding);
        self.decode_rows(job, "final", VaeTiling::for_plan(plan), latent, sink)
    }

    /// Encodes `pixels` (1, 3, H, W) in [-1, 1] to a latent in VAE tiles on the workers, the
    /// posterior sampled with the seeded noise of `noise` (what a stage transition does).
    pub fn encode_image(
        &self,
        job: &str,
        plan: &Plan,
        noise: VaeNoise,
        pixels: &Tensor,
    ) -> Result<Tensor> {
        self.encode_tiled(job, VaeTiling::for_plan(plan), noise, Pixels::Whole(pixels))
    }

    /// The decoded final picture as a (1, 3, H, W) f32 tensor in [-1, 1], for tests and small
    /// images.
    pub fn decode_image(&self, job: &str, plan: &Plan, latent: &Tensor) -> Result<Tensor> {
        self.decode_tiled(job, "final", VaeTiling::for_plan(plan), latent)
    }

    /// The job's checkpoint, if it has one.
    fn load_checkpoint(&self, job: &str, plan: &Plan) -> Result<Option<Checkpoint>> {
        if !self.store.exists(&keys::checkpoint_state(job))? {
            return Ok(None);
        }
        let c: Checkpoint = get_json(self.store, &keys::checkpoint_state(job))?;
        let steps = plan
            .stages
            .get(c.stage)
            .map(|s| s.timesteps.len())
            .ok_or_else(|| {
                EngineError::Invalid(format!(
                    "the checkpoint is at stage {}, but the plan has {} stages",
                    c.stage,
                    plan.stages.len()
                ))
            })?;
        if c.step > steps {
            return Err(EngineError::Invalid(format!(
                "the checkpoint is at step {} of stage {}, which has {steps} steps",
                c.step, c.stage
            )));
        }
        Ok(Some(c))
    }

    /// What a completed stage left for the next, from its checkpoint.
    fn load_stage_result(&self, job: &str, c: &Checkpoint) -> Result<StageResult> {
        let cpu = Device::Cpu;
        let key = |part: &str| keys::checkpoint(job, c.stage, c.step, part);
        let camap = if self.store.exists(&key("camap"))? {
            Some(CaMap::from_tensor(get_tensor(
                self.store,
                &key("camap"),
                &cpu,
            )?)?)
        } else {
            None
        };
        Ok(StageResult {
            latent: get_tensor(self.store, &key("latent"), &cpu)?,
            x0: get_tensor(self.store, &key("x0"), &cpu)?,
            camap,
        })
    }

    /// Records that `step` steps of stage `k` are done with latent `z`; at a stage's end
    /// (`end`) also what the next stage needs. Tensors first, then the state that names them,
    /// then the previous checkpoint's tensors go: a crash anywhere leaves a usable checkpoint.
    fn checkpoint(
        &self,
        job: &str,
        plan: &Plan,
        k: usize,
        step: usize,
        z: &Tensor,
        end: Option<(&Tensor, Option<&CaMap>)>,
    ) -> Result<()> {
        let key = |part: &str| keys::checkpoint(job, k, step, part);
        put_tensor(self.store, &key("latent"), z)?;
        if let Some((x0, camap)) = end {
            put_tensor(self.store, &key("x0"), x0)?;
            if let Some(m) = camap {
                put_tensor(self.store, &key("camap"), m.tensor())?;
            }
        }
        put_json(
            self.store,
            &keys::checkpoint_state(job),
            &Checkpoint {
                stage: k,
                step,
                complete: end.is_some(),
            },
        )?;
        // The checkpoint before this one is known from the plan: the previous step, or the
        // end of the previous stage.
        let previous = match (k, step) {
            (0, 0) => None,
            (k, 0) => Some((k - 1, plan.stages[k - 1].timesteps.len())),
            (k, j) => Some((k, j - 1)),
        };
        if let Some((pk, pj)) = previous {
            for part in ["latent", "x0", "camap"] {
                self.store.delete(&keys::checkpoint(job, pk, pj, part))?;
            }
        }
        Ok(())
    }

    /// Deletes the job's keys.
    pub fn finish(&self, job: &str) -> Result<()> {
        self.store.delete_prefix(&keys::job_prefix(job))?;
        Ok(())
    }

    fn dispatch_one(&self, job: &str, id: &str, kind: TaskKind) -> Result<()> {
        let task = Task {
            job: job.to_string(),
            id: id.to_string(),
            kind,
        };
        self.workers.run(std::slice::from_ref(&task), &|_| {})?;
        Ok(())
    }

    /// The stage's upscaled picture (computed a tile at a time) → clean latent of the stage.
    fn reencode(
        &self,
        job: &str,
        seed: u64,
        plan: &Plan,
        k: usize,
        resized: &Resizer,
    ) -> Result<Tensor> {
        let noise = VaeNoise {
            seed,
            stage: k as u32,
        };
        self.encode_tiled(
            job,
            VaeTiling::for_plan(plan),
            noise,
            Pixels::Resized(resized),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run_stage(
        &self,
        job: &str,
        spec: &RenderSpec,
        plan: &Plan,
        k: usize,
        prev: Option<StageResult>,
        resume_at: Option<usize>,
        inputs: &mut JobInputs,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<StageResult> {
        let stage = &plan.stages[k];
        let cpu = Device::Cpu;
        let (h, w) = stage.latent_hw();
        let shape = (1, self.model.latent_channels, h, w);
        let stepper = Stepper::new(stage, &self.model.scheduler)?;
        let seed = spec.seed;

        // The stage's starting latent, and for restrained structure the clean latent and
        // noise that define n_i = add_noise(z_up, ε, t_i).
        let mut restraint_source: Option<(Tensor, Tensor)> = None;
        let stage_noise = || {
            NoiseKey {
                seed,
                stage: k as u32,
                step: 0,
                purpose: NoisePurpose::StageNoise,
            }
            .normal(shape, &cpu)
        };
        let (mut z, camap_in, first_step) = if let Some(j0) = resume_at {
            // Mid-stage resume: the latent after j0 steps, and the stage's entry data.
            let z = get_tensor(self.store, &keys::checkpoint(job, k, j0, "latent"), &cpu)?;
            if stage.restraint.is_some() && self.store.exists(&keys::stage(job, k, "zup"))? {
                let z_up = get_tensor(self.store, &keys::stage(job, k, "zup"), &cpu)?;
                restraint_source = Some((z_up, stage_noise()?));
            }
            let camap_key = keys::stage(job, k, views::CAMAP_IN);
            let camap_in = if self.store.exists(&camap_key)? {
                Some(CaMap::from_tensor(get_tensor(
                    self.store, &camap_key, &cpu,
                )?)?)
            } else {
                None
            };
            // Whatever the interrupted step left is redone from scratch.
            self.store.delete_prefix(&keys::step_prefix(job, k, j0))?;
            (z, camap_in, j0)
        } else {
            let z = match &stage.entry {
                StageEntry::Noise => {
                    let noise = match inputs.initial_latents.take() {
                        Some(t) => check_initial_latents(t, shape, stage)?,
                        None => NoiseKey {
                            seed,
                            stage: k as u32,
                            step: 0,
                            purpose: NoisePurpose::InitialLatent,
                        }
                        .normal(shape, &cpu)?,
                    };
                    // diffusers scales given latents by the scheduler's initial sigma too.
                    (noise * stepper.scheduler.init_noise_sigma())?
                }
                StageEntry::InitImage { filter } => {
                    let image = inputs.init_image.take().ok_or_else(|| {
                        EngineError::Invalid(
                            "the plan starts from an init image but none was given".into(),
                        )
                    })?;
                    let resized = Resizer::new(
                        &image.clamp(-1f32, 1f32)?,
                        stage.size[1] as usize,
                        stage.size[0] as usize,
                        *filter,
                    )?;
                    drop(image);
                    let z0 = self.reencode(job, seed, plan, k, &resized)?;
                    self.checkpoint(job, plan, k, 0, &z0, Some((&z0, None)))?;
                    return Ok(StageResult {
                        latent: z0.clone(),
                        x0: z0,
                        camap: None,
                    });
                }
                StageEntry::Previous {
                    from_predicted_x0,
                    filter,
                } => {
                    let p = prev.as_ref().ok_or_else(|| {
                        EngineError::Invalid(format!(
                            "stage {k} continues a previous stage, but it is the first"
                        ))
                    })?;
                    let source = if *from_predicted_x0 { &p.x0 } else { &p.latent };
                    let (mut pixels, hw) = self.decode_planes(
                        job,
                        &format!("s{k}"),
                        VaeTiling::for_plan(plan),
                        source,
                    )?;
                    // FreCaS clips the decoded prediction to the image range before resizing.
                    if *from_predicted_x0 {
                        for v in pixels.iter_mut() {
                            *v = v.clamp(-1.0, 1.0);
                        }
                    }
                    // The upscaled picture is computed tile by tile as the encode asks.
                    let resized = Resizer::from_planes(
                        pixels,
                        (1, 3),
                        hw,
                        stage.size[1] as usize,
                        stage.size[0] as usize,
                        *filter,
                    )?;
                    let z_up = self.reencode(job, seed, plan, k, &resized)?;
                    drop(resized);
                    let eps = stage_noise()?;
                    let t0 = *stage.timesteps.first().ok_or_else(|| {
                        EngineError::Invalid(format!("stage {k} has no timesteps"))
                    })?;
                    let z = stepper.scheduler.add_noise(&z_up, &eps, t0)?;
                    if stage.restraint.is_some() {
                        put_tensor(self.store, &keys::stage(job, k, "zup"), &z_up)?;
                        restraint_source = Some((z_up, eps));
                    }
                    z
                }
            };
            let camap_in = prev.and_then(|p| p.camap);
            if let Some(m) = &camap_in {
                put_tensor(
                    self.store,
                    &keys::stage(job, k, views::CAMAP_IN),
                    m.tensor(),
                )?;
            }
            // The entry (a noise draw or a whole decode-resize-encode transition) is not redone.
            self.checkpoint(job, plan, k, 0, &z, None)?;
            (z, camap_in, 0)
        };

        // Per-pixel restraint exponents under a mask.
        let exponents = match (&stage.restraint, &inputs.mask) {
            (Some(r), Some(mask)) => match r.cosine_scale_bg {
                Some(bg) => Some(exponent_map(
                    &binarize_mask(mask)?,
                    (h, w),
                    r.cosine_scale,
                    bg,
                )?),
                None => None,
            },
            _ => None,
        };

        let steps = stage.timesteps.len();
        let mut x0 = z.clone();
        let mut camap_out = None;
        // Each step's checkpoint (and the deletion of the step's task keys) is written on a
        // thread of its own while the next step's tasks run; the next checkpoint waits for it,
        // so they still land in order, and the stage does not end before its last one has.
        let preview = inputs.preview.as_ref().map(|PreviewHook(p)| p);
        std::thread::scope(|scope| -> Result<()> {
            let mut pending: Option<std::thread::ScopedJoinHandle<'_, Result<()>>> = None;
            let join = |h: std::thread::ScopedJoinHandle<'_, Result<()>>| -> Result<()> {
                h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
            };
            for (j, &t) in stage.timesteps.iter().enumerate().skip(first_step) {
                let step_start = Instant::now();
                let clock = Instant::now();
                if let (Some(r), Some((z_up, eps)), true) =
                    (&stage.restraint, &restraint_source, j > 0)
                {
                    let noised = || stepper.scheduler.add_noise(z_up, eps, t);
                    let big_t = self.model.scheduler.num_train_timesteps;
                    z = match &exponents {
                        Some(e) => {
                            restrain_with_map(&z, &restraint_weight_map(e, t, big_t)?, noised)?
                        }
                        None => restrain(&z, restraint_weight(t, big_t, r.cosine_scale), noised)?,
                    };
                }
                let input = stepper.scale_input(&z, j)?;
                let before_views = clock.elapsed().as_secs_f64();
                let capture = stage.camap_capture && j + 1 == steps;
                let at = StepAt {
                    job,
                    seed,
                    stage: k,
                    step: j,
                    timestep: t,
                };
                let pred = views::evaluate(
                    self.store,
                    self.workers,
                    plan,
                    stage,
                    at,
                    &input,
                    camap_in.as_ref(),
                    capture,
                    &|n| progress(Progress::Views(n)),
                )?;
                let mut timings = pred.timings;
                timings.guidance += before_views;
                let clock = Instant::now();
                let eps = match (&stage.guidance, &pred.uncond) {
                    (GuidancePlan::Cfg { scale }, Some(u)) => {
                        guidance::classifier_free(u, &pred.cond, *scale)?
                    }
                    (
                        GuidancePlan::FaCfg {
                            high,
                            low,
                            low_latent,
                        },
                        Some(u),
                    ) => fa_cfg(
                        u,
                        &pred.cond,
                        (low_latent[0], low_latent[1]),
                        FaCfgWeights {
                            high: *high,
                            low: *low,
                        },
                    )?,
                    _ => pred.cond.clone(),
                };
                timings.guidance += clock.elapsed().as_secs_f64();
                let clock = Instant::now();
                let (next, pred_x0) = stepper.step(&eps, j, t, &z)?;
                z = next;
                x0 = pred_x0;
                timings.scheduler += clock.elapsed().as_secs_f64();
                let clock = Instant::now();
                if pred.camap.is_some() {
                    camap_out = pred.camap;
                }
                // Only a checkpoint still being written when this one is due waits here.
                if let Some(h) = pending.take() {
                    join(h)?;
                }
                let end = (j + 1 == steps).then(|| (x0.clone(), camap_out.clone()));
                let (z_saved, x0_now) = (z.clone(), x0.clone());
                pending = Some(scope.spawn(move || -> Result<()> {
                    let end = end.as_ref().map(|(x0, m)| (x0, m.as_ref()));
                    self.checkpoint(job, plan, k, j + 1, &z_saved, end)?;
                    self.store.delete_prefix(&keys::step_prefix(job, k, j))?;
                    if let Some(preview) = preview {
                        preview(&x0_now);
                    }
                    Ok(())
                }));
                timings.checkpoint += clock.elapsed().as_secs_f64();
                let step_end = Instant::now();
                timings.wall = step_end.duration_since(step_start).as_secs_f64();
                timings.critical = match (pred.first_handed_out, pred.last_result) {
                    (Some(first), Some(last)) => {
                        first.saturating_duration_since(step_start).as_secs_f64()
                            + step_end.saturating_duration_since(last).as_secs_f64()
                    }
                    _ => timings.wall,
                };
                progress(Progress::Step {
                    stage: k,
                    step: j + 1,
                    steps,
                    timestep: t,
                    timings,
                });
            }
            if let Some(h) = pending.take() {
                join(h)?;
            }
            Ok(())
        })?;
        Ok(StageResult {
            latent: z.to_dtype(DType::F32)?,
            x0,
            camap: camap_out,
        })
    }
}

fn check_initial_latents(
    t: Tensor,
    shape: (usize, usize, usize, usize),
    stage: &StagePlan,
) -> Result<Tensor> {
    let want = [shape.0, shape.1, shape.2, shape.3];
    let dims = t.dims().to_vec();
    // A (4, h, w) latent is the same thing without the batch axis; accept it.
    let t = if dims.len() == 3 { t.unsqueeze(0)? } else { t };
    if t.dims() != want {
        return Err(EngineError::Invalid(format!(
            "--latents holds a tensor of shape {dims:?}, but the first stage ({}x{}) needs \
             {want:?} (1 x channels x height/8 x width/8): pass --size {}x{} (or matching \
             --stages) or other latents",
            stage.size[0],
            stage.size[1],
            dims.last().copied().unwrap_or(0) * PIXELS_PER_LATENT as usize,
            dims.get(dims.len().saturating_sub(2)).copied().unwrap_or(0)
                * PIXELS_PER_LATENT as usize,
        )));
    }
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
}

/// [-1, 1] floats to 8-bit RGB as diffusers' image processor does: `(x / 2 + 0.5)` clamped to
/// [0, 1], times 255, rounded half away from zero (numpy's `round` is half-to-even, but exact
/// halves do not occur in practice for float outputs).
pub fn to_rgb8(image: &Tensor) -> Result<Tensor> {
    let x = ((image.to_device(&Device::Cpu)?.to_dtype(DType::F32)? / 2.0)? + 0.5)?;
    let x = (x.clamp(0f32, 1f32)? * 255.0)?.round()?;
    Ok(x.to_dtype(DType::U8)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb_conversion_clamps_and_rounds() -> Result<()> {
        let t = Tensor::new(&[[[-1.5f32, -1.0, 0.0, 0.999, 1.0, 2.0]]], &Device::Cpu)?;
        let v = to_rgb8(&t)?.flatten_all()?.to_vec1::<u8>()?;
        assert_eq!(v, vec![0, 0, 128, 255, 255, 255]);
        Ok(())
    }
}
