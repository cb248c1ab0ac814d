//! A scheduler step as arithmetic on one value: `(model output, sample) → (next sample, x̂₀)`.
//!
//! Every step Tessera runs (DDIM without clipping, Euler, flow-matching Euler) treats each
//! latent value on its own. [`ValueStep`] holds a step's constants in f32, and its `apply`
//! repeats the tensor chain's f32 operations in their order (candle's scalar product is the
//! affine `v·m + 0`, and that `+ 0` stays: it turns −0 into +0). The fused whole-latent pass
//! (`fused::step`) and the engine's band-by-band step both go through it, so they give the
//! same bytes as the chain.

use super::PredictionType;

/// How a step's model input is made from its latent, value by value (what
/// `Scheduler::scale_model_input` computes): unchanged, or Euler's product by 1/√(σ² + 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputScale {
    Identity,
    Times(f32),
}

impl InputScale {
    #[inline]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            InputScale::Identity => v,
            InputScale::Times(m) => v * m + 0.0,
        }
    }
}

/// One step's constants, by scheduler and parameterisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueStep {
    /// DDIM (η = 0) from ᾱ_t to ᾱ_prev: `sb` = √(1 − ᾱ_t), `inv_sa` = 1/√ᾱ_t, `pa`, `pb` =
    /// √ᾱ_prev, √(1 − ᾱ_prev).
    DdimEpsilon {
        sb: f32,
        inv_sa: f32,
        pa: f32,
        pb: f32,
    },
    DdimV {
        sa: f32,
        sb: f32,
        pa: f32,
        pb: f32,
    },
    /// Euler from σ to σ_next: x̂₀ from the prediction, then `s + ((s − x̂₀)/σ)·(σ_next − σ)`.
    EulerEpsilon {
        sigma: f32,
        inv_sigma: f32,
        delta: f32,
    },
    EulerV {
        m_out: f32,
        m_in: f32,
        inv_sigma: f32,
        delta: f32,
    },
    /// Flow matching from σ by `dt` = σ_next − σ (both rounded to f32 first, as torch).
    Flow {
        sigma: f32,
        dt: f32,
    },
}

/// A scheduler's `add_noise` as arithmetic on one value: `(clean, noise) → noised`, the tensor
/// chain's f32 operations in its order (as [`ValueStep`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueNoise {
    /// DDIM: `√ᾱ·x + √(1 − ᾱ)·n`.
    Ddim { sa: f32, sb: f32 },
    /// Euler: `x + σ·n`.
    Euler { sigma: f32 },
    /// Flow matching's `scale_noise`: `σ·n + (1 − σ)·x`.
    Flow { sigma: f32, keep: f32 },
}

impl ValueNoise {
    pub fn ddim(alpha: f64) -> Self {
        Self::Ddim {
            sa: alpha.sqrt() as f32,
            sb: (1.0 - alpha).sqrt() as f32,
        }
    }

    pub fn euler(sigma: f64) -> Self {
        Self::Euler {
            sigma: sigma as f32,
        }
    }

    pub fn flow(sigma: f64) -> Self {
        Self::Flow {
            sigma: sigma as f32,
            keep: (1.0 - sigma) as f32,
        }
    }

    /// The clean value `x` noised with `n`.
    #[inline]
    pub fn apply(self, x: f32, n: f32) -> f32 {
        match self {
            Self::Ddim { sa, sb } => (x * sa + 0.0) + (n * sb + 0.0),
            Self::Euler { sigma } => x + (n * sigma + 0.0),
            Self::Flow { sigma, keep } => (n * sigma + 0.0) + (x * keep + 0.0),
        }
    }
}

impl ValueStep {
    /// DDIM from ᾱ_t to ᾱ_prev.
    pub fn ddim(prediction: PredictionType, alpha_t: f64, alpha_prev: f64) -> Self {
        let sb = (1.0 - alpha_t).sqrt() as f32;
        let (pa, pb) = (alpha_prev.sqrt() as f32, (1.0 - alpha_prev).sqrt() as f32);
        match prediction {
            PredictionType::Epsilon => Self::DdimEpsilon {
                sb,
                inv_sa: (1.0 / alpha_t.sqrt()) as f32,
                pa,
                pb,
            },
            PredictionType::VPrediction => Self::DdimV {
                sa: alpha_t.sqrt() as f32,
                sb,
                pa,
                pb,
            },
        }
    }

    /// Euler from σ to σ_next.
    pub fn euler(prediction: PredictionType, sigma: f64, sigma_next: f64) -> Self {
        let (inv_sigma, delta) = ((1.0 / sigma) as f32, (sigma_next - sigma) as f32);
        match prediction {
            PredictionType::Epsilon => Self::EulerEpsilon {
                sigma: sigma as f32,
                inv_sigma,
                delta,
            },
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                Self::EulerV {
                    m_out: (-sigma / s2.sqrt()) as f32,
                    m_in: (1.0 / s2) as f32,
                    inv_sigma,
                    delta,
                }
            }
        }
    }

    /// Flow-matching Euler from σ to σ_next.
    pub fn flow(sigma: f64, sigma_next: f64) -> Self {
        Self::Flow {
            sigma: sigma as f32,
            dt: (sigma_next as f32) - (sigma as f32),
        }
    }

    /// `(next sample, x̂₀)` of one value of the model output `e` and of the sample `s`.
    #[inline]
    pub fn apply(self, e: f32, s: f32) -> (f32, f32) {
        let ddim = |x0: f32, eps: f32, pa: f32, pb: f32| ((x0 * pa + 0.0) + (eps * pb + 0.0), x0);
        let euler = |x0: f32, inv_sigma: f32, delta: f32| {
            let derivative = (s - x0) * inv_sigma + 0.0;
            (s + (derivative * delta + 0.0), x0)
        };
        match self {
            Self::DdimEpsilon { sb, inv_sa, pa, pb } => {
                ddim((s - (e * sb + 0.0)) * inv_sa + 0.0, e, pa, pb)
            }
            Self::DdimV { sa, sb, pa, pb } => {
                let x0 = (s * sa + 0.0) - (e * sb + 0.0);
                ddim(x0, (e * sa + 0.0) + (s * sb + 0.0), pa, pb)
            }
            Self::EulerEpsilon {
                sigma,
                inv_sigma,
                delta,
            } => euler(s - (e * sigma + 0.0), inv_sigma, delta),
            Self::EulerV {
                m_out,
                m_in,
                inv_sigma,
                delta,
            } => euler((e * m_out + 0.0) + (s * m_in + 0.0), inv_sigma, delta),
            Self::Flow { sigma, dt } => (s + (e * dt + 0.0), s - (e * sigma + 0.0)),
        }
    }
}
