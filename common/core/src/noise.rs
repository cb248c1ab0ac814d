//! Seeded Gaussian noise. Every random draw in a job comes from a generator keyed by
//! (seed, stage, step, purpose), so an image never depends on how many workers ran it, in what
//! order, or whether it was resumed: the same key always yields the same numbers.

use candle_core::{Device, Result, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

/// Why a draw is made; part of the key so two purposes at one step never share numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum NoisePurpose {
    /// The first stage's starting latent.
    InitialLatent = 1,
    /// A VAE posterior sample when encoding an image.
    VaeSample = 2,
    /// Re-noising an upscaled latent between stages.
    StageNoise = 3,
    /// Jitter of a step's local tiles.
    ViewJitter = 4,
    /// Jitter of the windows of FreeScale's in-UNet scale fusion, per view.
    FusionJitter = 5,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NoiseKey {
    pub seed: u64,
    pub stage: u32,
    pub step: u32,
    pub purpose: NoisePurpose,
}

impl NoiseKey {
    pub fn new(seed: u64, purpose: NoisePurpose) -> Self {
        Self {
            seed,
            stage: 0,
            step: 0,
            purpose,
        }
    }

    /// A 256-bit ChaCha seed mixed from the key with SplitMix64, so nearby keys give
    /// unrelated streams.
    fn rng(&self) -> ChaCha20Rng {
        let mut state = self.seed
            ^ (u64::from(self.stage) << 40)
            ^ (u64::from(self.step) << 8)
            ^ (self.purpose as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut seed = [0u8; 32];
        for chunk in seed.chunks_mut(8) {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes());
        }
        ChaCha20Rng::from_seed(seed)
    }

    /// A 64-bit seed for generators other than Gaussian noise (tile jitter), from the same
    /// key mixing; `salt` separates several draws under one key (e.g. the view index).
    pub fn derive_seed(&self, salt: u64) -> u64 {
        use rand::RngCore;
        let mut rng = self.rng();
        rng.set_stream(salt);
        rng.next_u64()
    }

    /// Standard normal f32 values of the given shape, drawn on the CPU (so every device gets
    /// the same numbers) and moved to `device`.
    pub fn normal(&self, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let mut rng = self.rng();
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_numbers_other_key_other_numbers() -> Result<()> {
        let dev = Device::Cpu;
        let k = NoiseKey::new(7, NoisePurpose::InitialLatent);
        let a = k
            .normal((1, 4, 8, 8), &dev)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = k
            .normal((1, 4, 8, 8), &dev)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a, b);
        let other = NoiseKey { step: 1, ..k };
        let c = other
            .normal((1, 4, 8, 8), &dev)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_ne!(a, c);
        // Standard normal: over 2^16 draws the moments are within a few standard errors.
        let big = k.normal(1 << 16, &dev)?.to_vec1::<f32>()?;
        let mean = big.iter().map(|&x| f64::from(x)).sum::<f64>() / big.len() as f64;
        let var = big
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / big.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.03,
            "mean {mean} var {var}"
        );
        Ok(())
    }
}
