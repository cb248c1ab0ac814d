//! The units of work a worker performs for a job: encode a prompt, predict noise for a batch of
//! latent views at one timestep, decode latents to pixels. The coordinator owns everything
//! between these calls (guidance, scheduler steps, merging), so these stay pure functions of
//! their inputs — which is what makes a retried or duplicated task safe.

use candle_core::{DType, Device, Result, Tensor};
use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tessera_core::method::camap::{CaMap, CaMapCollector, FlatCaMap};
use tessera_core::method::freescale::dilated_layers;
use tessera_core::noise::{NoiseKey, NoisePurpose};
use tessera_core::task::{DenoiseTask, Task, TaskKind};
use tessera_store::{get_tensor, keys, put_tensor, Store, StoreError};

use crate::hooks::{CrossAttnInjection, FreeU, ScaleFusion, SelfAttentionMode, UNetHooks};
use crate::model::diffusion::{DiffusionModel, PromptEmbeddings, SizeConditioning};
use crate::model::loader::PipelineKind;

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

/// Encodes pixels (N, 3, H, W) in [-1, 1] to the scheduler's latent space: the posterior's
/// sample with the given noise (N, C, H/8, W/8) times the scaling factor, as the pipelines'
/// `vae.encode(image).latent_dist.sample() * scaling_factor`. In one piece: the coordinator
/// sends a picture larger than a VAE tile as `EncodeTile` tasks.
pub fn encode_pixels(model: &DiffusionModel, pixels: &Tensor, noise: &Tensor) -> Result<Tensor> {
    let x = pixels.to_dtype(model.vae_dtype())?;
    let posterior = model.vae.encode(&x)?;
    let z = posterior.sample(&noise.to_dtype(model.vae_dtype())?)?;
    z.to_dtype(candle_core::DType::F32)? * model.vae_scaling_factor()
}

/// One tile of a distributed encode: the posterior of `pixels` (N, 3, H, W) in [-1, 1] as
/// (N, 2C, H/8, W/8) `[mean, std]`, both times the scaling factor, so that
/// `mean + std · ε` is [`encode_pixels`]' sample for noise ε.
pub fn encode_moments(model: &DiffusionModel, pixels: &Tensor) -> Result<Tensor> {
    let x = pixels.to_dtype(model.vae_dtype())?;
    let posterior = model.vae.encode(&x)?;
    let sf = model.vae_scaling_factor();
    let mean = (posterior.mean().to_dtype(candle_core::DType::F32)? * sf)?;
    let std = (posterior.std()?.to_dtype(candle_core::DType::F32)? * sf)?;
    Tensor::cat(&[&mean, &std], 1)
}

/// What went wrong running a task; the message names the task and the key.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("task {task}: {source}")]
    Store {
        task: String,
        source: tessera_store::StoreError,
    },
    #[error("task {task}: {message}")]
    Compute { task: String, message: String },
}

/// FreeU factors by family: FreeScale's SDXL values, and FreeU's recommended SD 2.x values.
pub fn freeu_for(model: &DiffusionModel) -> FreeU {
    match model.kind {
        PipelineKind::StableDiffusionXl => FreeU {
            b1: 1.1,
            b2: 1.2,
            s1: 0.6,
            s2: 0.4,
        },
        PipelineKind::StableDiffusion => FreeU {
            b1: 1.4,
            b2: 1.6,
            s1: 0.9,
            s2: 0.2,
        },
    }
}

/// The UNet hooks a denoise task asks for.
pub fn hooks_for(model: &DiffusionModel, d: &DenoiseTask) -> UNetHooks {
    let mut hooks = UNetHooks::default();
    if d.freeu {
        hooks.freeu = Some(freeu_for(model));
    }
    hooks
        .dilation
        .extend(dilated_layers(d.dilation).map(|(path, f)| (path.to_string(), f)));
    if let Some(f) = &d.scale_fusion {
        hooks.self_attention = SelfAttentionMode::ScaleFusion(ScaleFusion {
            train_latent: (f.train_latent[0], f.train_latent[1]),
            fast: f.fast,
            jitter_seed: f.jitter_seed,
        });
    }
    hooks.capture_cross_attention = d.camap_capture.is_some();
    hooks
}

/// The stage CA-map a worker cuts its views from, kept between tasks: every view task of a
/// stage names the same map (written once at the stage's entry and never changed), so it is
/// read once per stage rather than once per task.
#[derive(Default)]
pub struct CamapCache(Mutex<Option<(String, Arc<FlatCaMap>)>>);

impl CamapCache {
    /// The map stored at `key`, read on first use. Tasks in flight at once wait for one read.
    pub fn get(
        &self,
        store: &dyn Store,
        key: &str,
    ) -> std::result::Result<Arc<FlatCaMap>, StoreError> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, map)) = slot.as_ref() {
            if k == key {
                return Ok(map.clone());
            }
        }
        *slot = None;
        let t = get_tensor(store, key, &candle_core::Device::Cpu)?;
        let map = CaMap::from_tensor(t)
            .and_then(|m| FlatCaMap::new(&m))
            .map_err(|e| StoreError::Codec {
                key: key.to_string(),
                message: format!("not a CA-map: {e}"),
            })?;
        let map = Arc::new(map);
        *slot = Some((key.to_string(), map.clone()));
        Ok(map)
    }
}

/// Runs one task: reads its inputs from `store`, computes on the model's device, writes its
/// outputs. Pure in its inputs, so running it twice writes the same bytes.
///
/// The device work runs while holding `turn`; reading and decoding the inputs before, and
/// encoding and writing the outputs after, do not. A worker that shares one `turn` between
/// its calls thus reads the next task while the device computes the current one, and the
/// device never waits for the store. Returns how long the task held the device.
pub fn execute(
    model: &DiffusionModel,
    store: &dyn Store,
    camaps: &CamapCache,
    task: &Task,
    turn: &Mutex<()>,
) -> std::result::Result<Duration, TaskError> {
    let held = Cell::new(Duration::ZERO);
    run(model, store, camaps, task, &|| {
        DeviceTurn::take(turn, &held)
    })?;
    Ok(held.get())
}

/// Holds the device for a task's computation, adding the time held to `total` when dropped.
struct DeviceTurn<'a> {
    _guard: MutexGuard<'a, ()>,
    since: Instant,
    total: &'a Cell<Duration>,
}

impl<'a> DeviceTurn<'a> {
    fn take(turn: &'a Mutex<()>, total: &'a Cell<Duration>) -> Self {
        let guard = turn.lock().unwrap_or_else(|e| e.into_inner());
        Self {
            _guard: guard,
            since: Instant::now(),
            total,
        }
    }
}

impl Drop for DeviceTurn<'_> {
    fn drop(&mut self) {
        self.total.set(self.total.get() + self.since.elapsed());
    }
}

fn run<'a>(
    model: &DiffusionModel,
    store: &dyn Store,
    camaps: &CamapCache,
    task: &Task,
    on_device: &dyn Fn() -> DeviceTurn<'a>,
) -> std::result::Result<(), TaskError> {
    let st = |source| TaskError::Store {
        task: task.id.clone(),
        source,
    };
    let cx = |e: candle_core::Error| TaskError::Compute {
        task: task.id.clone(),
        message: e.to_string(),
    };
    let dev = &model.device;
    let cpu = &Device::Cpu;
    match &task.kind {
        TaskKind::EncodePrompt {
            prompt,
            negative_prompt,
        } => {
            let parts = {
                let _turn = on_device();
                let e = model
                    .encode_prompt(prompt, negative_prompt.as_deref())
                    .map_err(|e| TaskError::Compute {
                        task: task.id.clone(),
                        message: e.to_string(),
                    })?;
                let host = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(cpu);
                let pooled = match (&e.pooled_cond, &e.pooled_uncond) {
                    (Some(pc), Some(pu)) => Some((host(pc).map_err(cx)?, host(pu).map_err(cx)?)),
                    _ => None,
                };
                (
                    host(&e.cond).map_err(cx)?,
                    host(&e.uncond).map_err(cx)?,
                    pooled,
                )
            };
            let put = |part: &str, t: &Tensor| {
                put_tensor(store, &keys::embedding(&task.job, part), t).map_err(st)
            };
            let (cond, uncond, pooled) = parts;
            put("uncond", &uncond)?;
            if let Some((pc, pu)) = &pooled {
                put("pooled_cond", pc)?;
                put("pooled_uncond", pu)?;
            }
            // Last: a resumed engine takes `cond` as the sign that all parts are stored.
            put("cond", &cond)
        }
        TaskKind::Denoise(d) => {
            let views = get_tensor(store, &d.input, cpu).map_err(st)?;
            let emb = load_embeddings(store, &task.job).map_err(st)?;
            let inject = match &d.camap_inject {
                Some(inj) => {
                    let stage_map = camaps.get(store, &inj.key).map_err(st)?;
                    let map = stage_map
                        .batch(
                            (inj.stage_hw[0], inj.stage_hw[1]),
                            (inj.view_hw[0], inj.view_hw[1]),
                            &inj.placements,
                        )
                        .map_err(|e| TaskError::Compute {
                            task: task.id.clone(),
                            message: e.to_string(),
                        })?;
                    Some((inj.weight, map))
                }
                None => None,
            };
            let size = SizeConditioning::for_size(d.size_conditioning[0], d.size_conditioning[1]);
            let guided = d.output_uncond.is_some();
            let (cond, uncond, capture) = {
                let _turn = on_device();
                let mut hooks = hooks_for(model, d);
                if let Some((weight, map)) = inject {
                    hooks.inject_cross_attention = Some(CrossAttnInjection {
                        weight,
                        map: map
                            .to_device(dev)
                            .map_err(cx)?
                            .to_dtype(model.dtype)
                            .map_err(cx)?,
                    });
                }
                let emb = emb.to_model(model).map_err(cx)?;
                let views = views.to_device(dev).map_err(cx)?;
                let pred = predict_noise(model, &views, d.timestep, &emb, size, guided, &mut hooks)
                    .map_err(cx)?;
                let capture = match &d.camap_capture {
                    Some(key) => {
                        let mut collector = CaMapCollector::new();
                        for m in &hooks.captured {
                            collector.add(&m.probs, (m.height, m.width)).map_err(|e| {
                                TaskError::Compute {
                                    task: task.id.clone(),
                                    message: e.to_string(),
                                }
                            })?;
                        }
                        let map = collector.finish().map_err(|e| TaskError::Compute {
                            task: task.id.clone(),
                            message: e.to_string(),
                        })?;
                        Some((key, map.tensor().to_device(cpu).map_err(cx)?))
                    }
                    None => None,
                };
                // Stored in the UNet's own dtype: exact (the prediction came out in it), and
                // half the bytes to write, hold and merge where that is f16 (every GPU worker).
                let stored = |t: &Tensor| t.to_dtype(model.dtype)?.to_device(cpu);
                let uncond = pred.uncond.as_ref().map(stored).transpose().map_err(cx)?;
                (stored(&pred.cond).map_err(cx)?, uncond, capture)
            };
            if let Some((key, map)) = capture {
                put_tensor(store, key, &map).map_err(st)?;
            }
            put_tensor(store, &d.output_cond, &cond).map_err(st)?;
            if let (Some(key), Some(u)) = (&d.output_uncond, &uncond) {
                put_tensor(store, key, u).map_err(st)?;
            }
            Ok(())
        }
        TaskKind::Decode { input, output } => {
            let z = get_tensor(store, input, cpu).map_err(st)?;
            let px = {
                let _turn = on_device();
                let z = z.to_device(dev).map_err(cx)?;
                // In the VAE's dtype, exactly as it decoded: half the bytes on a GPU.
                decode_latents(model, &z)
                    .and_then(|px| px.to_dtype(model.vae_dtype())?.to_device(cpu))
                    .map_err(cx)?
            };
            put_tensor(store, output, &px).map_err(st)
        }
        TaskKind::Encode {
            input,
            output,
            noise,
        } => {
            let px = get_tensor(store, input, cpu).map_err(st)?;
            let z = {
                let _turn = on_device();
                let px = px.to_device(dev).map_err(cx)?;
                let (n, _, h, w) = px.dims4().map_err(cx)?;
                let f = model.vae.config().downscale_factor();
                let channels = model.unet.config().in_channels;
                let eps = NoiseKey {
                    seed: noise.seed,
                    stage: noise.stage,
                    step: 0,
                    purpose: NoisePurpose::VaeSample,
                }
                .normal((n, channels, h / f, w / f), dev)
                .map_err(cx)?;
                encode_pixels(model, &px, &eps)
                    .and_then(|z| z.to_device(cpu))
                    .map_err(cx)?
            };
            put_tensor(store, output, &z).map_err(st)
        }
        TaskKind::EncodeTile { input, output } => {
            let px = get_tensor(store, input, cpu).map_err(st)?;
            let moments = {
                let _turn = on_device();
                let px = px.to_device(dev).map_err(cx)?;
                encode_moments(model, &px)
                    .and_then(|m| m.to_device(cpu))
                    .map_err(cx)?
            };
            put_tensor(store, output, &moments).map_err(st)
        }
    }
}

/// The job's prompt embeddings as stored (f32, on the CPU); [`PromptEmbeddings::to_model`]
/// puts them on the model's device in its dtype.
pub fn load_embeddings(
    store: &dyn Store,
    job: &str,
) -> std::result::Result<PromptEmbeddings, tessera_store::StoreError> {
    let get = |part: &str| get_tensor(store, &keys::embedding(job, part), &Device::Cpu);
    let opt = |part: &str| match get(part) {
        Ok(t) => Ok(Some(t)),
        Err(tessera_store::StoreError::Missing(_)) => Ok(None),
        Err(e) => Err(e),
    };
    Ok(PromptEmbeddings {
        cond: get("cond")?,
        uncond: get("uncond")?,
        pooled_cond: opt("pooled_cond")?,
        pooled_uncond: opt("pooled_uncond")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random_models::tiny::{synthesize, TinyArch};
    use tessera_store::MemoryStore;

    /// What lets the coordinator send f16 views to f16 workers: a worker casts its views to
    /// the model's dtype first thing, so views stored in it predict exactly as f32 views do,
    /// and the predictions it stores are in that dtype.
    #[test]
    fn views_in_the_model_dtype_predict_exactly_as_f32_views() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("tessera-view-dtype-{}", std::process::id()));
        synthesize(TinyArch::Sd21Tiny, &dir, 3)?;
        let model = DiffusionModel::load(&dir, &Device::Cpu, DType::F16);
        std::fs::remove_dir_all(&dir)?;
        let model = model?;
        let store = MemoryStore::new();
        let (camaps, turn) = (CamapCache::default(), Mutex::new(()));
        let task = |id: &str, kind| Task {
            job: "j".into(),
            id: id.into(),
            kind,
        };
        let prompt = TaskKind::EncodePrompt {
            prompt: "a lighthouse".into(),
            negative_prompt: None,
        };
        execute(&model, &store, &camaps, &task("p", prompt), &turn)?;

        let views = Tensor::randn(0f32, 1f32, (2, 4, 16, 16), &Device::Cpu)?;
        put_tensor(&store, "in32", &views)?;
        put_tensor(&store, "in16", &views.to_dtype(DType::F16)?)?;
        let mut outputs = Vec::new();
        for input in ["in32", "in16"] {
            let denoise = TaskKind::Denoise(DenoiseTask {
                timestep: 500.0,
                input: input.into(),
                output_cond: format!("{input}:cond"),
                output_uncond: Some(format!("{input}:uncond")),
                size_conditioning: [128, 128],
                freeu: false,
                dilation: 1,
                scale_fusion: None,
                camap_inject: None,
                camap_capture: None,
            });
            let held = execute(&model, &store, &camaps, &task(input, denoise), &turn)?;
            assert!(held > Duration::ZERO);
            for part in ["cond", "uncond"] {
                let bytes = store.get(&format!("{input}:{part}"))?.expect("stored");
                let t = tessera_core::codec::decode(&bytes, &Device::Cpu)?;
                assert_eq!(t.dtype(), DType::F16);
                assert_eq!(t.dims(), views.dims());
                outputs.push(bytes);
            }
        }
        assert_eq!(outputs[0], outputs[2], "cond differs");
        assert_eq!(outputs[1], outputs[3], "uncond differs");
        Ok(())
    }
}
