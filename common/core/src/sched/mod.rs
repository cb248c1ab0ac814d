//! DDIM, Euler discrete and flow-matching Euler schedulers, matching diffusers step for step. A `Scheduler` is one
//! sampling schedule (kind, config, number of steps); `step` is a pure function of
//! (model output, step index, sample), with no hidden counter, so a resumed or re-run step
//! computes exactly what it computed the first time.

mod config;
mod ddim;
mod euler;
mod flow;
pub(crate) mod fused;
mod stage;
mod value;

pub use config::{SchedulerConfig, TimestepSpacing};
pub use flow::dynamic_mu;
pub use stage::StageStepper;
pub use value::{InputScale, ValueNoise, ValueStep};

use candle_core::{DType, Result as TensorResult, Tensor};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("scheduler config: {0}")]
    Config(String),
    #[error("unsupported scheduler setting: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    Ddim,
    Euler,
    /// Flow-matching Euler (SD3's `FlowMatchEulerDiscreteScheduler`).
    #[serde(rename = "flow_euler")]
    FlowEuler,
}

impl std::str::FromStr for SchedulerKind {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self, SchedulerError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ddim" => Ok(Self::Ddim),
            "euler" => Ok(Self::Euler),
            "flow-euler" | "flow_euler" => Ok(Self::FlowEuler),
            other => Err(SchedulerError::Invalid(format!(
                "scheduler {other:?} is not known: use ddim or euler (flow-matching models \
                 step with flow-matching Euler, --scheduler euler)"
            ))),
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::FlowEuler => "flow-euler",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

#[derive(Debug, Clone)]
pub struct StepOutput {
    pub prev_sample: Tensor,
    pub pred_original_sample: Tensor,
}

#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    prediction: PredictionType,
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    /// DDIM: ᾱ used after the last step. Euler: unused.
    final_alpha_cumprod: f64,
    clip_sample: Option<f64>,
    /// Euler and flow-matching Euler: σ per step plus a final 0. DDIM: empty.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

impl Scheduler {
    pub fn new(
        kind: SchedulerKind,
        cfg: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        cfg.check_supported(kind)?;
        let n_train = cfg.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n_train {
            return Err(SchedulerError::Invalid(format!(
                "{num_inference_steps} steps: use 1 to {n_train} (the model's training timesteps)"
            )));
        }
        let alphas_cumprod = cfg.alphas_cumprod()?;
        let spacing = cfg.spacing()?;
        let mut s = Scheduler {
            kind,
            prediction: cfg.prediction()?,
            num_train_timesteps: n_train,
            final_alpha_cumprod: if cfg.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            clip_sample: cfg.clip_sample.then_some(cfg.clip_sample_range),
            alphas_cumprod,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            init_noise_sigma: 1.0,
        };
        match kind {
            SchedulerKind::Ddim => {
                let timesteps =
                    ddim::timesteps(spacing, n_train, num_inference_steps, cfg.steps_offset);
                // diffusers would fail with an index error at the first step; say why now.
                if let Some(t) = timesteps.iter().find(|&&t| t >= n_train as f64) {
                    return Err(SchedulerError::Invalid(format!(
                        "DDIM timestep {t} (steps_offset {} with {num_inference_steps} steps) \
                         is past the model's {n_train} training timesteps",
                        cfg.steps_offset
                    )));
                }
                s.timesteps = timesteps;
            }
            SchedulerKind::FlowEuler => return Self::flow(cfg, num_inference_steps, None),
            SchedulerKind::Euler => {
                let (timesteps, sigmas) = euler::schedule(
                    spacing,
                    n_train,
                    num_inference_steps,
                    cfg.steps_offset,
                    &s.alphas_cumprod,
                );
                // diffusers' `init_noise_sigma`: max σ (in f32) for linspace/trailing, and
                // √(σ_max² + 1) for leading, whose first timestep is below the top of the schedule.
                let max_sigma = sigmas.iter().copied().fold(0.0f64, f64::max);
                s.init_noise_sigma = match spacing {
                    TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
                    TimestepSpacing::Leading => {
                        f64::from((max_sigma * max_sigma + 1.0).sqrt() as f32)
                    }
                };
                s.timesteps = timesteps;
                s.sigmas = sigmas;
            }
        }
        Ok(s)
    }

    /// A flow-matching Euler schedule of `num_inference_steps` steps; `mu` is the shift of a
    /// config with `use_dynamic_shifting` (see [`dynamic_mu`]).
    pub fn flow(
        cfg: &SchedulerConfig,
        num_inference_steps: usize,
        mu: Option<f64>,
    ) -> Result<Self, SchedulerError> {
        cfg.check_supported(SchedulerKind::FlowEuler)?;
        let n_train = cfg.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n_train {
            return Err(SchedulerError::Invalid(format!(
                "{num_inference_steps} steps: use 1 to {n_train} (the model's training timesteps)"
            )));
        }
        let (timesteps, sigmas) = flow::schedule(cfg, num_inference_steps, mu)?;
        Ok(Scheduler {
            kind: SchedulerKind::FlowEuler,
            // Unused by flow matching: x₀ comes from the velocity.
            prediction: PredictionType::Epsilon,
            num_train_timesteps: n_train,
            alphas_cumprod: Vec::new(),
            timesteps,
            final_alpha_cumprod: 1.0,
            clip_sample: None,
            sigmas,
            init_noise_sigma: 1.0,
        })
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The timesteps the model is evaluated at, in order.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    /// σ per step (plus the final 0) of Euler and flow matching; empty for DDIM.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The model input for step `step_index`: Euler divides by sqrt(σ² + 1), DDIM passes it on.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> TensorResult<Tensor> {
        let scale = self.input_scale(step_index)?;
        if scale == InputScale::Identity {
            return Ok(sample.clone());
        }
        // One threaded pass of the value arithmetic; candle's division where it cannot.
        match fused::map(sample, |v| scale.apply(v))? {
            Some(scaled) => Ok(scaled),
            None => sample / self.input_divisor(step_index)?,
        }
    }

    /// [`Self::scale_model_input`] as arithmetic on one value.
    pub fn input_scale(&self, step_index: usize) -> TensorResult<InputScale> {
        if step_index >= self.timesteps.len() {
            return Err(candle_core::Error::Msg(format!(
                "step index {step_index} outside the schedule of {} steps",
                self.timesteps.len()
            )));
        }
        Ok(match self.kind {
            SchedulerKind::Ddim | SchedulerKind::FlowEuler => InputScale::Identity,
            // candle divides by a scalar as `v·(1/d) + 0`.
            SchedulerKind::Euler => {
                InputScale::Times((1.0 / self.input_divisor(step_index)?) as f32)
            }
        })
    }

    /// Euler's √(σ² + 1) at `step_index`.
    fn input_divisor(&self, step_index: usize) -> TensorResult<f64> {
        let sigma = self.sigma_at(step_index)?;
        Ok((sigma * sigma + 1.0).sqrt())
    }

    /// One denoising step at `step_index` of the schedule (η = 0 for DDIM, no churn for
    /// Euler). Both outputs have the sample's dtype; `model_output` is converted to it. Euler
    /// works in f32 when the sample is f16/bf16, as diffusers upcasts before its step.
    pub fn step(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> TensorResult<StepOutput> {
        let t = *self.timesteps.get(step_index).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "step index {step_index} outside the schedule of {} steps",
                self.timesteps.len()
            ))
        })?;
        let out_dtype = sample.dtype();
        match self.kind {
            SchedulerKind::Ddim => self.ddim_step_from(model_output, t, sample),
            SchedulerKind::FlowEuler => {
                self.flow_step(model_output, step_index, step_index + 1, sample)
            }
            SchedulerKind::Euler => {
                let work = match out_dtype {
                    DType::F16 | DType::BF16 => DType::F32,
                    other => other,
                };
                let out = euler::step(
                    self.prediction,
                    &model_output.to_dtype(work)?,
                    &sample.to_dtype(work)?,
                    self.sigma_at(step_index)?,
                    self.sigma_at(step_index + 1)?,
                )?;
                Ok(StepOutput {
                    prev_sample: out.prev_sample.to_dtype(out_dtype)?,
                    pred_original_sample: out.pred_original_sample.to_dtype(out_dtype)?,
                })
            }
        }
    }

    /// A flow-matching Euler step from σ of step `from` to σ of step `to` of the schedule
    /// (`to` = the step count is the final σ = 0), in f32 as diffusers upcasts; FreCaS steps
    /// between entries of the 1000-step schedule this way.
    pub fn flow_step(
        &self,
        model_output: &Tensor,
        from: usize,
        to: usize,
        sample: &Tensor,
    ) -> TensorResult<StepOutput> {
        if self.kind != SchedulerKind::FlowEuler {
            return Err(candle_core::Error::Msg(
                "flow_step needs a flow-matching scheduler".into(),
            ));
        }
        let out_dtype = sample.dtype();
        let out = flow::step(
            &model_output.to_dtype(DType::F32)?,
            &sample.to_dtype(DType::F32)?,
            self.sigma_at(from)?,
            self.sigma_at(to)?,
        )?;
        Ok(StepOutput {
            prev_sample: out.prev_sample.to_dtype(out_dtype)?,
            pred_original_sample: out.pred_original_sample.to_dtype(out_dtype)?,
        })
    }

    /// A DDIM step from any training timestep `t`, back by the schedule's nominal ratio
    /// `num_train_timesteps / num_inference_steps`, as diffusers' `DDIMScheduler.step` does
    /// (not to the next timestep of the schedule: they differ for linspace spacing); below 0
    /// it uses the final ᾱ. FreCaS evaluates timesteps off the schedule's grid this way.
    pub fn ddim_step_from(
        &self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
    ) -> TensorResult<StepOutput> {
        if self.kind != SchedulerKind::Ddim {
            return Err(candle_core::Error::Msg(
                "ddim_step_from needs a DDIM scheduler".into(),
            ));
        }
        let (alpha_t, alpha_prev) = self.ddim_alphas_from(t)?;
        ddim::step(
            self.prediction,
            &model_output.to_dtype(sample.dtype())?,
            sample,
            alpha_t,
            alpha_prev,
            self.clip_sample,
        )
    }

    /// Noises a clean sample to `timestep`, as the scheduler's `add_noise` does: DDIM uses
    /// √ᾱ·x + √(1−ᾱ)·n at that (integer) training timestep; Euler x + σ·n and flow matching
    /// σ·n + (1 − σ)·x (`scale_noise`) with the σ of the schedule's step at that timestep (it
    /// must be one of the schedule's timesteps).
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timestep: f64,
    ) -> TensorResult<Tensor> {
        let noise = noise.to_dtype(original.dtype())?;
        match self.kind {
            SchedulerKind::Ddim => {
                let a = self.alpha_at(timestep)?;
                (original * a.sqrt())? + (noise * (1.0 - a).sqrt())?
            }
            SchedulerKind::Euler | SchedulerKind::FlowEuler => {
                let index = self.step_index_of(timestep).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "timestep {timestep} is not in this {} schedule {:?}",
                        self.kind, self.timesteps
                    ))
                })?;
                let sigma = self.sigma_at(index)?;
                match self.kind {
                    // Flow matching's `scale_noise`.
                    SchedulerKind::FlowEuler => flow::scale_noise(original, &noise, sigma),
                    _ => original + (noise * sigma)?,
                }
            }
        }
    }

    /// Flow matching's `scale_noise` with the σ of step `index` of the schedule.
    pub fn scale_noise_at(
        &self,
        original: &Tensor,
        noise: &Tensor,
        index: usize,
    ) -> TensorResult<Tensor> {
        let noise = noise.to_dtype(original.dtype())?;
        flow::scale_noise(original, &noise, self.sigma_at(index)?)
    }

    /// [`Self::add_noise`] at `timestep` as arithmetic on one value (for f32 latents), or
    /// `None` where `timestep` is not one the scheduler can noise to.
    pub fn value_noise(&self, timestep: f64) -> Option<ValueNoise> {
        match self.kind {
            SchedulerKind::Ddim => Some(ValueNoise::ddim(self.alpha_at(timestep).ok()?)),
            SchedulerKind::Euler | SchedulerKind::FlowEuler => {
                let sigma = self.sigma_at(self.step_index_of(timestep)?).ok()?;
                Some(match self.kind {
                    SchedulerKind::FlowEuler => ValueNoise::flow(sigma),
                    _ => ValueNoise::euler(sigma),
                })
            }
        }
    }

    /// [`Self::scale_noise_at`] as arithmetic on one value (see [`Self::value_noise`]).
    pub fn flow_value_noise_at(&self, index: usize) -> Option<ValueNoise> {
        Some(ValueNoise::flow(self.sigma_at(index).ok()?))
    }

    /// The step of the schedule evaluated at `timestep`, found as diffusers'
    /// `index_for_timestep` finds it: the second of two equal timesteps, else the only one.
    pub fn step_index_of(&self, timestep: f64) -> Option<usize> {
        let mut hits = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == timestep)
            .map(|(i, _)| i);
        let first = hits.next()?;
        Some(hits.next().unwrap_or(first))
    }

    /// ᾱ_t and ᾱ_prev of [`Self::ddim_step_from`] at `t`.
    fn ddim_alphas_from(&self, t: f64) -> TensorResult<(f64, f64)> {
        let prev_t = t as i64 - (self.num_train_timesteps / self.timesteps.len()) as i64;
        let alpha_t = self.alpha_at(t)?;
        let alpha_prev = if prev_t >= 0 {
            self.alpha_at(prev_t as f64)?
        } else {
            self.final_alpha_cumprod
        };
        Ok((alpha_t, alpha_prev))
    }

    /// [`Self::step`] at `step_index` as arithmetic on one value (for f32 samples), or `None`
    /// where the step is not value by value here (DDIM clipping its x̂₀) or the index is
    /// outside the schedule.
    pub fn value_step(&self, step_index: usize) -> Option<ValueStep> {
        let t = *self.timesteps.get(step_index)?;
        match self.kind {
            SchedulerKind::Ddim => self.ddim_value_step_from(t),
            SchedulerKind::FlowEuler => self.flow_value_step(step_index, step_index + 1),
            SchedulerKind::Euler => {
                let sigma = self.sigma_at(step_index).ok()?;
                let next = self.sigma_at(step_index + 1).ok()?;
                Some(ValueStep::euler(self.prediction, sigma, next))
            }
        }
    }

    /// [`Self::ddim_step_from`] as arithmetic on one value (see [`Self::value_step`]).
    pub fn ddim_value_step_from(&self, t: f64) -> Option<ValueStep> {
        if self.kind != SchedulerKind::Ddim || self.clip_sample.is_some() {
            return None;
        }
        let (alpha_t, alpha_prev) = self.ddim_alphas_from(t).ok()?;
        Some(ValueStep::ddim(self.prediction, alpha_t, alpha_prev))
    }

    /// [`Self::flow_step`] as arithmetic on one value (see [`Self::value_step`]).
    pub fn flow_value_step(&self, from: usize, to: usize) -> Option<ValueStep> {
        if self.kind != SchedulerKind::FlowEuler {
            return None;
        }
        Some(ValueStep::flow(
            self.sigma_at(from).ok()?,
            self.sigma_at(to).ok()?,
        ))
    }

    /// ᾱ at an integer training timestep.
    fn alpha_at(&self, timestep: f64) -> TensorResult<f64> {
        if timestep.fract() != 0.0 || timestep < 0.0 {
            return Err(candle_core::Error::Msg(format!(
                "timestep {timestep} is not a training timestep (0..{})",
                self.alphas_cumprod.len()
            )));
        }
        self.alphas_cumprod
            .get(timestep as usize)
            .copied()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "timestep {timestep} outside 0..{}",
                    self.alphas_cumprod.len()
                ))
            })
    }

    fn sigma_at(&self, step_index: usize) -> TensorResult<f64> {
        self.sigmas.get(step_index).copied().ok_or_else(|| {
            candle_core::Error::Msg(format!("step index {step_index} outside the schedule"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl_config(kind: &str, pred: &str, spacing: &str) -> SchedulerConfig {
        SchedulerConfig::from_json(
            format!(
                r#"{{"_class_name": "{kind}", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "{pred}",
                "timestep_spacing": "{spacing}", "steps_offset": 1, "set_alpha_to_one": false,
                "clip_sample": false}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    /// The value-by-value input scaling is what the whole-latent one gives, bit for bit.
    #[test]
    fn input_scale_is_scale_model_input_value_by_value() {
        let cfg = sdxl_config("EulerDiscreteScheduler", "epsilon", "leading");
        let sample = Tensor::randn(0f32, 3.0, (1, 4, 9, 7), &candle_core::Device::Cpu).unwrap();
        let values = sample.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for kind in [SchedulerKind::Euler, SchedulerKind::Ddim] {
            let s = Scheduler::new(kind, &cfg, 10).unwrap();
            for i in [0, 4, 9] {
                let whole = s.scale_model_input(&sample, i).unwrap();
                let whole = whole.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let scale = s.input_scale(i).unwrap();
                assert_eq!(kind == SchedulerKind::Euler, scale != InputScale::Identity);
                for (w, &v) in whole.iter().zip(&values) {
                    assert_eq!(w.to_bits(), scale.apply(v).to_bits());
                }
            }
            assert!(s.input_scale(10).is_err());
        }
    }

    #[test]
    fn leading_timesteps_with_offset() {
        let cfg = sdxl_config("EulerDiscreteScheduler", "epsilon", "leading");
        let s = Scheduler::new(SchedulerKind::Euler, &cfg, 10).unwrap();
        assert_eq!(
            s.timesteps(),
            &[901., 801., 701., 601., 501., 401., 301., 201., 101., 1.]
        );
        assert_eq!(s.sigmas().len(), 11);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
        let d = Scheduler::new(SchedulerKind::Ddim, &cfg, 10).unwrap();
        assert_eq!(d.timesteps(), s.timesteps());
        assert_eq!(d.init_noise_sigma(), 1.0);
    }

    /// Values printed by diffusers 0.42.1 for step counts that do not divide 1000: half-way
    /// `linspace` points (DDIM rounds 499.5 to 500 and 832.5 to 832, half to even; Euler keeps
    /// them and interpolates σ), and `trailing`'s fractional stride.
    #[test]
    fn odd_step_counts_match_diffusers() {
        type Case = (
            usize,
            &'static str,
            &'static [f64],
            &'static [f64],
            &'static [f64],
        );
        let cases: [Case; 4] = [
            (
                3,
                "linspace",
                &[999., 500., 0.],
                &[999., 499.5, 0.],
                &[
                    14.614646911621094,
                    1.6155834197998047,
                    0.02916753478348255,
                    0.,
                ],
            ),
            (
                3,
                "trailing",
                &[999., 666., 332.],
                &[999., 666., 332.],
                &[
                    14.614646911621094,
                    2.9183084964752197,
                    0.9292148947715759,
                    0.,
                ],
            ),
            (
                7,
                "leading",
                &[853., 711., 569., 427., 285., 143., 1.],
                &[853., 711., 569., 427., 285., 143., 1.],
                &[
                    6.570651531219482,
                    3.4854564666748047,
                    2.0473127365112305,
                    1.2720634937286377,
                    0.7900615334510803,
                    0.4403095841407776,
                    0.04131447896361351,
                    0.,
                ],
            ),
            (
                7,
                "linspace",
                &[999., 832., 666., 500., 333., 166., 0.],
                &[999., 832.5, 666., 499.5, 333., 166.5, 0.],
                &[
                    14.614646911621094,
                    5.948918342590332,
                    2.9183084964752197,
                    1.6155834197998047,
                    0.9323583841323853,
                    0.49355348944664,
                    0.02916753478348255,
                    0.,
                ],
            ),
        ];
        for (n, spacing, ddim_ts, euler_ts, sigmas) in cases {
            let cfg = sdxl_config("DDIMScheduler", "epsilon", spacing);
            let d = Scheduler::new(SchedulerKind::Ddim, &cfg, n).unwrap();
            assert_eq!(d.timesteps(), ddim_ts, "ddim {n} {spacing}");
            let e = Scheduler::new(SchedulerKind::Euler, &cfg, n).unwrap();
            assert_eq!(e.timesteps(), euler_ts, "euler {n} {spacing}");
            for (ours, theirs) in e.sigmas().iter().zip(sigmas) {
                let err = if *theirs == 0.0 {
                    ours.abs()
                } else {
                    (ours / theirs - 1.0).abs()
                };
                assert!(err < 1e-6, "euler {n} {spacing}: σ {ours} vs {theirs}");
            }
        }
    }

    /// At an integer timestep Euler's σ is √((1 − ᾱ_t)/ᾱ_t) of the training schedule.
    #[test]
    fn euler_sigma_at_an_integer_timestep() {
        let cfg = sdxl_config("EulerDiscreteScheduler", "epsilon", "leading");
        let s = Scheduler::new(SchedulerKind::Euler, &cfg, 10).unwrap();
        let a = s.alphas_cumprod()[901];
        let expected = ((1.0 - a) / a).sqrt();
        assert!((s.sigmas()[0] / expected - 1.0).abs() < 1e-6);
        assert!((s.init_noise_sigma() / (expected * expected + 1.0).sqrt() - 1.0).abs() < 1e-6);
        assert_eq!(s.step_index_of(901.0), Some(0));
        assert_eq!(s.step_index_of(900.0), None);
    }

    #[test]
    fn outputs_keep_the_sample_dtype_and_bad_indices_are_errors() -> TensorResult<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[0.5f32, -1.0], &dev)?.to_dtype(DType::F16)?;
        let e = Tensor::new(&[0.1f32, 0.2], &dev)?;
        for class in ["EulerDiscreteScheduler", "DDIMScheduler"] {
            let cfg = sdxl_config(class, "v_prediction", "trailing");
            let s = Scheduler::new(cfg.kind().unwrap(), &cfg, 4).unwrap();
            let out = s.step(&e, 3, &x)?;
            assert_eq!(out.prev_sample.dtype(), DType::F16);
            assert_eq!(out.pred_original_sample.dtype(), DType::F16);
            assert!(s.step(&e, 4, &x).is_err());
            assert!(s.scale_model_input(&x, 4).is_err());
            assert!(s.add_noise(&x, &e, 998.5).is_err());
            assert!(s.add_noise(&x, &e, 999.0).is_ok());
        }
        Ok(())
    }

    /// Euler's input scaling in one threaded pass gives the tensor division's bytes, at every
    /// step of the schedule (±0 among the values).
    #[test]
    fn euler_input_scaling_matches_the_tensor_division_bit_for_bit() -> TensorResult<()> {
        let dev = candle_core::Device::Cpu;
        let cfg = sdxl_config("EulerDiscreteScheduler", "epsilon", "leading");
        let s = Scheduler::new(SchedulerKind::Euler, &cfg, 10).unwrap();
        let mut v = Tensor::randn(0f32, 14.0, 3 * (1 << 16) + 3, &dev)?.to_vec1::<f32>()?;
        (v[0], v[1]) = (0.0, -0.0);
        let x = Tensor::new(v, &dev)?;
        let bits = |t: &Tensor| -> TensorResult<Vec<u32>> {
            Ok(t.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
        };
        for j in 0..10 {
            let sigma = s.sigmas()[j];
            let chain = (&x / (sigma * sigma + 1.0).sqrt())?;
            assert_eq!(
                bits(&s.scale_model_input(&x, j)?)?,
                bits(&chain)?,
                "step {j}"
            );
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_does_not_reproduce() {
        let mut cfg = sdxl_config("PNDMScheduler", "epsilon", "leading");
        assert!(cfg
            .kind()
            .unwrap_err()
            .to_string()
            .contains("--scheduler ddim"));
        cfg.use_karras_sigmas = true;
        let e = Scheduler::new(SchedulerKind::Euler, &cfg, 10).unwrap_err();
        assert!(e.to_string().contains("Karras"));
        let cfg = sdxl_config("DDIMScheduler", "sample", "leading");
        assert!(Scheduler::new(SchedulerKind::Ddim, &cfg, 10).is_err());
        let cfg = sdxl_config("DDIMScheduler", "epsilon", "leading");
        assert!(Scheduler::new(SchedulerKind::Ddim, &cfg, 0).is_err());
        assert!(Scheduler::new(SchedulerKind::Ddim, &cfg, 1001).is_err());
        assert!("pndm"
            .parse::<SchedulerKind>()
            .unwrap_err()
            .to_string()
            .contains("ddim or euler"));
        assert_eq!(
            "Euler".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::Euler
        );
    }

    #[test]
    fn one_step_ddim_returns_the_predicted_clean_sample() -> TensorResult<()> {
        // With a single step, prev_t < 0 and set_alpha_to_one=false uses ᾱ₀ ≈ 1: the result is
        // almost exactly the x0 prediction.
        let cfg = sdxl_config("DDIMScheduler", "epsilon", "leading");
        let s = Scheduler::new(SchedulerKind::Ddim, &cfg, 1).unwrap();
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[0.5f32, -1.0], &dev)?;
        let e = Tensor::new(&[0.1f32, 0.2], &dev)?;
        let out = s.step(&e, 0, &x)?;
        let prev = out.prev_sample.to_vec1::<f32>()?;
        let x0 = out.pred_original_sample.to_vec1::<f32>()?;
        for (p, q) in prev.iter().zip(&x0) {
            assert!((p - q).abs() < 0.05, "{p} vs {q}");
        }
        Ok(())
    }
}
