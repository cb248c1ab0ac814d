//! `tessera model ...`: model utilities.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Args, Subcommand};
use tessera_core::family::{NamedModel, TINY_MODELS};
use tessera_worker::random_models::tiny::{synthesize, TinyArch};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a tiny model of a real architecture with random weights, in the diffusers layout
    /// (configs, safetensors, tokenizer files). It renders noise-like pictures, fast: for tests
    /// and for trying the tool without downloading weights.
    Synth(SynthArgs),
}

/// `--arch`'s values: the family table's tiny models.
fn tiny_models() -> PossibleValuesParser {
    PossibleValuesParser::new(
        TINY_MODELS
            .iter()
            .map(|m| PossibleValue::new(m.name).help(m.about)),
    )
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Which architecture to synthesize.
    #[arg(long, value_parser = tiny_models())]
    pub arch: String,
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
            let model = NamedModel::find(&TINY_MODELS, &args.arch)
                .with_context(|| format!("--arch {}: not a tiny model", args.arch))?;
            let arch = TinyArch::of_family(model.family);
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
