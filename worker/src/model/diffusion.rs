//! A whole Stable Diffusion model loaded from a diffusers directory: tokenizers, text encoders,
//! denoiser, VAE and the scheduler configuration, plus prompt encoding exactly as diffusers'
//! StableDiffusionPipeline / StableDiffusionXLPipeline / StableDiffusion3Pipeline do it.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use tessera_core::family::Family;
use tessera_core::sched::SchedulerConfig;

use super::denoiser::{Conditioning, Denoiser, SD3_T5_TOKENS};
use super::loader::{ModelDir, ModelError, ModelIndex, Result};
use super::single_file::Prediction;
use super::t5::{T5Config, T5EncoderModel, T5Tokenizer};
use super::text::{ClipTextConfig, ClipTextModel};
use super::tokenizer::ClipTokenizer;
use super::vae::{AutoencoderKL, VaeConfig};

/// One tokenizer with its text encoder.
struct TextBranch {
    tokenizer: ClipTokenizer,
    encoder: ClipTextModel,
}

/// SD3's optional third text encoder.
struct T5Branch {
    tokenizer: T5Tokenizer,
    encoder: T5EncoderModel,
}

pub struct DiffusionModel {
    /// What `model_index.json` said. The opened `ModelDir` itself is not kept: a single file's
    /// memory map would hold its ~7 GB of pages resident for the model's lifetime.
    pub index: ModelIndex,
    pub device: Device,
    pub dtype: DType,
    pub denoiser: Denoiser,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    vae_dtype: DType,
    text: Vec<TextBranch>,
    t5: Option<T5Branch>,
}

/// Text conditioning for one prompt pair. Batches are laid out `[uncond, cond]`, as diffusers
/// concatenates them.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// (1, 77, C) each; SD3: (1, 77 + 256, C).
    pub cond: Tensor,
    pub uncond: Tensor,
    /// SDXL's and SD3's pooled text embeddings, (1, P) each.
    pub pooled_cond: Option<Tensor>,
    pub pooled_uncond: Option<Tensor>,
}

impl PromptEmbeddings {
    /// On `model`'s device, in its dtype.
    pub fn to_model(&self, model: &DiffusionModel) -> candle_core::Result<Self> {
        let put = |t: &Tensor| t.to_device(&model.device)?.to_dtype(model.dtype);
        Ok(Self {
            cond: put(&self.cond)?,
            uncond: put(&self.uncond)?,
            pooled_cond: self.pooled_cond.as_ref().map(put).transpose()?,
            pooled_uncond: self.pooled_uncond.as_ref().map(put).transpose()?,
        })
    }
}

/// SDXL's micro-conditioning (original size, crop, target size), in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeConditioning {
    pub original: (u32, u32),
    pub crop_top_left: (u32, u32),
    pub target: (u32, u32),
}

impl SizeConditioning {
    /// What the SDXL pipeline uses by default: no crop, original = target = the render size.
    pub fn for_size(height: u32, width: u32) -> Self {
        Self {
            original: (height, width),
            crop_top_left: (0, 0),
            target: (height, width),
        }
    }

    fn as_row(&self) -> [f32; 6] {
        [
            self.original.0 as f32,
            self.original.1 as f32,
            self.crop_top_left.0 as f32,
            self.crop_top_left.1 as f32,
            self.target.0 as f32,
            self.target.1 as f32,
        ]
    }
}

impl DiffusionModel {
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(path, device, dtype, None)
    }

    /// [`Self::load`] with a single file's prediction type overridden (diffusers'
    /// `prediction_type` argument of `from_single_file`).
    pub fn load_with(
        path: &Path,
        device: &Device,
        dtype: DType,
        prediction: Option<Prediction>,
    ) -> Result<Self> {
        Self::load_from(ModelDir::open_with(path, prediction)?, device, dtype)
    }

    /// Loads an opened model (with its LoRAs, if it has any); a LoRA module that matched no
    /// weight is an error here, after every component is built.
    pub fn load_from(dir: ModelDir, device: &Device, dtype: DType) -> Result<Self> {
        let family = dir.index().family;
        let denoiser = Denoiser::load(&dir, dtype, device)?;

        let vae_cfg: VaeConfig = dir.config("vae")?;
        // The VAE stays in f32 when asked for f16: SDXL's VAE overflows in half precision
        // (its config says force_upcast), and it runs once per tile, so the cost is small.
        let vae_dtype = if dtype == DType::F16 && vae_cfg.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let vae = dir
            .weights("vae", vae_dtype, device)?
            .build(|vb| AutoencoderKL::new(vb, &vae_cfg))?;

        let text = load_clip_branches(&dir, family, dtype, device)?;
        let t5 = load_t5_branch(&dir, dtype, device)?;
        dir.check_loras_used()?;

        let scheduler_config = dir.scheduler_config()?;

        Ok(Self {
            index: dir.index().clone(),
            device: device.clone(),
            dtype,
            denoiser,
            vae,
            scheduler_config,
            vae_dtype,
            text,
            t5,
        })
    }

    /// The family of the model's pipeline and denoiser.
    pub fn family(&self) -> Family {
        self.denoiser.family()
    }

    /// The training size in pixels.
    pub fn training_size(&self) -> u32 {
        self.denoiser.training_size()
    }

    /// The VAE's own dtype (f32 where half precision would overflow).
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype
    }

    pub fn vae_scaling_factor(&self) -> f64 {
        self.vae.config().scaling_factor
    }

    /// The VAE's `shift_factor` (SD3's latents are `(z − shift) · scale`), 0 where none.
    pub fn vae_shift_factor(&self) -> f64 {
        self.vae.config().shift_factor.unwrap_or(0.0)
    }

    /// Whether the model encodes prompts with T5 too (SD3 with `text_encoder_3`).
    pub fn has_t5(&self) -> bool {
        self.t5.is_some()
    }

    /// Encodes a prompt and its negative. A missing negative prompt is the empty string, except
    /// for SDXL models whose pipeline config sets `force_zeros_for_empty_prompt`: there the
    /// unconditional embeddings are zeros, as in diffusers.
    pub fn encode_prompt(&self, prompt: &str, negative: Option<&str>) -> Result<PromptEmbeddings> {
        let (cond, pooled_cond) = self.encode_text(prompt)?;
        let zero_negative = negative.is_none()
            && self.family() == Family::Sdxl
            && self.index.force_zeros_for_empty_prompt;
        let (uncond, pooled_uncond) = if zero_negative {
            (
                cond.zeros_like().map_err(other)?,
                pooled_cond
                    .as_ref()
                    .map(|p| p.zeros_like())
                    .transpose()
                    .map_err(other)?,
            )
        } else {
            self.encode_text(negative.unwrap_or(""))?
        };
        Ok(PromptEmbeddings {
            cond,
            uncond,
            pooled_cond,
            pooled_uncond,
        })
    }

    /// SD: the last hidden state of the one encoder. SDXL: the penultimate hidden states of both
    /// encoders side by side, and the second encoder's projected pooled output. SD3: see
    /// [`Self::encode_sd3`].
    fn encode_text(&self, text: &str) -> Result<(Tensor, Option<Tensor>)> {
        let mut states = Vec::with_capacity(self.text.len());
        let mut pooled = Vec::new();
        for branch in &self.text {
            let ids = branch
                .tokenizer
                .encode(text)
                .map_err(|e| ModelError::Other(e.to_string()))?;
            let ids = Tensor::new(ids.as_slice(), &self.device)
                .and_then(|t| t.unsqueeze(0))
                .map_err(other)?;
            let out = branch.encoder.forward(&ids).map_err(other)?;
            match self.family() {
                Family::Sd2 => states.push(out.last_hidden_state),
                Family::Sdxl | Family::Sd3 => {
                    states.push(out.penultimate);
                    pooled.extend(out.text_embeds);
                }
            }
        }
        let context = Tensor::cat(&states, 2).map_err(other)?;
        match self.family() {
            Family::Sd2 => Ok((context, None)),
            // SDXL's first encoder has no projection: the pooled output is the second's.
            Family::Sdxl => Ok((context, pooled.pop())),
            Family::Sd3 => self.encode_sd3(text, &context, &pooled),
        }
    }

    /// SD3 (`StableDiffusion3Pipeline.encode_prompt`): both CLIP encoders' penultimate states
    /// side by side, zero-padded to the transformer's text width, then the T5 encoder's last
    /// state of 256 tokens (zeros when the directory has no T5); the pooled text is both
    /// CLIP projections side by side.
    fn encode_sd3(
        &self,
        text: &str,
        clip: &Tensor,
        pooled: &[Tensor],
    ) -> Result<(Tensor, Option<Tensor>)> {
        let width = self.denoiser_context_dim()?;
        let clip_width = clip.dim(2).map_err(other)?;
        if clip_width > width {
            return Err(ModelError::Other(format!(
                "the CLIP encoders give {clip_width} features, more than the transformer's \
                 joint_attention_dim {width}"
            )));
        }
        let clip = clip
            .pad_with_zeros(2, 0, width - clip_width)
            .map_err(other)?;
        let t5 = match &self.t5 {
            Some(b) => {
                let ids = b.tokenizer.encode(text).map_err(ModelError::Other)?;
                let ids = Tensor::new(ids.as_slice(), &self.device)
                    .and_then(|t| t.unsqueeze(0))
                    .map_err(other)?;
                b.encoder.forward(&ids).map_err(other)?
            }
            None => Tensor::zeros((1, SD3_T5_TOKENS, width), clip.dtype(), &self.device)
                .map_err(other)?,
        };
        let context =
            Tensor::cat(&[&clip, &t5.to_dtype(clip.dtype()).map_err(other)?], 1).map_err(other)?;
        let pooled = Tensor::cat(pooled, 1).map_err(other)?;
        Ok((context, Some(pooled)))
    }

    fn denoiser_context_dim(&self) -> Result<usize> {
        match &self.denoiser {
            Denoiser::Mmdit(m) => Ok(m.config().joint_attention_dim),
            Denoiser::Unet { .. } => Err(ModelError::Other(
                "SD3 prompt encoding needs an SD3 transformer".into(),
            )),
        }
    }

    /// The denoiser's conditioning for a batch of `repeat` views laid out `[uncond, cond]`
    /// (or `[cond]` alone when `guided` is false), as diffusers batches it: the text
    /// embeddings, and for the families conditioned on them the pooled embeddings and size ids.
    pub fn conditioning(
        &self,
        embeddings: &PromptEmbeddings,
        size: SizeConditioning,
        guided: bool,
        repeat: usize,
    ) -> Result<Conditioning> {
        let batch = |cond: &Tensor, uncond: &Tensor, repeat_as: &[usize]| {
            let cond = cond.repeat(repeat_as)?;
            if guided {
                Tensor::cat(&[&uncond.repeat(repeat_as)?, &cond], 0)
            } else {
                Ok(cond)
            }
        };
        let text = batch(&embeddings.cond, &embeddings.uncond, &[repeat, 1, 1]).map_err(other)?;
        let (Some(pc), Some(pu)) = (&embeddings.pooled_cond, &embeddings.pooled_uncond) else {
            return Ok(Conditioning {
                text,
                pooled: None,
                size_ids: None,
            });
        };
        let pooled = batch(pc, pu, &[repeat, 1]).map_err(other)?;
        let size_ids = if self.family().info().conditioning.size_ids {
            let rows = pooled.dim(0).map_err(other)?;
            let ids: Vec<f32> = (0..rows).flat_map(|_| size.as_row()).collect();
            let ids = Tensor::from_vec(ids, (rows, 6), &self.device)
                .and_then(|t| t.to_dtype(self.dtype))
                .map_err(other)?;
            Some(ids)
        } else {
            None
        };
        Ok(Conditioning {
            text,
            pooled: Some(pooled),
            size_ids,
        })
    }
}

/// The CLIP tokenizers and text encoders of a family: SD 2.x's one, SDXL's two (the second
/// with its pooled projection), SD3's two (both with projections).
fn load_clip_branches(
    dir: &ModelDir,
    family: Family,
    dtype: DType,
    device: &Device,
) -> Result<Vec<TextBranch>> {
    let branches: &[(&str, &str, bool)] = match family {
        Family::Sd2 => &[("tokenizer", "text_encoder", false)],
        Family::Sdxl => &[
            ("tokenizer", "text_encoder", false),
            ("tokenizer_2", "text_encoder_2", true),
        ],
        Family::Sd3 => &[
            ("tokenizer", "text_encoder", true),
            ("tokenizer_2", "text_encoder_2", true),
        ],
    };
    let mut text = Vec::with_capacity(branches.len());
    for &(tok, enc, with_projection) in branches {
        let tokenizer = dir.clip_tokenizer(tok)?;
        let cfg: ClipTextConfig = dir.config(enc)?;
        let encoder = dir
            .weights(enc, dtype, device)?
            .build(|vb| ClipTextModel::new(vb, &cfg, with_projection))?;
        text.push(TextBranch { tokenizer, encoder });
    }
    Ok(text)
}

/// SD3's T5 encoder and tokenizer when `model_index.json` names one (`text_encoder_3`); a
/// directory with `text_encoder_3: [null, null]` runs without, as diffusers does.
fn load_t5_branch(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Option<T5Branch>> {
    if !dir.index().components.contains("text_encoder_3") {
        return Ok(None);
    }
    let tok_path = dir.component_dir("tokenizer_3").join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ModelError::MissingFile { path: tok_path });
    }
    let tokenizer = T5Tokenizer::from_file(&tok_path, SD3_T5_TOKENS).map_err(ModelError::Other)?;
    let cfg: T5Config = dir.config("text_encoder_3")?;
    let encoder = dir
        .weights("text_encoder_3", dtype, device)?
        .build(|vb| T5EncoderModel::new(vb, &cfg))?;
    Ok(Some(T5Branch { tokenizer, encoder }))
}

fn other(e: candle_core::Error) -> ModelError {
    ModelError::Other(e.to_string())
}
