//! The denoiser of a model: the network that predicts from noisy latents at a timestep, under
//! a text conditioning and the methods' hooks. Engine, tasks and worker talk to it through
//! [`Denoiser`] (the loaded network) and [`DenoiserConfig`] (its facts, read without weights),
//! one variant per implementation: diffusers' UNet2DConditionModel serves SD 2.x and SDXL,
//! `SD3Transformer2DModel` (MMDiT) serves SD3. What varies by family otherwise is in the
//! family table, [`tessera_core::family`].

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tessera_core::family::{Family, FamilyInfo};

use super::flops::{mmdit_flops, unet_flops};
use super::loader::{ModelDir, Result};
use super::sd3::transformer::{Sd3Transformer2DModel, Sd3TransformerConfig};
use super::unet::{AddedCond, UNet2DConditionModel, UNetConfig};
use crate::hooks::UNetHooks;

/// Pixels per latent pixel of the VAEs of every family.
const PIXELS_PER_LATENT: usize = 8;
/// SDXL's size ids per sample: original size, crop top-left, target size.
const SIZE_IDS: usize = 6;
/// Text tokens of a CLIP prompt.
const CLIP_TOKENS: usize = 77;
/// T5 tokens the SD3 pipeline adds (`max_sequence_length`, zeros without T5).
pub const SD3_T5_TOKENS: usize = 256;

/// A denoiser's configuration, as its model directory gives it.
#[derive(Debug, Clone)]
pub enum DenoiserConfig {
    /// `unet/config.json` of an SD 2.x or SDXL directory.
    /// (Boxed: a UNet config is several times an MMDiT one.)
    Unet {
        family: Family,
        config: Box<UNetConfig>,
    },
    /// `transformer/config.json` of an SD3 directory.
    Mmdit { config: Sd3TransformerConfig },
}

/// A loaded denoiser.
pub enum Denoiser {
    /// (Both boxed: the module trees differ several times in size.)
    Unet {
        family: Family,
        unet: Box<UNet2DConditionModel>,
    },
    Mmdit(Box<Sd3Transformer2DModel>),
}

/// What the denoiser is conditioned on for one batch, laid out like the batch's latents.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// (B, tokens, C) text embeddings: the cross-attention context.
    pub text: Tensor,
    /// (B, P) pooled text embeddings, for families conditioned on them (SDXL).
    pub pooled: Option<Tensor>,
    /// (B, 6) size ids, for families conditioned on them (SDXL).
    pub size_ids: Option<Tensor>,
}

impl DenoiserConfig {
    /// The denoiser config of the directory's family.
    pub fn read(dir: &ModelDir) -> Result<Self> {
        let family = dir.index().family;
        match family {
            Family::Sd2 | Family::Sdxl => Ok(Self::Unet {
                family,
                config: Box::new(dir.config("unet")?),
            }),
            Family::Sd3 => Ok(Self::Mmdit {
                config: dir.config("transformer")?,
            }),
        }
    }

    pub fn family(&self) -> Family {
        match self {
            Self::Unet { family, .. } => *family,
            Self::Mmdit { .. } => Family::Sd3,
        }
    }

    /// The training size in pixels (`sample_size` latent pixels).
    pub fn training_size(&self) -> u32 {
        let latent = match self {
            Self::Unet { config, .. } => config.sample_size(),
            Self::Mmdit { config } => config.sample_size,
        };
        (latent * PIXELS_PER_LATENT) as u32
    }

    /// Channels of the latents it denoises.
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Unet { config, .. } => config.in_channels,
            Self::Mmdit { config } => config.in_channels,
        }
    }

    /// Channels of its first block (activations scale with it): the transformer's width.
    pub fn base_channels(&self) -> usize {
        match self {
            Self::Unet { config, .. } => config.block_out_channels.first().copied().unwrap_or(320),
            Self::Mmdit { config } => config.inner_dim(),
        }
    }

    /// Width of the text embeddings it attends to.
    pub fn context_dim(&self) -> candle_core::Result<usize> {
        match self {
            Self::Unet { config, .. } => Ok(config.per_block()?.cross_dims[0]),
            Self::Mmdit { config } => Ok(config.joint_attention_dim),
        }
    }

    /// Text tokens of its conditioning: 77 CLIP tokens, and SD3's 256 T5 tokens after them.
    pub fn text_tokens(&self) -> usize {
        match self {
            Self::Unet { .. } => CLIP_TOKENS,
            Self::Mmdit { .. } => CLIP_TOKENS + SD3_T5_TOKENS,
        }
    }

    /// The largest latent side one call accepts, where the model limits it.
    pub fn max_view_latent(&self) -> Option<usize> {
        match self {
            Self::Unet { .. } => None,
            Self::Mmdit { config } => config.max_latent(),
        }
    }

    /// Width of the pooled text embedding, for families conditioned on one.
    pub fn pooled_dim(&self) -> Option<usize> {
        match self {
            Self::Unet { config, .. } => match (
                config.addition_time_embed_dim,
                config.projection_class_embeddings_input_dim,
            ) {
                // The added embedding is [pooled, Fourier features of the size ids].
                (Some(t), Some(p)) if config.is_sdxl() => Some(p - SIZE_IDS * t),
                _ => None,
            },
            Self::Mmdit { config } => Some(config.pooled_projection_dim),
        }
    }

    /// FLOPs of one evaluation of one sample of `h × w` latent pixels with `tokens` text
    /// tokens (see [`super::flops`]).
    pub fn flops(&self, h: usize, w: usize, tokens: usize) -> candle_core::Result<f64> {
        match self {
            Self::Unet { config, .. } => unet_flops(config, h, w, tokens),
            Self::Mmdit { config } => Ok(mmdit_flops(config, h, w, tokens)),
        }
    }

    /// Builds the denoiser over `vb`.
    pub fn build(&self, vb: VarBuilder<'static>) -> candle_core::Result<Denoiser> {
        match self {
            Self::Unet { family, config } => Ok(Denoiser::Unet {
                family: *family,
                unet: Box::new(UNet2DConditionModel::new(vb, config)?),
            }),
            Self::Mmdit { config } => Ok(Denoiser::Mmdit(Box::new(Sd3Transformer2DModel::new(
                vb, config,
            )?))),
        }
    }

    /// The weights' component folder.
    pub fn component(&self) -> &'static str {
        match self {
            Self::Unet { .. } => "unet",
            Self::Mmdit { .. } => "transformer",
        }
    }

    /// Loads the denoiser's weights from `dir` in `dtype` on `device`.
    pub fn load(&self, dir: &ModelDir, dtype: DType, device: &Device) -> Result<Denoiser> {
        dir.weights(self.component(), dtype, device)?
            .build(|vb| self.build(vb))
    }
}

impl Denoiser {
    /// The denoiser of the model in `dir`.
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        DenoiserConfig::read(dir)?.load(dir, dtype, device)
    }

    pub fn family(&self) -> Family {
        match self {
            Self::Unet { family, .. } => *family,
            Self::Mmdit(_) => Family::Sd3,
        }
    }

    /// The family's row of the family table.
    pub fn info(&self) -> &'static FamilyInfo {
        self.family().info()
    }

    /// Channels of the latents it denoises.
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Unet { unet, .. } => unet.config().in_channels,
            Self::Mmdit(m) => m.config().in_channels,
        }
    }

    /// Latent pixels per token side.
    pub fn patch_size(&self) -> usize {
        self.info().patch_size
    }

    /// The training size in pixels.
    pub fn training_size(&self) -> u32 {
        let latent = match self {
            Self::Unet { unet, .. } => unet.config().sample_size(),
            Self::Mmdit(m) => m.config().sample_size,
        };
        (latent * PIXELS_PER_LATENT) as u32
    }

    /// One prediction for `latents` (B, C, h, w) at `timestep` (shared by the batch;
    /// fractional for Euler), in the latents' dtype.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        hooks: &mut UNetHooks,
    ) -> candle_core::Result<Tensor> {
        // The HtoD parameter cache, when its lever is on (a no-op otherwise and on the CPU).
        let _cache = crate::gpu::host::param_cache(latents.device());
        match self {
            Self::Unet { unet, .. } => {
                let added = match (&cond.pooled, &cond.size_ids) {
                    (Some(pooled), Some(ids)) => Some(AddedCond {
                        text_embeds: pooled.clone(),
                        time_ids: ids.clone(),
                    }),
                    _ => None,
                };
                unet.forward(latents, timestep, &cond.text, added.as_ref(), hooks)
            }
            Self::Mmdit(m) => {
                let pooled = cond.pooled.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("sd3 transformer: no pooled text embeddings".into())
                })?;
                m.forward(latents, timestep, &cond.text, pooled, hooks)
            }
        }
    }
}
