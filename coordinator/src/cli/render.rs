//! `tessera render`: one image, start to finish, in this process.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tessera_common::sched::SchedulerKind;
use tessera_common::spec::{RenderSpec, Size};
use tessera_worker::device::{compute_dtype, open_device};
use tessera_worker::model::diffusion::DiffusionModel;

use crate::{assemble, engine, latent_file};

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Model directory in the diffusers layout (SD 2.1 or SDXL base; `tessera model synth`
    /// makes a tiny one).
    #[arg(long)]
    pub model: PathBuf,
    /// What to render.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from. Absent means "" for SD 2.1 and zero embeddings for SDXL, as in
    /// diffusers.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Output size WIDTHxHEIGHT in pixels, multiples of 8 [default: the model's training size].
    #[arg(long)]
    pub size: Option<Size>,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less disables guidance.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Sampler [default: the model's scheduler/scheduler_config.json].
    #[arg(long, value_parser = parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// Seed of all random draws; the same seed and flags give the same image
    /// [default: a random seed, printed and stored in the PNG].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Initial noise of the first stage: a safetensors file with one tensor of shape
    /// 1x4xHEIGHT/8xWIDTH/8 (replaces the seeded noise).
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Also write the final latent (before decoding) to this safetensors file.
    #[arg(long)]
    pub output_latents: Option<PathBuf>,
    /// Where to compute: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output PNG file.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
}

fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    s.parse::<SchedulerKind>().map_err(|e| e.to_string())
}

pub fn run(args: RenderArgs) -> Result<()> {
    let started = Instant::now();
    let device = open_device(&args.device)?;
    let initial = args
        .latents
        .as_deref()
        .map(latent_file::read_latents)
        .transpose()?;

    let spinner =
        ProgressBar::new_spinner().with_message(format!("loading {}", args.model.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let model = DiffusionModel::load(&args.model, &device, compute_dtype(&device))?;
    spinner.finish_and_clear();

    let size = args.size.unwrap_or(Size {
        width: model.training_size(),
        height: model.training_size(),
    });
    let seed = args.seed.unwrap_or_else(rand::random);
    if args.seed.is_none() {
        eprintln!("seed: {seed}");
    }
    let spec = RenderSpec {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        width: size.width,
        height: size.height,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler,
        seed,
    };
    spec.validate()?;

    let bar = ProgressBar::new(spec.steps as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let out = engine::render_single(&model, &spec, initial, &mut |p| {
        bar.set_message(format!("t={}", p.timestep));
        bar.set_position(p.step as u64);
    })?;
    bar.finish_and_clear();

    if let Some(path) = &args.output_latents {
        latent_file::write_latents(path, &out.latents)?;
    }
    let parameters = format!(
        "{}\nscheduler: {}\nmodel: {}\nmethod: single",
        spec.describe(),
        out.scheduler,
        args.model.display()
    );
    assemble::write_png(&args.output, &out.image, &parameters)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "wrote {} ({}x{}) in {:.1}s",
        args.output.display(),
        spec.width,
        spec.height,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
