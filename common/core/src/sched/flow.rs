//! Flow-matching Euler (Esser et al. 2024, SD3), as diffusers' `FlowMatchEulerDiscreteScheduler`:
//! σ runs from 1 to 0, the model predicts the velocity v = ε − x₀, and a step is
//! x ← x + (σ_next − σ)·v. The timestep the model sees is σ·1000.
//!
//! The σ lists repeat diffusers' arithmetic: the training sigmas `shift·s / (1 + (shift − 1)·s)`
//! of `s = i/1000` in torch's float32 (`__init__`), whose first and last values bound a numpy
//! float64 `linspace` that `set_timesteps` shifts *again* (in float64) and rounds to float32.

use candle_core::{Result, Tensor};

use super::{fused, SchedulerConfig, SchedulerError, StepOutput, ValueStep};

/// How `set_timesteps` shifts a σ list: a fixed `shift`, or the resolution-dependent shift
/// by `mu` (the config's `use_dynamic_shifting`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shift {
    Fixed(f64),
    Exponential(f64),
    Linear(f64),
}

impl Shift {
    fn of(cfg: &SchedulerConfig, mu: Option<f64>) -> std::result::Result<Self, SchedulerError> {
        if !cfg.use_dynamic_shifting {
            return Ok(Shift::Fixed(cfg.shift));
        }
        let mu = mu.ok_or_else(|| {
            SchedulerError::Invalid(
                "the scheduler shifts by the image size (use_dynamic_shifting): the image's \
                 sequence length is needed"
                    .into(),
            )
        })?;
        match cfg.time_shift_type.as_str() {
            "exponential" => Ok(Shift::Exponential(mu)),
            "linear" => Ok(Shift::Linear(mu)),
            other => Err(SchedulerError::Unsupported(format!(
                "time_shift_type {other:?} (supported: exponential, linear)"
            ))),
        }
    }

    /// diffusers' `time_shift(mu, 1.0, t)` or `shift·t / (1 + (shift − 1)·t)`, in f64.
    fn apply(self, t: f64) -> f64 {
        match self {
            Shift::Fixed(s) => s * t / (1.0 + (s - 1.0) * t),
            Shift::Exponential(mu) => mu.exp() / (mu.exp() + (1.0 / t - 1.0)),
            Shift::Linear(mu) => mu / (mu + (1.0 / t - 1.0)),
        }
    }
}

/// `(timesteps, sigmas)` of an `n`-step schedule: σ per step in f32 (as f64) followed by a
/// final 0, and timesteps σ·N in f32.
pub(super) fn schedule(
    cfg: &SchedulerConfig,
    n: usize,
    mu: Option<f64>,
) -> std::result::Result<(Vec<f64>, Vec<f64>), SchedulerError> {
    let n_train = cfg.num_train_timesteps;
    let shift = Shift::of(cfg, mu)?;
    // `__init__`: σ = i/N in f32, shifted in f32 unless the shift is dynamic.
    let train_sigma = |i: usize| -> f32 {
        let s = i as f32 / n_train as f32;
        if cfg.use_dynamic_shifting {
            s
        } else {
            let k = cfg.shift as f32;
            k * s / (1.0 + (k - 1.0) * s)
        }
    };
    let (sigma_max, sigma_min) = (f64::from(train_sigma(n_train)), f64::from(train_sigma(1)));
    let nt = n_train as f64;
    let mut sigmas: Vec<f64> = np_linspace(sigma_max * nt, sigma_min * nt, n)
        .into_iter()
        .map(|t| shift.apply(t / nt))
        .collect();
    if let Some(terminal) = cfg.shift_terminal.filter(|&t| t != 0.0) {
        let last = 1.0 - sigmas.last().copied().unwrap_or(0.0);
        let scale = last / (1.0 - terminal);
        for s in &mut sigmas {
            *s = 1.0 - (1.0 - *s) / scale;
        }
    }
    let sigmas: Vec<f64> = sigmas.iter().map(|&s| f64::from(s as f32)).collect();
    let timesteps = sigmas
        .iter()
        .map(|&s| f64::from(s as f32 * n_train as f32))
        .collect();
    let mut sigmas = sigmas;
    sigmas.push(0.0);
    Ok((timesteps, sigmas))
}

/// numpy's `linspace(start, stop, n)` in float64: `i·step + start`, the last point `stop`.
fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i == n - 1 {
                        stop
                    } else {
                        i as f64 * step + start
                    }
                })
                .collect()
        }
    }
}

/// diffusers' `calculate_shift`: μ linear in the image's token count between
/// (`base_image_seq_len`, `base_shift`) and (`max_image_seq_len`, `max_shift`).
pub fn dynamic_mu(cfg: &SchedulerConfig, image_seq_len: usize) -> f64 {
    let m = (cfg.max_shift - cfg.base_shift)
        / (cfg.max_image_seq_len as f64 - cfg.base_image_seq_len as f64);
    let b = cfg.base_shift - m * cfg.base_image_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// One Euler step from σ to σ_next along the velocity `model_output`, with x̂₀ = x − σ·v (the
/// reference FreCaS scheduler's `denoised`). The tensors must share a dtype.
pub(super) fn step(
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
    sigma_next: f64,
) -> Result<StepOutput> {
    // torch computes `sigma_next − sigma` between two float32 tensor elements.
    let (s, dt) = (sigma as f32, (sigma_next as f32) - (sigma as f32));
    let step = ValueStep::flow(sigma, sigma_next);
    if let Some(out) = fused::step(model_output, sample, |v, x| step.apply(v, x))? {
        return Ok(out);
    }
    Ok(StepOutput {
        prev_sample: (sample + (model_output * f64::from(dt))?)?,
        pred_original_sample: (sample - (model_output * f64::from(s))?)?,
    })
}

/// `scale_noise`: the forward process σ·ε + (1 − σ)·x.
pub(super) fn scale_noise(original: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    (noise * sigma)? + (original * (1.0 - sigma))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd3_config(extra: &str) -> SchedulerConfig {
        SchedulerConfig::from_json(
            format!(
                r#"{{"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                   "shift": 3.0{extra}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn sd3_schedule_runs_from_one_to_the_double_shifted_minimum() {
        let (ts, sigmas) = schedule(&sd3_config(""), 28, None).unwrap();
        assert_eq!(ts.len(), 28);
        assert_eq!(sigmas.len(), 29);
        assert_eq!(sigmas[0], 1.0);
        assert_eq!(ts[0], 1000.0);
        assert_eq!(*sigmas.last().unwrap(), 0.0);
        // σ_min of __init__ is shift(0.001) ≈ 0.002994, shifted again by set_timesteps.
        let s = 3.0 * 0.001f32 / (1.0 + 2.0 * 0.001f32);
        let again = 3.0 * f64::from(s) / (1.0 + 2.0 * f64::from(s));
        assert!((sigmas[27] - again).abs() < 1e-7, "{}", sigmas[27]);
        assert!(sigmas.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn dynamic_shifting_needs_the_image_size_and_follows_calculate_shift() {
        let cfg =
            sd3_config(r#", "use_dynamic_shifting": true, "base_shift": 0.5, "max_shift": 1.15"#);
        assert!(schedule(&cfg, 10, None).is_err());
        assert!((dynamic_mu(&cfg, 256) - 0.5).abs() < 1e-12);
        assert!((dynamic_mu(&cfg, 4096) - 1.15).abs() < 1e-12);
        let (_, sigmas) = schedule(&cfg, 10, Some(1.15)).unwrap();
        assert_eq!(sigmas[0], 1.0);
    }

    #[test]
    fn a_step_moves_along_the_velocity_and_predicts_x0() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[0.5f32, -1.0], &dev)?;
        let v = Tensor::new(&[0.25f32, 2.0], &dev)?;
        let out = step(&v, &x, 0.75, 0.5)?;
        assert_eq!(out.prev_sample.to_vec1::<f32>()?, vec![0.4375, -1.5]);
        assert_eq!(
            out.pred_original_sample.to_vec1::<f32>()?,
            vec![0.3125, -2.5]
        );
        let noised = scale_noise(&x, &v, 0.25)?.to_vec1::<f32>()?;
        assert_eq!(noised, vec![0.4375, -0.25]);
        Ok(())
    }
}
