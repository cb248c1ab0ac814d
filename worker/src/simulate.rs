//! A **benchmark double** of a worker's model (`tessera worker --simulate-eval-ms MS`): it loads
//! no weights and computes nothing meaningful. Each task runs through the model's own
//! [`crate::tasks::execute`], which reads its real inputs from the store and writes its outputs;
//! the double only waits as long as a GPU of the given speed would and makes outputs of the real
//! shapes and dtypes — a CUDA worker's: noise predictions and decoded pixels in f16, as the model
//! computes them there — so the coordinator, the dispatch and Redis do exactly the work of a
//! real run. It
//! exists to measure Tessera's own overhead and scaling (`tessera bench scale`) on machines
//! without GPUs; it is never the default and its pictures are meaningless.
//!
//! Costs: one training-size evaluation with CFG (both halves) takes `eval_ms`; a view scales
//! linearly with its area relative to the training latent, a batch with its views, an unguided
//! evaluation is half. Prompt encoding costs a tenth of an evaluation; VAE decode and encode
//! cost one evaluation per training-size image of pixels.

use std::path::Path;
use std::time::Duration;

use candle_core::{Device, Result, Tensor};
use tessera_core::task::DenoiseTask;

use crate::model::denoiser::DenoiserConfig;
use crate::model::diffusion::PromptEmbeddings;
use crate::model::loader::ModelDir;
use crate::tasks::{DenoiseOutputs, OnDevice};

/// Sequence length of the CLIP text encoders' embeddings.
const TEXT_TOKENS: usize = 77;
/// The dtype a CUDA worker's UNet and VAE compute in, so their outputs' sizes.
pub const GPU_DTYPE: candle_core::DType = candle_core::DType::F16;

/// What the double needs of a model: its geometry, read from the model directory's configs.
#[derive(Debug, Clone)]
pub struct SimulatedModel {
    /// Milliseconds per training-size evaluation with CFG.
    pub eval_ms: f64,
    /// Training latent side (SDXL 128).
    pub train_latent: usize,
    pub latent_channels: usize,
    /// Width of the prompt embeddings the denoiser attends to.
    pub context_dim: usize,
    /// Width of SDXL's pooled text embedding, `None` for SD 2.1.
    pub pooled_dim: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SimulatedModelError {
    path: String,
    message: String,
}

impl SimulatedModel {
    /// The geometry of the model in `dir` (configs only; no weights are read).
    pub fn from_dir(dir: &Path, eval_ms: f64) -> std::result::Result<Self, SimulatedModelError> {
        let err = |message: String| SimulatedModelError {
            path: dir.display().to_string(),
            message,
        };
        let model = ModelDir::open(dir).map_err(|e| err(e.to_string()))?;
        let denoiser = DenoiserConfig::read(&model).map_err(|e| err(e.to_string()))?;
        Ok(Self {
            eval_ms,
            train_latent: denoiser.training_size() as usize / 8,
            latent_channels: denoiser.latent_channels(),
            context_dim: denoiser.context_dim().map_err(|e| err(e.to_string()))?,
            pooled_dim: denoiser.pooled_dim(),
        })
    }

    /// The simulated time of evaluating `views` views of `h × w` latent pixels.
    pub fn denoise_time(&self, views: usize, hw: (usize, usize), guided: bool) -> Duration {
        let area = (hw.0 * hw.1) as f64 / (self.train_latent * self.train_latent) as f64;
        let halves = if guided { 1.0 } else { 0.5 };
        Duration::from_secs_f64(self.eval_ms * 1e-3 * views as f64 * area * halves)
    }

    /// The simulated time of a VAE pass over `h × w` latent pixels.
    pub fn vae_time(&self, hw: (usize, usize)) -> Duration {
        self.denoise_time(1, hw, true)
    }

    /// The simulated device time: `length` holding the worker's device turn. Each turn is
    /// logged with its wall-clock span (ms since the epoch): `tessera bench scale` reads
    /// these lines to tell when the workers waited.
    fn compute(on_device: &OnDevice, length: Duration) {
        let _turn = on_device();
        let start_ms = epoch_ms();
        std::thread::sleep(length);
        tracing::info!(start_ms, end_ms = epoch_ms(), "simulated device turn");
    }

    /// Prompt embeddings of the real shapes: constant tokens, and SDXL's pooled embeddings.
    pub(crate) fn encode_prompt(&self, on_device: &OnDevice) -> Result<PromptEmbeddings> {
        Self::compute(on_device, self.denoise_time(1, (1, 1), true).mul_f64(0.1));
        let cpu = &Device::Cpu;
        let tokens = |v: f32| Tensor::full(v, (1, TEXT_TOKENS, self.context_dim), cpu);
        let pooled = |v: f32| {
            self.pooled_dim
                .map(|p| Tensor::full(v, (1, p), cpu))
                .transpose()
        };
        Ok(PromptEmbeddings {
            cond: tokens(0.01)?,
            uncond: tokens(0.0)?,
            pooled_cond: pooled(0.01)?,
            pooled_uncond: pooled(0.0)?,
        })
    }

    /// Both predictions are the views themselves: a real worker's arithmetic runs on its GPU,
    /// not on the CPU this double may share with the coordinator.
    pub(crate) fn denoise(
        &self,
        d: &DenoiseTask,
        views: &Tensor,
        on_device: &OnDevice,
    ) -> Result<DenoiseOutputs> {
        let (n, _, h, w) = views.dims4()?;
        let guided = d.output_uncond.is_some();
        Self::compute(on_device, self.denoise_time(n, (h, w), guided));
        let camap = match &d.camap_capture {
            Some(_) => {
                let halves = if guided { 2 } else { 1 };
                Some(Tensor::full(
                    1.0 / TEXT_TOKENS as f32,
                    (halves * n, h.div_ceil(4), w.div_ceil(4), TEXT_TOKENS),
                    &Device::Cpu,
                )?)
            }
            None => None,
        };
        let out = views.to_dtype(GPU_DTYPE)?;
        Ok(DenoiseOutputs {
            uncond: guided.then(|| out.clone()),
            cond: out,
            camap,
        })
    }

    /// Pixels of the real size: the latent's first channels, nearest-upsampled.
    pub(crate) fn decode(&self, z: &Tensor, on_device: &OnDevice) -> Result<Tensor> {
        let (_, c, h, w) = z.dims4()?;
        Self::compute(on_device, self.vae_time((h, w)));
        z.narrow(1, 0, c.min(3))?
            .repeat((1, 3usize.div_ceil(c.min(3)), 1, 1))?
            .narrow(1, 0, 3)?
            .upsample_nearest2d(8 * h, 8 * w)?
            .clamp(-1f32, 1f32)?
            .to_dtype(GPU_DTYPE)
    }

    /// A latent of the real size: the pooled picture, repeated over the channels.
    pub(crate) fn encode(&self, px: &Tensor, on_device: &OnDevice) -> Result<Tensor> {
        let (_, _, h, w) = px.dims4()?;
        Self::compute(on_device, self.vae_time((h / 8, w / 8)));
        let channels = self.latent_channels;
        let pooled = px.avg_pool2d(8)?;
        pooled
            .repeat((1, channels.div_ceil(3), 1, 1))?
            .narrow(1, 0, channels)
    }

    /// The posterior's (mean, std): the pooled picture as the mean, std zero.
    pub(crate) fn encode_moments(&self, px: &Tensor, on_device: &OnDevice) -> Result<Tensor> {
        let mean = self.encode(px, on_device)?;
        Tensor::cat(&[&mean, &mean.zeros_like()?], 1)
    }
}

/// Milliseconds since the Unix epoch, as f64 (the coordinator's step lines use the same clock).
fn epoch_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_scale_with_area_batch_and_guidance() {
        let m = SimulatedModel {
            eval_ms: 100.0,
            train_latent: 128,
            latent_channels: 4,
            context_dim: 2048,
            pooled_dim: Some(1280),
        };
        assert_eq!(
            m.denoise_time(1, (128, 128), true),
            Duration::from_millis(100)
        );
        assert_eq!(
            m.denoise_time(4, (128, 128), true),
            Duration::from_millis(400)
        );
        assert_eq!(
            m.denoise_time(1, (256, 128), false),
            Duration::from_millis(100)
        );
        assert_eq!(m.vae_time((64, 64)), Duration::from_millis(25));
    }
}
