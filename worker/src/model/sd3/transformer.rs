//! diffusers' `SD3Transformer2DModel` (MMDiT): `pos_embed` (a stride-p patch convolution plus
//! the learned position embedding, cropped at the centre to the latent's patch grid as
//! `PatchEmbed.cropped_pos_embed` crops it), `time_text_embed` (sinusoidal timestep embedding
//! and the pooled text projection, summed), `context_embedder`, the joint blocks, `norm_out`
//! and `proj_out`, then the patches are put back into a latent.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::joint_attention::JointGrid;
use super::joint_block::{AdaLayerNormContinuous, BlockShape, JointTransformerBlock};
use crate::hooks::UNetHooks;
use crate::model::attention::LayerGrid;
use crate::model::unet::{timestep_embedding, TimestepEmbedding};

fn default_sample_size() -> usize {
    128
}
fn default_patch_size() -> usize {
    2
}
fn default_channels() -> usize {
    16
}
fn default_layers() -> usize {
    18
}
fn default_head_dim() -> usize {
    64
}
fn default_heads() -> usize {
    18
}
fn default_joint_dim() -> usize {
    4096
}
fn default_caption_dim() -> usize {
    1152
}
fn default_pooled_dim() -> usize {
    2048
}
fn default_max_size() -> Option<usize> {
    Some(96)
}

/// `transformer/config.json`; absent keys take `SD3Transformer2DModel.__init__`'s defaults.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Sd3TransformerConfig {
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_joint_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "default_caption_dim")]
    pub caption_projection_dim: usize,
    #[serde(default = "default_pooled_dim")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "default_max_size")]
    pub pos_embed_max_size: Option<usize>,
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    #[serde(default)]
    pub qk_norm: Option<String>,
}

impl Sd3TransformerConfig {
    /// The width of the token streams: heads × head size.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The largest latent side the position embedding covers.
    pub fn max_latent(&self) -> Option<usize> {
        self.pos_embed_max_size.map(|m| m * self.patch_size)
    }

    /// Rejects what this implementation does not cover, before any weight is read.
    pub fn validate(&self) -> Result<()> {
        if self.pos_embed_max_size.is_none() {
            candle_core::bail!(
                "transformer config: pos_embed_max_size is null (SD3 checkpoints set it; the \
                 sine-cosine position embedding of other models is not implemented)"
            );
        }
        if self.patch_size == 0 || self.num_attention_heads == 0 || self.num_layers == 0 {
            candle_core::bail!("transformer config: patch_size, heads and layers must be positive");
        }
        if self.caption_projection_dim != self.inner_dim() {
            candle_core::bail!(
                "transformer config: caption_projection_dim {} differs from the blocks' width {}",
                self.caption_projection_dim,
                self.inner_dim()
            );
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => {
                candle_core::bail!("transformer config: qk_norm {other:?} (supported: rms_norm)")
            }
        }
        if let Some(l) = self
            .dual_attention_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            candle_core::bail!(
                "transformer config: dual attention layer {l} of {} layers",
                self.num_layers
            );
        }
        Ok(())
    }
}

/// diffusers' `PatchEmbed` with SD3's cropped position embedding.
#[derive(Debug, Clone)]
struct PatchEmbed {
    proj: Conv2d,
    /// (1, max·max, C).
    pos_embed: Tensor,
    max_size: usize,
    patch: usize,
}

impl PatchEmbed {
    fn new(vb: VarBuilder, cfg: &Sd3TransformerConfig) -> Result<Self> {
        let max_size = cfg.pos_embed_max_size.unwrap_or(0);
        let conv = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        Ok(Self {
            proj: candle_nn::conv2d(
                cfg.in_channels,
                cfg.inner_dim(),
                cfg.patch_size,
                conv,
                vb.pp("proj"),
            )?,
            pos_embed: vb.get((1, max_size * max_size, cfg.inner_dim()), "pos_embed")?,
            max_size,
            patch: cfg.patch_size,
        })
    }

    /// (B, C, H, W) latent -> (B, H/p · W/p, inner) tokens with their positions.
    fn forward(&self, latent: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latent.dims4()?;
        let (ph, pw) = (h / self.patch, w / self.patch);
        if ph > self.max_size || pw > self.max_size {
            candle_core::bail!(
                "a {h}x{w} latent is {ph}x{pw} patches, but the position embedding covers at \
                 most {m}x{m} (pos_embed_max_size): use views of at most {} latent pixels",
                self.max_size * self.patch,
                m = self.max_size
            );
        }
        let x = self.proj.forward(latent)?;
        let (b, c, _, _) = x.dims4()?;
        let x = x.reshape((b, c, ph * pw))?.transpose(1, 2)?;
        let (top, left) = ((self.max_size - ph) / 2, (self.max_size - pw) / 2);
        let pos = self
            .pos_embed
            .reshape((self.max_size, self.max_size, c))?
            .narrow(0, top, ph)?
            .narrow(1, left, pw)?
            .reshape((1, ph * pw, c))?
            .to_dtype(x.dtype())?;
        x.broadcast_add(&pos)
    }
}

/// diffusers' `PixArtAlphaTextProjection` with SiLU: linear_1, SiLU, linear_2.
#[derive(Debug, Clone)]
struct TextProjection {
    linear_1: Linear,
    linear_2: Linear,
}

impl TextProjection {
    fn new(vb: VarBuilder, input: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(input, dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// Sinusoidal channels of the timestep (diffusers' `Timesteps(256, flip_sin_to_cos=True, 0)`).
const TIME_CHANNELS: usize = 256;

#[derive(Debug, Clone)]
pub struct Sd3Transformer2DModel {
    pos_embed: PatchEmbed,
    timestep_embedder: TimestepEmbedding,
    text_embedder: TextProjection,
    context_embedder: Linear,
    blocks: Vec<JointTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
    cfg: Sd3TransformerConfig,
}

impl Sd3Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &Sd3TransformerConfig) -> Result<Self> {
        cfg.validate()?;
        let dim = cfg.inner_dim();
        let tte = vb.pp("time_text_embed");
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let shape = BlockShape {
                    dim,
                    heads: cfg.num_attention_heads,
                    head_dim: cfg.attention_head_dim,
                    qk_norm: cfg.qk_norm.is_some(),
                    context_pre_only: i + 1 == cfg.num_layers,
                    dual_attention: cfg.dual_attention_layers.contains(&i),
                };
                JointTransformerBlock::new(vb.pp("transformer_blocks").pp(i), shape)
            })
            .collect::<Result<Vec<_>>>()?;
        let p = cfg.patch_size;
        Ok(Self {
            pos_embed: PatchEmbed::new(vb.pp("pos_embed"), cfg)?,
            timestep_embedder: TimestepEmbedding::new(
                tte.pp("timestep_embedder"),
                TIME_CHANNELS,
                dim,
            )?,
            text_embedder: TextProjection::new(
                tte.pp("text_embedder"),
                cfg.pooled_projection_dim,
                dim,
            )?,
            context_embedder: candle_nn::linear(
                cfg.joint_attention_dim,
                cfg.caption_projection_dim,
                vb.pp("context_embedder"),
            )?,
            blocks,
            norm_out: AdaLayerNormContinuous::new(vb.pp("norm_out"), dim, dim)?,
            proj_out: candle_nn::linear(dim, p * p * cfg.out_channels(), vb.pp("proj_out"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Sd3TransformerConfig {
        &self.cfg
    }

    /// The velocity for `latent` (B, C, H, W) at `timestep` (σ·1000, shared by the batch),
    /// under text tokens `context` (B, T, joint_attention_dim) and pooled text `pooled`
    /// (B, pooled_projection_dim).
    pub fn forward(
        &self,
        latent: &Tensor,
        timestep: f64,
        context: &Tensor,
        pooled: &Tensor,
        hooks: &mut UNetHooks,
    ) -> Result<Tensor> {
        let (b, c, h, w) = latent.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.in_channels || h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "sd3 transformer: a latent of {c} channels and {h}x{w} pixels; it takes {} \
                 channels and sides that are positive multiples of the patch size {p}",
                self.cfg.in_channels
            );
        }
        if context.dim(0)? != b || pooled.dim(0)? != b {
            candle_core::bail!("sd3 transformer: the text batch differs from the latent batch {b}");
        }
        let dtype = latent.dtype();
        let x = self.pos_embed.forward(latent)?;
        let temb = self.time_embedding(b, timestep, &pooled.to_dtype(dtype)?)?;
        let mut context = self.context_embedder.forward(&context.to_dtype(dtype)?)?;
        let train = self.cfg.sample_size / p;
        let grid = JointGrid {
            layer: LayerGrid {
                hw: (h / p, w / p),
                input_hw: (h, w),
            },
            training_tokens: train * train,
        };
        let mut x = x;
        for block in &self.blocks {
            let (nx, nc) = block.forward(&x, &context, &temb, grid, hooks)?;
            x = nx;
            if let Some(nc) = nc {
                context = nc;
            }
        }
        let x = self.proj_out.forward(&self.norm_out.forward(&x, &temb)?)?;
        self.unpatchify(&x, h / p, w / p)
    }

    /// The timestep's embedding plus the pooled text's projection, (B, inner).
    fn time_embedding(&self, b: usize, timestep: f64, pooled: &Tensor) -> Result<Tensor> {
        let t = Tensor::full(timestep as f32, b, pooled.device())?;
        let proj = timestep_embedding(&t, TIME_CHANNELS, true, 0.0)?.to_dtype(pooled.dtype())?;
        self.timestep_embedder.forward(&proj)? + self.text_embedder.forward(pooled)?
    }

    /// (B, h·w, p·p·C) patches -> (B, C, h·p, w·p), diffusers' `einsum("nhwpqc->nchpwq")`.
    fn unpatchify(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, _, _) = x.dims3()?;
        let (p, c) = (self.cfg.patch_size, self.cfg.out_channels());
        x.reshape((b, h, w, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, c, h * p, w * p))
    }
}
