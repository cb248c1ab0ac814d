//! The units of work a worker performs for a job: encode a prompt, predict noise for a batch of
//! latent views at one timestep, decode latents to pixels. The coordinator owns everything
//! between these calls (guidance, scheduler steps, merging), so these stay pure functions of
//! their inputs — which is what makes a retried or duplicated task safe.
//!
//! [`execute`] runs a task the same way whatever computes it: it reads the inputs, hands them
//! to a [`Backend`] — the loaded model, or the benchmark double of [`crate::simulate`] — and
//! writes the outputs.

use candle_core::{DType, Device, Result, Tensor};
use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tessera_core::method::camap::{CaMap, CaMapCollector, FlatCaMap};
use tessera_core::noise::{NoiseKey, NoisePurpose};
use tessera_core::task::{DenoiseTask, Task, TaskKind, VaeNoise};
use tessera_store::{get_tensor, keys, put_tensor, Store, StoreError};

use crate::hooks::{self, CrossAttnInjection, UNetHooks};
use crate::model::diffusion::{DiffusionModel, PromptEmbeddings, SizeConditioning};
use crate::simulate::SimulatedModel;

/// The denoiser's predictions for a batch of views: conditional, and unconditional when guided.
#[derive(Debug, Clone)]
pub struct NoisePrediction {
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
}

/// Runs the denoiser on `views` (N, C, h, w), already scaled by the scheduler's
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
    let input = if guided {
        Tensor::cat(&[&views, &views], 0)?
    } else {
        views
    };
    let cond = model
        .conditioning(embeddings, size, guided, n)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let out = model
        .denoiser
        .forward(&input, timestep, &cond, hooks)?
        .to_dtype(DType::F32)?;
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

/// Decodes latents (N, C, h, w) in the scheduler's space (i.e. before dividing by the VAE's
/// scaling factor and adding its shift, SD3's `latents / scaling_factor + shift_factor`) to
/// images in [-1, 1].
pub fn decode_latents(model: &DiffusionModel, latents: &Tensor) -> Result<Tensor> {
    let z = ((latents.to_dtype(model.vae_dtype())? / model.vae_scaling_factor())?
        + model.vae_shift_factor())?;
    model.vae.decode(&z)?.to_dtype(candle_core::DType::F32)
}

/// Encodes pixels (N, 3, H, W) in [-1, 1] to the scheduler's latent space: the posterior's
/// sample with the given noise (N, C, H/8, W/8), less the VAE's shift, times the scaling
/// factor, as the pipelines' `(vae.encode(image).latent_dist.sample() − shift_factor) *
/// scaling_factor`. In one piece: the coordinator sends a picture larger than a VAE tile as
/// `EncodeTile` tasks.
pub fn encode_pixels(model: &DiffusionModel, pixels: &Tensor, noise: &Tensor) -> Result<Tensor> {
    let x = pixels.to_dtype(model.vae_dtype())?;
    let posterior = model.vae.encode(&x)?;
    let z = posterior.sample(&noise.to_dtype(model.vae_dtype())?)?;
    ((z.to_dtype(candle_core::DType::F32)? - model.vae_shift_factor())?)
        * model.vae_scaling_factor()
}

/// One tile of a distributed encode: the posterior of `pixels` (N, 3, H, W) in [-1, 1] as
/// (N, 2C, H/8, W/8) `[(mean − shift) · scale, std · scale]`, so that `mean + std · ε` is
/// [`encode_pixels`]' sample for noise ε.
pub fn encode_moments(model: &DiffusionModel, pixels: &Tensor) -> Result<Tensor> {
    let x = pixels.to_dtype(model.vae_dtype())?;
    let posterior = model.vae.encode(&x)?;
    let sf = model.vae_scaling_factor();
    let mean =
        ((posterior.mean().to_dtype(candle_core::DType::F32)? - model.vae_shift_factor())? * sf)?;
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

/// What a worker keeps between tasks because every view task of a step (and of the job) would
/// otherwise read it again: the stage CA-map its views are cut from (written once at the
/// stage's entry, never changed) and each running job's prompt embeddings (written once by the
/// job's encode task, never changed while the job id lives; ids are not reused). With SDXL's
/// embeddings (two 77 × 2048 f32 contexts, about 1.3 MB) read per task, a step of 289 tasks
/// would move 360 MB; cached, each job's are read once per worker.
#[derive(Default)]
pub struct ReadCache {
    camap: Mutex<Option<(String, Arc<FlatCaMap>)>>,
    /// The embeddings of the last few jobs, newest last (the runner interleaves a few jobs).
    embeddings: Mutex<Vec<(String, PromptEmbeddings)>>,
}

/// Jobs whose embeddings a worker keeps: the runner's jobs in flight at once, with room.
const CACHED_JOBS: usize = 8;

impl ReadCache {
    /// The map stored at `key`, read on first use. Tasks in flight at once wait for one read.
    pub fn camap(
        &self,
        store: &dyn Store,
        key: &str,
    ) -> std::result::Result<Arc<FlatCaMap>, StoreError> {
        let mut slot = self.camap.lock().unwrap_or_else(|e| e.into_inner());
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

    /// `job`'s prompt embeddings, read on first use (tensors share their storage, so the
    /// copy handed out is cheap).
    pub fn embeddings(
        &self,
        store: &dyn Store,
        job: &str,
    ) -> std::result::Result<PromptEmbeddings, StoreError> {
        let mut jobs = self.embeddings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, e)) = jobs.iter().find(|(j, _)| j == job) {
            return Ok(e.clone());
        }
        let e = load_embeddings(store, job)?;
        if jobs.len() >= CACHED_JOBS {
            jobs.remove(0);
        }
        jobs.push((job.to_string(), e.clone()));
        Ok(e)
    }
}

/// What computes a task's outputs from its inputs: the loaded model, or the benchmark double
/// ([`crate::simulate`]), which waits as long as a GPU would and makes outputs of the real
/// shapes. What a task reads and writes is the same for both.
#[derive(Clone, Copy)]
pub enum Backend<'a> {
    Model(&'a DiffusionModel),
    Simulated(&'a SimulatedModel),
}

/// Runs one task: reads its inputs from `store`, computes on the backend's device, writes its
/// outputs. Pure in its inputs, so running it twice writes the same bytes.
///
/// The device work runs while holding `turn`; reading and decoding the inputs before, and
/// encoding and writing the outputs after, do not. A worker that shares one `turn` between
/// its calls thus reads the next task while the device computes the current one, and the
/// device never waits for the store. Returns how long the task held the device.
pub fn execute(
    backend: Backend,
    store: &dyn Store,
    cache: &ReadCache,
    task: &Task,
    turn: &Mutex<()>,
) -> std::result::Result<Duration, TaskError> {
    execute_counted(backend, store, cache, task, turn).map(|ran| ran.held)
}

/// What running a task took: the time it held the device, and the model evaluations it ran
/// (views, twice with guidance; none for prompt and VAE tasks), for the metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ran {
    pub held: Duration,
    pub evaluations: u64,
}

/// [`execute`], also counting the task's model evaluations.
pub fn execute_counted(
    backend: Backend,
    store: &dyn Store,
    cache: &ReadCache,
    task: &Task,
    turn: &Mutex<()>,
) -> std::result::Result<Ran, TaskError> {
    let held = Cell::new(Duration::ZERO);
    let on_device = || DeviceTurn::take(turn, &held);
    let io = TaskIo { store, task };
    let mut evaluations = 0;
    match &task.kind {
        TaskKind::EncodePrompt {
            prompt,
            negative_prompt,
        } => {
            let e = backend
                .encode_prompt(prompt, negative_prompt.as_deref(), &on_device)
                .map_err(|e| io.compute(e))?;
            write_embeddings(store, &task.job, &e).map_err(|e| io.store(e))
        }
        TaskKind::Denoise(d) => {
            evaluations = denoise_task(backend, &io, cache, d, &on_device)?;
            Ok(())
        }
        TaskKind::Decode { input, output } => {
            let z = io.read(input)?;
            let px = backend.decode(&z, &on_device).map_err(|e| io.compute(e))?;
            io.write(output, &px)
        }
        TaskKind::Encode {
            input,
            output,
            noise,
        } => {
            let px = io.read(input)?;
            let z = backend
                .encode(&px, *noise, &on_device)
                .map_err(|e| io.compute(e))?;
            io.write(output, &z)
        }
        TaskKind::EncodeTile { input, output } => {
            let px = io.read(input)?;
            let moments = backend
                .encode_moments(&px, &on_device)
                .map_err(|e| io.compute(e))?;
            io.write(output, &moments)
        }
    }?;
    Ok(Ran {
        held: held.get(),
        evaluations,
    })
}

/// Holds the device for a task's computation, adding the time held to `total` when dropped.
pub(crate) struct DeviceTurn<'a> {
    _guard: MutexGuard<'a, ()>,
    since: Instant,
    total: &'a Cell<Duration>,
}

/// Takes the device turn: a backend calls it around its device work.
pub(crate) type OnDevice<'a> = dyn Fn() -> DeviceTurn<'a> + 'a;

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

/// A task's store reads and writes, with errors naming the task.
struct TaskIo<'a> {
    store: &'a dyn Store,
    task: &'a Task,
}

impl TaskIo<'_> {
    fn read(&self, key: &str) -> std::result::Result<Tensor, TaskError> {
        get_tensor(self.store, key, &Device::Cpu).map_err(|e| self.store(e))
    }

    fn write(&self, key: &str, t: &Tensor) -> std::result::Result<(), TaskError> {
        put_tensor(self.store, key, t).map_err(|e| self.store(e))
    }

    fn store(&self, source: StoreError) -> TaskError {
        TaskError::Store {
            task: self.task.id.clone(),
            source,
        }
    }

    fn compute(&self, e: impl std::fmt::Display) -> TaskError {
        TaskError::Compute {
            task: self.task.id.clone(),
            message: e.to_string(),
        }
    }
}

/// What a denoise task reads besides the task itself.
pub struct DenoiseInputs {
    /// (N, C, h, w) views, in the dtype the coordinator wrote them.
    pub views: Tensor,
    /// The job's prompt embeddings as stored (f32, on the CPU).
    pub embeddings: PromptEmbeddings,
    /// The stage CA-map the views' maps are cut from, when the task injects one.
    pub stage_camap: Option<Arc<FlatCaMap>>,
}

/// What a denoise task writes.
pub struct DenoiseOutputs {
    pub cond: Tensor,
    /// Present when the task is guided.
    pub uncond: Option<Tensor>,
    /// The batch's CA-map, when the task captures one.
    pub camap: Option<Tensor>,
}

fn denoise_task(
    backend: Backend,
    io: &TaskIo,
    cache: &ReadCache,
    d: &DenoiseTask,
    on_device: &OnDevice,
) -> std::result::Result<u64, TaskError> {
    let inputs = DenoiseInputs {
        views: io.read(&d.input)?,
        embeddings: cache
            .embeddings(io.store, &io.task.job)
            .map_err(|e| io.store(e))?,
        stage_camap: match &d.camap_inject {
            Some(inj) => Some(cache.camap(io.store, &inj.key).map_err(|e| io.store(e))?),
            None => None,
        },
    };
    let out = backend
        .denoise(d, inputs, on_device)
        .map_err(|e| io.compute(e))?;
    if let (Some(key), Some(map)) = (&d.camap_capture, &out.camap) {
        io.write(key, map)?;
    }
    io.write(&d.output_cond, &out.cond)?;
    let views = out.cond.dims().first().copied().unwrap_or(0) as u64;
    let mut evaluations = views;
    if let (Some(key), Some(u)) = (&d.output_uncond, &out.uncond) {
        io.write(key, u)?;
        evaluations += views;
    }
    Ok(evaluations)
}

/// Stores a job's prompt embeddings; `cond` last, as a resumed engine takes it as the sign
/// that all parts are stored.
fn write_embeddings(
    store: &dyn Store,
    job: &str,
    e: &PromptEmbeddings,
) -> std::result::Result<(), StoreError> {
    let put = |part: &str, t: &Tensor| put_tensor(store, &keys::embedding(job, part), t);
    put("uncond", &e.uncond)?;
    if let (Some(pc), Some(pu)) = (&e.pooled_cond, &e.pooled_uncond) {
        put("pooled_cond", pc)?;
        put("pooled_uncond", pu)?;
    }
    put("cond", &e.cond)
}

impl Backend<'_> {
    /// The prompt's embeddings, in f32 on the CPU.
    fn encode_prompt(
        self,
        prompt: &str,
        negative: Option<&str>,
        on_device: &OnDevice,
    ) -> Result<PromptEmbeddings> {
        match self {
            Self::Model(m) => model_encode_prompt(m, prompt, negative, on_device),
            Self::Simulated(s) => s.encode_prompt(on_device),
        }
    }

    fn denoise(
        self,
        d: &DenoiseTask,
        inputs: DenoiseInputs,
        on_device: &OnDevice,
    ) -> Result<DenoiseOutputs> {
        match self {
            Self::Model(m) => model_denoise(m, d, inputs, on_device),
            Self::Simulated(s) => s.denoise(d, &inputs.views, on_device),
        }
    }

    /// Pixels of latents `z`, on the CPU in the VAE's dtype.
    fn decode(self, z: &Tensor, on_device: &OnDevice) -> Result<Tensor> {
        match self {
            Self::Model(m) => {
                let _turn = on_device();
                let z = z.to_device(&m.device)?;
                // In the VAE's dtype, exactly as it decoded: half the bytes on a GPU.
                decode_latents(m, &z)?
                    .to_dtype(m.vae_dtype())?
                    .to_device(&Device::Cpu)
            }
            Self::Simulated(s) => s.decode(z, on_device),
        }
    }

    /// Latents of pixels `px`: the posterior's sample with the seeded noise of `noise`.
    fn encode(self, px: &Tensor, noise: VaeNoise, on_device: &OnDevice) -> Result<Tensor> {
        match self {
            Self::Model(m) => model_encode(m, px, noise, on_device),
            Self::Simulated(s) => s.encode(px, on_device),
        }
    }

    /// The posterior's `[mean, std]` of pixels `px`.
    fn encode_moments(self, px: &Tensor, on_device: &OnDevice) -> Result<Tensor> {
        match self {
            Self::Model(m) => {
                let _turn = on_device();
                let px = px.to_device(&m.device)?;
                encode_moments(m, &px)?.to_device(&Device::Cpu)
            }
            Self::Simulated(s) => s.encode_moments(px, on_device),
        }
    }
}

fn model_encode_prompt(
    model: &DiffusionModel,
    prompt: &str,
    negative: Option<&str>,
    on_device: &OnDevice,
) -> Result<PromptEmbeddings> {
    let _turn = on_device();
    let e = model
        .encode_prompt(prompt, negative)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let host = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    let (pooled_cond, pooled_uncond) = match (&e.pooled_cond, &e.pooled_uncond) {
        (Some(pc), Some(pu)) => (Some(host(pc)?), Some(host(pu)?)),
        _ => (None, None),
    };
    Ok(PromptEmbeddings {
        cond: host(&e.cond)?,
        uncond: host(&e.uncond)?,
        pooled_cond,
        pooled_uncond,
    })
}

fn model_denoise(
    model: &DiffusionModel,
    d: &DenoiseTask,
    inputs: DenoiseInputs,
    on_device: &OnDevice,
) -> Result<DenoiseOutputs> {
    let (dev, cpu) = (&model.device, &Device::Cpu);
    let inject = match (&d.camap_inject, &inputs.stage_camap) {
        (Some(inj), Some(stage_map)) => {
            let map = stage_map
                .batch(
                    (inj.stage_hw[0], inj.stage_hw[1]),
                    (inj.view_hw[0], inj.view_hw[1]),
                    &inj.placements,
                )
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Some((inj.weight, map))
        }
        _ => None,
    };
    let size = SizeConditioning::for_size(d.size_conditioning[0], d.size_conditioning[1]);
    let guided = d.output_uncond.is_some();
    let _turn = on_device();
    let mut hooks = hooks::for_task(model.family(), d);
    if let Some((weight, map)) = inject {
        hooks.inject_cross_attention = Some(CrossAttnInjection {
            weight,
            map: map.to_device(dev)?.to_dtype(model.dtype)?,
        });
    }
    let emb = inputs.embeddings.to_model(model)?;
    let views = inputs.views.to_device(dev)?;
    let pred = predict_noise(model, &views, d.timestep, &emb, size, guided, &mut hooks)?;
    let camap = match &d.camap_capture {
        Some(_) => Some(collect_camap(&hooks)?.to_device(cpu)?),
        None => None,
    };
    // Stored in the denoiser's own dtype: exact (the prediction came out in it), and half the
    // bytes to write, hold and merge where that is f16 (every GPU worker).
    let stored = |t: &Tensor| t.to_dtype(model.dtype)?.to_device(cpu);
    Ok(DenoiseOutputs {
        cond: stored(&pred.cond)?,
        uncond: pred.uncond.as_ref().map(stored).transpose()?,
        camap,
    })
}

/// The batch's CA-map from the cross-attention maps a forward pass captured.
fn collect_camap(hooks: &UNetHooks) -> Result<Tensor> {
    let msg = |e: tessera_core::error::MathError| candle_core::Error::Msg(e.to_string());
    let mut collector = CaMapCollector::new();
    for m in &hooks.captured {
        collector.add(&m.probs, (m.height, m.width)).map_err(msg)?;
    }
    Ok(collector.finish().map_err(msg)?.tensor().clone())
}

fn model_encode(
    model: &DiffusionModel,
    px: &Tensor,
    noise: VaeNoise,
    on_device: &OnDevice,
) -> Result<Tensor> {
    let dev = &model.device;
    let _turn = on_device();
    let px = px.to_device(dev)?;
    let (n, _, h, w) = px.dims4()?;
    let f = model.vae.config().downscale_factor();
    let channels = model.denoiser.latent_channels();
    let eps = NoiseKey {
        seed: noise.seed,
        stage: noise.stage,
        step: 0,
        purpose: NoisePurpose::VaeSample,
    }
    .normal((n, channels, h / f, w / f), dev)?;
    encode_pixels(model, &px, &eps)?.to_device(&Device::Cpu)
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

    #[test]
    fn a_jobs_embeddings_are_read_once_per_worker() -> anyhow::Result<()> {
        let store = MemoryStore::new();
        let cache = ReadCache::default();
        let put = |job: &str, v: f32| -> anyhow::Result<()> {
            for part in ["cond", "uncond"] {
                let t = Tensor::full(v, (1, 3, 4), &Device::Cpu)?;
                put_tensor(&store, &keys::embedding(job, part), &t)?;
            }
            Ok(())
        };
        put("a", 1.0)?;
        put("b", 2.0)?;
        let first = cache.embeddings(&store, "a")?;
        store.delete_prefix(&keys::job_prefix("a"))?;
        let again = cache.embeddings(&store, "a")?;
        assert_eq!(again.cond.to_vec3::<f32>()?, first.cond.to_vec3::<f32>()?);
        let b = cache.embeddings(&store, "b")?;
        assert_eq!(b.uncond.to_vec3::<f32>()?[0][0][0], 2.0);
        assert!(cache.embeddings(&store, "gone").is_err());
        for n in 0..CACHED_JOBS {
            put(&format!("j{n}"), 0.0)?;
            cache.embeddings(&store, &format!("j{n}"))?;
        }
        assert!(
            cache.embeddings(&store, "a").is_err(),
            "the oldest job was dropped"
        );
        Ok(())
    }

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
        let (cache, turn) = (ReadCache::default(), Mutex::new(()));
        let task = |id: &str, kind| Task {
            job: "j".into(),
            id: id.into(),
            kind,
        };
        let prompt = TaskKind::EncodePrompt {
            prompt: "a lighthouse".into(),
            negative_prompt: None,
        };
        execute(
            Backend::Model(&model),
            &store,
            &cache,
            &task("p", prompt),
            &turn,
        )?;

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
            let held = execute(
                Backend::Model(&model),
                &store,
                &cache,
                &task(input, denoise),
                &turn,
            )?;
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
