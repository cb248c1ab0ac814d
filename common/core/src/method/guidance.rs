//! Classifier-free guidance on merged noise predictions.

use candle_core::{Result, Tensor};

/// Plain CFG (Ho & Salimans): `ε = ε_u + w · (ε_c − ε_u)`, computed in that order so the
/// result rounds like diffusers' `noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)`.
pub fn classifier_free(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    uncond.add(&((cond - uncond)? * scale)?)
}

/// diffusers applies guidance only when the scale is above one; at or below it the pipeline
/// evaluates the conditional branch alone.
pub fn uses_guidance(scale: f64) -> bool {
    scale > 1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cfg_matches_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let u = Tensor::new(&[1.0f32, -2.0, 0.5], &dev)?;
        let c = Tensor::new(&[2.0f32, 0.0, 0.5], &dev)?;
        let g = classifier_free(&u, &c, 7.5)?.to_vec1::<f32>()?;
        assert_eq!(g, vec![1.0 + 7.5 * 1.0, -2.0 + 7.5 * 2.0, 0.5]);
        assert!(uses_guidance(1.01) && !uses_guidance(1.0));
        Ok(())
    }
}
