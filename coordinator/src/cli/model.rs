//! `tessera model ...`: model utilities.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_core::family::{Family, NamedModel, SYNTHETIC_MODELS, TINY_MODELS};
use tessera_worker::random_models::diffusers_dir::Size;
use tessera_worker::random_models::safetensors_stream::WeightDtype;
use tessera_worker::random_models::streamed::{
    write_random_lora, Layout, StreamedModel, StreamedWrite,
};
use tessera_worker::random_models::tiny::{synthesize, TinyArch};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a model of a real architecture with random weights: a tiny one (renders
    /// noise-like pictures, fast: for tests and trying the tool without downloading weights),
    /// or SDXL or SD 2.1 at the published full size (for load-time and memory benchmarks),
    /// as a diffusers directory or as one original-layout .safetensors file.
    Synth(SynthArgs),
}

/// `--arch`'s values: the family table's tiny models, then its full-size synthetic ones.
fn architectures() -> PossibleValuesParser {
    let tiny = TINY_MODELS
        .iter()
        .map(|m| PossibleValue::new(m.name).help(m.about));
    let full = SYNTHETIC_MODELS.iter().map(|m| {
        PossibleValue::new(m.name).help(format!(
            "{}, full size (--model synthetic:{})",
            m.about, m.name
        ))
    });
    PossibleValuesParser::new(tiny.chain(full))
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Which architecture to synthesize: a tiny model, or a full-size one (as
    /// `--model synthetic:NAME` makes on the device, here written to disk: ~7 GB for SDXL
    /// in f16).
    #[arg(long, value_parser = architectures())]
    pub arch: String,
    /// Where to write it: a directory (created; must be empty, absent or an earlier
    /// synthesized model) for the diffusers layout, a new FILE.safetensors for single-file.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights: the same seed writes byte-identical files, and both
    /// layouts of one seed hold the same weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// diffusers: model_index.json and a folder per component; single-file: one .safetensors
    /// with the original (LDM/SGM) names, as ComfyUI and A1111 load (SDXL and SD 2.1 only).
    #[arg(long, default_value = "diffusers", value_parser = PossibleValuesParser::new(["diffusers", "single-file"]))]
    pub layout: String,
    /// The weights' type [default: f16 at full size, as published checkpoints are; f32 for
    /// the tiny models].
    #[arg(long, value_parser = PossibleValuesParser::new(["f16", "bf16", "f32"]))]
    pub dtype: Option<String>,
    /// Instead of a model, write a random kohya-format LoRA of this rank over every attention
    /// projection of the architecture's UNet (to_q, to_k, to_v, to_out.0 of attn1 and attn2)
    /// to --out FILE.safetensors (for `bench load --lora`).
    #[arg(long)]
    pub lora_rank: Option<usize>,
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Synth(args) => synth(args),
    }
}

fn synth(args: SynthArgs) -> Result<()> {
    let name = args.arch.as_str();
    let (model, size) = match NamedModel::find(&TINY_MODELS, name) {
        Some(m) => (m, Size::Tiny),
        None => (
            NamedModel::find(&SYNTHETIC_MODELS, name)
                .with_context(|| format!("--arch {name}: not a known architecture"))?,
            Size::Full,
        ),
    };
    let layout = match args.layout.as_str() {
        "single-file" => Layout::SingleFile,
        _ => Layout::Diffusers,
    };
    let default_dtype = if size == Size::Full { "f16" } else { "f32" };
    let dtype_name = args.dtype.as_deref().unwrap_or(default_dtype);
    let dtype = WeightDtype::parse(dtype_name).context("--dtype takes f16, bf16 or f32")?;
    if size == Size::Tiny && layout == Layout::Diffusers && dtype == WeightDtype::F32 {
        let arch = TinyArch::of_family(model.family);
        synthesize(arch, &args.out, args.seed)
            .with_context(|| format!("synthesizing a model into {}", args.out.display()))?;
        eprintln!(
            "wrote a tiny {} model to {}",
            arch.name(),
            args.out.display()
        );
        return Ok(());
    }
    if model.family == Family::Sd3 {
        bail!(
            "--arch {name}: SD3 is written only as a tiny f32 diffusers directory (use \
             --model synthetic:sd3 for the full size, made on the device)"
        );
    }
    let streamed = StreamedModel {
        sdxl: model.family == Family::Sdxl,
        size,
        layout,
        dtype,
        seed: args.seed,
    };
    if let Some(rank) = args.lora_rank {
        if rank == 0 {
            bail!("--lora-rank must be at least 1, e.g. 32");
        }
        let bar = ProgressBar::new_spinner();
        let modules = write_random_lora(streamed, rank, &args.out, &mut |n| bar.inc(n))
            .with_context(|| format!("writing a LoRA to {}", args.out.display()))?;
        bar.finish_and_clear();
        eprintln!(
            "wrote a rank-{rank} LoRA over {modules} attention projections of {name}'s UNet to {}",
            args.out.display()
        );
        return Ok(());
    }
    write_streamed(streamed, &args)?;
    eprintln!(
        "wrote {name} ({dtype_name}, {}) to {}",
        args.layout,
        args.out.display()
    );
    Ok(())
}

/// Plans the model, then writes its weights a tensor at a time under a progress bar.
fn write_streamed(model: StreamedModel, args: &SynthArgs) -> Result<()> {
    let what = || format!("writing a model to {}", args.out.display());
    let plan = StreamedWrite::prepare(model, &args.out).with_context(what)?;
    let bar = bytes_bar(plan.bytes());
    plan.write(&mut |n| bar.inc(n)).with_context(what)?;
    bar.finish_and_clear();
    Ok(())
}

/// A progress bar over bytes written.
fn bytes_bar(total: u64) -> ProgressBar {
    ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{spinner} weights [{bar:30}] {bytes}/{total_bytes} · {binary_bytes_per_sec} · eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    )
}
