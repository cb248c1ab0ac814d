//! DDIM (Song et al. 2020), deterministic (η = 0), as diffusers' `DDIMScheduler`.

use candle_core::{Result, Tensor};

use super::{fused, PredictionType, StepOutput, TimestepSpacing, ValueStep};

/// Integer timesteps, as `DDIMScheduler.set_timesteps` makes them: `linspace` values rounded
/// half to even (numpy's `round`), `leading` shifted by `steps_offset`.
pub(super) fn timesteps(
    spacing: TimestepSpacing,
    n_train: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let spread = spacing.spread(n_train, n, steps_offset);
    match spacing {
        TimestepSpacing::Linspace => spread.into_iter().map(f64::round_ties_even).collect(),
        TimestepSpacing::Leading | TimestepSpacing::Trailing => spread,
    }
}

/// One DDIM step from ᾱ_t to ᾱ_prev: Song et al. eq. 12 with σ_t = 0, i.e.
/// x_prev = √ᾱ_prev · x̂0 + √(1 − ᾱ_prev) · ε̂ (`DDIMScheduler.step` with eta = 0).
/// The tensors must share a dtype; the caller converts.
pub(super) fn step(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_t: f64,
    alpha_prev: f64,
    clip_sample: Option<f64>,
) -> Result<StepOutput> {
    if clip_sample.is_none() {
        if let Some(out) = step_fused(prediction, model_output, sample, alpha_t, alpha_prev)? {
            return Ok(out);
        }
    }
    step_ops(
        prediction,
        model_output,
        sample,
        alpha_t,
        alpha_prev,
        clip_sample,
    )
}

/// The same step (without clipping) in one threaded pass over the values (see
/// [`super::fused`]): the f32 operations of [`step_ops`] in its order.
fn step_fused(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_t: f64,
    alpha_prev: f64,
) -> Result<Option<StepOutput>> {
    let step = ValueStep::ddim(prediction, alpha_t, alpha_prev);
    fused::step(model_output, sample, |e, s| step.apply(e, s))
}

/// The step as a chain of tensor operations: any device and dtype, and clipping.
fn step_ops(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_t: f64,
    alpha_prev: f64,
    clip_sample: Option<f64>,
) -> Result<StepOutput> {
    let beta_t = 1.0 - alpha_t;
    let (mut x0, eps) = match prediction {
        // x_t = √ᾱ x0 + √(1−ᾱ) ε solved for x0.
        PredictionType::Epsilon => (
            ((sample - (model_output * beta_t.sqrt())?)? / alpha_t.sqrt())?,
            model_output.clone(),
        ),
        // v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022, §4), so x0 and ε are rotations of (x_t, v).
        PredictionType::VPrediction => (
            ((sample * alpha_t.sqrt())? - (model_output * beta_t.sqrt())?)?,
            ((model_output * alpha_t.sqrt())? + (sample * beta_t.sqrt())?)?,
        ),
    };
    if let Some(range) = clip_sample {
        x0 = x0.clamp(-range, range)?;
    }
    let prev = ((&x0 * alpha_prev.sqrt())? + (eps * (1.0 - alpha_prev).sqrt())?)?;
    Ok(StepOutput {
        prev_sample: prev,
        pred_original_sample: x0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused pass gives the tensor chain's bytes, for both parameterisations, from an
    /// early step to the last (ᾱ_prev = 1).
    #[test]
    fn fused_step_matches_tensor_ops_bit_for_bit() -> Result<()> {
        let pairs = [(0.0047, 0.0091), (0.5, 0.62), (0.9991, 1.0)];
        fused::check_against_chain(&pairs, step_fused, |p, e, s, a, b| {
            step_ops(p, e, s, a, b, None)
        })
    }
}
