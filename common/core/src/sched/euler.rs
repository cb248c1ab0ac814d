//! Euler discrete (Karras et al. 2022, Algorithm 2 without churn), as diffusers'
//! `EulerDiscreteScheduler` with linear interpolation of σ over timesteps.

use candle_core::{Result, Tensor};

use super::{fused, PredictionType, StepOutput, TimestepSpacing, ValueStep};

/// Timesteps (f32 values, as diffusers holds them) and σ per step followed by a final 0.
pub(super) fn schedule(
    spacing: TimestepSpacing,
    n_train: usize,
    n: usize,
    steps_offset: usize,
    alphas_cumprod: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    // `np.linspace(..., dtype=float32)` computes in f64 and rounds once to f32; the integer
    // spacings are exact in f32.
    let timesteps: Vec<f64> = spacing
        .spread(n_train, n, steps_offset)
        .into_iter()
        .map(|t| f64::from(t as f32))
        .collect();
    // σ_t = √((1 − ᾱ_t) / ᾱ_t), evaluated in f32 on the f32 ᾱ as diffusers does with torch.
    let train_sigmas: Vec<f64> = alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            f64::from(((1.0 - a) / a).sqrt())
        })
        .collect();
    // np.interp in f64, then the `astype(np.float32)` of the concatenated sigmas.
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| f64::from(interp(t, &train_sigmas) as f32))
        .collect();
    sigmas.push(0.0);
    (timesteps, sigmas)
}

/// `np.interp(x, arange(len), ys)`: linear between neighbours, clamped at both ends.
fn interp(x: f64, ys: &[f64]) -> f64 {
    let Some(&last_y) = ys.last() else {
        return 0.0;
    };
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return last_y;
    }
    let i = x.floor() as usize;
    let frac = x - i as f64;
    if frac == 0.0 {
        return ys[i];
    }
    // numpy's form: slope · (x − x_i) + y_i.
    (ys[i + 1] - ys[i]) * frac + ys[i]
}

/// One Euler step from σ to σ_next on the ODE dx/dσ = (x − x̂0) / σ. The tensors must share
/// a dtype; the caller converts.
pub(super) fn step(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
    sigma_next: f64,
) -> Result<StepOutput> {
    if let Some(out) = step_fused(prediction, model_output, sample, sigma, sigma_next)? {
        return Ok(out);
    }
    step_ops(prediction, model_output, sample, sigma, sigma_next)
}

/// The step as a chain of tensor operations: any device and dtype.
fn step_ops(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
    sigma_next: f64,
) -> Result<StepOutput> {
    let x0 = match prediction {
        // x = x0 + σ ε in the variance-exploding parameterisation.
        PredictionType::Epsilon => (sample - (model_output * sigma)?)?,
        // Karras et al. Table 1 preconditioning: c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1).
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            ((model_output * (-sigma / s2.sqrt()))? + (sample / s2)?)?
        }
    };
    let derivative = ((sample - &x0)? / sigma)?;
    let prev = (sample + (derivative * (sigma_next - sigma))?)?;
    Ok(StepOutput {
        prev_sample: prev,
        pred_original_sample: x0,
    })
}

/// The same step in one threaded pass over the values (see [`super::fused`]): each value
/// goes through the same f32 operations, in the same order, as [`step_ops`], with candle's
/// scalar products as affines `v·m + 0` (`m` rounded from f64).
fn step_fused(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
    sigma_next: f64,
) -> Result<Option<StepOutput>> {
    let step = ValueStep::euler(prediction, sigma, sigma_next);
    fused::step(model_output, sample, |e, s| step.apply(e, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused pass gives the tensor chain's bytes, for both parameterisations, on a latent
    /// large enough to be threaded; views that are not contiguous take the chain.
    #[test]
    fn fused_step_matches_tensor_ops_bit_for_bit() -> Result<()> {
        let pairs = [(14.6146, 9.7232), (0.0292, 0.0), (1.0, 0.5)];
        fused::check_against_chain(&pairs, step_fused, step_ops)?;
        let m = Tensor::randn(0f32, 1.0, (4, 6), &candle_core::Device::Cpu)?.t()?;
        assert!(step_fused(PredictionType::Epsilon, &m, &m, 1.0, 0.5)?.is_none());
        Ok(())
    }

    #[test]
    fn interp_matches_numpy_at_ends_and_between() {
        let ys = [1.0, 3.0, 7.0];
        assert_eq!(interp(-1.0, &ys), 1.0);
        assert_eq!(interp(1.0, &ys), 3.0);
        assert_eq!(interp(1.25, &ys), 4.0);
        assert_eq!(interp(5.0, &ys), 7.0);
    }
}
