//! diffusers' `UNet2DConditionModel` for SD 2.1 and SDXL, configured straight from
//! `unet/config.json`, with parameter names matching the checkpoints and hooks per call.

use super::norm::GroupNorm;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use super::blocks::{BlockSettings, CrossAttnSettings, DownBlock, MidBlock, UpBlock};
use super::resnet::HookedConv2d;
use crate::hooks::UNetHooks;

/// A config field diffusers accepts either as one value or as one value per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// One value per block; a list must have exactly `n` entries.
    pub(crate) fn per_block(&self, n: usize, field: &'static str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => Err(UNetConfigError::Invalid {
                field,
                message: format!("has {} entries for {n} blocks", v.len()),
            }
            .into()),
        }
    }
}

/// Why a UNet config cannot be used; every message names the field.
#[derive(Debug, thiserror::Error)]
pub enum UNetConfigError {
    #[error("unet config field `{field}` = {value} is not supported")]
    Unsupported { field: &'static str, value: String },
    #[error("unet config field `{field}` {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl From<UNetConfigError> for candle_core::Error {
    fn from(e: UNetConfigError) -> Self {
        candle_core::Error::wrap(e)
    }
}

fn d_in_channels() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_down_blocks() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up_blocks() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers_per_block() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_one_usize() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn d_downsample_padding() -> usize {
    1
}
fn d_one_f64() -> f64 {
    1.0
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross_dim() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_head_dim() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn d_only_cross() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn d_time_scale_shift() -> String {
    "default".into()
}
fn d_time_embedding_type() -> String {
    "positional".into()
}
fn d_kernel() -> usize {
    3
}
fn d_attention_type() -> String {
    "default".into()
}

/// `unet/config.json` as diffusers writes it; defaults are diffusers' constructor defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default)]
    pub sample_size: Option<OneOrMany<usize>>,
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_in_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_only_cross")]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "d_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers_per_block")]
    pub layers_per_block: OneOrMany<usize>,
    #[serde(default = "d_downsample_padding")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross_dim")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "d_one_usize")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// With `num_attention_heads` null this is the number of heads (a diffusers naming quirk).
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Only affects half precision in diffusers; our softmax always runs in f32 for half inputs.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one_f64")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_time_embedding_type")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_attention_type")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

/// The error for a config field set to something this implementation does not compute.
fn unsupported<T: std::fmt::Debug>(field: &'static str, v: T) -> candle_core::Error {
    UNetConfigError::Unsupported {
        field,
        value: format!("{v:?}"),
    }
    .into()
}

impl UNetConfig {
    /// Training latent size (config `sample_size`; diffusers' pipelines assume 64 when absent).
    pub fn sample_size(&self) -> usize {
        match &self.sample_size {
            Some(OneOrMany::One(s)) => *s,
            Some(OneOrMany::Many(v)) => v.first().copied().unwrap_or(64),
            None => 64,
        }
    }

    /// SDXL-style size and pooled-text conditioning.
    pub fn is_sdxl(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// Rejects what this implementation does not compute, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.check_conditioning()?;
        self.check_cross_attention()?;
        self.check_activations_and_time()?;
        self.check_layer_options()?;
        self.check_blocks()
    }

    /// Class, encoder-hidden and time embeddings: positional timesteps, and SDXL's
    /// `text_time` added conditioning with its two sizes.
    fn check_conditioning(&self) -> Result<()> {
        if let Some(v) = &self.class_embed_type {
            return Err(unsupported("class_embed_type", v));
        }
        if let Some(v) = &self.num_class_embeds {
            return Err(unsupported("num_class_embeds", v));
        }
        if let Some(v) = &self.encoder_hid_dim_type {
            return Err(unsupported("encoder_hid_dim_type", v));
        }
        if let Some(v) = &self.encoder_hid_dim {
            return Err(unsupported("encoder_hid_dim", v));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                &self.time_embedding_type,
            ));
        }
        match self.addition_embed_type.as_deref() {
            None | Some("text_time") => {}
            Some(v) => return Err(unsupported("addition_embed_type", v)),
        }
        if self.is_sdxl() {
            if self.addition_time_embed_dim.is_none() {
                return Err(UNetConfigError::Invalid {
                    field: "addition_time_embed_dim",
                    message: "is required with addition_embed_type \"text_time\"".into(),
                }
                .into());
            }
            if self.projection_class_embeddings_input_dim.is_none() {
                return Err(UNetConfigError::Invalid {
                    field: "projection_class_embeddings_input_dim",
                    message: "is required with addition_embed_type \"text_time\"".into(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Cross-attention in every transformer block, one context.
    fn check_cross_attention(&self) -> Result<()> {
        if self.dual_cross_attention {
            return Err(unsupported("dual_cross_attention", true));
        }
        let only_cross = match &self.only_cross_attention {
            OneOrMany::One(b) => *b,
            OneOrMany::Many(v) => v.iter().any(|b| *b),
        };
        if only_cross {
            return Err(unsupported(
                "only_cross_attention",
                &self.only_cross_attention,
            ));
        }
        if self.mid_block_only_cross_attention == Some(true) {
            return Err(unsupported("mid_block_only_cross_attention", true));
        }
        Ok(())
    }

    /// SiLU everywhere, the default resnet time scale-shift, no extra time-embedding layers.
    fn check_activations_and_time(&self) -> Result<()> {
        if self.act_fn != "silu" {
            return Err(unsupported("act_fn", &self.act_fn));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
            ));
        }
        if self.resnet_skip_time_act {
            return Err(unsupported("resnet_skip_time_act", true));
        }
        if let Some(v) = &self.time_embedding_act_fn {
            return Err(unsupported("time_embedding_act_fn", v));
        }
        if let Some(v) = &self.timestep_post_act {
            return Err(unsupported("timestep_post_act", v));
        }
        if let Some(v) = &self.time_cond_proj_dim {
            return Err(unsupported("time_cond_proj_dim", v));
        }
        Ok(())
    }

    /// Default attention, no concatenated class embeddings, no cross-attention norm or
    /// reversed layer counts, odd in/out conv kernels.
    fn check_layer_options(&self) -> Result<()> {
        if self.attention_type != "default" {
            return Err(unsupported("attention_type", &self.attention_type));
        }
        if self.class_embeddings_concat {
            return Err(unsupported("class_embeddings_concat", true));
        }
        if let Some(v) = &self.cross_attention_norm {
            return Err(unsupported("cross_attention_norm", v));
        }
        if let Some(v) = &self.reverse_transformer_layers_per_block {
            if !v.is_null() {
                return Err(unsupported("reverse_transformer_layers_per_block", v));
            }
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(unsupported(field, k));
            }
        }
        Ok(())
    }

    /// The block lists: one entry per level, block types this implementation has.
    fn check_blocks(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(UNetConfigError::Invalid {
                field: "block_out_channels",
                message: "is empty".into(),
            }
            .into());
        }
        if self.down_block_types.len() != n {
            return Err(UNetConfigError::Invalid {
                field: "down_block_types",
                message: format!(
                    "has {} entries, block_out_channels {n}",
                    self.down_block_types.len()
                ),
            }
            .into());
        }
        if self.up_block_types.len() != n {
            return Err(UNetConfigError::Invalid {
                field: "up_block_types",
                message: format!(
                    "has {} entries, block_out_channels {n}",
                    self.up_block_types.len()
                ),
            }
            .into());
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "CrossAttnDownBlock2D" {
                return Err(unsupported("down_block_types", t));
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "CrossAttnUpBlock2D" {
                return Err(unsupported("up_block_types", t));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            v => return Err(unsupported("mid_block_type", v)),
        }
        if self.norm_num_groups == 0 {
            return Err(unsupported("norm_num_groups", 0));
        }
        Ok(())
    }

    /// Heads per block: `num_attention_heads`, or `attention_head_dim` when it is null.
    fn heads_per_block(&self) -> Result<Vec<usize>> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.per_block(n, "num_attention_heads"),
            None => self.attention_head_dim.per_block(n, "attention_head_dim"),
        }
    }

    /// The per-block settings the config may give once or per block, resolved to one entry
    /// per block (what the UNet's constructor and the FLOP count both walk).
    pub fn per_block(&self) -> Result<PerBlock> {
        let n = self.block_out_channels.len();
        Ok(PerBlock {
            heads: self.heads_per_block()?,
            layers: self.layers_per_block.per_block(n, "layers_per_block")?,
            transformer_layers: self
                .transformer_layers_per_block
                .per_block(n, "transformer_layers_per_block")?,
            cross_dims: self
                .cross_attention_dim
                .per_block(n, "cross_attention_dim")?,
        })
    }

    fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }
}

/// [`UNetConfig::per_block`]: one entry per down block.
#[derive(Debug, Clone)]
pub struct PerBlock {
    pub heads: Vec<usize>,
    pub layers: Vec<usize>,
    pub transformer_layers: Vec<usize>,
    pub cross_dims: Vec<usize>,
}

/// SDXL's extra conditioning for a batch.
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// (B, pooled_dim) pooled text embeddings of the second text encoder.
    pub text_embeds: Tensor,
    /// (B, 6): orig_h, orig_w, crop_top, crop_left, target_h, target_w.
    pub time_ids: Tensor,
}

/// diffusers' `get_timestep_embedding` (max_period 10000, scale 1), in f32 as diffusers does:
/// exp(−ln(10000)·i / (half − shift)) frequencies, [sin, cos] or [cos, sin] when flipped.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let device = timesteps.device();
    let t = timesteps.to_dtype(DType::F32)?.flatten_all()?;
    let n = t.dim(0)?;
    let idx = Tensor::arange(0u32, half as u32, device)?.to_dtype(DType::F32)?;
    let exponent = ((idx * -(10000f64).ln())? / (half as f64 - freq_shift))?;
    let freqs = exponent.exp()?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[&cos, &sin], 1)?
    } else {
        Tensor::cat(&[&sin, &cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        debug_assert_eq!(emb.dims(), &[n, dim]);
        Ok(emb)
    }
}

/// diffusers' `TimestepEmbedding`: linear_1, SiLU, linear_2.
#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub(crate) fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    cfg: UNetConfig,
    conv_in: HookedConv2d,
    time_embedding: TimestepEmbedding,
    /// SDXL: (add_time_proj width, add_embedding).
    add_embedding: Option<(usize, TimestepEmbedding)>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: HookedConv2d,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.block_out_channels.len();
        let ch = &cfg.block_out_channels;
        let PerBlock {
            heads,
            layers,
            transformer_layers: tlayers,
            cross_dims,
        } = cfg.per_block()?;
        let temb = cfg.time_embed_dim();

        let conv_in = HookedConv2d::new(
            cfg.in_channels,
            ch[0],
            cfg.conv_in_kernel,
            1,
            cfg.conv_in_kernel / 2,
            vb.pp("conv_in"),
        )?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?;
        let add_embedding = match (
            cfg.is_sdxl(),
            cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim,
        ) {
            (true, Some(d), Some(p)) => {
                Some((d, TimestepEmbedding::new(vb.pp("add_embedding"), p, temb)?))
            }
            _ => None,
        };
        let settings = BlockSettings {
            temb_channels: temb,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            output_scale_factor: cfg.resnet_out_scale_factor,
            use_linear_projection: cfg.use_linear_projection,
        };
        let cross = |i: usize, has: bool| {
            has.then_some(CrossAttnSettings {
                heads: heads[i],
                layers: tlayers[i],
                context_dim: cross_dims[i],
            })
        };

        let mut down_blocks = Vec::with_capacity(n);
        for (i, t) in cfg.down_block_types.iter().enumerate() {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            down_blocks.push(DownBlock::new(
                vb.pp("down_blocks").pp(i),
                cin,
                ch[i],
                layers[i],
                i + 1 < n,
                cfg.downsample_padding,
                cross(i, t == "CrossAttnDownBlock2D"),
                &settings,
            )?);
        }
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            ch[n - 1],
            CrossAttnSettings {
                heads: heads[n - 1],
                layers: tlayers[n - 1],
                context_dim: cross_dims[n - 1],
            },
            &settings,
            cfg.mid_block_scale_factor,
        )?;
        let mut up_blocks = Vec::with_capacity(n);
        for (i, t) in cfg.up_block_types.iter().enumerate() {
            // Up block i mirrors down block n−1−i.
            let r = n - 1 - i;
            let prev = if i == 0 { ch[n - 1] } else { ch[r + 1] };
            let cin = ch[r.saturating_sub(1)];
            up_blocks.push(UpBlock::new(
                vb.pp("up_blocks").pp(i),
                cin,
                prev,
                ch[r],
                layers[r] + 1,
                i + 1 < n,
                i,
                cross(r, t == "CrossAttnUpBlock2D"),
                &settings,
            )?);
        }
        let conv_norm_out = super::norm::group_norm(
            cfg.norm_num_groups,
            ch[0],
            cfg.norm_eps,
            vb.pp("conv_norm_out"),
        )?;
        let conv_out = HookedConv2d::new(
            ch[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            1,
            cfg.conv_out_kernel / 2,
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The time embedding plus, for SDXL, the size / pooled-text embedding.
    fn embedding(
        &self,
        b: usize,
        timestep: f64,
        added: Option<&AddedCond>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = Tensor::full(timestep as f32, b, device)?;
        let t_emb = timestep_embedding(
            &t,
            self.cfg.block_out_channels[0],
            self.cfg.flip_sin_to_cos,
            self.cfg.freq_shift,
        )?;
        let emb = self.time_embedding.forward(&t_emb.to_dtype(dtype)?)?;
        let Some((dim, add_embedding)) = &self.add_embedding else {
            return Ok(emb);
        };
        let Some(added) = added else {
            candle_core::bail!(
                "this SDXL UNet needs added conditioning (text_embeds and time_ids)"
            );
        };
        let (tb, nids) = added.time_ids.dims2()?;
        let eb = added.text_embeds.dims2()?.0;
        if tb != b || eb != b || nids != 6 {
            candle_core::bail!(
                "added conditioning: time_ids {:?} and text_embeds {:?} must be (B, 6) and (B, P) with B = {b}",
                added.time_ids.dims(),
                added.text_embeds.dims()
            );
        }
        let time = timestep_embedding(
            &added.time_ids.flatten_all()?,
            *dim,
            self.cfg.flip_sin_to_cos,
            self.cfg.freq_shift,
        )?
        .reshape((b, 6 * dim))?;
        let text = added.text_embeds.to_dtype(DType::F32)?;
        let add = Tensor::cat(&[&text, &time], D::Minus1)?.to_dtype(dtype)?;
        emb + add_embedding.forward(&add)?
    }

    /// One denoising prediction. `timestep` is shared by the batch (fractional for Euler).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
        hooks: &mut UNetHooks,
    ) -> Result<Tensor> {
        let (b, c, h, w) = sample.dims4()?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "unet sample has {c} channels, the model expects {}",
                self.cfg.in_channels
            );
        }
        let (eb, _, _) = encoder_hidden_states.dims3()?;
        if eb != b {
            candle_core::bail!(
                "unet: encoder_hidden_states batch {eb} differs from sample batch {b}"
            );
        }
        if h == 0 || w == 0 {
            candle_core::bail!("unet: empty sample {h}x{w}");
        }
        let dtype = sample.dtype();
        let context = encoder_hidden_states.to_dtype(dtype)?;
        let emb = self.embedding(b, timestep, added, dtype, sample.device())?;

        let sample = if self.cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let input_hw = (h, w);
        let mut x = self.conv_in.forward(&sample, hooks)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (y, s) = block.forward(&x, &emb, &context, input_hw, hooks)?;
            x = y;
            skips.extend(s);
        }
        x = self
            .mid_block
            .forward(&x, &emb, &context, input_hw, hooks)?;
        let last = self.up_blocks.len() - 1;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let keep = skips.len().checked_sub(block.num_resnets());
            let Some(keep) = keep else {
                candle_core::bail!("unet: up block {i} lacks skip connections");
            };
            let mut own = skips.split_off(keep);
            // Upsample to the next block's skip size, which also covers odd sizes as diffusers'
            // `upsample_size`.
            let size = if i < last {
                match skips.last() {
                    Some(s) => {
                        let (_, _, sh, sw) = s.dims4()?;
                        Some((sh, sw))
                    }
                    None => None,
                }
            } else {
                None
            };
            x = block.forward(&x, &mut own, &emb, &context, size, input_hw, hooks)?;
        }
        let x = self.conv_norm_out.forward(&x)?.silu()?;
        self.conv_out.forward(&x, hooks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{CrossAttnInjection, FreeU};
    use candle_nn::VarMap;

    fn tiny(sdxl: bool) -> UNetConfig {
        let v = if sdxl {
            serde_json::json!({
                "sample_size": 16, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [32, 64, 64], "layers_per_block": 2,
                "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [2, 4, 4],
                "num_attention_heads": null, "cross_attention_dim": 24, "use_linear_projection": true,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 12
            })
        } else {
            serde_json::json!({
                "sample_size": 16, "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1,
                "attention_head_dim": [2, 4, 4, 4], "cross_attention_dim": 16, "upcast_attention": true
            })
        };
        serde_json::from_value(v).unwrap()
    }

    fn run(sdxl: bool, hooks: &mut UNetHooks) -> Result<Tensor> {
        let cfg = tiny(sdxl);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let unet = UNet2DConditionModel::new(vb, &cfg)?;
        let dev = Device::Cpu;
        let sample = Tensor::randn(0f32, 1.0, (2, 4, 13, 10), &dev)?;
        let ctx_dim = if sdxl { 24 } else { 16 };
        let ctx = Tensor::randn(0f32, 1.0, (2, 5, ctx_dim), &dev)?;
        let added = AddedCond {
            text_embeds: Tensor::randn(0f32, 1.0, (2, 12), &dev)?,
            time_ids: Tensor::new(
                &[
                    [104f32, 80., 0., 0., 104., 80.],
                    [104., 80., 0., 0., 104., 80.],
                ],
                &dev,
            )?,
        };
        let out = unet.forward(&sample, 500.5, &ctx, sdxl.then_some(&added), hooks)?;
        assert_eq!(out.dims(), &[2, 4, 13, 10]);
        Ok(out)
    }

    #[test]
    fn tiny_unets_run_on_non_square_input() -> Result<()> {
        for sdxl in [false, true] {
            let plain = run(sdxl, &mut UNetHooks::default())?;
            assert!(plain.sum_all()?.to_scalar::<f32>()?.is_finite());
            let mut hooks = UNetHooks {
                freeu: Some(FreeU {
                    b1: 1.1,
                    b2: 1.2,
                    s1: 0.6,
                    s2: 0.4,
                }),
                capture_cross_attention: true,
                ..Default::default()
            };
            hooks.dilation.insert("mid_block.resnets.0.conv1".into(), 2);
            run(sdxl, &mut hooks)?;
            assert!(!hooks.captured.is_empty());
            let first = &hooks.captured[0];
            assert_eq!(first.probs.dims()[1], first.height * first.width);
            let mut inject = UNetHooks {
                inject_cross_attention: Some(CrossAttnInjection {
                    weight: 0.6,
                    map: Tensor::ones((2, 4, 3, 5), DType::F32, &Device::Cpu)?.affine(0.2, 0.)?,
                }),
                ..Default::default()
            };
            run(sdxl, &mut inject)?;
        }
        Ok(())
    }

    #[test]
    fn tiny_unet_runs_in_half_precision() -> Result<()> {
        // BF16 is left out: candle has no BF16 matmul on the CPU.
        let dtype = DType::F16;
        let cfg = tiny(true);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
        let unet = UNet2DConditionModel::new(vb, &cfg)?;
        let dev = Device::Cpu;
        let sample = Tensor::randn(0f32, 1.0, (1, 4, 8, 12), &dev)?.to_dtype(dtype)?;
        let ctx = Tensor::randn(0f32, 1.0, (1, 5, 24), &dev)?.to_dtype(dtype)?;
        let added = AddedCond {
            text_embeds: Tensor::randn(0f32, 1.0, (1, 12), &dev)?.to_dtype(dtype)?,
            time_ids: Tensor::new(&[[64f32, 96., 0., 0., 64., 96.]], &dev)?.to_dtype(dtype)?,
        };
        let mut hooks = UNetHooks {
            freeu: Some(FreeU {
                b1: 1.1,
                b2: 1.2,
                s1: 0.6,
                s2: 0.4,
            }),
            capture_cross_attention: true,
            ..Default::default()
        };
        let out = unet.forward(&sample, 999.0, &ctx, Some(&added), &mut hooks)?;
        assert_eq!(out.dtype(), dtype);
        assert_eq!(out.dims(), &[1, 4, 8, 12]);
        Ok(())
    }

    #[test]
    fn rejects_unsupported_settings() {
        let mut cfg = tiny(false);
        cfg.class_embed_type = Some("timestep".into());
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("class_embed_type"), "{err}");
        let mut cfg = tiny(false);
        cfg.addition_embed_type = Some("text".into());
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("addition_embed_type"));
        let mut cfg = tiny(false);
        cfg.down_block_types[0] = "SimpleCrossAttnDownBlock2D".into();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("down_block_types"));
        let bad: std::result::Result<UNetConfig, _> =
            serde_json::from_value(serde_json::json!({"layers_per_block": "x"}));
        assert!(bad.is_err());
    }
}
