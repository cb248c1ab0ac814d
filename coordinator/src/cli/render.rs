//! `tessera render`: one image, start to finish, in this process — an embedded coordinator,
//! in-process workers and an in-memory store, running the same engine as the cluster.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tessera_core::describe;
use tessera_core::plan::{self, Plan};
use tessera_core::spec::RenderSpec;
use tessera_store::{MemoryStore, Store};
use tessera_worker::device::{compute_dtype, open_device};
use tessera_worker::model::arch::arch_info_with;
use tessera_worker::model::diffusion::DiffusionModel;
use tessera_worker::model::loader::ModelDir;
use tessera_worker::model::lora::{LoraSet, LoraSpec};

use super::job::{JobArgs, MissingPrompt};
use super::model_flags::ModelFlags;
use super::output::check_writable;
use crate::dispatch::LocalWorkers;
use crate::engine::{Engine, JobInputs, ModelInfo, PreviewHook, Progress};
use crate::sync::lock;
use crate::{assemble, image_input, latent_file, preview};

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Model: a diffusers directory (SD 2.x, SDXL base, SD3; `tessera model synth` makes a
    /// tiny one) or a single-file SDXL or SD 2.x checkpoint (`FILE.safetensors`).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub model_flags: ModelFlags,
    /// A LoRA to merge into the model, kohya or diffusers/PEFT format, with its weight
    /// (default 1); repeatable.
    #[arg(long, value_name = "FILE[:WEIGHT]", value_parser = LoraSpec::parse)]
    pub lora: Vec<LoraSpec>,
    #[command(flatten)]
    pub job: JobArgs,
    /// Initial noise of the first stage: a safetensors file with one tensor of shape
    /// 1x4xHEIGHT/8xWIDTH/8 (replaces the seeded noise).
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Also write the final latent (before decoding) to this safetensors file.
    #[arg(long)]
    pub output_latents: Option<PathBuf>,
    /// In-process workers. On a CPU they share one loaded model; the image is the same for
    /// any number.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Where to compute: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output PNG file.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Keep a small live preview of the image in this PNG, replaced after every step (latent
    /// colours without the VAE: composition and colour, not the final detail).
    #[arg(long)]
    pub preview: Option<PathBuf>,
}

/// Writes the step's preview to `path`; a failure is reported once and does not stop the
/// render.
fn preview_hook(path: PathBuf, sdxl: bool) -> PreviewHook {
    let warned = std::sync::atomic::AtomicBool::new(false);
    PreviewHook(Box::new(move |x0| {
        let written = preview::preview_png(x0, sdxl, preview::PREVIEW_SIDE).and_then(|png| {
            preview::write_atomically(&path, &png)
                .with_context(|| format!("writing --preview {}", path.display()))
        });
        if let Err(e) = written {
            if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("no preview: {e:#}");
            }
        }
    }))
}

/// Every file the render will write, checked before anything else is read or computed.
fn check_outputs(args: &RenderArgs) -> Result<()> {
    let mut outputs = vec![("-o", args.output.as_path())];
    outputs.extend(
        args.output_latents
            .as_deref()
            .map(|p| ("--output-latents", p)),
    );
    outputs.extend(args.preview.as_deref().map(|p| ("--preview", p)));
    check_writable(&outputs)
}

/// What a render computes, checked and read before the weights load.
struct Prepared {
    spec: RenderSpec,
    plan: Plan,
    inputs: JobInputs,
    loras: Arc<LoraSet>,
}

pub fn run(args: RenderArgs) -> Result<()> {
    let started = Instant::now();
    if args.workers == 0 || args.workers > 64 {
        bail!("--workers {}: use 1 to 64", args.workers);
    }
    check_outputs(&args)?;
    let device = open_device(&args.device)?;
    let prepared = prepare(&args, &device)?;
    let model = load_model(&args, prepared.loras.clone(), &device)?;
    let Prepared {
        spec,
        plan,
        inputs,
        loras: _,
    } = prepared;

    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let workers = LocalWorkers::new(vec![model.clone(); args.workers], store.clone());
    let engine = Engine {
        store: store.as_ref(),
        workers: &workers,
        model: ModelInfo {
            scheduler: model.scheduler_config.clone(),
            latent_channels: model.denoiser.latent_channels(),
        },
    };
    let progress = RenderProgress::new(&plan);
    let on_progress = |p: Progress| progress.show(p);
    let out = engine.run("local", &spec, &plan, inputs, &on_progress)?;
    let outputs = Outputs {
        spec: &spec,
        plan: &plan,
    };
    write_outputs(&args, &engine, &outputs, &out.latents, &on_progress)?;
    progress.finish();
    eprintln!(
        "wrote {} ({}x{}, {}, {} stage{}) in {:.1}s",
        args.output.display(),
        spec.width,
        spec.height,
        plan.method,
        plan.stages.len(),
        if plan.stages.len() == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The spec, the plan and the input files, before any weights load, so a bad flag costs
/// nothing. Prints the seed when it was drawn here.
fn prepare(args: &RenderArgs, device: &Device) -> Result<Prepared> {
    let initial = args
        .latents
        .as_deref()
        .map(latent_file::read_latents)
        .transpose()?;
    let weight_bytes = if device.is_cpu() { 4 } else { 2 };
    let arch = arch_info_with(&args.model, weight_bytes, args.model_flags.prediction())?;
    let request = args.job.to_request(MissingPrompt::Refuse)?;
    let spec = request.to_spec(arch.training_size, rand::random)?;
    let plan = plan::plan(&spec, &arch)?;
    let target = (spec.width, spec.height);
    let first = plan.stages[0].size;
    let init_image = args
        .job
        .init_image
        .as_deref()
        .map(|p| image_input::read_init_image(p, (first[0], first[1])))
        .transpose()?;
    let mask = args
        .job
        .mask
        .as_deref()
        .map(|p| image_input::read_mask(p, target))
        .transpose()?;
    let loras = Arc::new(LoraSet::load(&args.lora).map_err(anyhow::Error::msg)?);
    // The PNG records each LoRA as a cluster job names it.
    let spec = RenderSpec {
        loras: loras.refs(),
        ..spec
    };
    if request.seed.is_none() {
        eprintln!("seed: {}", spec.seed);
    }
    let preview = args
        .preview
        .clone()
        .map(|path| preview_hook(path, plan.sdxl));
    Ok(Prepared {
        inputs: JobInputs {
            initial_latents: initial,
            init_image,
            mask,
            preview,
        },
        spec,
        plan,
        loras,
    })
}

/// Loads the model's weights behind a spinner.
fn load_model(
    args: &RenderArgs,
    loras: Arc<LoraSet>,
    device: &Device,
) -> Result<Arc<DiffusionModel>> {
    let path = &args.model;
    let spinner = ProgressBar::new_spinner().with_message(format!("loading {}", path.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let dtype = compute_dtype(device);
    let dir = ModelDir::open_with(path, args.model_flags.prediction())?.with_loras(loras);
    let model = Arc::new(DiffusionModel::load_from(dir, device, dtype)?);
    spinner.finish_and_clear();
    Ok(model)
}

/// `--output-latents`, then the PNG, streamed band by band as the tiled decode finishes it.
/// What the written outputs describe.
struct Outputs<'a> {
    spec: &'a RenderSpec,
    plan: &'a Plan,
}

fn write_outputs(
    args: &RenderArgs,
    engine: &Engine<'_>,
    outputs: &Outputs<'_>,
    latents: &Tensor,
    on_progress: &(dyn Fn(Progress) + Sync),
) -> Result<()> {
    if let Some(path) = &args.output_latents {
        latent_file::write_latents(path, latents)?;
    }
    let (spec, plan) = (outputs.spec, outputs.plan);
    let parameters = describe::png_parameters(spec, plan, &args.model.display().to_string());
    let mut png = assemble::OutputFiles::create(
        &args.output,
        spec,
        &parameters,
        assemble::dzi::AUTO_THRESHOLD,
    )
    .with_context(|| format!("writing {}", args.output.display()))?;
    engine.decode_output("local", plan, latents, &mut png, on_progress)?;
    png.finish()
        .with_context(|| format!("writing {}", args.output.display()))
}

/// The progress bar of a render, and the wall time of each stage for the summary after it.
struct RenderProgress {
    bar: ProgressBar,
    /// Model evaluations per view: two under classifier-free guidance.
    halves: usize,
    stage_label: Mutex<String>,
    timings: Mutex<StageTimings>,
}

impl RenderProgress {
    fn new(plan: &Plan) -> Self {
        let total = plan.total_evaluations.max(1) as u64;
        let bar = ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} views · {elapsed_precise} · eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        RenderProgress {
            bar,
            halves: if plan.guided { 2 } else { 1 },
            stage_label: Mutex::new(String::new()),
            timings: Mutex::new(StageTimings::default()),
        }
    }

    fn show(&self, p: Progress) {
        let (bar, halves) = (&self.bar, self.halves);
        match p {
            Progress::Stage {
                stage,
                stages,
                size,
                steps,
            } => {
                let label = format!("stage {}/{stages} {}x{}", stage + 1, size[0], size[1]);
                lock(&self.timings).begin(format!("{}x{}", size[0], size[1]), steps);
                bar.set_message(format!("{label} step 0/{steps}"));
                *lock(&self.stage_label) = label;
            }
            Progress::Step { step, steps, .. } => {
                let label = lock(&self.stage_label).clone();
                bar.set_message(format!("{label} step {step}/{steps}"));
            }
            Progress::Views(n) => {
                bar.inc((n * halves) as u64);
                lock(&self.timings).views += n * halves;
            }
            Progress::Decoding => {
                lock(&self.timings).begin("decode".into(), 0);
                bar.set_message("decoding")
            }
            Progress::Resumed { .. } => {}
        }
    }

    /// Clears the bar and prints the time of each stage.
    fn finish(&self) {
        self.bar.finish_and_clear();
        let mut timings = lock(&self.timings);
        timings.begin(String::new(), 0);
        for line in timings.summary() {
            eprintln!("{line}");
        }
    }
}

/// Wall time and model evaluations of each stage (and the decode), printed after a render.
#[derive(Default)]
struct StageTimings {
    current: Option<(String, usize, std::time::Instant)>,
    views: usize,
    done: Vec<(String, usize, usize, f64)>,
}

impl StageTimings {
    /// Closes the running stage (if any) and starts `name`.
    fn begin(&mut self, name: String, steps: usize) {
        if let Some((prev, prev_steps, t)) = self.current.take() {
            let views = std::mem::take(&mut self.views);
            self.done
                .push((prev, prev_steps, views, t.elapsed().as_secs_f64()));
        }
        self.views = 0;
        if !name.is_empty() {
            self.current = Some((name, steps, std::time::Instant::now()));
        }
    }

    fn summary(&self) -> Vec<String> {
        self.done
            .iter()
            .map(|(name, steps, views, secs)| {
                if *steps == 0 {
                    format!("{name}: {secs:.2}s")
                } else {
                    format!(
                        "{name}: {steps} steps, {views} view evaluations in {secs:.2}s \
                         ({:.2} evaluations/s)",
                        *views as f64 / secs.max(1e-9)
                    )
                }
            })
            .collect()
    }
}
