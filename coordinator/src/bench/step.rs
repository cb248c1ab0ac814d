//! `tessera bench step`: the coordinator's cost per high-resolution step, measured in the
//! engine's real step loop ([`StepTimings`]) over a real Redis, next to one model evaluation of
//! the tiny model, and as a fraction of the simulated step time at N workers.
//!
//! The workers are stood in for by N benchmark doubles run in this process over the same
//! Redis, each taking the simulated time per task, so the coordinator's work overlaps them
//! as it would a real cluster's and the step's critical path can be measured.
//! The job is one high-resolution stage from noise, run to its final latent (not decoded).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tessera_core::method::params::{Method, MethodSpec};
use tessera_core::plan::{ArchInfo, Plan};
use tessera_core::spec::{JobRequest, RenderSpec, Size};
use tessera_core::task::{Task, TaskKind};
use tessera_harness::RedisServer;
use tessera_store::{RedisOptions, RedisStore};
use tessera_worker::service::GuardedStore;
use tessera_worker::simulate::SimulatedModel;
use tessera_worker::tasks::{self, Backend, ReadCache};

use super::{sdxl_geometry_model, BenchError, Machine, Report, Result, Scratch, Table};
use crate::dispatch::{Dispatch, DispatchError};
use crate::engine::{Engine, EngineError, JobInputs, ModelInfo, Progress, StepTimings};

#[derive(Debug, Clone)]
pub struct StepOptions {
    /// Image sides in pixels.
    pub sizes: Vec<u32>,
    /// Steps of the stage to time (the first is a warm-up and not counted).
    pub steps: usize,
    /// The simulated worker speed and count the cost is compared with.
    pub eval_ms: f64,
    pub workers: usize,
    pub view_batch: usize,
    pub markdown: Option<PathBuf>,
}

/// The workers: `slots` benchmark doubles in this process, each taking the simulated time per
/// task (a timer, no compute) over the same store, fed as the engine streams tasks out.
struct SimulatedWorkers {
    sim: SimulatedModel,
    store: RedisStore,
    /// The stage CA-map, read once per stage as by a worker process.
    cache: ReadCache,
    slots: usize,
    /// Doubles computing now, across overlapping calls (a stage's steps overlap): a task
    /// taken from a stream waits until fewer than `slots` compute.
    busy: Mutex<usize>,
    freed: std::sync::Condvar,
}

impl SimulatedWorkers {
    /// Waits for a free double and takes it.
    fn take_turn(&self) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= self.slots {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy += 1;
    }

    fn end_turn(&self) {
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.freed.notify_one();
    }
}

impl Dispatch for SimulatedWorkers {
    fn run_streamed(
        &self,
        tasks: &mut (dyn Iterator<Item = Task> + Send),
        done: &(dyn Fn(&Task) + Sync),
    ) -> std::result::Result<(), DispatchError> {
        let feed = Mutex::new(tasks);
        let first_error: Mutex<Option<DispatchError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..self.slots {
                let (feed, first_error) = (&feed, &first_error);
                let turn = Mutex::new(());
                scope.spawn(move || loop {
                    let next = feed.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let Some(task) = next else { return };
                    if first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_some()
                    {
                        continue;
                    }
                    let outcome = if matches!(task.kind, TaskKind::Decode { .. }) {
                        // The steps are done; the decode is not what this bench measures.
                        Err(DispatchError::Cancelled)
                    } else {
                        self.take_turn();
                        let outcome = tasks::execute(
                            Backend::Simulated(&self.sim),
                            &GuardedStore::new(&self.store, &task),
                            &self.cache,
                            &task,
                            &turn,
                        );
                        self.end_turn();
                        outcome.map(|_| ()).map_err(DispatchError::from)
                    };
                    match outcome {
                        Ok(()) => done(&task),
                        Err(e) => {
                            first_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                        }
                    }
                });
            }
        });
        match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn workers(&self) -> usize {
        self.slots
    }

    /// As a cluster of CUDA workers would ask for.
    fn view_dtype(&self) -> DType {
        tessera_worker::simulate::GPU_DTYPE
    }
}

/// Seconds the workers alone need for one step: tasks of `batch` views (the last one
/// shorter) taken in order by whichever of `workers` is free first, no coordinator at all.
fn worker_makespan(views: usize, batch: usize, workers: usize, eval_ms: f64) -> f64 {
    let mut free = vec![0f64; workers.max(1)];
    let mut left = views;
    while left > 0 {
        let n = left.min(batch.max(1));
        left -= n;
        let (i, _) = free
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .unwrap_or((0, &0.0));
        free[i] += n as f64 * eval_ms / 1e3;
    }
    free.into_iter().fold(0.0, f64::max)
}

/// Per-step means of one size.
#[derive(Debug, Clone)]
pub struct StepCost {
    pub size: u32,
    pub views: usize,
    pub timed_steps: usize,
    pub mean: StepTimings,
}

fn mean(ts: &[StepTimings]) -> StepTimings {
    let n = ts.len().max(1) as f64;
    let mut m = StepTimings::default();
    for t in ts {
        m.store_write += t.store_write / n;
        m.workers += t.workers / n;
        m.store_read += t.store_read / n;
        m.merge += t.merge / n;
        m.fusion += t.fusion / n;
        m.guidance += t.guidance / n;
        m.scheduler += t.scheduler / n;
        m.checkpoint += t.checkpoint / n;
        m.critical += t.critical / n;
        m.wall += t.wall / n;
    }
    m
}

/// One hybrid stage at `size`², straight from noise, with one warm-up step before the timed ones.
fn bench_job(size: u32, opts: &StepOptions) -> JobRequest {
    let side = Size {
        width: size,
        height: size,
    };
    JobRequest {
        prompt: "a lighthouse on a cliff at dusk".into(),
        size: Some(side),
        seed: Some(1),
        method: MethodSpec {
            method: Some(Method::Hybrid),
            stages: Some(vec![side]),
            stage_steps: Some(vec![opts.steps + 1]),
            view_batch: Some(opts.view_batch),
            ..MethodSpec::default()
        },
        ..JobRequest::default()
    }
}

/// The bench job's spec and plan on the model in `model_dir`, whose architecture comes with
/// them.
fn plan_job(
    size: u32,
    opts: &StepOptions,
    model_dir: &std::path::Path,
) -> Result<(ArchInfo, RenderSpec, Plan)> {
    let arch = tessera_worker::model::arch::arch_info(model_dir, 2)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let spec = bench_job(size, opts)
        .to_spec(arch.training_size, || 1)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let plan =
        tessera_core::plan::plan(&spec, &arch).map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok((arch, spec, plan))
}

/// One step's timings, as the bench goes.
fn print_step(step: usize, steps: usize, t: &StepTimings) {
    eprintln!(
        "  step {step}/{steps}: wall {:.0} ms, critical path {:.0} ms (fusion {:.0}, \
         guidance {:.0}, scheduler {:.0}, checkpoint {:.0}), coordinator work {:.0} ms",
        t.wall * 1e3,
        t.critical * 1e3,
        t.fusion * 1e3,
        t.guidance * 1e3,
        t.scheduler * 1e3,
        t.checkpoint * 1e3,
        t.coordinator() * 1e3
    );
}

fn measure_size(
    size: u32,
    opts: &StepOptions,
    model_dir: &std::path::Path,
    redis: &RedisServer,
    runtime: &tokio::runtime::Runtime,
) -> Result<StepCost> {
    let (arch, spec, plan) = plan_job(size, opts, model_dir)?;
    let views = plan.stages[0].local_views + plan.stages[0].global_views;
    let store = runtime
        .block_on(RedisStore::connect(&redis.url(), RedisOptions::default()))
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let workers = SimulatedWorkers {
        sim: SimulatedModel::from_dir(model_dir, opts.eval_ms)
            .map_err(|e| BenchError::Setup(e.to_string()))?,
        store: store.clone(),
        cache: ReadCache::default(),
        slots: opts.workers,
        busy: Mutex::new(0),
        freed: std::sync::Condvar::new(),
    };
    let engine = Engine {
        store: &store,
        workers: &workers,
        model: ModelInfo {
            scheduler: arch.scheduler.clone(),
            latent_channels: arch.latent_channels,
        },
    };
    let timings = Mutex::new(Vec::new());
    let job_id = format!("bench-step-{size}");
    eprintln!(
        "{size}x{size}: {views} views per step, {} steps",
        opts.steps + 1
    );
    let outcome = engine.run(&job_id, &spec, &plan, JobInputs::default(), &|p| {
        if let Progress::Step {
            step,
            steps,
            timings: t,
            ..
        } = p
        {
            print_step(step, steps, &t);
            timings.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        }
    });
    let _ = engine.finish(&job_id);
    match outcome {
        // The stage ran to its final latent (the decode is never asked for), or a plan with
        // a transition was stopped at its decode.
        Err(EngineError::Dispatch(DispatchError::Cancelled)) | Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    let all = timings.into_inner().unwrap_or_else(|e| e.into_inner());
    let timed = &all[1.min(all.len())..];
    Ok(StepCost {
        size,
        views,
        timed_steps: timed.len(),
        mean: mean(timed),
    })
}

/// Seconds of one CFG evaluation (batch of one view) of the tiny SDXL model, median of 3, at
/// a `latent`² view.
fn tiny_eval_seconds(scratch: &std::path::Path, latent: usize) -> Result<f64> {
    use tessera_worker::model::diffusion::{DiffusionModel, SizeConditioning};
    let dir = scratch.join("sdxl-tiny");
    if !dir.join("model_index.json").is_file() {
        tessera_worker::random_models::tiny::synthesize(
            tessera_worker::random_models::tiny::TinyArch::SdxlTiny,
            &dir,
            1,
        )
        .map_err(|e| BenchError::Setup(format!("synthesizing the tiny model: {e}")))?;
    }
    let model = DiffusionModel::load(&dir, &Device::Cpu, DType::F32)
        .map_err(|e| BenchError::Setup(format!("loading the tiny model: {e}")))?;
    let emb = model
        .encode_prompt("a lighthouse", None)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let views = Tensor::randn(0f32, 1f32, (1, 4, latent, latent), &Device::Cpu)?;
    let size = SizeConditioning::for_size(8 * latent as u32, 8 * latent as u32);
    let mut times = Vec::new();
    for _ in 0..3 {
        let mut hooks = Default::default();
        let t = Instant::now();
        tessera_worker::tasks::predict_noise(&model, &views, 500.0, &emb, size, true, &mut hooks)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[1])
}

/// The coordinator's cost per step at each size, next to the simulated workers' time.
fn cost_table(costs: &[StepCost], opts: &StepOptions) -> Table {
    let ms = |s: f64| format!("{:.1}", s * 1e3);
    let mut table = Table::new(&[
        "size",
        "views/step",
        "store write",
        "store read",
        "merge",
        "fusion",
        "guidance",
        "scheduler",
        "checkpoint",
        "coordinator work",
        "critical path",
        "simulated step",
        "share",
        "step wall",
        "workers alone",
        "lengthened by",
    ]);
    for c in costs {
        let simulated = c.views as f64 * opts.eval_ms / opts.workers as f64 / 1e3;
        let alone = worker_makespan(c.views, opts.view_batch, opts.workers, opts.eval_ms);
        let m = &c.mean;
        table.row(vec![
            format!("{0}x{0}", c.size),
            c.views.to_string(),
            ms(m.store_write),
            ms(m.store_read),
            ms(m.merge),
            ms(m.fusion),
            ms(m.guidance),
            ms(m.scheduler),
            ms(m.checkpoint),
            ms(m.coordinator()),
            ms(m.critical),
            ms(simulated),
            format!("{:.2}%", 100.0 * m.critical / simulated),
            ms(m.wall),
            ms(alone),
            format!("{:.1}%", 100.0 * (m.wall - alone) / alone),
        ]);
    }
    table
}

/// What the table's columns measure and how the simulated figures are made.
fn notes(opts: &StepOptions) -> Vec<String> {
    vec![
        "columns in ms per step, means over the timed steps (the stage's first step is a \
         warm-up), measured by the engine's real step code (StepTimings) over a real \
         redis-server, with the workers as in-process benchmark doubles that take the \
         simulated time per task"
            .into(),
        "store write … checkpoint, coordinator work: the coordinator's own work per step, \
         overlapped with the workers or not (inputs are written while earlier tasks run, \
         outputs read and merged as tasks finish, checkpoints written during the next step)"
            .into(),
        "critical path: the time in a step during which none of its tasks is out — from \
         the step's start to its first task handed out, plus from its last result in to \
         the step's end (last merges, fusion, guidance, scheduler) — the cost the goal \
         of < 2% is about; share = critical path / simulated step"
            .into(),
        format!(
            "simulated step = views × {} ms / {} workers; workers alone = the same tasks \
             ({} views each) scheduled on {} workers with no coordinator; lengthened by = \
             step wall / workers alone − 1 (includes any worker starved of inputs, and \
             this shared box's scheduling noise)",
            opts.eval_ms, opts.workers, opts.view_batch, opts.workers
        ),
    ]
}

pub fn run(opts: &StepOptions, command: String) -> Result<(Vec<StepCost>, Report)> {
    let machine = Machine::probe();
    let scratch = Scratch::new("step")?;
    let model = sdxl_geometry_model(&scratch.0)?;
    let redis = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(super::io("starting the async runtime"))?;
    let mut costs = Vec::new();
    for &size in &opts.sizes {
        costs.push(measure_size(size, opts, &model, &redis, &runtime)?);
    }
    let tiny_16 = tiny_eval_seconds(&scratch.0, 16)?;

    let ms = |s: f64| format!("{:.1}", s * 1e3);
    let table = cost_table(&costs, opts);
    let mut model_table = Table::new(&["tiny SDXL model, one CFG evaluation (CPU)", "ms"]);
    model_table.row(vec!["16x16 latent (its training size)".into(), ms(tiny_16)]);
    let report = Report {
        title: format!(
            "bench step: coordinator cost per high-resolution step vs {} simulated workers at {} ms/evaluation",
            opts.workers, opts.eval_ms
        ),
        command,
        machine,
        tables: vec![table, model_table],
        notes: notes(opts),
    };
    Ok((costs, report))
}
