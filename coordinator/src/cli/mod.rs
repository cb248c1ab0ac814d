//! The `tessera` command line. Each subcommand is a plain struct of flags and a `run` function.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod bench_kernels;
pub mod bench_unet;
pub mod client;
pub mod job;
pub mod model;
pub mod model_flags;
pub mod output;
pub mod plan;
pub mod render;
pub mod roles;

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
    /// Run the cluster coordinator: the job API for clients, dispatch to workers, state in
    /// Redis (a restarted coordinator resumes every running job).
    Coordinator(roles::CoordinatorArgs),
    /// Run a cluster worker: serve one model on one device to the coordinator.
    Worker(roles::WorkerArgs),
    /// Queue a job on a coordinator; prints the job id alone on stdout.
    Submit(client::SubmitArgs),
    /// Show a job's state and progress.
    Status(client::StatusArgs),
    /// Follow a job with a progress bar until it ends: exit status 0 when it succeeds, 1 when
    /// it fails, 3 when it is cancelled.
    Watch(client::WatchArgs),
    /// Stop a queued or running job and remove its data.
    Cancel(client::JobArg),
    /// List the coordinator's jobs, newest first.
    List(client::ListArgs),
    /// Download a finished job's PNG.
    Fetch(client::FetchArgs),
    /// Queue one job per prompt line of a file (for overnight runs); prints the job ids.
    Batch(client::BatchArgs),
    /// Benchmarks: Tessera's own costs (coordinator step, scaling) and the UNet on a device; prints a
    /// table and a markdown block for BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

impl Cli {
    /// How this command's logs are written: the server roles' `--log-format`, else text.
    pub fn log_format(&self) -> roles::LogFormat {
        match &self.command {
            Command::Coordinator(a) => a.observe.log_format,
            Command::Worker(a) => a.observe.log_format,
            _ => roles::LogFormat::Text,
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Render(args) => render::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Model(cmd) => model::run(cmd),
        Command::Coordinator(args) => roles::run_coordinator(args),
        Command::Worker(args) => roles::run_worker(args),
        Command::Submit(args) => client::submit(args),
        Command::Status(args) => client::status(args),
        Command::Watch(args) => match client::watch(args)? {
            0 => Ok(()),
            code => std::process::exit(code),
        },
        Command::Cancel(args) => client::cancel(args),
        Command::List(args) => client::list(args),
        Command::Fetch(args) => client::fetch(args),
        Command::Batch(args) => client::batch(args),
        Command::Bench(cmd) => bench::run(cmd),
    }
}
