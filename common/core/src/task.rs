//! The units of work the coordinator hands to workers. A task names its inputs and outputs by
//! store key and carries everything else it needs, so any worker can run it, a retry
//! recomputes the same bytes, and a result always lands under its own step's keys.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub job: String,
    /// Unique within the job, e.g. `s1:t3:task2`; for logs and leases.
    pub id: String,
    pub kind: TaskKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskKind {
    /// Encode prompt and negative prompt; writes the embeddings under the job's `emb:` keys.
    EncodePrompt {
        prompt: String,
        negative_prompt: Option<String>,
    },
    Denoise(DenoiseTask),
    /// Latent (1, C, h, w) in the scheduler's space → pixels (1, 3, 8h, 8w) in [-1, 1].
    /// The coordinator sends one per VAE tile (`coordinator::tiled_vae`); a worker still
    /// tiles internally if it is given more than a tile.
    Decode {
        input: String,
        output: String,
    },
    /// Pixels (1, 3, H, W) in [-1, 1] → latent (1, C, H/8, W/8) times the VAE's scaling
    /// factor: the posterior's sample drawn with the seeded noise of `noise`, tiled when large.
    Encode {
        input: String,
        output: String,
        noise: VaeNoise,
    },
    /// One tile of a distributed encode: pixels (1, 3, H, W) in [-1, 1] → the posterior's
    /// (1, 2C, H/8, W/8) `[mean, std]`, both times the VAE's scaling factor, so the
    /// coordinator can blend tiles and draw the sample `mean + std · ε` with noise it owns
    /// (whoever ran a tile, the sample is the same).
    EncodeTile {
        input: String,
        output: String,
    },
}

impl TaskKind {
    /// The kind of work, in one word: for pace estimates, logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            TaskKind::EncodePrompt { .. } => "prompt",
            TaskKind::Denoise(_) => "denoise",
            TaskKind::Decode { .. } => "decode",
            TaskKind::Encode { .. } => "encode",
            TaskKind::EncodeTile { .. } => "encode-tile",
        }
    }
}

/// Key of the VAE posterior sample's noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaeNoise {
    pub seed: u64,
    pub stage: u32,
}

/// One model call on a batch of equally sized views at one timestep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenoiseTask {
    pub timestep: f64,
    /// (N, C, h, w) views, already scaled by the scheduler's `scale_model_input`.
    pub input: String,
    /// (N, C, h, w) conditional predictions.
    pub output_cond: String,
    /// (N, C, h, w) unconditional predictions, when guided.
    pub output_uncond: Option<String>,
    /// SDXL size conditioning (height, width) in pixels.
    pub size_conditioning: [u32; 2],
    pub freeu: bool,
    /// Dilation of FreeScale's selected convs (1: none).
    pub dilation: usize,
    /// FreeScale's in-UNet scale fusion, for views larger than the training size.
    pub scale_fusion: Option<FusionHook>,
    /// Cross-attention map reuse: the stage's map, its weight and the views' placements.
    pub camap_inject: Option<CamapInject>,
    /// Key to write the captured (halves·N, h0, w0, 77) cross-attention map to.
    pub camap_capture: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusionHook {
    /// Training latent (height, width).
    pub train_latent: [usize; 2],
    pub fast: bool,
    pub jitter_seed: Option<u64>,
}

/// Cross-attention map reuse for a view task: the worker reads the stage's map (once per
/// stage, it is the same for every task) and cuts each view's part itself, so the map is not
/// written again for every task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CamapInject {
    /// Key of the stage's `(halves, h0, w0, 77)` map.
    pub key: String,
    pub weight: f64,
    /// The stage latent's (height, width).
    pub stage_hw: [usize; 2],
    /// The views' latent (height, width).
    pub view_hw: [usize; 2],
    /// Where each of the task's views lies, in batch order.
    pub placements: Vec<crate::method::camap::ViewPlacement>,
}
