//! FreeScale's per-step schedule for stages above the training size (reference
//! `pipeline_freescale.py`, `__call__`; detail control in `pipeline_freescale_imgen.py`).
//!
//! - Restart: the stage skips its first `int(0.3 · steps)` steps and starts from the upscaled
//!   latent noised to that step's timestep.
//! - Restrained structure (skip residual): before every step i ≥ restart,
//!   `z ← (1 − c_i)·z + c_i·n_i` with `n_i = add_noise(z_up, ε, t_i)` (one ε per stage) and
//!   `c_i = (½·(1 + cos(π·(T − t_i)/T)))^cosine_scale`, T = the scheduler's
//!   `num_train_timesteps` and t_i the scheduler's own timestep value. Early (t near T) c ≈ 1
//!   pins the layout to the upscaled image; late c → 0 frees the details.
//! - Dilation: while i < dilate_tau, selected 3×3 convs use dilation = padding =
//!   stage width // training width.
//!
//! One home for each rule: the plan takes the restart from [`restart_index`] and each stage's
//! [`DilationSchedule`] from here, the engine restrains through [`RestrainedStructure`], and a
//! worker dilates the convs [`dilated_layers`] lists.

use crate::error::{invalid, Result};
use candle_core::{DType, Tensor};

/// Fraction of the steps a stage > 0 skips: `restart_steps = [int(num_inference_steps*0.3)]`.
pub const RESTART_FRACTION: f64 = 0.3;
/// Reference default `cosine_scale` (`run_freescale.py` and the pipeline signature).
pub const DEFAULT_COSINE_SCALE: f64 = 2.0;
/// Reference default `dilate_tau`.
pub const DEFAULT_DILATE_TAU: usize = 35;

/// `int(steps · 0.3)`, truncating the f64 product as Python's `int` does.
pub fn restart_index(steps: usize) -> usize {
    (steps as f64 * RESTART_FRACTION) as usize
}

/// `½·(1 + cos(π·(T − t)/T))`: 1 at t = T, 0 at t = 0.
pub fn cosine_factor(t: f64, num_train_timesteps: usize) -> f64 {
    let big_t = num_train_timesteps as f64;
    0.5 * (1.0 + (std::f64::consts::PI * (big_t - t) / big_t).cos())
}

/// c = cosine_factor^cosine_scale.
pub fn restraint_weight(t: f64, num_train_timesteps: usize, cosine_scale: f64) -> f64 {
    cosine_factor(t, num_train_timesteps).powf(cosine_scale)
}

/// `(1 − c)·z + c·n`, where `n` is only computed when c ≠ 0 (at c = 0 the result is z
/// itself, which is what the formula gives for any finite n).
pub fn restrain(
    z: &Tensor,
    c: f64,
    noised: impl FnOnce() -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&c) {
        return invalid(format!("restraint weight {c} is outside [0, 1]"));
    }
    if c == 0.0 {
        return Ok(z.clone());
    }
    let n = noised()?;
    if n.dims() != z.dims() {
        return invalid(format!(
            "noised latent {:?} does not match the latent {:?}",
            n.dims(),
            z.dims()
        ));
    }
    Ok(((z * (1.0 - c))? + (n * c)?)?)
}

/// FreeScale's restrained structure in one stage > 0: before the model call of every step
/// after the stage's first, `z ← (1 − c)·z + c·n` with one exponent for the whole latent or,
/// under a mask, one per latent pixel (`pipeline_freescale_imgen.py`). The stage itself starts
/// at the restart step (the plan leaves the earlier steps out), so the reference's `continue`
/// below the restart is not repeated here.
#[derive(Debug, Clone)]
pub struct RestrainedStructure {
    /// T: the scheduler's `num_train_timesteps`.
    pub num_train_timesteps: usize,
    pub exponents: RestraintExponents,
}

/// The exponent of the cosine factor: `cosine_scale`, or a map from [`exponent_map`].
#[derive(Debug, Clone)]
pub enum RestraintExponents {
    Uniform(f64),
    /// `(1, 1, h, w)` f32, one exponent per latent pixel.
    Map(Tensor),
}

impl RestrainedStructure {
    /// One exponent, `cosine_scale`, everywhere.
    pub fn uniform(cosine_scale: f64, num_train_timesteps: usize) -> Self {
        Self {
            num_train_timesteps,
            exponents: RestraintExponents::Uniform(cosine_scale),
        }
    }

    /// `cosine_scale` where the mask image is non-zero, `cosine_scale_bg` elsewhere, on a
    /// latent of `latent_hw` (the mask binarised, then resized as in [`exponent_map`]).
    pub fn masked(
        mask: &Tensor,
        latent_hw: (usize, usize),
        cosine_scale: f64,
        cosine_scale_bg: f64,
        num_train_timesteps: usize,
    ) -> Result<Self> {
        let map = exponent_map(
            &binarize_mask(mask)?,
            latent_hw,
            cosine_scale,
            cosine_scale_bg,
        )?;
        Ok(Self {
            num_train_timesteps,
            exponents: RestraintExponents::Map(map),
        })
    }

    /// z before the model call of the stage's step `j` at timestep `t`; `noised` builds
    /// n = add_noise(z_up, ε, t) on demand (scheduler-specific: Euler adds σ·ε, DDIM mixes by
    /// ᾱ). Step 0 is left as is: its z is n itself, so the reference's blend there is a no-op.
    pub fn apply(
        &self,
        z: &Tensor,
        j: usize,
        t: f64,
        noised: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        if j == 0 {
            return Ok(z.clone());
        }
        let big_t = self.num_train_timesteps;
        match &self.exponents {
            RestraintExponents::Uniform(scale) => {
                restrain(z, restraint_weight(t, big_t, *scale), noised)
            }
            RestraintExponents::Map(e) => {
                restrain_with_map(z, &restraint_weight_map(e, t, big_t)?, noised)
            }
        }
    }

    /// [`Self::apply`] with one exponent everywhere as one threaded pass over the values: z,
    /// the upscaled latent `z_up` and the stage's noise `eps`, noised by `noise` (the
    /// scheduler's `add_noise` at `t`), with the chains' f32 operations in their order (the
    /// same bytes). `None` where it does not apply (step 0, a weight of 0 or outside [0, 1],
    /// an exponent map, tensors that are not contiguous f32 on the CPU); the caller then runs
    /// [`Self::apply`].
    pub fn apply_in_one_pass(
        &self,
        z: &Tensor,
        (z_up, eps): (&Tensor, &Tensor),
        (j, t): (usize, f64),
        noise: crate::sched::ValueNoise,
    ) -> Result<Option<Tensor>> {
        let Some(rule) = self.value_restraint((j, t), noise) else {
            return Ok(None);
        };
        if z.dims() != z_up.dims() {
            return Ok(None);
        }
        Ok(crate::sched::fused::zip3_map(z_up, eps, z, |x, n, z| {
            rule.apply(x, n, z)
        })?)
    }

    /// The arithmetic of [`Self::apply_in_one_pass`] at step `j` (timestep `t`) on one value,
    /// or `None` where that pass does not apply (step 0, a weight of 0 or outside [0, 1], an
    /// exponent map).
    pub fn value_restraint(
        &self,
        (j, t): (usize, f64),
        noise: crate::sched::ValueNoise,
    ) -> Option<ValueRestraint> {
        let RestraintExponents::Uniform(scale) = self.exponents else {
            return None;
        };
        let c = restraint_weight(t, self.num_train_timesteps, scale);
        if j == 0 || c == 0.0 || !(0.0..=1.0).contains(&c) {
            return None;
        }
        Some(ValueRestraint {
            keep: (1.0 - c) as f32,
            mix: c as f32,
            noise,
        })
    }
}

/// One step's restraint with one exponent, on one value: `(z·(1 − c)) + (n·c)` with
/// n = add_noise(z_up, ε), each scalar product candle's affine `v·m + 0` (the chains' f32
/// operations in their order).
#[derive(Debug, Clone, Copy)]
pub struct ValueRestraint {
    keep: f32,
    mix: f32,
    noise: crate::sched::ValueNoise,
}

impl ValueRestraint {
    /// z restrained, from the upscaled latent's value `z_up` and the stage noise's `eps`.
    #[inline]
    pub fn apply(self, z_up: f32, eps: f32, z: f32) -> f32 {
        (z * self.keep + 0.0) + (self.noise.apply(z_up, eps) * self.mix + 0.0)
    }
}

/// Per-latent-pixel exponents `mask·cosine_scale + (1 − mask)·cosine_scale_bg`, with the mask
/// (`(1, 1, Hm, Wm)` or `(Hm, Wm)`, 1 = keep structure strongly) resized nearest-neighbour to
/// the latent as the reference's `F.interpolate(mask, size=latent, mode="nearest")`. Result
/// `(1, 1, h, w)` f32. The reference binarises the mask image first (pixel ≠ 0 → 1); see
/// [`binarize_mask`].
pub fn exponent_map(
    mask: &Tensor,
    latent_hw: (usize, usize),
    cosine_scale: f64,
    cosine_scale_bg: f64,
) -> Result<Tensor> {
    let mask = match mask.rank() {
        2 => mask.unsqueeze(0)?.unsqueeze(0)?,
        4 if mask.dim(0)? == 1 && mask.dim(1)? == 1 => mask.clone(),
        _ => {
            return invalid(format!(
                "mask must be (H, W) or (1, 1, H, W), got {:?}",
                mask.dims()
            ))
        }
    };
    if latent_hw.0 == 0 || latent_hw.1 == 0 {
        return invalid("latent size must be positive");
    }
    let m = mask
        .to_dtype(DType::F32)?
        .upsample_nearest2d(latent_hw.0, latent_hw.1)?;
    let fg = (&m * cosine_scale)?;
    let bg = ((m.ones_like()? - &m)? * cosine_scale_bg)?;
    Ok((fg + bg)?)
}

/// 1 where the mask is non-zero, else 0 (the reference's `process_image_to_bitensor`).
pub fn binarize_mask(mask: &Tensor) -> Result<Tensor> {
    Ok(mask.ne(0.0)?.to_dtype(DType::F32)?)
}

/// c per latent pixel: cosine_factor^exponent (same shape as `exponents`). `0^0 = 1` as in
/// torch.
pub fn restraint_weight_map(
    exponents: &Tensor,
    t: f64,
    num_train_timesteps: usize,
) -> Result<Tensor> {
    let cf = cosine_factor(t, num_train_timesteps);
    let e = exponents.to_dtype(DType::F32)?;
    if cf <= 0.0 {
        return Ok(e.eq(0.0)?.to_dtype(DType::F32)?);
    }
    Ok((e * cf.ln())?.exp()?)
}

/// `(1 − c)·z + c·n` with a per-pixel c broadcast over batch and channels.
pub fn restrain_with_map(
    z: &Tensor,
    weights: &Tensor,
    noised: impl FnOnce() -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let n = noised()?;
    if n.dims() != z.dims() {
        return invalid(format!(
            "noised latent {:?} does not match the latent {:?}",
            n.dims(),
            z.dims()
        ));
    }
    let c = weights.to_dtype(z.dtype())?;
    let keep = (c.ones_like()? - &c)?;
    Ok((z.broadcast_mul(&keep)? + n.broadcast_mul(&c)?)?)
}

/// The 3×3 convs FreeScale dilates (`dilate_layers` in `pipeline_freescale.py`), by
/// diffusers parameter path. SD2.1's UNet has the same paths.
pub const DILATED_CONVS: [&str; 9] = [
    "down_blocks.1.downsamplers.0.conv",
    "down_blocks.2.resnets.0.conv1",
    "down_blocks.2.resnets.0.conv2",
    "down_blocks.2.resnets.1.conv1",
    "down_blocks.2.resnets.1.conv2",
    "mid_block.resnets.0.conv1",
    "mid_block.resnets.0.conv2",
    "mid_block.resnets.1.conv1",
    "mid_block.resnets.1.conv2",
];

/// `dilate_coef = target_size[1] // 1024`: stage width over training width, integer
/// division, in pixels or latent pixels alike. At least 1.
pub fn dilation_factor(stage_width: usize, training_width: usize) -> Result<usize> {
    if training_width == 0 {
        return invalid("training width must be positive");
    }
    Ok((stage_width / training_width).max(1))
}

/// `(layer, dilation)` for every one of the [`DILATED_CONVS`] at `dilation`; empty when it is
/// 1 (or 0): what a worker's UNet hooks are given.
pub fn dilated_layers(dilation: usize) -> impl Iterator<Item = (&'static str, usize)> {
    let layers: &[&'static str] = if dilation > 1 { &DILATED_CONVS } else { &[] };
    layers.iter().map(move |&l| (l, dilation))
}

/// FreeScale's dilation in one stage: the [`DILATED_CONVS`] use dilation (= padding) `factor`
/// for the stage's first `steps` steps (the reference's `i < dilate_tau`, counted from the
/// stage's first step), then 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DilationSchedule {
    pub factor: usize,
    pub steps: usize,
}

impl DilationSchedule {
    /// No dilation at any step.
    pub const NONE: Self = Self {
        factor: 1,
        steps: 0,
    };

    /// `view_width // training_width` for the first `steps` steps; [`Self::NONE`] when that
    /// factor is 1.
    pub fn new(view_width: usize, training_width: usize, steps: usize) -> Result<Self> {
        let factor = dilation_factor(view_width, training_width)?;
        Ok(if factor == 1 {
            Self::NONE
        } else {
            Self { factor, steps }
        })
    }

    /// Dilation of the [`DILATED_CONVS`] at the stage's step `j`: the factor while
    /// j < steps, else 1.
    pub fn dilation_at(&self, j: usize) -> usize {
        if j < self.steps {
            self.factor
        } else {
            1
        }
    }
}

// Expected values are pasted verbatim from torch's f32 output (printed as f64 reprs).
#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;
    use crate::sched::{Scheduler, SchedulerConfig, SchedulerKind};
    use candle_core::Device;

    const SDXL_SCHEDULER: &str = r#"{"_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1,
        "prediction_type": "epsilon"}"#;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn sdxl_euler_50_steps_restart_and_cosine_factors(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        // Expected: diffusers EulerDiscreteScheduler(SDXL config above).set_timesteps(50)
        // gives 981, 961, …, 1 (step 20); restart = int(50*0.3) = 15 → t = 681; c1 computed
        // as in pipeline_freescale.py, `0.5*(1+torch.cos(torch.pi*(T-t)/T))**cosine_scale`
        // with T = config.num_train_timesteps, all run in /tmp/ref/fs.py (torch float32).
        let cfg = SchedulerConfig::from_json(SDXL_SCHEDULER.as_bytes())?;
        let sched = Scheduler::new(SchedulerKind::Euler, &cfg, 50)?;
        let ts = sched.timesteps();
        let want: Vec<f64> = (0..50).map(|i| 981.0 - 20.0 * i as f64).collect();
        assert_eq!(ts, &want[..]);
        let restart = restart_index(50);
        assert_eq!(restart, 15);
        assert_eq!(ts[restart], 681.0);
        // (step, cosine factor, c at scale 2, c at scale 3, c at scale 0.5)
        let rows = [
            (
                15,
                0.7692383527755737,
                0.591727614402771,
                0.4551795721054077,
                0.8770623803138733,
            ),
            (
                16,
                0.7422521114349365,
                0.5509381890296936,
                0.4089350402355194,
                0.8615405559539795,
            ),
            (
                20,
                0.6258657574653625,
                0.3917079567909241,
                0.24515660107135773,
                0.7911167740821838,
            ),
            (
                30,
                0.3173990845680237,
                0.10074217617511749,
                0.03197547420859337,
                0.5633818507194519,
            ),
            (
                34,
                0.20737957954406738,
                0.0430062897503376,
                0.008918626233935356,
                0.45538946986198425,
            ),
            (
                35,
                0.18249982595443726,
                0.03330618515610695,
                0.006078373175114393,
                0.42719998955726624,
            ),
            (
                49,
                2.473592758178711e-06,
                6.118661133314163e-12,
                1.5135075869115457e-17,
                0.0015727659920230508,
            ),
        ];
        for (i, cf, c2, c3, c05) in rows {
            let t = ts[i];
            // torch computes in f32, Tessera in f64: the cosine factor agrees to f32
            // rounding everywhere. At t = 1 torch's `1 + cos(π·0.999)` cancels (its 2.4736e-6
            // vs the exact sin²(π/2000) = 2.4674e-6), which the square root at scale 0.5
            // carries into the third digit, hence the looser bound on that one entry.
            let tol05 = if i == 49 { 3e-6 } else { 2e-7 };
            close(cosine_factor(t, 1000), cf, 1e-7);
            close(restraint_weight(t, 1000, 2.0), c2, 2e-7);
            close(restraint_weight(t, 1000, 3.0), c3, 2e-7);
            close(restraint_weight(t, 1000, 0.5), c05, tol05);
        }
        let exact = (std::f64::consts::PI / 2000.0).sin().powi(2);
        close(cosine_factor(1.0, 1000), exact, 1e-15);
        assert_eq!(restart_index(10), 3);
        assert_eq!(restart_index(1), 0);
        Ok(())
    }

    #[test]
    fn restrain_blends_and_evaluates_noise_lazily() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::new(&[1.0f32, 2.0, -4.0], &dev)?;
        let n = Tensor::new(&[3.0f32, 0.0, 4.0], &dev)?;
        let got = restrain(&z, 0.25, || Ok(n.clone()))?.to_vec1::<f32>()?;
        assert_eq!(got, vec![1.5, 1.5, -2.0]);
        let mut called = false;
        let got = restrain(&z, 0.0, || {
            called = true;
            Ok(n.clone())
        })?;
        assert!(!called);
        assert_eq!(got.to_vec1::<f32>()?, z.to_vec1::<f32>()?);
        assert!(restrain(&z, 1.5, || Ok(n.clone())).is_err());
        Ok(())
    }

    #[test]
    fn restrained_structure_leaves_the_first_step_and_blends_the_later_ones() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[[[1.0f32, 2.0], [-4.0, 0.5]]]], &dev)?;
        let n = Tensor::new(&[[[[3.0f32, 0.0], [4.0, 1.0]]]], &dev)?;
        let uniform = RestrainedStructure::uniform(2.0, 1000);
        let mut called = false;
        let first = uniform.apply(&z, 0, 981.0, || {
            called = true;
            Ok(n.clone())
        })?;
        assert!(!called);
        assert_eq!(
            first.flatten_all()?.to_vec1::<f32>()?,
            z.flatten_all()?.to_vec1::<f32>()?
        );
        let c = restraint_weight(681.0, 1000, 2.0);
        let want = restrain(&z, c, || Ok(n.clone()))?;
        let got = uniform.apply(&z, 1, 681.0, || Ok(n.clone()))?;
        assert_eq!(
            got.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        // Under a mask: the left column keeps `cosine_scale`, the right one the background's.
        let mask = Tensor::new(&[[255.0f32, 0.0]], &dev)?;
        let masked = RestrainedStructure::masked(&mask, (2, 2), 2.0, 0.5, 1000)?;
        let e = exponent_map(&binarize_mask(&mask)?, (2, 2), 2.0, 0.5)?;
        let want = restrain_with_map(
            &z,
            &restraint_weight_map(&e, 681.0, 1000)?,
            || Ok(n.clone()),
        )?;
        let got = masked.apply(&z, 3, 681.0, || Ok(n.clone()))?;
        assert_eq!(
            got.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn mask_exponents_match_reference_imgen() -> Result<()> {
        // Expected: pipeline_freescale_imgen.py's
        // `cosine_factor ** (mask_*cosine_scale + (1-mask_)*cosine_scale_bg)` with the mask
        // (1,1,2,4) [[0,1,1,0],[1,0,0,1]] resized nearest to (4, 8), cosine_scale 3.0,
        // cosine_scale_bg 0.5, t = 581 (step 20 of the SDXL Euler schedule), run with torch
        // in /tmp/ref/fs.py (before the reference's cast to f16).
        let dev = Device::Cpu;
        let mask = Tensor::from_vec(vec![0f32, 1., 1., 0., 1., 0., 0., 1.], (1, 1, 2, 4), &dev)?;
        let e = exponent_map(&mask, (4, 8), 3.0, 0.5)?;
        let want_mask = [
            0., 0., 1., 1., 1., 1., 0., 0., 0., 0., 1., 1., 1., 1., 0., 0., 1., 1., 0., 0., 0., 0.,
            1., 1., 1., 1., 0., 0., 0., 0., 1., 1.,
        ];
        let ev = e.flatten_all()?.to_vec1::<f32>()?;
        for (got, m) in ev.iter().zip(want_mask) {
            assert_eq!(*got, if m == 1.0 { 3.0 } else { 0.5 });
        }
        let c = restraint_weight_map(&e, 581.0, 1000)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (got, m) in c.iter().zip(want_mask) {
            let want = if m == 1.0 {
                0.24515658617019653
            } else {
                0.7911167740821838
            };
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        // At t = 0 the factor is 0: c = 0 for positive exponents, 1 for a zero exponent.
        let z = Tensor::new(&[[[[2.0f32, 0.0]]]], &dev)?;
        assert_eq!(
            restraint_weight_map(&z, 0.0, 1000)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            vec![0.0, 1.0]
        );
        // Per-pixel blend broadcasts over batch and channels.
        let lat = Tensor::ones((1, 2, 1, 2), DType::F32, &dev)?;
        let noise = Tensor::zeros((1, 2, 1, 2), DType::F32, &dev)?;
        let w = Tensor::new(&[[[[0.25f32, 1.0]]]], &dev)?;
        let got = restrain_with_map(&lat, &w, || Ok(noise.clone()))?;
        assert_eq!(
            got.flatten_all()?.to_vec1::<f32>()?,
            vec![0.75, 0.0, 0.75, 0.0]
        );
        let bin = binarize_mask(&Tensor::new(&[0.0f32, 0.2, 1.0], &dev)?)?;
        assert_eq!(bin.to_vec1::<f32>()?, vec![0.0, 1.0, 1.0]);
        assert!(exponent_map(&Tensor::zeros(3, DType::F32, &dev)?, (4, 4), 1.0, 1.0).is_err());
        Ok(())
    }

    #[test]
    fn dilation_schedule_follows_reference() -> Result<()> {
        // pipeline_freescale.py: dilate_coef = target_size[1] // 1024 and the dilated list
        // applies while i < dilate_tau (35).
        let d = DilationSchedule::new(4096, 1024, DEFAULT_DILATE_TAU)?;
        assert_eq!(d.factor, 4);
        assert_eq!(d.dilation_at(34), 4);
        assert_eq!(d.dilation_at(35), 1);
        assert_eq!(dilated_layers(d.dilation_at(20)).count(), 9);
        assert!(dilated_layers(d.dilation_at(20)).all(|(_, f)| f == 4));
        assert_eq!(dilated_layers(d.dilation_at(35)).count(), 0);
        assert_eq!(
            DilationSchedule::new(1024, 1024, 35)?,
            DilationSchedule::NONE
        );
        assert_eq!(dilation_factor(3000, 1024)?, 2);
        assert_eq!(dilation_factor(512, 1024)?, 1);
        assert_eq!(DILATED_CONVS[0], "down_blocks.1.downsamplers.0.conv");
        Ok(())
    }

    #[test]
    fn restart_and_weights_match_reference_source_lines(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        // Expected: tests/parity/ref_freescale_schedule.py, which evaluates the
        // `restart_steps = [int(num_inference_steps*0.3)] ...`, `cosine_factor = ...` and
        // `c1 = cosine_factor ** cosine_scale` lines read out of pipeline_freescale.py on a
        // diffusers 0.42.1 EulerDiscreteScheduler with SDXL's config, 50 steps (torch f32).
        for (steps, restart) in [
            (1usize, 0usize),
            (3, 0),
            (4, 1),
            (10, 3),
            (20, 6),
            (25, 7),
            (30, 9),
            (40, 12),
            (60, 18),
            (100, 30),
        ] {
            assert_eq!(restart_index(steps), restart, "{steps}");
        }
        let cfg = SchedulerConfig::from_json(SDXL_SCHEDULER.as_bytes())?;
        let sched = Scheduler::new(SchedulerKind::Euler, &cfg, 50)?;
        let ts = sched.timesteps();
        // The stage starts from add_noise(z_up, ε, 681) = z_up + σ·ε, σ printed by the script.
        let restart = restart_index(50);
        assert_eq!((restart, ts[restart]), (15, 681.0));
        close(sched.sigmas()[restart], 3.093010187149048, 1e-6);
        let dev = Device::Cpu;
        let z = Tensor::new(&[0.5f32, -1.0], &dev)?;
        let eps = Tensor::new(&[1.0f32, 2.0], &dev)?;
        let n = sched.add_noise(&z, &eps, ts[restart])?.to_vec1::<f32>()?;
        close(f64::from(n[0]), 0.5 + 3.093010187149048, 1e-5);
        close(f64::from(n[1]), -1.0 + 2.0 * 3.093010187149048, 1e-5);
        // (step, t, c at cosine_scale 1, 2, 0.5): steps not in the table above.
        for (i, t, c1, c2, c05) in [
            (
                25usize,
                481.0,
                0.47017258405685425,
                0.22106225788593292,
                0.6856912970542908,
            ),
            (
                40,
                181.0,
                0.07867977023124695,
                0.006190506275743246,
                0.280499130487442,
            ),
        ] {
            assert_eq!(ts[i], t);
            close(restraint_weight(t, 1000, 1.0), c1, 1e-7);
            close(restraint_weight(t, 1000, 2.0), c2, 1e-7);
            close(restraint_weight(t, 1000, 0.5), c05, 2e-7);
            close(
                RestrainedStructure::uniform(2.0, 1000)
                    .apply(&Tensor::zeros(1, DType::F32, &dev)?, i, t, || {
                        Tensor::ones(1, DType::F32, &dev)
                    })?
                    .to_vec1::<f32>()?[0]
                    .into(),
                c2,
                1e-7,
            );
        }
        Ok(())
    }
}
