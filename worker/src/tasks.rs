//! The units of work a worker performs for a job: encode a prompt, predict noise for a batch of
//! latent views at one timestep, decode latents to pixels. The coordinator owns everything
//! between these calls (guidance, scheduler steps, merging), so these stay pure functions of
//! their inputs — which is what makes a retried or duplicated task safe.

use candle_core::{Result, Tensor};

use crate::model::diffusion::{DiffusionModel, PromptEmbeddings, SizeConditioning};
use crate::model::hooks::UNetHooks;

/// The UNet's predictions for a batch of views: conditional, and unconditional when guided.
#[derive(Debug, Clone)]
pub struct NoisePrediction {
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
}

/// Runs the UNet on `views` (N, 4, h, w), already scaled by the scheduler's
/// `scale_model_input`, at `timestep`. With guidance the batch is `[uncond × N, cond × N]`
/// in one forward pass, as diffusers batches it.
pub fn predict_noise(
    model: &DiffusionModel,
    views: &Tensor,
    timestep: f64,
    embeddings: &PromptEmbeddings,
    size: SizeConditioning,
    guided: bool,
    hooks: &mut UNetHooks,
) -> Result<NoisePrediction> {
    let n = views.dim(0)?;
    let views = views.to_dtype(model.dtype)?;
    let (input, context) = if guided {
        (
            Tensor::cat(&[&views, &views], 0)?,
            Tensor::cat(
                &[
                    embeddings.uncond.repeat((n, 1, 1))?,
                    embeddings.cond.repeat((n, 1, 1))?,
                ],
                0,
            )?,
        )
    } else {
        (views, embeddings.cond.repeat((n, 1, 1))?)
    };
    let added = model
        .added_conditioning(embeddings, size, guided, n)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let out = model
        .unet
        .forward(&input, timestep, &context, added.as_ref(), hooks)?
        .to_dtype(candle_core::DType::F32)?;
    if guided {
        Ok(NoisePrediction {
            uncond: Some(out.narrow(0, 0, n)?),
            cond: out.narrow(0, n, n)?,
        })
    } else {
        Ok(NoisePrediction {
            cond: out,
            uncond: None,
        })
    }
}

/// Decodes latents (N, 4, h, w) in the scheduler's space (i.e. before dividing by the VAE's
/// scaling factor) to images in [-1, 1].
pub fn decode_latents(model: &DiffusionModel, latents: &Tensor) -> Result<Tensor> {
    let z = (latents.to_dtype(model.vae_dtype())? / model.vae_scaling_factor())?;
    model.vae.decode(&z)?.to_dtype(candle_core::DType::F32)
}
