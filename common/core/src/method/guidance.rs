//! Classifier-free guidance on merged noise predictions.

use candle_core::{Result, Tensor};

use crate::sched::fused;

/// Plain CFG (Ho & Salimans): `ε = ε_u + w · (ε_c − ε_u)`, computed in that order so the
/// result rounds like diffusers' `noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)`.
/// On a stage latent in memory it is one threaded pass (it lies on the step's critical path).
pub fn classifier_free(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    let w = scale as f32;
    if let Some(g) = fused::zip_map(uncond, cond, |u, c| cfg_value(u, c, w))? {
        return Ok(g);
    }
    uncond.add(&((cond - uncond)? * scale)?)
}

/// Classifier-free guidance of one value at the scale `w` (f32): the chain's operations in its
/// order, the scalar product as candle's affine `v·w + 0`.
#[inline]
pub fn cfg_value(u: f32, c: f32, w: f32) -> f32 {
    u + ((c - u) * w + 0.0)
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

    /// The threaded pass gives the tensor chain's bytes (with ±0 and a scale that is not a
    /// whole number), on a latent large enough to be split over the cores.
    #[test]
    fn fused_cfg_matches_the_tensor_chain_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let n = 3 * (1 << 16) + 7;
        let u = Tensor::randn(0f32, 1.0, n, &dev)?.to_vec1::<f32>()?;
        let mut c = Tensor::randn(0f32, 1.0, n, &dev)?.to_vec1::<f32>()?;
        c[0] = u[0];
        c[1] = -0.0;
        let (u, c) = (Tensor::new(u, &dev)?, Tensor::new(c, &dev)?);
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
        };
        for scale in [7.5, 4.3, 1.0 / 3.0] {
            let fused = classifier_free(&u, &c, scale)?;
            let chain = u.add(&((&c - &u)? * scale)?)?;
            assert_eq!(bits(&fused)?, bits(&chain)?, "scale {scale}");
        }
        // Not contiguous: the chain itself.
        let m = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
        let (mu, mc) = (m.t()?, (m.t()? * 2.0)?);
        let strided = classifier_free(&mu, &mc, 7.5)?;
        assert_eq!(
            bits(&strided.flatten_all()?)?,
            bits(&mu.add(&((&mc - &mu)? * 7.5)?)?.flatten_all()?)?
        );
        Ok(())
    }
}
