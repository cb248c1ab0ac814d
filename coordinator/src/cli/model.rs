//! `tessera model ...`: model utilities.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use tessera_worker::random_models::tiny::{synthesize, TinyArch};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a tiny model of a real architecture with random weights, in the diffusers layout
    /// (configs, safetensors, tokenizer files). It renders noise-like pictures, fast: for tests
    /// and for trying the tool without downloading weights.
    Synth(SynthArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ArchArg {
    /// SDXL base architecture (two text encoders, text_time conditioning), tiny widths;
    /// training size 128x128.
    SdxlTiny,
    /// SD 2.1 architecture (v-prediction, DDIM), tiny widths; training size 128x128.
    Sd21Tiny,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Which architecture to synthesize.
    #[arg(long, value_enum)]
    pub arch: ArchArg,
    /// Directory to write the model into (created; must be empty or absent).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights: the same seed writes byte-identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Synth(args) => {
            let arch = match args.arch {
                ArchArg::SdxlTiny => TinyArch::SdxlTiny,
                ArchArg::Sd21Tiny => TinyArch::Sd21Tiny,
            };
            synthesize(arch, &args.out, args.seed)
                .with_context(|| format!("synthesizing a model into {}", args.out.display()))?;
            eprintln!(
                "wrote a tiny {} model to {}",
                arch.name(),
                args.out.display()
            );
            Ok(())
        }
    }
}
