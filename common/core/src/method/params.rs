//! What a user may say about the cascade (`--method`, `--stages` and the method flags), as
//! given: `None` means "the method's reference default", resolved by [`crate::plan`].

use serde::{Deserialize, Serialize};

use crate::resize::ResizeFilter;
use crate::spec::Size;

/// The sampling method of a render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Plain text-to-image at one size: what diffusers' pipelines compute.
    Single,
    /// FreeScale: same timesteps every stage, restrained structure, scale fusion, dilation.
    Freescale,
    /// FreCaS: per-stage timing from SNR alignment, FA-CFG, cross-attention map reuse.
    Frecas,
    /// Tessera's default: FreCaS' timing, FA-CFG and CA-map reuse with FreeScale's restrained
    /// structure and tiled scale fusion.
    Hybrid,
}

impl Method {
    pub const NAMES: &'static str = "single, freescale, frecas or hybrid";
}

impl std::str::FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "single" => Ok(Self::Single),
            "freescale" => Ok(Self::Freescale),
            "frecas" => Ok(Self::Frecas),
            "hybrid" => Ok(Self::Hybrid),
            other => Err(format!(
                "method {other:?} is not known: use {}",
                Self::NAMES
            )),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single => "single",
            Self::Freescale => "freescale",
            Self::Frecas => "frecas",
            Self::Hybrid => "hybrid",
        })
    }
}

/// How overlapping local views are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TileWeights {
    /// Plain average, as the reference (which averages attention features, not predictions:
    /// on predictions it leaves a step where a view starts, see common/tests/merge_seams.rs).
    Uniform,
    /// Gaussian window weights: a view fades out towards its border.
    #[default]
    Gaussian,
}

impl std::str::FromStr for TileWeights {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uniform" => Ok(Self::Uniform),
            "gaussian" => Ok(Self::Gaussian),
            other => Err(format!(
                "tile weighting {other:?} is not known: use uniform or gaussian"
            )),
        }
    }
}

impl std::fmt::Display for TileWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Uniform => "uniform",
            Self::Gaussian => "gaussian",
        })
    }
}

/// The cascade part of a render spec. Every `Option` left `None` takes the method's default.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MethodSpec {
    /// `None`: `single` at the model's training size, `hybrid` above it.
    pub method: Option<Method>,
    /// Stage sizes, smallest first, the last equal to the render size.
    pub stages: Option<Vec<Size>>,
    /// FreeScale: the step at which stages > 0 start (default int(0.3 · steps)).
    pub restart_step: Option<usize>,
    /// FreeScale restrained structure exponent (default 2).
    pub cosine_scale: Option<f64>,
    /// Exponent outside the `--mask` (detail-level control).
    pub cosine_scale_bg: Option<f64>,
    /// FreeScale: steps with dilated convolutions inside tiles larger than the training size.
    pub dilate_tau: Option<usize>,
    /// FreeScale's fast mode for the in-UNet global branch (strided sub-grids).
    pub fast: bool,
    /// FreCaS: end timestep of each stage.
    pub end_times: Option<Vec<usize>>,
    /// FreCaS: steps of each stage.
    pub stage_steps: Option<Vec<usize>>,
    /// FreCaS: SNR exponent γ of the start-timestep alignment.
    pub gamma: Option<f64>,
    /// FreCaS: FA-CFG weights [w_high, w_low].
    pub facfg: Option<[f64; 2]>,
    /// FreCaS: CA-map reuse weight (0 turns it off).
    pub camap: Option<f64>,
    /// Fraction of a tile shared with its neighbour (default 0.5).
    pub tile_overlap: Option<f64>,
    /// Side of a local tile in pixels (default: the training size). A tile as large as the
    /// stage is the reference's single whole-latent evaluation.
    pub tile_size: Option<u32>,
    pub tile_weights: TileWeights,
    /// Turn off the global views and their fusion (local tiles only).
    pub no_fusion: bool,
    /// FreeU on (default for freescale and hybrid) or off.
    pub freeu: Option<bool>,
    /// Views per model call.
    pub view_batch: Option<usize>,
    /// Pixel-space resize between stages (bicubic for freescale and hybrid, nearest for frecas).
    pub resize: Option<ResizeFilter>,
    /// The render starts from a given picture (its pixels travel beside the spec).
    pub init_image: bool,
    /// A detail mask is given (its pixels travel beside the spec).
    pub mask: bool,
}
