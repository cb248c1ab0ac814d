//! The job flags shared by `render`, `plan`, `submit` and `batch`: what to render and how the
//! cascade runs. Their names are a contract (scripts and the deployment recipes use them). They
//! become a [`JobRequest`], the domain type the wire and the engine read; clap stays here.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use tessera_core::method::params::{Method, MethodSpec, TileWeights};
use tessera_core::resize::ResizeFilter;
use tessera_core::sched::SchedulerKind;
use tessera_core::spec::{
    BitDepth, DziMode, JobRequest, OutputFormat, Size, DEFAULT_GUIDANCE, DEFAULT_STEPS,
};

#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// What to render.
    #[arg(long)]
    pub prompt: Option<String>,
    /// What to steer away from. Absent means "" for SD 2.1 and zero embeddings for SDXL, as in
    /// diffusers.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Output size WIDTHxHEIGHT in pixels: multiples of 8 for plain sampling, of 64 for the
    /// cascades [default: the last of --stages, else the model's training size]. Above the
    /// training size the cascade doubles from it (see --stages).
    #[arg(long)]
    pub size: Option<Size>,
    /// Denoising steps. `single` and `freescale` run this schedule in every stage (FreeScale's
    /// later stages skip its first 30%); `frecas` and `hybrid` spread it over the stages in
    /// the reference preset's proportions (50 gives the preset, e.g. 40+10) unless
    /// --stage-steps says otherwise.
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less disables guidance.
    #[arg(long, default_value_t = DEFAULT_GUIDANCE)]
    pub guidance: f64,
    /// Sampler [default: the model's scheduler/scheduler_config.json; Euler for freescale;
    /// frecas and hybrid always step with DDIM].
    #[arg(long, value_parser = parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// Seed of all random draws; the same seed and flags give the same image
    /// [default: a random seed, printed and stored in the PNG].
    #[arg(long)]
    pub seed: Option<u64>,

    /// single: plain sampling at one size. freescale: same timesteps every stage, restrained
    /// structure, scale fusion. frecas: SNR-aligned stage timing, FA-CFG, attention-map
    /// reuse (fastest). hybrid: FreCaS' timing with FreeScale's restrained structure and
    /// fusion [default: single at the training size, hybrid above].
    #[arg(long, value_parser = parse_method)]
    pub method: Option<Method>,
    /// Stage sizes, smallest first, the last the picture's size (then --size may be left out):
    /// e.g. 1024x1024,2048x2048,4096x4096 [default: doubling from the training size].
    #[arg(long, value_delimiter = ',')]
    pub stages: Option<Vec<Size>>,
    /// FreeScale: the step stages after the first start at [default: 30% of --steps].
    #[arg(long)]
    pub restart_step: Option<usize>,
    /// FreeScale: how strongly later stages keep the previous stage's structure (1-2; at most
    /// 1 at 8K) [default: 2].
    #[arg(long)]
    pub cosine_scale: Option<f64>,
    /// FreeScale: steps with dilated convolutions inside tiles larger than the training size
    /// [default: 35, counted in a 50-step schedule].
    #[arg(long)]
    pub dilate_tau: Option<usize>,
    /// FreeScale's fast mode: the in-tile global attention works on strided sub-grids.
    #[arg(long)]
    pub fast: bool,
    /// FreCaS: end timestep of each stage, e.g. 200,0 [default: the reference preset].
    #[arg(long, value_delimiter = ',')]
    pub end_times: Option<Vec<usize>>,
    /// FreCaS: steps of each stage, e.g. 40,10 [default: the reference preset].
    #[arg(long, value_delimiter = ',')]
    pub stage_steps: Option<Vec<usize>>,
    /// FreCaS: exponent of the stage-start SNR alignment [default: the reference preset].
    #[arg(long)]
    pub gamma: Option<f64>,
    /// FreCaS: FA-CFG weights W_HIGH,W_LOW for stages after the first [default: 35,7.5].
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub facfg: Option<Vec<f64>>,
    /// FreCaS: weight of the reused cross-attention maps, 0 to 1 (0 turns reuse off)
    /// [default: the reference preset].
    #[arg(long)]
    pub camap: Option<f64>,
    /// Fraction of a tile shared with its neighbour, 0 to 0.9 [default: 0.5].
    #[arg(long)]
    pub tile_overlap: Option<f64>,
    /// Side of a local tile in pixels, a multiple of 64 [default: the training size]. A tile
    /// covering the whole stage runs the reference's in-UNet algorithm on one worker.
    #[arg(long)]
    pub tile_size: Option<u32>,
    /// How overlapping tiles are averaged: gaussian (tiles fade out towards their borders) or
    /// uniform (the reference's plain average, which leaves steps at tile borders).
    #[arg(long, default_value_t = TileWeights::default(), value_parser = parse_weights)]
    pub tile_weights: TileWeights,
    /// Local tiles only: no global views and no scale fusion.
    #[arg(long)]
    pub no_fusion: bool,
    /// FreeU on or off [default: on for freescale and hybrid].
    #[arg(long)]
    pub freeu: Option<bool>,
    /// Views per model call [default: 4].
    #[arg(long)]
    pub view_batch: Option<usize>,
    /// Pixel resize between stages: bicubic, bilinear or nearest [default: nearest for
    /// frecas, bicubic otherwise].
    #[arg(long, value_parser = parse_filter)]
    pub resize: Option<ResizeFilter>,
    /// Start from this PNG instead of sampling the first stage: it is resized to the first
    /// stage and upscaled by the later ones.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Detail mask PNG (white = keep structure with --cosine-scale, black = use
    /// --cosine-scale-bg); same aspect ratio as the render.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Restrained-structure exponent outside the mask [default: 0.5].
    #[arg(long)]
    pub cosine_scale_bg: Option<f64>,
    /// Bits per sample of the output PNG: 8 or 16.
    #[arg(long, default_value_t = BitDepth::default(), value_parser = parse_bit_depth)]
    pub bit_depth: BitDepth,
    /// Deep Zoom pyramid (NAME.dzi, NAME_files/, NAME_viewer.html) beside the PNG: auto (only
    /// wider or taller than 16384 px), always or never.
    #[arg(long, default_value_t = DziMode::default(), value_parser = parse_dzi)]
    pub dzi: DziMode,
}

fn parse_dzi(s: &str) -> Result<DziMode, String> {
    s.parse::<DziMode>().map_err(|e| e.to_string())
}

fn parse_bit_depth(s: &str) -> Result<BitDepth, String> {
    s.parse::<BitDepth>().map_err(|e| e.to_string())
}

fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    s.parse::<SchedulerKind>().map_err(|e| e.to_string())
}

fn parse_method(s: &str) -> Result<Method, String> {
    s.parse::<Method>()
}

fn parse_weights(s: &str) -> Result<TileWeights, String> {
    s.parse::<TileWeights>()
}

fn parse_filter(s: &str) -> Result<ResizeFilter, String> {
    s.parse::<ResizeFilter>().map_err(|e| e.to_string())
}

/// What a command does when `--prompt` is not given.
#[derive(Debug, Clone, Copy)]
pub enum MissingPrompt {
    /// `render`: there is nothing to render without one.
    Refuse,
    /// `plan` plans without one; `submit` sends it as it is and the coordinator refuses it.
    Use(&'static str),
}

impl JobArgs {
    /// The job these flags ask for. Only a missing `--prompt` can be refused here; what the
    /// flags mean together is checked when the request is resolved against a model.
    pub fn to_request(&self, missing_prompt: MissingPrompt) -> Result<JobRequest> {
        let prompt = match (&self.prompt, missing_prompt) {
            (Some(p), _) => p.clone(),
            (None, MissingPrompt::Use(p)) => p.to_string(),
            (None, MissingPrompt::Refuse) => {
                bail!("--prompt is required: describe the picture to render")
            }
        };
        Ok(JobRequest {
            prompt,
            negative_prompt: self.negative_prompt.clone(),
            size: self.size,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler,
            seed: self.seed,
            method: MethodSpec {
                method: self.method,
                stages: self.stages.clone(),
                restart_step: self.restart_step,
                cosine_scale: self.cosine_scale,
                cosine_scale_bg: self.cosine_scale_bg,
                dilate_tau: self.dilate_tau,
                fast: self.fast,
                end_times: self.end_times.clone(),
                stage_steps: self.stage_steps.clone(),
                gamma: self.gamma,
                facfg: None,
                camap: self.camap,
                tile_overlap: self.tile_overlap,
                tile_size: self.tile_size,
                tile_weights: self.tile_weights,
                no_fusion: self.no_fusion,
                freeu: self.freeu,
                view_batch: self.view_batch,
                resize: self.resize,
                init_image: self.init_image.is_some(),
                mask: self.mask.is_some(),
            },
            facfg: self.facfg.clone(),
            output: OutputFormat {
                bit_depth: self.bit_depth,
                dzi: self.dzi,
            },
            loras: Vec::new(),
        })
    }
}
