//! A **benchmark double** of a worker's model (`tessera worker --simulate-eval-ms MS`): it loads
//! no weights and computes nothing meaningful. Each task reads its real inputs from the store,
//! waits as long as a GPU of the given speed would, and writes outputs of the real shapes and
//! dtypes — a CUDA worker's: noise predictions and decoded pixels in f16, as the model computes
//! them there — so the coordinator, the dispatch and Redis do exactly the work of a real run. It
//! exists to measure Tessera's own overhead and scaling (`tessera bench scale`) on machines
//! without GPUs; it is never the default and its pictures are meaningless.
//!
//! Costs: one training-size evaluation with CFG (both halves) takes `eval_ms`; a view scales
//! linearly with its area relative to the training latent, a batch with its views, an unguided
//! evaluation is half. Prompt encoding costs a tenth of an evaluation; VAE decode and encode
//! cost one evaluation per training-size image of pixels.

use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use tessera_core::codec;
use tessera_core::task::{Task, TaskKind};
use tessera_store::{keys, RedisStore, StoreError};

use crate::tasks::TaskError;

/// Sequence length of the CLIP text encoders' embeddings.
const TEXT_TOKENS: usize = 77;
/// The dtype a CUDA worker's UNet and VAE compute in, so their outputs' sizes.
pub const GPU_DTYPE: DType = DType::F16;

/// What the double needs of a model: its geometry, read from the model directory's configs.
#[derive(Debug, Clone)]
pub struct SimulatedModel {
    /// Milliseconds per training-size evaluation with CFG.
    pub eval_ms: f64,
    /// Training latent side (SDXL 128).
    pub train_latent: usize,
    pub latent_channels: usize,
    /// Width of the prompt embeddings the UNet attends to (`cross_attention_dim`).
    pub context_dim: usize,
    /// Width of SDXL's pooled text embedding, `None` for SD 2.1.
    pub pooled_dim: Option<usize>,
    /// The stage CA-map last read: like a real worker, the double reads a stage's map once.
    pub camap_read: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SimulatedModelError {
    path: String,
    message: String,
}

fn read_config(dir: &Path, component: &str) -> Result<serde_json::Value, SimulatedModelError> {
    let path = dir.join(component).join("config.json");
    let err = |message: String| SimulatedModelError {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(e.to_string()))
}

fn field(v: &serde_json::Value, name: &str) -> Option<usize> {
    match &v[name] {
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as usize),
        // SD 2.1's cross_attention_dim may be a list (one per block); they are all equal.
        serde_json::Value::Array(a) => a.first().and_then(|n| n.as_u64()).map(|n| n as usize),
        _ => None,
    }
}

impl SimulatedModel {
    /// The geometry of the model in `dir` (configs only; no weights are read).
    pub fn from_dir(dir: &Path, eval_ms: f64) -> Result<Self, SimulatedModelError> {
        let unet = read_config(dir, "unet")?;
        let missing = |what: &str| SimulatedModelError {
            path: dir.join("unet/config.json").display().to_string(),
            message: format!("no {what}"),
        };
        let pooled_dim = if dir.join("text_encoder_2").is_dir() {
            field(&read_config(dir, "text_encoder_2")?, "projection_dim")
        } else {
            None
        };
        Ok(Self {
            eval_ms,
            train_latent: field(&unet, "sample_size").ok_or_else(|| missing("sample_size"))?,
            latent_channels: field(&unet, "in_channels").ok_or_else(|| missing("in_channels"))?,
            context_dim: field(&unet, "cross_attention_dim")
                .ok_or_else(|| missing("cross_attention_dim"))?,
            pooled_dim,
            camap_read: Default::default(),
        })
    }

    /// The simulated time of evaluating `views` views of `h × w` latent pixels.
    pub fn denoise_time(&self, views: usize, hw: (usize, usize), guided: bool) -> Duration {
        let area = (hw.0 * hw.1) as f64 / (self.train_latent * self.train_latent) as f64;
        let halves = if guided { 1.0 } else { 0.5 };
        Duration::from_secs_f64(self.eval_ms * 1e-3 * views as f64 * area * halves)
    }

    /// The simulated time of a VAE pass over `h × w` latent pixels.
    /// The simulated device time: `length` holding the worker's device turn.
    async fn compute(turn: &tokio::sync::Mutex<()>, length: Duration) -> Duration {
        let _turn = turn.lock().await;
        let since = std::time::Instant::now();
        tokio::time::sleep(length).await;
        since.elapsed()
    }

    pub fn vae_time(&self, hw: (usize, usize)) -> Duration {
        self.denoise_time(1, hw, true)
    }

    /// Runs one task against the store: reads its inputs, waits, writes deterministic outputs
    /// of the real sizes (a scaled copy of the input for noise predictions) while `guard`
    /// exists.
    /// Runs one task like [`crate::tasks::execute`]: the simulated device time is spent
    /// holding `turn`, the store reads and writes around it are not.
    pub async fn execute(
        &self,
        store: &RedisStore,
        guard: &str,
        task: &Task,
        turn: &tokio::sync::Mutex<()>,
    ) -> Result<Duration, TaskError> {
        let st = |source| TaskError::Store {
            task: task.id.clone(),
            source,
        };
        let cx = |e: candle_core::Error| TaskError::Compute {
            task: task.id.clone(),
            message: e.to_string(),
        };
        let read = |key: String| async move {
            let bytes = store
                .get_async(&key)
                .await?
                .ok_or(StoreError::Missing(key.clone()))?;
            codec::decode(&bytes, &Device::Cpu).map_err(|e| StoreError::Codec {
                key,
                message: e.to_string(),
            })
        };
        let write = |key: String, t: Tensor| async move {
            let bytes = blocking(move || {
                codec::encode(&t).map_err(|e| candle_core::Error::Msg(e.to_string()))
            })
            .await
            .map_err(|e| StoreError::Codec {
                key: key.clone(),
                message: e.to_string(),
            })?;
            store.put_guarded_async(guard, &key, &bytes).await?;
            Ok::<(), StoreError>(())
        };
        match &task.kind {
            TaskKind::EncodePrompt { .. } => {
                let held =
                    Self::compute(turn, self.denoise_time(1, (1, 1), true).mul_f64(0.1)).await;
                let tokens =
                    |v: f32| Tensor::full(v, (1, TEXT_TOKENS, self.context_dim), &Device::Cpu);
                let mut parts = vec![("uncond", tokens(0.0).map_err(cx)?)];
                if let Some(p) = self.pooled_dim {
                    parts.push((
                        "pooled_cond",
                        Tensor::full(0.01f32, (1, p), &Device::Cpu).map_err(cx)?,
                    ));
                    parts.push((
                        "pooled_uncond",
                        Tensor::zeros((1, p), DType::F32, &Device::Cpu).map_err(cx)?,
                    ));
                }
                // Last, as the real worker: `cond` says every part is stored.
                parts.push(("cond", tokens(0.01).map_err(cx)?));
                for (part, t) in parts {
                    write(keys::embedding(&task.job, part), t)
                        .await
                        .map_err(st)?;
                }
                Ok(held)
            }
            TaskKind::Denoise(d) => {
                let views = read(d.input.clone()).await.map_err(st)?;
                let (n, _, h, w) = views.dims4().map_err(cx)?;
                if let Some(inj) = &d.camap_inject {
                    let seen = {
                        let last = self.camap_read.lock().unwrap_or_else(|e| e.into_inner());
                        last.as_deref() == Some(inj.key.as_str())
                    };
                    if !seen {
                        read(inj.key.clone()).await.map_err(st)?;
                        *self.camap_read.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(inj.key.clone());
                    }
                }
                let guided = d.output_uncond.is_some();
                let held = Self::compute(turn, self.denoise_time(n, (h, w), guided)).await;
                if let Some(key) = &d.camap_capture {
                    let halves = if guided { 2 } else { 1 };
                    let map = Tensor::full(
                        1.0 / TEXT_TOKENS as f32,
                        (halves * n, h.div_ceil(4), w.div_ceil(4), TEXT_TOKENS),
                        &Device::Cpu,
                    )
                    .map_err(cx)?;
                    write(key.clone(), map).await.map_err(st)?;
                }
                // Both predictions are the views themselves: a real worker's arithmetic runs on
                // its GPU, not on the CPU this double may share with the coordinator.
                let out = views.to_dtype(GPU_DTYPE).map_err(cx)?;
                write(d.output_cond.clone(), out.clone())
                    .await
                    .map_err(st)?;
                if let Some(key) = &d.output_uncond {
                    write(key.clone(), out).await.map_err(st)?;
                }
                Ok(held)
            }
            TaskKind::Decode { input, output } => {
                let z = read(input.clone()).await.map_err(st)?;
                let (_, c, h, w) = z.dims4().map_err(cx)?;
                let held = Self::compute(turn, self.vae_time((h, w))).await;
                let px = blocking(move || -> candle_core::Result<Tensor> {
                    z.narrow(1, 0, c.min(3))?
                        .repeat((1, 3usize.div_ceil(c.min(3)), 1, 1))?
                        .narrow(1, 0, 3)?
                        .upsample_nearest2d(8 * h, 8 * w)?
                        .clamp(-1f32, 1f32)?
                        .to_dtype(GPU_DTYPE)
                })
                .await
                .map_err(cx)?;
                write(output.clone(), px).await.map_err(st)?;
                Ok(held)
            }
            TaskKind::Encode { input, output, .. } => {
                let px = read(input.clone()).await.map_err(st)?;
                let (_, _, h, w) = px.dims4().map_err(cx)?;
                let held = Self::compute(turn, self.vae_time((h / 8, w / 8))).await;
                let channels = self.latent_channels;
                let z = blocking(move || -> candle_core::Result<Tensor> {
                    let pooled = px.avg_pool2d(8)?;
                    let rep = channels.div_ceil(3);
                    pooled.repeat((1, rep, 1, 1))?.narrow(1, 0, channels)
                })
                .await
                .map_err(cx)?;
                write(output.clone(), z).await.map_err(st)?;
                Ok(held)
            }
            TaskKind::EncodeTile { input, output } => {
                // The posterior's (mean, std): the pooled picture as the mean, std zero.
                let px = read(input.clone()).await.map_err(st)?;
                let (_, _, h, w) = px.dims4().map_err(cx)?;
                let held = Self::compute(turn, self.vae_time((h / 8, w / 8))).await;
                let channels = self.latent_channels;
                let moments = blocking(move || -> candle_core::Result<Tensor> {
                    let pooled = px.avg_pool2d(8)?;
                    let mean = pooled
                        .repeat((1, channels.div_ceil(3), 1, 1))?
                        .narrow(1, 0, channels)?;
                    Tensor::cat(&[&mean, &mean.zeros_like()?], 1)
                })
                .await
                .map_err(cx)?;
                write(output.clone(), moments).await.map_err(st)?;
                Ok(held)
            }
        }
    }
}

/// Runs CPU work off the async threads (large tensors take milliseconds to encode).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> candle_core::Result<T> + Send + 'static,
) -> candle_core::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(candle_core::Error::Msg(format!(
            "simulated task panicked: {e}"
        ))),
    }
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
            camap_read: Default::default(),
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
