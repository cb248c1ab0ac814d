//! The `tessera` command line. Each subcommand is a plain struct of flags and a `run` function.

use clap::{Parser, Subcommand};

pub mod job;
pub mod model;
pub mod plan;
pub mod render;

#[derive(Debug, Parser)]
#[command(
    name = "tessera",
    version,
    about = "Render images far beyond a diffusion model's training size (FreeScale, FreCaS)",
    long_about = "Tessera renders Stable Diffusion 2.1 and SDXL images, on one machine or across \
                  a cluster of GPU workers.\n\nStart with `tessera model synth` to make a tiny \
                  random model for trying things out, then `tessera render`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Render one image in this process (no Redis, no cluster needed).
    Render(render::RenderArgs),
    /// Print the cascade a render would run (stages, timesteps, views, evaluations, memory)
    /// without running it.
    Plan(plan::PlanArgs),
    /// Model utilities: synthesize tiny random models for tests and trials.
    #[command(subcommand)]
    Model(model::ModelCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Render(args) => render::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Model(cmd) => model::run(cmd),
    }
}
