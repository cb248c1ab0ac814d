//! The stepping rule of one planned stage ([`StageSchedule`]): which scheduler it builds, which
//! of its steps a stage step is, how the model input is scaled, how a step and the stage
//! entry's noising are computed. The engine runs every stage through this one type.

use candle_core::{Result as TensorResult, Tensor};

use super::{
    InputScale, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, ValueNoise, ValueStep,
};
use crate::plan::StageSchedule;

/// A stage's scheduler and how the stage walks it.
#[derive(Debug, Clone)]
pub struct StageStepper {
    scheduler: Scheduler,
    schedule: StageSchedule,
}

impl StageStepper {
    pub fn new(schedule: &StageSchedule, cfg: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let scheduler = match schedule {
            StageSchedule::Schedule {
                scheduler: SchedulerKind::FlowEuler,
                steps,
                mu,
                ..
            } => Scheduler::flow(cfg, *steps, *mu)?,
            StageSchedule::Schedule {
                scheduler, steps, ..
            } => Scheduler::new(*scheduler, cfg, *steps)?,
            StageSchedule::Frecas { inference_steps } => {
                Scheduler::new(SchedulerKind::Ddim, cfg, *inference_steps)?
            }
            StageSchedule::FrecasFlow { indices, mu } => {
                if indices.is_empty() {
                    return Err(SchedulerError::Invalid(
                        "a FreCaS stage has no steps".into(),
                    ));
                }
                Scheduler::flow(cfg, cfg.num_train_timesteps, *mu)?
            }
        };
        Ok(Self {
            scheduler,
            schedule: schedule.clone(),
        })
    }

    /// The scheduler behind the stage.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Index into the scheduler's own schedule of the stage's step `j`.
    fn index(&self, j: usize) -> usize {
        match &self.schedule {
            StageSchedule::Schedule { start, .. } => start + j,
            StageSchedule::Frecas { .. } => j,
            StageSchedule::FrecasFlow { indices, .. } => {
                indices.get(j).copied().unwrap_or(usize::MAX)
            }
        }
    }

    /// The model input of step `j` (Euler divides by √(σ² + 1); DDIM and flow matching pass
    /// the latent on).
    pub fn scale_input(&self, z: &Tensor, j: usize) -> TensorResult<Tensor> {
        match &self.schedule {
            StageSchedule::Schedule { .. } => self.scheduler.scale_model_input(z, self.index(j)),
            StageSchedule::Frecas { .. } | StageSchedule::FrecasFlow { .. } => Ok(z.clone()),
        }
    }

    /// [`Self::scale_input`] as arithmetic on one value.
    pub fn input_scale(&self, j: usize) -> TensorResult<InputScale> {
        match &self.schedule {
            StageSchedule::Schedule { .. } => self.scheduler.input_scale(self.index(j)),
            StageSchedule::Frecas { .. } | StageSchedule::FrecasFlow { .. } => {
                Ok(InputScale::Identity)
            }
        }
    }

    /// Step `j` at timestep `t`: (next latent, predicted clean latent).
    pub fn step(
        &self,
        eps: &Tensor,
        j: usize,
        t: f64,
        z: &Tensor,
    ) -> TensorResult<(Tensor, Tensor)> {
        let out = match &self.schedule {
            StageSchedule::Schedule { .. } => self.scheduler.step(eps, self.index(j), z)?,
            StageSchedule::Frecas { .. } => self.scheduler.ddim_step_from(eps, t, z)?,
            StageSchedule::FrecasFlow { indices, .. } => {
                // The reference's modified scheduler steps from σ[indexs[i]] to
                // σ[indexs[i + 1]]. For a stage's last step it appends `indexs[-2] + 1`, which
                // at the end of the final stage would re-noise the picture to σ of the
                // second-to-last entry plus one; we step to the entry after the last instead
                // (σ = 0 when the stage ends at 0). Earlier stages hand on x̂₀, which does not
                // depend on the step's target.
                let from = self.index(j);
                let to = indices.get(j + 1).copied().unwrap_or(from + 1);
                self.scheduler.flow_step(eps, from, to, z)?
            }
        };
        Ok((out.prev_sample, out.pred_original_sample))
    }

    /// [`Self::step`] as arithmetic on one value of an f32 latent, or `None` where the step
    /// is not value by value (DDIM clipping x̂₀).
    pub fn value_step(&self, j: usize, t: f64) -> Option<ValueStep> {
        match &self.schedule {
            StageSchedule::Schedule { .. } => self.scheduler.value_step(self.index(j)),
            StageSchedule::Frecas { .. } => self.scheduler.ddim_value_step_from(t),
            StageSchedule::FrecasFlow { indices, .. } => {
                // As in `step`: to the next entry, or the one after the last.
                let from = self.index(j);
                let to = indices.get(j + 1).copied().unwrap_or(from + 1);
                self.scheduler.flow_value_step(from, to)
            }
        }
    }

    /// The timestep of the stage's step `j`, `planned` as the plan lists it. A flow-matching
    /// schedule's own value is taken: its fractional timesteps may lose their last bit on a
    /// trip through the plan's JSON, and the steps must be the same bytes embedded and on a
    /// cluster.
    pub fn timestep(&self, j: usize, planned: f64) -> f64 {
        match self.scheduler.kind() {
            SchedulerKind::FlowEuler => self
                .scheduler
                .timesteps()
                .get(self.index(j))
                .copied()
                .unwrap_or(planned),
            _ => planned,
        }
    }

    /// A clean latent noised to the timestep `t` of the stage's step `j` (the stage's entry,
    /// FreeScale's restrained structure): `add_noise`, or flow matching's `scale_noise` with
    /// the σ of that step.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        j: usize,
        t: f64,
    ) -> TensorResult<Tensor> {
        match self.scheduler.kind() {
            SchedulerKind::FlowEuler => {
                self.scheduler
                    .scale_noise_at(original, noise, self.index(j))
            }
            _ => self.scheduler.add_noise(original, noise, t),
        }
    }

    /// [`Self::add_noise`] as arithmetic on one value of an f32 latent, or `None` where the
    /// step's timestep cannot be noised to.
    pub fn value_noise(&self, j: usize, t: f64) -> Option<ValueNoise> {
        match self.scheduler.kind() {
            SchedulerKind::FlowEuler => self.scheduler.flow_value_noise_at(self.index(j)),
            _ => self.scheduler.value_noise(t),
        }
    }

    /// What the initial noise is scaled by.
    pub fn init_noise_sigma(&self) -> f64 {
        self.scheduler.init_noise_sigma()
    }
}
