//! Runs a job's whole cascade over the store: the coordinator's side of every stage (entry,
//! guidance, restrained structure, scheduler steps, checkpoints, transitions) with the model
//! work handed to workers as tasks. The embedded `tessera render` and the cluster drive this
//! same loop; only the [`Dispatch`] and the [`Store`] differ.

mod step_end;
mod step_input;
pub mod vae;
pub mod views;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tessera_core::codec::with_f32_values;
use tessera_core::method::camap::CaMap;
use tessera_core::method::facfg::{fa_cfg, FaCfgWeights};
use tessera_core::method::freescale::RestrainedStructure;
use tessera_core::method::guidance;
use tessera_core::noise::{NoiseKey, NoisePurpose};
use tessera_core::plan::{GuidancePlan, Plan, StageEntry, StagePlan};
use tessera_core::resize::{ResizeFilter, Resizer};
use tessera_core::sched::{SchedulerConfig, StageStepper as Stepper};
use tessera_core::spec::{RenderSpec, PIXELS_PER_LATENT};
use tessera_core::task::{Task, TaskKind, VaeNoise};
use tessera_core::tiling::vae::VaeTiling;
use tessera_core::tiling::MergeBuffers;
use tessera_store::{get_json, get_tensor, keys, put_json, put_tensor, Store};

use crate::dispatch::{Dispatch, DispatchError};
use step_end::StepEnd;
use step_input::{InputRule, StepInput};
use vae::{Pixels, RowSink};
use views::{Flight, Predictions, StepAt, StepSetup, StepViews};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("model: {0}")]
    Model(String),
    /// The store failed (unreachable, or it refused): the image is tried again from its
    /// checkpoint once the store answers.
    #[error("store: {0}")]
    Store(String),
    /// The store answered, but a key the job needs is gone or unreadable (a store that lost
    /// data, an evicted key): waiting cannot bring it back.
    #[error("store: {0}")]
    StoreData(String),
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
        use tessera_store::StoreError::{Codec, Missing};
        match e {
            Missing(_) | Codec { .. } => EngineError::StoreData(e.to_string()),
            _ => EngineError::Store(e.to_string()),
        }
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
    /// Weighted merge of the local views, scatter of the global views (and CA-maps), with
    /// what runs behind it as results arrive: the fusion's and the step end's earlier bands.
    pub merge: f64,
    /// Scale fusion `G(local) + (global − G(global))` (its last band).
    pub fusion: f64,
    /// Restrained structure, input scaling, CFG or FA-CFG.
    pub guidance: f64,
    /// The scheduler step. Where it runs behind the merge (`step_end`): its last band, with
    /// its guidance (one pass); the bands before it run in the merge's callbacks and count
    /// as merge, as the fusion behind the merge does.
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
    /// pending, the last band's fusion, guidance and scheduler step, and starting the
    /// checkpoint). Time a
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

    /// Sets [`Self::wall`] and [`Self::critical`] of a step that began at `start` and ends
    /// now, its first task handed out at `first_handed_out` and its last result in at
    /// `last_result` (the whole step is critical when it had no tasks).
    fn close_step(
        &mut self,
        start: Instant,
        first_handed_out: Option<Instant>,
        last_result: Option<Instant>,
    ) {
        let end = Instant::now();
        self.wall = end.duration_since(start).as_secs_f64();
        self.critical = match (first_handed_out, last_result) {
            (Some(first), Some(last)) => {
                first.saturating_duration_since(start).as_secs_f64()
                    + end.saturating_duration_since(last).as_secs_f64()
            }
            _ => self.wall,
        };
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
        let camap = self.load_camap(&key("camap"))?;
        Ok(StageResult {
            latent: get_tensor(self.store, &key("latent"), &cpu)?,
            x0: get_tensor(self.store, &key("x0"), &cpu)?,
            camap,
        })
    }

    /// The CA-map stored at `key`, if there is one.
    fn load_camap(&self, key: &str) -> Result<Option<CaMap>> {
        if !self.store.exists(key)? {
            return Ok(None);
        }
        let map = get_tensor(self.store, key, &Device::Cpu)?;
        Ok(Some(CaMap::from_tensor(map)?))
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

    /// Runs stage `k` the way a diffusers pipeline's `__call__` runs: prepare (the entry
    /// latent, or where a resumed stage was; the restrained structure), then the denoising
    /// loop.
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
        let (h, w) = stage.latent_hw();
        let at = StageAt {
            job,
            seed: spec.seed,
            plan,
            k,
            stage,
            shape: (1, self.model.latent_channels, h, w),
        };
        let stepper = Stepper::new(&stage.schedule, &self.model.scheduler)?;
        let mut start = match resume_at {
            Some(j0) => self.resume_stage(&at, j0)?,
            None => match self.enter_stage(&at, &stepper, prev, inputs)? {
                Entry::Steps(start) => start,
                Entry::Done(result) => return Ok(result),
            },
        };
        let source = start.restraint_source.take();
        let restraint = self.restraint(&at, source, inputs.mask.as_ref())?;
        let preview = inputs.preview.as_ref().map(|PreviewHook(p)| p.as_ref());
        self.denoise(&at, &stepper, start, restraint.as_ref(), preview, progress)
    }

    /// A mid-stage resume: the latent after `j0` steps and the stage's entry data; whatever
    /// the interrupted step left is redone from scratch.
    fn resume_stage(&self, at: &StageAt, j0: usize) -> Result<StageStart> {
        let (job, k, cpu) = (at.job, at.k, Device::Cpu);
        let z = get_tensor(self.store, &keys::checkpoint(job, k, j0, "latent"), &cpu)?;
        let zup_key = keys::stage(job, k, "zup");
        let restraint_source = if at.stage.restraint.is_some() && self.store.exists(&zup_key)? {
            Some((get_tensor(self.store, &zup_key, &cpu)?, at.stage_noise()?))
        } else {
            None
        };
        let camap_in = self.load_camap(&keys::stage(job, k, views::CAMAP_IN))?;
        self.store.delete_prefix(&keys::step_prefix(job, k, j0))?;
        Ok(StageStart {
            z,
            first_step: j0,
            camap_in,
            restraint_source,
        })
    }

    /// The stage's entry as its plan says: noise, an init image (the whole stage), or the
    /// previous stage's result upscaled and noised. The entry (a noise draw or a whole
    /// decode-resize-encode transition) is checkpointed, so it is not redone.
    fn enter_stage(
        &self,
        at: &StageAt,
        stepper: &Stepper,
        prev: Option<StageResult>,
        inputs: &mut JobInputs,
    ) -> Result<Entry> {
        let mut restraint_source = None;
        let z = match &at.stage.entry {
            StageEntry::Noise => {
                let noise = match inputs.initial_latents.take() {
                    Some(t) => check_initial_latents(t, at.shape, at.stage)?,
                    None => at.noise(NoisePurpose::InitialLatent)?,
                };
                // diffusers scales given latents by the scheduler's initial sigma too.
                (noise * stepper.init_noise_sigma())?
            }
            StageEntry::InitImage { filter } => {
                let image = inputs.init_image.take().ok_or_else(|| {
                    EngineError::Invalid(
                        "the plan starts from an init image but none was given".into(),
                    )
                })?;
                return Ok(Entry::Done(self.enter_from_image(at, image, *filter)?));
            }
            StageEntry::Previous {
                from_predicted_x0,
                filter,
            } => {
                let (z, source) = self.enter_from_previous(
                    at,
                    stepper,
                    prev.as_ref(),
                    *from_predicted_x0,
                    *filter,
                )?;
                restraint_source = source;
                z
            }
        };
        let camap_in = prev.and_then(|p| p.camap);
        if let Some(m) = &camap_in {
            put_tensor(
                self.store,
                &keys::stage(at.job, at.k, views::CAMAP_IN),
                m.tensor(),
            )?;
        }
        self.checkpoint(at.job, at.plan, at.k, 0, &z, None)?;
        Ok(Entry::Steps(StageStart {
            z,
            first_step: 0,
            camap_in,
            restraint_source,
        }))
    }

    /// An init-image stage: the picture resized to the stage and encoded is its result.
    fn enter_from_image(
        &self,
        at: &StageAt,
        image: Tensor,
        filter: ResizeFilter,
    ) -> Result<StageResult> {
        let size = at.stage.size;
        let resized = Resizer::new(
            &image.clamp(-1f32, 1f32)?,
            size[1] as usize,
            size[0] as usize,
            filter,
        )?;
        drop(image);
        let z0 = self.reencode(at.job, at.seed, at.plan, at.k, &resized)?;
        self.checkpoint(at.job, at.plan, at.k, 0, &z0, Some((&z0, None)))?;
        Ok(StageResult {
            latent: z0.clone(),
            x0: z0,
            camap: None,
        })
    }

    /// The previous stage's result decoded, resized to this stage, encoded (z_up) and noised
    /// to the stage's first timestep; with (z_up, ε) when the stage restrains its structure
    /// (z_up is stored for a resume).
    fn enter_from_previous(
        &self,
        at: &StageAt,
        stepper: &Stepper,
        prev: Option<&StageResult>,
        from_predicted_x0: bool,
        filter: ResizeFilter,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (job, k, stage) = (at.job, at.k, at.stage);
        let p = prev.ok_or_else(|| {
            EngineError::Invalid(format!(
                "stage {k} continues a previous stage, but it is the first"
            ))
        })?;
        let source = if from_predicted_x0 { &p.x0 } else { &p.latent };
        let tiling = VaeTiling::for_plan(at.plan);
        let (mut pixels, hw) = self.decode_planes(job, &format!("s{k}"), tiling, source)?;
        // FreCaS clips the decoded prediction to the image range before resizing.
        if from_predicted_x0 {
            for v in pixels.iter_mut() {
                *v = v.clamp(-1.0, 1.0);
            }
        }
        // The upscaled picture is computed tile by tile as the encode asks.
        let (width, height) = (stage.size[1] as usize, stage.size[0] as usize);
        let resized = Resizer::from_planes(pixels, (1, 3), hw, width, height, filter)?;
        let z_up = self.reencode(job, at.seed, at.plan, k, &resized)?;
        drop(resized);
        let eps = at.stage_noise()?;
        let t0 = *stage
            .timesteps
            .first()
            .ok_or_else(|| EngineError::Invalid(format!("stage {k} has no timesteps")))?;
        let z = stepper.add_noise(&z_up, &eps, 0, t0)?;
        if stage.restraint.is_none() {
            return Ok((z, None));
        }
        put_tensor(self.store, &keys::stage(job, k, "zup"), &z_up)?;
        Ok((z, Some((z_up, eps))))
    }

    /// The stage's restrained structure, when its plan has one and its source (z_up, ε)
    /// exists: per-pixel exponents under a mask.
    fn restraint(
        &self,
        at: &StageAt,
        source: Option<(Tensor, Tensor)>,
        mask: Option<&Tensor>,
    ) -> Result<Option<Restraint>> {
        let Some(r) = &at.stage.restraint else {
            return Ok(None);
        };
        let big_t = self.model.scheduler.num_train_timesteps;
        let rule = match (mask, r.cosine_scale_bg) {
            (Some(mask), Some(bg)) => {
                RestrainedStructure::masked(mask, at.stage.latent_hw(), r.cosine_scale, bg, big_t)?
            }
            _ => RestrainedStructure::uniform(r.cosine_scale, big_t),
        };
        Ok(source.map(|(z_up, eps)| Restraint { rule, z_up, eps }))
    }

    /// The denoising loop of a stage from `start`: restrain, scale the input, evaluate the
    /// views, guide, step, checkpoint in the background, report the step's timings.
    ///
    /// Steps overlap at their edge: each step opens the next one before its own results
    /// come in, and its end publishes the next latent's top rows as they are stepped, so the
    /// next step's first tasks (local views at the top of the latent) reach workers the
    /// step's last round leaves idle (`step_input.rs`); a restrained stage's rows are
    /// restrained value by value on the way (`next_input_rule`).
    fn denoise(
        &self,
        at: &StageAt,
        stepper: &Stepper,
        start: StageStart,
        restraint: Option<&Restraint>,
        preview: Option<&PreviewFn>,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<StageResult> {
        let stage = at.stage;
        let steps = stage.timesteps.len();
        let (mut z, camap_in) = (start.z, start.camap_in);
        let mut x0 = z.clone();
        let mut camap_out = None;
        let first = start.first_step;
        // Two tasks per worker: the workers the step's last round leaves idle, and then every
        // worker while the next step's global views are written.
        let head = 2 * self.workers.workers();
        let layouts = (first..steps)
            .map(|j| StepViews::new(stage, &at.step(stepper, j), at.plan.view_batch, head))
            .collect::<Result<Vec<_>>>()?;
        let done = |n| progress(Progress::Views(n));
        let setup = |j: usize| StepSetup {
            store: self.store,
            workers: self.workers,
            plan: at.plan,
            stage,
            views: &layouts[j - first],
            at: at.step(stepper, j),
            camap: camap_in.as_ref(),
            capture: stage.camap_capture && j + 1 == steps,
            done: &done,
        };
        // The local merge's stage-sized buffers, passed from step to step (a step's merge
        // starts when it begins, after the step before has handed them back).
        let mut buffers = MergeBuffers::default();
        std::thread::scope(|scope| -> Result<()> {
            let open = |setup| views::open(scope, setup, StepInput::new(at.shape));
            let mut checkpoints = Background::new(scope);
            let mut next: Option<Flight> = None;
            for j in first..steps {
                let step_start = Instant::now();
                let t = stepper.timestep(j, stage.timesteps[j]);
                if let Some(r) = restraint {
                    z = r.apply(&z, j, t, stepper)?;
                }
                let input = stepper.scale_input(&z, j)?;
                let mut flight = match next.take() {
                    Some(f) => f,
                    None => open(setup(j)),
                };
                flight.begin(&input)?;
                drop(input);
                let mut end = StepEnd::new(&stage.guidance, at.plan.guided, stepper, (j, t), &z);
                if j + 1 < steps {
                    let following = open(setup(j + 1));
                    let t_next = stepper.timestep(j + 1, stage.timesteps[j + 1]);
                    let rule = next_input_rule(stepper, restraint, (j + 1, t_next))?;
                    if let (Some(end), Some(rule)) = (end.as_mut(), rule) {
                        end.publish_to(following.input(), rule, following.head_rows());
                    }
                    next = Some(following);
                }
                let before_views = step_start.elapsed().as_secs_f64();
                // What arrived early is merged now (counted as the merge's time).
                flight.start_merge(end, std::mem::take(&mut buffers))?;
                let mut pred;
                (pred, buffers) = flight.close()?;
                let mut timings = pred.timings;
                timings.guidance += before_views;
                (z, x0) = match pred.stepped.take() {
                    Some(stepped) => stepped,
                    None => {
                        let eps = timed(&mut timings.guidance, || guide(&stage.guidance, &pred))?;
                        timed(&mut timings.scheduler, || stepper.step(&eps, j, t, &z))?
                    }
                };
                let clock = Instant::now();
                if pred.camap.is_some() {
                    camap_out = pred.camap;
                }
                // Only a checkpoint still being written when this one is due waits.
                let end = (j + 1 == steps).then(|| (x0.clone(), camap_out.clone()));
                let (z_saved, x0_now) = (z.clone(), x0.clone());
                checkpoints
                    .start(move || self.save_step(at, j, &z_saved, end, &x0_now, preview))?;
                timings.checkpoint += clock.elapsed().as_secs_f64();
                timings.close_step(step_start, pred.first_handed_out, pred.last_result);
                progress(Progress::Step {
                    stage: at.k,
                    step: j + 1,
                    steps,
                    timestep: t,
                    timings,
                });
            }
            checkpoints.wait()
        })?;
        Ok(StageResult {
            latent: z.to_dtype(DType::F32)?,
            x0,
            camap: camap_out,
        })
    }

    /// Step `j`'s checkpoint (with x0 and the CA-map at the stage's end), the deletion of
    /// its task keys and the preview: what runs beside the next step.
    fn save_step(
        &self,
        at: &StageAt,
        j: usize,
        z: &Tensor,
        end: Option<(Tensor, Option<CaMap>)>,
        x0: &Tensor,
        preview: Option<&PreviewFn>,
    ) -> Result<()> {
        let end = end.as_ref().map(|(x0, m)| (x0, m.as_ref()));
        self.checkpoint(at.job, at.plan, at.k, j + 1, z, end)?;
        self.store
            .delete_prefix(&keys::step_prefix(at.job, at.k, j))?;
        if let Some(preview) = preview {
            preview(x0);
        }
        Ok(())
    }
}

/// Where in the job a stage runs: what its preparation and steps read beside the latent.
struct StageAt<'a> {
    job: &'a str,
    seed: u64,
    plan: &'a Plan,
    k: usize,
    stage: &'a StagePlan,
    /// (1, C, h, w) of the stage's latent.
    shape: (usize, usize, usize, usize),
}

impl StageAt<'_> {
    /// Where step `j` of the stage is.
    fn step(&self, stepper: &Stepper, j: usize) -> StepAt<'_> {
        StepAt {
            job: self.job,
            seed: self.seed,
            stage: self.k,
            step: j,
            timestep: stepper.timestep(j, self.stage.timesteps[j]),
        }
    }

    /// The stage's seeded draw for `purpose`.
    fn noise(&self, purpose: NoisePurpose) -> Result<Tensor> {
        let key = NoiseKey {
            seed: self.seed,
            stage: self.k as u32,
            step: 0,
            purpose,
        };
        Ok(key.normal(self.shape, &Device::Cpu)?)
    }

    /// ε of the stage's entry and of its restrained structure's n_i = add_noise(z_up, ε, t_i).
    fn stage_noise(&self) -> Result<Tensor> {
        self.noise(NoisePurpose::StageNoise)
    }
}

/// Where a stage's steps begin: the latent, the step it is at, the CA-map it reuses and, for
/// the restrained structure, (z_up, ε).
struct StageStart {
    z: Tensor,
    first_step: usize,
    camap_in: Option<CaMap>,
    restraint_source: Option<(Tensor, Tensor)>,
}

/// What a stage's entry leaves: the start of its steps, or (an init image) its whole result.
enum Entry {
    Steps(StageStart),
    Done(StageResult),
}

/// A stage's restrained structure with its source: n_i = add_noise(z_up, ε, t_i).
struct Restraint {
    rule: RestrainedStructure,
    z_up: Tensor,
    eps: Tensor,
}

impl Restraint {
    /// z before the model call of step `j` at `t`: one threaded pass where the rule allows
    /// (it lies on the step's critical path), else the tensor chains — the same bytes.
    fn apply(&self, z: &Tensor, j: usize, t: f64, stepper: &Stepper) -> Result<Tensor> {
        if let Some(noise) = stepper.value_noise(j, t) {
            let halves = (&self.z_up, &self.eps);
            if let Some(out) = self.rule.apply_in_one_pass(z, halves, (j, t), noise)? {
                return Ok(out);
            }
        }
        let noised = || stepper.add_noise(&self.z_up, &self.eps, j, t);
        Ok(self.rule.apply(z, j, t, noised)?)
    }
}

/// How step `j`'s input is made value by value from the latent the step before produces,
/// or `None` where it cannot be (a restraint under a mask, or one whose one-pass form does not
/// apply): that step's first tasks then wait for its whole input.
fn next_input_rule(
    stepper: &Stepper,
    restraint: Option<&Restraint>,
    (j, t): (usize, f64),
) -> Result<Option<InputRule>> {
    let scale = stepper.input_scale(j)?;
    let Some(r) = restraint else {
        return Ok(Some(InputRule {
            scale,
            restraint: None,
        }));
    };
    let rule = stepper
        .value_noise(j, t)
        .and_then(|noise| r.rule.value_restraint((j, t), noise));
    let f32_cpu = |t: &Tensor| with_f32_values(t, |_| ()).is_some();
    Ok(match rule {
        Some(rule) if f32_cpu(&r.z_up) && f32_cpu(&r.eps) && r.z_up.dims() == r.eps.dims() => {
            Some(InputRule {
                scale,
                restraint: Some((rule, r.z_up.clone(), r.eps.clone())),
            })
        }
        _ => None,
    })
}

/// The guided prediction: CFG or FA-CFG of the merged predictions as the plan says, the
/// conditional one alone when unguided.
fn guide(plan: &GuidancePlan, pred: &Predictions) -> Result<Tensor> {
    guide_halves(plan, &pred.cond, pred.uncond.as_ref())
}

/// [`guide`] of the halves `cond` and `uncond` (also of a band of rows of them: CFG is value
/// by value).
fn guide_halves(plan: &GuidancePlan, cond: &Tensor, uncond: Option<&Tensor>) -> Result<Tensor> {
    Ok(match (plan, uncond) {
        (GuidancePlan::Cfg { scale }, Some(u)) => guidance::classifier_free(u, cond, *scale)?,
        (
            GuidancePlan::FaCfg {
                high,
                low,
                low_latent,
            },
            Some(u),
        ) => fa_cfg(
            u,
            cond,
            (low_latent[0], low_latent[1]),
            FaCfgWeights {
                high: *high,
                low: *low,
            },
        )?,
        _ => cond.clone(),
    })
}

/// Runs `f`, adding its seconds to `seconds`.
fn timed<T>(seconds: &mut f64, f: impl FnOnce() -> T) -> T {
    let clock = Instant::now();
    let out = f();
    *seconds += clock.elapsed().as_secs_f64();
    out
}

/// Work run on a thread of its own, one at a time: each step's checkpoint (and the deletion
/// of the step's task keys) is written while the next step's tasks run; the next checkpoint
/// waits for it, so they still land in order, and the stage does not end before its last one
/// has.
struct Background<'scope, 'env> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    pending: Option<std::thread::ScopedJoinHandle<'scope, Result<()>>>,
}

impl<'scope, 'env> Background<'scope, 'env> {
    fn new(scope: &'scope std::thread::Scope<'scope, 'env>) -> Self {
        Self {
            scope,
            pending: None,
        }
    }

    /// Waits for the work in progress, if any.
    fn wait(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            None => Ok(()),
        }
    }

    /// Starts `work` once the previous work is done.
    fn start(&mut self, work: impl FnOnce() -> Result<()> + Send + 'scope) -> Result<()> {
        self.wait()?;
        self.pending = Some(self.scope.spawn(work));
        Ok(())
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

    fn predictions(cond: &[f32], uncond: Option<&[f32]>) -> Result<Predictions> {
        let t = |v: &[f32]| Tensor::from_slice(v, (1, 1, 1, v.len()), &Device::Cpu);
        Ok(Predictions {
            cond: t(cond)?,
            uncond: uncond.map(t).transpose()?,
            stepped: None,
            camap: None,
            timings: StepTimings::default(),
            first_handed_out: None,
            last_result: None,
        })
    }

    /// The restrained structure in one pass gives the tensor chains' bytes for every
    /// scheduler's noising (DDIM, Euler, flow matching, FreCaS' DDIM), on a latent large
    /// enough to be threaded with a +0 and a −0 in it; step 0 and a map of exponents take the
    /// chains.
    #[test]
    fn restraint_in_one_pass_matches_the_chains_bit_for_bit() -> Result<()> {
        use tessera_core::plan::StageSchedule;
        use tessera_core::sched::SchedulerKind;
        let dev = Device::Cpu;
        let shape = (1, 4, 97, 211);
        let mut zv = Tensor::randn(0f32, 1.0, shape, &dev)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        (zv[0], zv[1]) = (0.0, -0.0);
        let z = Tensor::from_vec(zv, shape, &dev)?;
        let restraint = Restraint {
            rule: RestrainedStructure::uniform(1.5, 1000),
            z_up: Tensor::randn(0f32, 1.0, shape, &dev)?,
            eps: Tensor::randn(0f32, 1.0, shape, &dev)?,
        };
        let schedule = |scheduler| StageSchedule::Schedule {
            scheduler,
            steps: 10,
            start: 2,
            mu: None,
        };
        let frecas = StageSchedule::Frecas {
            inference_steps: 10,
        };
        let (ddim, euler, flow) = (
            SchedulerKind::Ddim,
            SchedulerKind::Euler,
            SchedulerKind::FlowEuler,
        );
        let steppers = [
            step_end::test_stepper_of(ddim, "epsilon", false, &schedule(ddim)),
            step_end::test_stepper_of(euler, "epsilon", false, &schedule(euler)),
            step_end::test_stepper_of(flow, "", false, &schedule(flow)),
            step_end::test_stepper_of(ddim, "epsilon", false, &frecas),
        ];
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.into_iter().map(f32::to_bits).collect())
        };
        for (k, stepper) in steppers.iter().enumerate() {
            for j in [1, 4] {
                let t = match k {
                    3 => 799.0,
                    _ => stepper.timestep(j, stepper.scheduler().timesteps()[2 + j]),
                };
                let noised = || stepper.add_noise(&restraint.z_up, &restraint.eps, j, t);
                let chain = restraint.rule.apply(&z, j, t, noised)?;
                let noise = stepper.value_noise(j, t).expect("a noising");
                let halves = (&restraint.z_up, &restraint.eps);
                let one = restraint
                    .rule
                    .apply_in_one_pass(&z, halves, (j, t), noise)?;
                assert_eq!(
                    bits(&one.expect("one pass"))?,
                    bits(&chain)?,
                    "stepper {k}, step {j}"
                );
                assert_eq!(bits(&restraint.apply(&z, j, t, stepper)?)?, bits(&chain)?);
            }
        }
        let noise = steppers[0].value_noise(1, 999.0).expect("a noising");
        let halves = (&restraint.z_up, &restraint.eps);
        let first = restraint
            .rule
            .apply_in_one_pass(&z, halves, (0, 999.0), noise)?;
        assert!(first.is_none());
        Ok(())
    }

    #[test]
    fn guidance_follows_the_plan_and_falls_back_to_the_conditional_prediction() -> Result<()> {
        let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let guided = predictions(&[1.0, 3.0], Some(&[0.0, 1.0]))?;
        let cfg = GuidancePlan::Cfg { scale: 2.0 };
        assert_eq!(flat(guide(&cfg, &guided)?)?, vec![2.0, 5.0]);
        let want = guidance::classifier_free(guided.uncond.as_ref().unwrap(), &guided.cond, 2.0)?;
        assert_eq!(flat(guide(&cfg, &guided)?)?, flat(want)?);
        assert_eq!(flat(guide(&GuidancePlan::None, &guided)?)?, vec![1.0, 3.0]);
        let unguided = predictions(&[1.0, 3.0], None)?;
        assert_eq!(flat(guide(&cfg, &unguided)?)?, vec![1.0, 3.0]);
        Ok(())
    }

    #[test]
    fn a_steps_critical_path_is_its_head_and_tail_around_the_tasks() {
        let start = Instant::now();
        let first = start + std::time::Duration::from_millis(5);
        let last = first + std::time::Duration::from_millis(20);
        while Instant::now() < last + std::time::Duration::from_millis(3) {
            std::thread::yield_now();
        }
        let mut t = StepTimings::default();
        t.close_step(start, Some(first), Some(last));
        // The 20 ms between the first task out and the last result in are the workers'.
        assert!(t.wall >= 0.028, "{t:?}");
        assert!((t.wall - t.critical - 0.020).abs() < 1e-9, "{t:?}");
        let mut whole = StepTimings::default();
        whole.close_step(start, None, None);
        assert_eq!(whole.critical, whole.wall);
    }

    #[test]
    fn background_work_runs_one_at_a_time_in_order_and_reports_its_error() {
        let log = std::sync::Mutex::new(Vec::new());
        let out = std::thread::scope(|scope| -> Result<()> {
            let mut bg = Background::new(scope);
            for i in 0..3 {
                let log = &log;
                bg.start(move || {
                    log.lock().unwrap().push(i);
                    Ok(())
                })?;
            }
            bg.start(|| Err(EngineError::Invalid("disk full".into())))?;
            bg.wait()
        });
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 2]);
        assert!(matches!(out, Err(EngineError::Invalid(m)) if m == "disk full"));
    }
}
