//! `scheduler/scheduler_config.json` as diffusers writes it, with diffusers' defaults.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{PredictionType, SchedulerError, SchedulerKind};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: usize,
    /// DDIM: the "previous" ᾱ of the final step; 1 when true, ᾱ₀ otherwise.
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    #[serde(default = "default_one")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default = "default_interpolation")]
    pub interpolation_type: String,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default = "default_final_sigmas")]
    pub final_sigmas_type: String,
    #[serde(default = "default_timestep_type")]
    pub timestep_type: String,
    /// Flow matching: the fixed shift of the σ schedule (SD3: 3.0).
    #[serde(default = "default_one")]
    pub shift: f64,
    /// Flow matching: shift by the image's token count instead (diffusers' `mu`).
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(
        default = "default_base_shift",
        deserialize_with = "or_default_base_shift"
    )]
    pub base_shift: f64,
    #[serde(
        default = "default_max_shift",
        deserialize_with = "or_default_max_shift"
    )]
    pub max_shift: f64,
    #[serde(default = "default_base_seq_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "default_max_seq_len")]
    pub max_image_seq_len: usize,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default = "default_time_shift_type")]
    pub time_shift_type: String,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_spacing() -> String {
    "leading".into()
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_interpolation() -> String {
    "linear".into()
}
fn default_final_sigmas() -> String {
    "zero".into()
}
fn default_timestep_type() -> String {
    "discrete".into()
}
fn default_base_shift() -> f64 {
    0.5
}
fn default_max_shift() -> f64 {
    1.15
}
fn default_base_seq_len() -> usize {
    256
}
fn default_max_seq_len() -> usize {
    4096
}
fn default_time_shift_type() -> String {
    "exponential".into()
}
/// `base_shift` may be written as null, meaning the default.
fn or_default_base_shift<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or_else(default_base_shift))
}
fn or_default_max_shift<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or_else(default_max_shift))
}

/// How inference timesteps are spread over the training timesteps (Lin et al. 2023, Table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Linspace,
    Trailing,
}

impl TimestepSpacing {
    /// The inference timesteps as diffusers' `set_timesteps` spreads them, before any rounding
    /// of `linspace` (DDIM rounds half to even, Euler keeps the fractions in f32). Each branch
    /// repeats numpy's arithmetic (`linspace`, `arange` with a float step) so the values agree
    /// to the last bit.
    pub(super) fn spread(self, n_train: usize, n: usize, steps_offset: usize) -> Vec<f64> {
        match self {
            TimestepSpacing::Linspace => {
                let stop = (n_train - 1) as f64;
                if n == 1 {
                    return vec![0.0];
                }
                let step = stop / (n - 1) as f64;
                (0..n)
                    .rev()
                    .map(|i| if i == n - 1 { stop } else { i as f64 * step })
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = n_train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                // np.arange(n_train, 0, -ratio) has ceil(n_train / ratio) values and fills them
                // as start + i·delta with delta = (start − ratio) − start.
                let ratio = n_train as f64 / n as f64;
                let start = n_train as f64;
                let len = (start / ratio).ceil() as usize;
                let delta = (start - ratio) - start;
                (0..len)
                    .map(|i| (start + i as f64 * delta).round_ties_even() - 1.0)
                    .collect()
            }
        }
    }
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self, SchedulerError> {
        let bytes = std::fs::read(path)
            .map_err(|e| SchedulerError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&bytes)
            .map_err(|e| SchedulerError::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, SchedulerError> {
        serde_json::from_slice(bytes).map_err(|e| SchedulerError::Config(e.to_string()))
    }

    /// The sampler the model's config names, as diffusers would instantiate it.
    pub fn kind(&self) -> Result<SchedulerKind, SchedulerError> {
        match self.class_name.as_str() {
            "DDIMScheduler" => Ok(SchedulerKind::Ddim),
            "EulerDiscreteScheduler" => Ok(SchedulerKind::Euler),
            "FlowMatchEulerDiscreteScheduler" => Ok(SchedulerKind::FlowEuler),
            other => Err(SchedulerError::Unsupported(format!(
                "the model's scheduler is {other:?}; Tessera implements DDIM and Euler: pass \
                 --scheduler ddim or --scheduler euler"
            ))),
        }
    }

    pub fn prediction(&self) -> Result<PredictionType, SchedulerError> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            other => Err(SchedulerError::Unsupported(format!(
                "prediction_type {other:?} (supported: epsilon, v_prediction)"
            ))),
        }
    }

    pub fn spacing(&self) -> Result<TimestepSpacing, SchedulerError> {
        match self.timestep_spacing.as_str() {
            "leading" => Ok(TimestepSpacing::Leading),
            "linspace" => Ok(TimestepSpacing::Linspace),
            "trailing" => Ok(TimestepSpacing::Trailing),
            other => Err(SchedulerError::Unsupported(format!(
                "timestep_spacing {other:?} (supported: leading, linspace, trailing)"
            ))),
        }
    }

    /// Settings this implementation does not reproduce are refused rather than ignored, so a
    /// render never silently differs from diffusers'.
    pub fn check_supported(&self, kind: SchedulerKind) -> Result<(), SchedulerError> {
        let refuse = |what: &str| Err(SchedulerError::Unsupported(what.to_string()));
        if kind == SchedulerKind::FlowEuler {
            return self.check_flow_supported();
        }
        if self.is_flow_matching() {
            return Err(SchedulerError::Invalid(format!(
                "the model is a flow-matching model ({}): it steps with flow-matching Euler \
                 (--scheduler euler, or none), not {kind}",
                self.class_name
            )));
        }
        if self.thresholding {
            return refuse("thresholding (dynamic thresholding is for pixel-space models)");
        }
        if self.rescale_betas_zero_snr {
            return refuse("rescale_betas_zero_snr");
        }
        if self.trained_betas.is_some() {
            return refuse("trained_betas");
        }
        if kind == SchedulerKind::Euler {
            if self.use_karras_sigmas || self.use_exponential_sigmas || self.use_beta_sigmas {
                return refuse("Karras/exponential/beta sigmas (use the plain Euler schedule)");
            }
            if self.interpolation_type != "linear" {
                return refuse("interpolation_type other than linear");
            }
            if self.final_sigmas_type != "zero" {
                return refuse("final_sigmas_type other than zero");
            }
            if self.timestep_type != "discrete" {
                return refuse("timestep_type other than discrete");
            }
        }
        self.prediction()?;
        self.spacing()?;
        Ok(())
    }

    /// A flow-matching scheduler (SD3's `FlowMatchEulerDiscreteScheduler`).
    pub fn is_flow_matching(&self) -> bool {
        self.class_name == "FlowMatchEulerDiscreteScheduler"
    }

    fn check_flow_supported(&self) -> Result<(), SchedulerError> {
        let refuse = |what: &str| Err(SchedulerError::Unsupported(what.to_string()));
        if self.use_karras_sigmas || self.use_exponential_sigmas || self.use_beta_sigmas {
            return refuse("Karras/exponential/beta sigmas (use the plain flow-matching schedule)");
        }
        if self.invert_sigmas {
            return refuse("invert_sigmas (a Mochi setting)");
        }
        if self.stochastic_sampling {
            return refuse("stochastic_sampling (Tessera steps the deterministic ODE)");
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return refuse("a shift that is not a positive number");
        }
        if self.num_train_timesteps < 2 {
            return Err(SchedulerError::Config(
                "num_train_timesteps must be at least 2".into(),
            ));
        }
        Ok(())
    }

    /// ᾱ_t for every training timestep, rounded through f32 where diffusers holds them in a
    /// float32 tensor (betas from `linspace` in f32, the product accumulated in double).
    pub fn alphas_cumprod(&self) -> Result<Vec<f64>, SchedulerError> {
        let n = self.num_train_timesteps;
        if n < 2 {
            return Err(SchedulerError::Config(
                "num_train_timesteps must be at least 2".into(),
            ));
        }
        let betas: Vec<f32> = match self.beta_schedule.as_str() {
            "linear" => linspace_f32(self.beta_start, self.beta_end, n),
            "scaled_linear" => linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            other => {
                return Err(SchedulerError::Unsupported(format!(
                    "beta_schedule {other:?} (supported: linear, scaled_linear)"
                )))
            }
        };
        let mut acc = 1.0f64;
        Ok(betas
            .iter()
            .map(|b| {
                acc *= f64::from(1.0f32 - b);
                f64::from(acc as f32)
            })
            .collect())
    }
}

/// torch.linspace in float32: the first half counts up from `start`, the second half down from
/// `end`, each point rounded to f32.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            }
        })
        .collect()
}
