//! The distributed engine against plain, independent sampling loops written here with the
//! worker's model calls: with one view covering the whole latent and fusion off it must be
//! plain sampling; with one tile covering the whole stage it must be FreeScale's in-UNet
//! algorithm (restart, restrained structure, dilation, scale fusion, FreeU).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use tessera_coordinator::dispatch::{Dispatch, DispatchError, LocalWorkers};
use tessera_coordinator::engine::{Engine, EngineError, JobInputs, ModelInfo, Progress};
use tessera_core::method::freescale::{restraint_weight, DILATED_CONVS};
use tessera_core::method::guidance::classifier_free;
use tessera_core::method::params::{Method, MethodSpec};
use tessera_core::noise::{NoiseKey, NoisePurpose};
use tessera_core::plan::{plan, ArchInfo};
use tessera_core::resize::{resize, ResizeFilter};
use tessera_core::sched::{Scheduler, SchedulerKind};
use tessera_core::spec::{RenderSpec, Size};
use tessera_store::{MemoryStore, Store};
use tessera_worker::hooks::{ScaleFusion, SelfAttentionMode, UNetHooks};
use tessera_worker::model::arch::arch_info;
use tessera_worker::model::diffusion::{DiffusionModel, SizeConditioning};
use tessera_worker::random_models::tiny::{synthesize, TinyArch};
use tessera_worker::tasks::{decode_latents, encode_pixels, predict_noise};

const SEED: u64 = 5;

fn model() -> (Arc<DiffusionModel>, ArchInfo) {
    let dir = std::env::temp_dir().join(format!("tessera-engine-paths-{}", std::process::id()));
    // The tests run in parallel: one of them writes the model, the others wait for it.
    static WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    {
        let _once = WRITE.lock().unwrap_or_else(|e| e.into_inner());
        if !dir.join("model_index.json").is_file() {
            let _ = std::fs::remove_dir_all(&dir);
            synthesize(TinyArch::SdxlTiny, &dir, 1).unwrap();
            tessera_harness::remove_at_exit(dir.clone());
        }
    }
    let m = DiffusionModel::load(&dir, &Device::Cpu, candle_core::DType::F32).unwrap();
    (Arc::new(m), arch_info(&dir, 4).unwrap())
}

fn spec(stages: &[u32], method: MethodSpec) -> RenderSpec {
    let last = *stages.last().unwrap();
    RenderSpec {
        loras: Vec::new(),
        prompt: "a lighthouse".into(),
        negative_prompt: None,
        width: last,
        height: last,
        steps: 4,
        guidance: 7.5,
        scheduler: Some(SchedulerKind::Euler),
        seed: SEED,
        output: Default::default(),
        method: MethodSpec {
            stages: Some(
                stages
                    .iter()
                    .map(|&s| Size {
                        width: s,
                        height: s,
                    })
                    .collect(),
            ),
            ..method
        },
    }
}

fn run_engine(model: &Arc<DiffusionModel>, arch: &ArchInfo, spec: &RenderSpec) -> Tensor {
    let p = plan(spec, arch).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let workers = LocalWorkers::new(vec![model.clone()], store.clone());
    let engine = Engine {
        store: store.as_ref(),
        workers: &workers,
        model: ModelInfo {
            scheduler: model.scheduler_config.clone(),
            latent_channels: 4,
        },
    };
    let out = engine
        .run("t", spec, &p, JobInputs::default(), &|_| {})
        .unwrap();
    out.latents
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A plain guided Euler loop over `steps[start..]` with the given hooks per step.
#[allow(clippy::too_many_arguments)]
fn sample(
    model: &DiffusionModel,
    sched: &Scheduler,
    mut z: Tensor,
    start: usize,
    size: SizeConditioning,
    mut hooks_at: impl FnMut(usize) -> UNetHooks,
    mut before: impl FnMut(usize, f64, Tensor) -> Tensor,
) -> Tensor {
    let emb = model.encode_prompt("a lighthouse", None).unwrap();
    for (i, &t) in sched.timesteps().iter().enumerate().skip(start) {
        z = before(i, t, z);
        let input = sched.scale_model_input(&z, i).unwrap();
        let mut hooks = hooks_at(i);
        let p = predict_noise(model, &input, t, &emb, size, true, &mut hooks).unwrap();
        let eps = classifier_free(p.uncond.as_ref().unwrap(), &p.cond, 7.5).unwrap();
        z = sched.step(&eps, i, &z).unwrap().prev_sample;
    }
    z
}

#[test]
fn one_whole_view_without_fusion_is_plain_sampling() {
    let (model, arch) = model();
    // A 2x-training-size stage evaluated as one view: no fusion, no dilation, no FreeU.
    let s = spec(
        &[256],
        MethodSpec {
            method: Some(Method::Freescale),
            tile_size: Some(256),
            no_fusion: true,
            dilate_tau: Some(0),
            freeu: Some(false),
            ..Default::default()
        },
    );
    let ours = run_engine(&model, &arch, &s);

    let sched = Scheduler::new(SchedulerKind::Euler, &model.scheduler_config, 4).unwrap();
    let noise = NoiseKey::new(SEED, NoisePurpose::InitialLatent)
        .normal((1, 4, 32, 32), &Device::Cpu)
        .unwrap();
    let z0 = (noise * sched.init_noise_sigma()).unwrap();
    let want = sample(
        &model,
        &sched,
        z0,
        0,
        SizeConditioning::for_size(256, 256),
        |_| UNetHooks::default(),
        |_, _, z| z,
    );
    assert_eq!(max_abs_diff(&ours, &want), 0.0);
}

#[test]
fn one_tile_covering_the_stage_is_in_unet_freescale() {
    let (model, arch) = model();
    let s = spec(
        &[128, 256],
        MethodSpec {
            method: Some(Method::Freescale),
            tile_size: Some(256),
            ..Default::default()
        },
    );
    let ours = run_engine(&model, &arch, &s);

    // Stage 0: plain guided sampling at the training size, with FreeU.
    let sched = Scheduler::new(SchedulerKind::Euler, &model.scheduler_config, 4).unwrap();
    let freeu = || UNetHooks {
        freeu: model.family().info().freeu,
        ..Default::default()
    };
    let noise = NoiseKey::new(SEED, NoisePurpose::InitialLatent)
        .normal((1, 4, 16, 16), &Device::Cpu)
        .unwrap();
    let z0 = (noise * sched.init_noise_sigma()).unwrap();
    let size = SizeConditioning::for_size(128, 128);
    let base = sample(&model, &sched, z0, 0, size, |_| freeu(), |_, _, z| z);

    // Stage 1 as pipeline_freescale.py runs it: decode, bicubic resize, encode (sample), one
    // noise draw, restart at int(0.3 * 4) = 1, blend towards n_i before every later step,
    // dilation 256 / 128 = 2 below tau = 35, scale fusion in every self-attention.
    let px = decode_latents(&model, &base).unwrap();
    let px = resize(&px, 256, 256, ResizeFilter::Bicubic).unwrap();
    let vae_noise = NoiseKey {
        seed: SEED,
        stage: 1,
        step: 0,
        purpose: NoisePurpose::VaeSample,
    }
    .normal((1, 4, 32, 32), &Device::Cpu)
    .unwrap();
    let z_up = encode_pixels(&model, &px, &vae_noise).unwrap();
    let eps = NoiseKey {
        seed: SEED,
        stage: 1,
        step: 0,
        purpose: NoisePurpose::StageNoise,
    }
    .normal((1, 4, 32, 32), &Device::Cpu)
    .unwrap();
    let restart = 1;
    let z = sched
        .add_noise(&z_up, &eps, sched.timesteps()[restart])
        .unwrap();
    let want = sample(
        &model,
        &sched,
        z,
        restart,
        size,
        |i| {
            let mut h = freeu();
            for conv in DILATED_CONVS {
                h.dilation.insert(conv.to_string(), 2);
            }
            h.self_attention = SelfAttentionMode::ScaleFusion(ScaleFusion {
                train_latent: (16, 16),
                fast: false,
                jitter_seed: Some(
                    NoiseKey {
                        seed: SEED,
                        stage: 1,
                        step: (i - restart) as u32,
                        purpose: NoisePurpose::FusionJitter,
                    }
                    .derive_seed(0),
                ),
            });
            h
        },
        |i, t, z| {
            if i == restart {
                return z;
            }
            let c = restraint_weight(t, 1000, 2.0);
            let n = sched.add_noise(&z_up, &eps, t).unwrap();
            ((z * (1.0 - c)).unwrap() + (n * c).unwrap()).unwrap()
        },
    );
    let diff = max_abs_diff(&ours, &want);
    assert!(diff <= 1e-5, "max |engine - reference loop| = {diff}");
}

/// A dispatch that stops working once it has been given `budget` tasks: a coordinator crash
/// as the engine sees it.
struct Crashing<'a> {
    inner: &'a LocalWorkers,
    budget: std::sync::atomic::AtomicUsize,
    given: std::sync::atomic::AtomicUsize,
}

impl Dispatch for Crashing<'_> {
    /// Takes the whole stream at once: a step's tasks are given or refused together.
    fn run_streamed(
        &self,
        tasks: &mut (dyn Iterator<Item = tessera_core::task::Task> + Send),
        done: &(dyn Fn(&tessera_core::task::Task) + Sync),
    ) -> Result<(), DispatchError> {
        use std::sync::atomic::Ordering;
        let tasks: Vec<tessera_core::task::Task> = tasks.collect();
        let n = tasks.len();
        if self.given.load(Ordering::Relaxed) + n > self.budget.load(Ordering::Relaxed) {
            return Err(DispatchError::Worker("simulated crash".into()));
        }
        self.given.fetch_add(n, Ordering::Relaxed);
        self.inner.run(&tasks, done)
    }

    fn workers(&self) -> usize {
        1
    }
}

struct Outcome {
    latents: Tensor,
    image: Tensor,
    tasks: usize,
    resumed: Vec<(usize, usize)>,
}

/// Runs `spec` on `store`, crashing after `budget` tasks (None: never); returns what the run
/// produced, or None when it crashed.
fn run_on(
    model: &Arc<DiffusionModel>,
    arch: &ArchInfo,
    spec: &RenderSpec,
    store: &Arc<dyn Store>,
    budget: Option<usize>,
) -> Option<Outcome> {
    let p = plan(spec, arch).unwrap();
    let workers = LocalWorkers::new(vec![model.clone()], store.clone());
    let crashing = Crashing {
        inner: &workers,
        budget: budget.unwrap_or(usize::MAX).into(),
        given: 0.into(),
    };
    let engine = Engine {
        store: store.as_ref(),
        workers: &crashing,
        model: ModelInfo {
            scheduler: model.scheduler_config.clone(),
            latent_channels: 4,
        },
    };
    let resumed = std::sync::Mutex::new(Vec::new());
    let on_progress = |p: Progress| {
        if let Progress::Resumed { stage, step } = p {
            resumed.lock().unwrap().push((stage, step));
        }
    };
    match engine.run("job", spec, &p, JobInputs::default(), &on_progress) {
        Ok(out) => Some(Outcome {
            image: engine
                .decode_image("job", &p, &out.latents)
                .and_then(|px| tessera_coordinator::engine::to_rgb8(&px))
                .unwrap(),
            latents: out.latents,
            tasks: crashing.given.into_inner(),
            resumed: resumed.into_inner().unwrap(),
        }),
        Err(EngineError::Dispatch(_)) => None,
        Err(e) => panic!("unexpected engine error: {e}"),
    }
}

/// Crashes at several points and resumes from the store; the result must be bit-identical to
/// an uninterrupted run, and a mid-stage crash must resume mid-stage.
fn crash_and_resume(spec: &RenderSpec, fractions: &[f64]) {
    let (model, arch) = model();
    let fresh: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let reference = run_on(&model, &arch, spec, &fresh, None).unwrap();
    assert!(reference.resumed.is_empty());
    for &f in fractions {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let budget = ((reference.tasks as f64) * f) as usize;
        assert!(
            run_on(&model, &arch, spec, &store, Some(budget)).is_none(),
            "no crash at {f}"
        );
        // Crash again after a few more tasks: a resume of a resume.
        let again = run_on(&model, &arch, spec, &store, Some(3));
        let out = match again {
            Some(out) => out,
            None => run_on(&model, &arch, spec, &store, None).unwrap(),
        };
        assert_eq!(out.resumed.len(), 1, "crash at {f}: {:?}", out.resumed);
        assert_eq!(
            max_abs_diff(&out.latents, &reference.latents),
            0.0,
            "crash at {f}"
        );
        let a = out.image.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let b = reference
            .image
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        assert_eq!(a, b, "crash at {f}: image differs");
        assert!(
            out.tasks < reference.tasks,
            "crash at {f}: the resumed run redid everything ({} tasks)",
            out.tasks
        );
    }
}

#[test]
fn a_hybrid_job_resumes_bit_identically_from_any_crash() {
    let spec = RenderSpec {
        scheduler: None,
        ..spec(
            &[128, 256, 384],
            MethodSpec {
                method: Some(Method::Hybrid),
                stage_steps: Some(vec![2, 2, 3]),
                ..Default::default()
            },
        )
    };
    // Early (around the stage 0/1 transition), inside stage 1, inside stage 2.
    crash_and_resume(&spec, &[0.05, 0.35, 0.75]);
}

#[test]
fn a_freescale_job_resumes_with_its_restraint_source() {
    let spec = spec(
        &[128, 256],
        MethodSpec {
            method: Some(Method::Freescale),
            ..Default::default()
        },
    );
    crash_and_resume(&spec, &[0.7]);
}
