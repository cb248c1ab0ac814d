//! Runs a job's sampling loop. The engine owns the scheduler, guidance and the latent; the model
//! work goes through the worker's task functions, so the same loop can later hand those tasks
//! to remote workers.

use candle_core::{DType, Device, Tensor};
use tessera_common::method::guidance;
use tessera_common::noise::{NoiseKey, NoisePurpose};
use tessera_common::sched::{Scheduler, SchedulerKind};
use tessera_common::spec::{RenderSpec, PIXELS_PER_LATENT};
use tessera_worker::model::diffusion::{DiffusionModel, SizeConditioning};
use tessera_worker::model::hooks::UNetHooks;
use tessera_worker::tasks;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("model: {0}")]
    Model(String),
    #[error("computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// What the sampling loop reports after each step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    pub step: usize,
    pub steps: usize,
    pub timestep: f64,
}

#[derive(Debug)]
pub struct RenderOutput {
    /// The final latent (1, 4, h, w) in f32, before the VAE's scaling is undone.
    pub latents: Tensor,
    /// The decoded picture, (3, H, W) 8-bit, row-major RGB.
    pub image: Tensor,
    pub scheduler: SchedulerKind,
}

/// The latent shape of a render: `(1, 4, height / 8, width / 8)`.
pub fn latent_shape(spec: &RenderSpec, channels: usize) -> (usize, usize, usize, usize) {
    (
        1,
        channels,
        (spec.height / PIXELS_PER_LATENT) as usize,
        (spec.width / PIXELS_PER_LATENT) as usize,
    )
}

/// Plain text-to-image sampling at one size: for the same initial latents, step for step what
/// diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline compute.
pub fn render_single(
    model: &DiffusionModel,
    spec: &RenderSpec,
    initial_latents: Option<Tensor>,
    on_step: &mut dyn FnMut(StepProgress),
) -> Result<RenderOutput> {
    spec.validate().map_err(|e| EngineError::Invalid(e.0))?;
    let device = model.device.clone();
    let cfg = &model.scheduler_config;
    let kind = match spec.scheduler {
        Some(k) => k,
        None => cfg
            .kind()
            .map_err(|e| EngineError::Invalid(format!("{e}")))?,
    };
    let scheduler =
        Scheduler::new(kind, cfg, spec.steps).map_err(|e| EngineError::Invalid(e.to_string()))?;

    let channels = model.unet.config().in_channels;
    let shape = latent_shape(spec, channels);
    let noise = match initial_latents {
        Some(t) => check_initial_latents(t, shape, spec)?.to_device(&device)?,
        None => NoiseKey::new(spec.seed, NoisePurpose::InitialLatent).normal(shape, &device)?,
    };
    // diffusers scales given latents by the scheduler's initial sigma too.
    let mut latents = (noise * scheduler.init_noise_sigma())?;

    let embeddings = model
        .encode_prompt(&spec.prompt, spec.negative_prompt.as_deref())
        .map_err(|e| EngineError::Model(e.to_string()))?;
    let guided = guidance::uses_guidance(spec.guidance);
    let size = SizeConditioning::for_size(spec.height, spec.width);
    let mut hooks = UNetHooks::default();

    let steps = scheduler.timesteps().len();
    for (i, &t) in scheduler.timesteps().iter().enumerate() {
        let input = scheduler.scale_model_input(&latents, i)?;
        let pred = tasks::predict_noise(model, &input, t, &embeddings, size, guided, &mut hooks)?;
        let eps = match &pred.uncond {
            Some(u) => guidance::classifier_free(u, &pred.cond, spec.guidance)?,
            None => pred.cond,
        };
        latents = scheduler.step(&eps, i, &latents)?.prev_sample;
        on_step(StepProgress {
            step: i + 1,
            steps,
            timestep: t,
        });
    }

    let pixels = tasks::decode_latents(model, &latents)?;
    Ok(RenderOutput {
        image: to_rgb8(&pixels.squeeze(0)?)?,
        latents: latents.to_dtype(DType::F32)?,
        scheduler: kind,
    })
}

fn check_initial_latents(
    t: Tensor,
    shape: (usize, usize, usize, usize),
    spec: &RenderSpec,
) -> Result<Tensor> {
    let want = [shape.0, shape.1, shape.2, shape.3];
    let dims = t.dims().to_vec();
    // A (4, h, w) latent is the same thing without the batch axis; accept it.
    let t = if dims.len() == 3 { t.unsqueeze(0)? } else { t };
    if t.dims() != want {
        return Err(EngineError::Invalid(format!(
            "--latents holds a tensor of shape {dims:?}, but a {}x{} render needs {want:?} \
             (1 x channels x height/8 x width/8): pass --size {}x{} or other latents",
            spec.width,
            spec.height,
            dims.last().copied().unwrap_or(0) * 8,
            dims.get(dims.len().saturating_sub(2)).copied().unwrap_or(0) * 8,
        )));
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// [-1, 1] floats to 8-bit RGB as diffusers' image processor does: `(x / 2 + 0.5)` clamped to
/// [0, 1], times 255, rounded half away from zero (numpy's `round` is half-to-even, but exact
/// halves do not occur in practice for float outputs).
pub fn to_rgb8(image: &Tensor) -> Result<Tensor> {
    let x = ((image.to_device(&Device::Cpu)?.to_dtype(DType::F32)? / 2.0)? + 0.5)?;
    let x = (x.clamp(0f32, 1f32)? * 255.0)?.round()?;
    Ok(x.to_dtype(DType::U8)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb_conversion_clamps_and_rounds() -> Result<()> {
        let t = Tensor::new(&[[[-1.5f32, -1.0, 0.0, 0.999, 1.0, 2.0]]], &Device::Cpu)?;
        let v = to_rgb8(&t)?.flatten_all()?.to_vec1::<u8>()?;
        assert_eq!(v, vec![0, 0, 128, 255, 255, 255]);
        Ok(())
    }
}
