//! Writes a model directory in the diffusers layout (configs, tokenizers and, when a seed is
//! given, random weights as safetensors) for an SDXL or SD 2.1 pipeline of either size: the
//! tiny test models ([`super::tiny`]) and the published full sizes ([`super::full_size`]).
//! The real loader then reads it like any checkpoint.
//!
//! Parameter names and shapes are not listed here: each component is constructed from its
//! config through a `VarMap`, which records every tensor the model code asks for, and the map
//! is then filled from a seeded generator and saved. So a written model always matches the
//! model code, and the same seed writes byte-identical files.

use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{json, Value};

use super::tiny::TINY_SAMPLE_SIZE;
use super::tiny_vocab::{write_standard_vocab, write_tiny_vocab};
use crate::model::loader::{read_json, ModelError, Result};
use crate::model::text::{ClipTextConfig, ClipTextModel};
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::{AutoencoderKL, VaeConfig};

pub(super) const DIFFUSERS_VERSION: &str = "0.42.1";

/// Hidden size of the tiny text encoders.
pub(super) const TINY_TEXT_HIDDEN: usize = 32;

/// Marks a directory as written here, which may then replace it; any other non-empty
/// directory (a real model, say) is never touched.
pub const SYNTH_MARKER: &str = "tessera-synth.json";

/// How big a written architecture is: the tiny test models, or the real published sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Tiny,
    Full,
}

/// The pipeline being written: SDXL or SD 2.1, at which size, with weights from which seed.
#[derive(Debug, Clone, Copy)]
struct Pipeline {
    sdxl: bool,
    full: bool,
    seed: Option<u64>,
}

/// One seed per component, in the order they are written: each component's weights come from
/// their own stream, whether or not the weights are written.
pub(super) struct SeedStream {
    base: u64,
    count: u64,
}

impl SeedStream {
    pub(super) fn new(seed: Option<u64>) -> Self {
        Self {
            base: seed.unwrap_or(0),
            count: 0,
        }
    }

    pub(super) fn next(&mut self) -> u64 {
        self.count += 1;
        self.base.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.count
    }
}

/// The token ids of the tiny vocabulary that the text encoders' configs name.
pub(super) struct Vocabulary {
    pub(super) size: usize,
    pub(super) bos: u64,
    pub(super) eos: u64,
    pub(super) pad: u64,
}

/// Writes the configs and tokenizers of an SDXL or SD 2.1 model of `size` into `out`, and
/// the weights drawn from `seed` when given (without, the loader makes them on the device).
pub(crate) fn write_model(sdxl: bool, size: Size, out: &Path, seed: Option<u64>) -> Result<()> {
    let pipeline = Pipeline {
        sdxl,
        full: size == Size::Full,
        seed,
    };
    let mut seeds = SeedStream::new(seed);
    // Tokenizers first: the text encoders' vocabulary size comes from them.
    let vocab = write_tokenizers(out, sdxl, size == Size::Full)?;
    write_text_encoders(out, pipeline, &vocab, &mut seeds)?;
    let unet = write_unet(out, pipeline, &mut seeds)?;
    write_vae(out, pipeline, &unet, &mut seeds)?;
    write_scheduler(out, sdxl)?;
    write_model_index(out, sdxl)
}

/// The CLIP tokenizer(s): one for SD 2.1 (padded with "!"), two for SDXL (the first
/// padded with `<|endoftext|>`, the second with "!"); the standard vocabulary (`standard`,
/// the full sizes, as published) or the tiny one.
pub(super) fn write_tokenizers(out: &Path, sdxl: bool, standard: bool) -> Result<Vocabulary> {
    let pad = if sdxl { "<|endoftext|>" } else { "!" };
    let write = if standard {
        write_standard_vocab
    } else {
        write_tiny_vocab
    };
    let tokenizer_dir = out.join("tokenizer");
    write(&tokenizer_dir, pad).map_err(|e| io_err(&tokenizer_dir, e))?;
    if sdxl {
        let dir = out.join("tokenizer_2");
        write(&dir, "!").map_err(|e| io_err(&dir, e))?;
    }
    let vocab: serde_json::Map<String, Value> = read_json(&tokenizer_dir.join("vocab.json"))?;
    let id_of = |tok: &str| vocab.get(tok).and_then(|v| v.as_u64()).unwrap_or(0);
    let eos = id_of("<|endoftext|>");
    Ok(Vocabulary {
        size: vocab.len(),
        bos: id_of("<|startoftext|>"),
        eos,
        pad: if pad == "!" { id_of("!") } else { eos },
    })
}

/// A text encoder's `config.json`. Full sizes: CLIP ViT-L (SDXL's first encoder), OpenCLIP
/// bigG (its second) and OpenCLIP ViT-H (SD 2.1's), over the real 49408-token vocabulary.
fn text_config(p: Pipeline, vocab: &Vocabulary, act: &str, with_projection: bool) -> Value {
    let dims = match (p.full, p.sdxl, with_projection) {
        (false, _, _) => (TINY_TEXT_HIDDEN, 64, 3, 4, TINY_TEXT_HIDDEN),
        (true, true, false) => (768, 3072, 12, 12, 768),
        (true, true, true) => (1280, 5120, 32, 20, 1280),
        (true, false, _) => (1024, 4096, 23, 16, 512),
    };
    clip_config(vocab, p.full, dims, act, with_projection)
}

/// A CLIP text encoder's `config.json` with `dims` = (hidden, intermediate, layers, heads,
/// projection), over the real 49408-token vocabulary size when `full`, else the tiny one's.
pub(super) fn clip_config(
    vocab: &Vocabulary,
    full: bool,
    (hidden, inter, layers, heads, proj): (usize, usize, usize, usize, usize),
    act: &str,
    with_projection: bool,
) -> Value {
    let vocab_size = if full { 49408 } else { vocab.size };
    let (bos, eos, pad) = (vocab.bos, vocab.eos, vocab.pad);
    json!({
        "architectures": [if with_projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": proj,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    })
}

/// The text encoder(s). SD 2.1's OpenCLIP encoder uses gelu; SDXL's first is CLIP ViT-L
/// (quick_gelu) and its second OpenCLIP bigG (gelu, with the pooled projection).
fn write_text_encoders(
    out: &Path,
    p: Pipeline,
    vocab: &Vocabulary,
    seeds: &mut SeedStream,
) -> Result<()> {
    let encoders: Vec<(&str, Value, bool)> = if p.sdxl {
        vec![
            (
                "text_encoder",
                text_config(p, vocab, "quick_gelu", false),
                false,
            ),
            ("text_encoder_2", text_config(p, vocab, "gelu", true), true),
        ]
    } else {
        vec![("text_encoder", text_config(p, vocab, "gelu", false), false)]
    };
    for (name, cfg_json, with_projection) in &encoders {
        let cfg: ClipTextConfig = write_config(out, name, "config.json", cfg_json)?;
        let s = seeds.next();
        if p.seed.is_some() {
            write_weights(out, name, "model.safetensors", s, |vb| {
                ClipTextModel::new(vb, &cfg, *with_projection).map(|_| ())
            })?;
        }
    }
    Ok(())
}

/// The UNet: the published configuration at full size, a small one of the same block layout
/// otherwise.
fn write_unet(out: &Path, p: Pipeline, seeds: &mut SeedStream) -> Result<UNetConfig> {
    let unet_json = if p.sdxl {
        sdxl_unet_config(p.full)
    } else {
        sd21_unet_config(p.full)
    };
    let unet_cfg: UNetConfig = write_config(out, "unet", "config.json", &unet_json)?;
    let s = seeds.next();
    if p.seed.is_some() {
        write_weights(
            out,
            "unet",
            "diffusion_pytorch_model.safetensors",
            s,
            |vb| UNet2DConditionModel::new(vb, &unet_cfg).map(|_| ()),
        )?;
    }
    Ok(unet_cfg)
}

/// Widths and sizes: the published UNet configurations of SDXL base 1.0 and SD 2.1 (768 px)
/// at full size; the same block layouts with 32–64 channels and a 128 px training size for the
/// tiny models.
struct UNetSizes {
    sample_size: usize,
    block_out_channels: Value,
    attention_head_dim: Value,
    cross_attention_dim: usize,
}

/// SDXL's `unet/config.json` (text_time conditioning, three levels) of either size.
fn sdxl_unet_config(full: bool) -> Value {
    // SDXL's per-level transformer depths, size-embedding width and pooled input width
    // (six size ids of `addition_time_embed_dim` each plus the pooled text embedding).
    let (sizes, transformer_layers, time_dim, pooled_dim) = if full {
        let sizes = UNetSizes {
            sample_size: 128,
            block_out_channels: json!([320, 640, 1280]),
            attention_head_dim: json!([5, 10, 20]),
            cross_attention_dim: 2048,
        };
        (sizes, json!([1, 2, 10]), 256, 2816)
    } else {
        let sizes = UNetSizes {
            sample_size: TINY_SAMPLE_SIZE,
            block_out_channels: json!([32, 64, 64]),
            attention_head_dim: json!([2, 4, 4]),
            cross_attention_dim: 2 * TINY_TEXT_HIDDEN,
        };
        (sizes, json!([1, 1, 2]), 16, 6 * 16 + TINY_TEXT_HIDDEN)
    };
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sizes.sample_size,
        "in_channels": 4, "out_channels": 4,
        "center_input_sample": false, "flip_sin_to_cos": true, "freq_shift": 0,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": sizes.block_out_channels,
        "layers_per_block": 2,
        "transformer_layers_per_block": transformer_layers,
        "attention_head_dim": sizes.attention_head_dim,
        "num_attention_heads": null,
        "cross_attention_dim": sizes.cross_attention_dim,
        "use_linear_projection": true,
        "upcast_attention": false,
        "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
        "downsample_padding": 1, "mid_block_scale_factor": 1,
        "resnet_time_scale_shift": "default",
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": pooled_dim,
    })
}

/// SD 2.1's `unet/config.json` (four levels, upcast attention) of either size.
fn sd21_unet_config(full: bool) -> Value {
    let sizes = if full {
        UNetSizes {
            sample_size: 96,
            block_out_channels: json!([320, 640, 1280, 1280]),
            attention_head_dim: json!([5, 10, 20, 20]),
            cross_attention_dim: 1024,
        }
    } else {
        UNetSizes {
            sample_size: TINY_SAMPLE_SIZE,
            block_out_channels: json!([32, 64, 64, 64]),
            attention_head_dim: json!([2, 4, 4, 4]),
            cross_attention_dim: TINY_TEXT_HIDDEN,
        }
    };
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sizes.sample_size,
        "in_channels": 4, "out_channels": 4,
        "center_input_sample": false, "flip_sin_to_cos": true, "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": sizes.block_out_channels,
        "layers_per_block": 2,
        "attention_head_dim": sizes.attention_head_dim,
        "num_attention_heads": null,
        "cross_attention_dim": sizes.cross_attention_dim,
        "use_linear_projection": true,
        "upcast_attention": true,
        "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
        "downsample_padding": 1, "mid_block_scale_factor": 1,
        "resnet_time_scale_shift": "default",
    })
}

/// The VAE: the published one (four levels of 128–512 channels) at full size, 16–32 channels
/// otherwise; SDXL's scaling factor and upcast flag where it applies.
fn write_vae(out: &Path, p: Pipeline, unet_cfg: &UNetConfig, seeds: &mut SeedStream) -> Result<()> {
    let (vae_channels, vae_layers, vae_groups) = if p.full {
        (json!([128, 256, 512, 512]), 2, 32)
    } else {
        (json!([16, 32, 32, 32]), 1, 8)
    };
    let sdxl = p.sdxl;
    let vae_json = json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": vae_channels,
        "layers_per_block": vae_layers,
        "norm_num_groups": vae_groups,
        "act_fn": "silu",
        "sample_size": unet_cfg.sample_size() * 8,
        "scaling_factor": if sdxl { 0.13025 } else { 0.18215 },
        "force_upcast": sdxl,
    });
    let vae_cfg: VaeConfig = write_config(out, "vae", "config.json", &vae_json)?;
    let s = seeds.next();
    if p.seed.is_some() {
        write_weights(out, "vae", "diffusion_pytorch_model.safetensors", s, |vb| {
            AutoencoderKL::new(vb, &vae_cfg).map(|_| ())
        })?;
    }
    Ok(())
}

/// The released pipelines' schedulers: Euler (epsilon) for SDXL, DDIM (v-prediction) for
/// SD 2.1.
fn write_scheduler(out: &Path, sdxl: bool) -> Result<()> {
    let scheduler_json = if sdxl {
        json!({
            "_class_name": "EulerDiscreteScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
            "timestep_spacing": "leading", "steps_offset": 1,
            "interpolation_type": "linear", "use_karras_sigmas": false,
            "clip_sample": false, "set_alpha_to_one": false, "sample_max_value": 1.0,
            "skip_prk_steps": true, "trained_betas": null,
        })
    } else {
        json!({
            "_class_name": "DDIMScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
            "timestep_spacing": "leading", "steps_offset": 1,
            "clip_sample": false, "set_alpha_to_one": false, "skip_prk_steps": true,
            "trained_betas": null,
        })
    };
    write_config::<Value>(out, "scheduler", "scheduler_config.json", &scheduler_json)?;
    Ok(())
}

/// `model_index.json`: the pipeline class and its components.
fn write_model_index(out: &Path, sdxl: bool) -> Result<()> {
    let index = if sdxl {
        json!({
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "force_zeros_for_empty_prompt": true,
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
    } else {
        json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
    };
    write_file(&out.join("model_index.json"), &pretty(&index))
}

/// Writes `component/file` from `value` and parses it back with the config type the loader
/// uses, so a config the model code cannot read is caught here rather than at render time.
pub(super) fn write_config<T: serde::de::DeserializeOwned>(
    out: &Path,
    component: &str,
    file: &str,
    value: &Value,
) -> Result<T> {
    let dir = out.join(component);
    fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let path = dir.join(file);
    write_file(&path, &pretty(value))?;
    read_json(&path)
}

/// Constructs a component over an empty `VarMap`, fills every tensor it created from a seeded
/// generator, and saves them as safetensors.
pub(super) fn write_weights(
    out: &Path,
    component: &str,
    file: &str,
    seed: u64,
    construct: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let build_err = |e: candle_core::Error| ModelError::Other(format!("building {component}: {e}"));
    construct(vb).map_err(build_err)?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| ModelError::Other(format!("{component}: weight map lock poisoned")))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let values = random_values(name, var.dims(), seed);
        let t = Tensor::from_vec(values, var.shape(), &Device::Cpu).map_err(build_err)?;
        var.set(&t).map_err(build_err)?;
    }
    drop(data);
    let path = out.join(component).join(file);
    varmap
        .save(&path)
        .map_err(|e| ModelError::Other(format!("{}: {e}", path.display())))?;
    // The safetensors writer creates owner-only files; a model directory is meant to be read
    // by workers running as other users too, like the configs beside it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .map_err(|e| io_err(&path, e))?;
    }
    Ok(())
}

/// Values for one parameter: norms near one, biases small, weights scaled by 1/sqrt(fan_in)
/// so activations stay of order one through the tiny network. Each tensor gets its own stream
/// keyed by its name, so adding a parameter does not change the others.
pub(super) fn random_values(name: &str, dims: &[usize], seed: u64) -> Vec<f32> {
    let n = dims.iter().product::<usize>();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ h);
    let mut normal = || -> f32 { StandardNormal.sample(&mut rng) };
    let leaf = name.rsplit('.').nth(1).unwrap_or_default();
    let is_norm = leaf.contains("norm");
    if dims.len() == 1 {
        if is_norm && name.ends_with(".weight") {
            return (0..n).map(|_| 1.0 + 0.1 * normal()).collect();
        }
        return (0..n).map(|_| 0.05 * normal()).collect();
    }
    let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
    let std = if name.contains("embedding") && !name.contains("linear") {
        0.5
    } else {
        1.0 / (fan_in as f32).sqrt()
    };
    (0..n).map(|_| std * normal()).collect()
}

pub(super) fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s
}

pub(super) fn write_file(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| io_err(path, e))
}

pub(super) fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_weights_are_near_one_and_streams_are_stable() {
        let like = [8];
        let w = random_values("down_blocks.0.resnets.0.norm1.weight", &like[..], 3);
        assert!(w.iter().all(|v| (v - 1.0).abs() < 0.6));
        let b = random_values("down_blocks.0.resnets.0.norm1.bias", &like[..], 3);
        assert!(b.iter().all(|v| v.abs() < 0.3));
        assert_eq!(
            b,
            random_values("down_blocks.0.resnets.0.norm1.bias", &like[..], 3)
        );
        assert_ne!(
            b,
            random_values("down_blocks.0.resnets.0.norm1.bias", &like[..], 4)
        );
    }
}
