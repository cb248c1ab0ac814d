//! Tiny models of the real architectures with random weights, written in the diffusers layout
//! (configs, safetensors, tokenizer files) so the real loader reads them like any checkpoint.
//!
//! Parameter names and shapes are not listed here: each component is constructed from its
//! config through a `VarMap`, which records every tensor the model code asks for, and the map
//! is then filled from a seeded generator and saved. So a synthesized model always matches the
//! model code, and the same seed writes byte-identical files.

use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{json, Value};
use tessera_core::family::{Family, NamedModel, TINY_MODELS};

use super::loader::{read_json, ModelError, Result};
use super::text::{ClipTextConfig, ClipTextModel};
use super::tokenizer::write_tiny_vocab;
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKL, VaeConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    SdxlTiny,
    Sd21Tiny,
}

impl TinyArch {
    /// The tiny model of `family` in the family table.
    pub fn of_family(family: Family) -> Self {
        match family {
            Family::Sdxl => TinyArch::SdxlTiny,
            Family::Sd2 => TinyArch::Sd21Tiny,
        }
    }

    pub fn family(&self) -> Family {
        match self {
            TinyArch::SdxlTiny => Family::Sdxl,
            TinyArch::Sd21Tiny => Family::Sd2,
        }
    }

    /// Its name in the family table (`model synth --arch NAME`).
    pub fn name(&self) -> &'static str {
        NamedModel::of_family(&TINY_MODELS, self.family())
            .map(|m| m.name)
            .expect("every family has a tiny model")
    }
}

/// Training size of the tiny models, in latent pixels (128 pixels).
pub const TINY_SAMPLE_SIZE: usize = 16;
const DIFFUSERS_VERSION: &str = "0.42.1";

/// Marks a directory as written by the synthesizer, which may then replace it; any other
/// non-empty directory (a real model, say) is never touched.
pub const SYNTH_MARKER: &str = "tessera-synth.json";

/// Writes a complete tiny model into `out`, which must be absent, empty, or an earlier
/// synthesized model (replaced).
pub fn synthesize(arch: TinyArch, out: &Path, seed: u64) -> Result<()> {
    prepare_dir(out)?;
    // The marker goes first, so an interrupted synthesis can still be replaced.
    write_file(
        &out.join(SYNTH_MARKER),
        &pretty(&json!({ "arch": arch.name(), "seed": seed })),
    )?;
    write_model(arch.family() == Family::Sdxl, Size::Tiny, out, Some(seed))
}

/// How big a synthesized architecture is: the tiny test models, or the real published sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Tiny,
    Full,
}

fn prepare_dir(out: &Path) -> Result<()> {
    if out.exists() {
        let non_empty = fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
        if non_empty && !out.join(SYNTH_MARKER).is_file() {
            return Err(ModelError::Other(format!(
                "{} exists and is not empty: choose a new directory",
                out.display()
            )));
        }
        if non_empty {
            fs::remove_dir_all(out).map_err(|source| io_err(out, source))?;
        }
    }
    fs::create_dir_all(out).map_err(|source| io_err(out, source))
}

/// Writes the configs and tokenizers of an SDXL or SD 2.1 model of `size` into `out`, and
/// the weights drawn from `seed` when given (without, the loader makes them on the device).
pub(crate) fn write_model(sdxl: bool, size: Size, out: &Path, seed: Option<u64>) -> Result<()> {
    let full = size == Size::Full;
    let seed_or_zero = seed.unwrap_or(0);
    // Tokenizers first: the text encoders' vocabulary size comes from them.
    let pad = if sdxl { "<|endoftext|>" } else { "!" };
    let tokenizer_dir = out.join("tokenizer");
    write_tiny_vocab(&tokenizer_dir, pad).map_err(|e| io_err(&tokenizer_dir, e))?;
    if sdxl {
        let dir = out.join("tokenizer_2");
        write_tiny_vocab(&dir, "!").map_err(|e| io_err(&dir, e))?;
    }
    let vocab: serde_json::Map<String, Value> = read_json(&tokenizer_dir.join("vocab.json"))?;
    let vocab_size = vocab.len();
    let id_of = |tok: &str| vocab.get(tok).and_then(|v| v.as_u64()).unwrap_or(0);
    let (bos, eos) = (id_of("<|startoftext|>"), id_of("<|endoftext|>"));

    // Full sizes: CLIP ViT-L (SDXL's first encoder), OpenCLIP bigG (its second) and OpenCLIP
    // ViT-H (SD 2.1's), over the real 49408-token vocabulary size; the tokenizer stays the tiny
    // one, whose ids all fall inside it.
    let text_hidden = 32;
    let vocab_size = if full { 49408 } else { vocab_size };
    let text_config = |act: &str, with_projection: bool| {
        let (hidden, inter, layers, heads, proj) = match (full, sdxl, with_projection) {
            (false, _, _) => (text_hidden, 64, 3, 4, text_hidden),
            (true, true, false) => (768, 3072, 12, 12, 768),
            (true, true, true) => (1280, 5120, 32, 20, 1280),
            (true, false, _) => (1024, 4096, 23, 16, 512),
        };
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
            "pad_token_id": if pad == "!" { id_of("!") } else { eos },
            "torch_dtype": "float32",
        })
    };

    let mut rng_stream = 0u64;
    let mut next_seed = || {
        rng_stream += 1;
        seed_or_zero.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ rng_stream
    };

    // Text encoders. SD 2.1's OpenCLIP encoder uses gelu; SDXL's first is CLIP ViT-L (quick_gelu)
    // and its second OpenCLIP bigG (gelu, with the pooled projection).
    let encoders: Vec<(&str, Value, bool)> = if sdxl {
        vec![
            ("text_encoder", text_config("quick_gelu", false), false),
            ("text_encoder_2", text_config("gelu", true), true),
        ]
    } else {
        vec![("text_encoder", text_config("gelu", false), false)]
    };
    for (name, cfg_json, with_projection) in &encoders {
        let cfg: ClipTextConfig = write_config(out, name, "config.json", cfg_json)?;
        let s = next_seed();
        if seed.is_some() {
            write_weights(out, name, "model.safetensors", s, |vb| {
                ClipTextModel::new(vb, &cfg, *with_projection).map(|_| ())
            })?;
        }
    }

    let cross_dim = if sdxl { 2 * text_hidden } else { text_hidden };
    let unet_json = if full {
        full_unet_config(sdxl)
    } else if sdxl {
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": TINY_SAMPLE_SIZE,
            "in_channels": 4, "out_channels": 4,
            "center_input_sample": false, "flip_sin_to_cos": true, "freq_shift": 0,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64, 64],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 1, 2],
            "attention_head_dim": [2, 4, 4],
            "num_attention_heads": null,
            "cross_attention_dim": cross_dim,
            "use_linear_projection": true,
            "upcast_attention": false,
            "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
            "downsample_padding": 1, "mid_block_scale_factor": 1,
            "resnet_time_scale_shift": "default",
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 16,
            "projection_class_embeddings_input_dim": 6 * 16 + text_hidden,
        })
    } else {
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": TINY_SAMPLE_SIZE,
            "in_channels": 4, "out_channels": 4,
            "center_input_sample": false, "flip_sin_to_cos": true, "freq_shift": 0,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64, 64, 64],
            "layers_per_block": 2,
            "attention_head_dim": [2, 4, 4, 4],
            "num_attention_heads": null,
            "cross_attention_dim": cross_dim,
            "use_linear_projection": true,
            "upcast_attention": true,
            "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
            "downsample_padding": 1, "mid_block_scale_factor": 1,
            "resnet_time_scale_shift": "default",
        })
    };
    let unet_cfg: UNetConfig = write_config(out, "unet", "config.json", &unet_json)?;
    let s = next_seed();
    if seed.is_some() {
        write_weights(
            out,
            "unet",
            "diffusion_pytorch_model.safetensors",
            s,
            |vb| UNet2DConditionModel::new(vb, &unet_cfg).map(|_| ()),
        )?;
    }

    let (vae_channels, vae_layers, vae_groups) = if full {
        (json!([128, 256, 512, 512]), 2, 32)
    } else {
        (json!([16, 32, 32, 32]), 1, 8)
    };
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
    let s = next_seed();
    if seed.is_some() {
        write_weights(out, "vae", "diffusion_pytorch_model.safetensors", s, |vb| {
            AutoencoderKL::new(vb, &vae_cfg).map(|_| ())
        })?;
    }

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
    write_file(&out.join("model_index.json"), &pretty(&index))?;
    Ok(())
}

/// The published UNet configurations of SDXL base 1.0 and SD 2.1 (768 px).
fn full_unet_config(sdxl: bool) -> Value {
    if sdxl {
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": 128,
            "in_channels": 4, "out_channels": 4,
            "center_input_sample": false, "flip_sin_to_cos": true, "freq_shift": 0,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "num_attention_heads": null,
            "cross_attention_dim": 2048,
            "use_linear_projection": true,
            "upcast_attention": false,
            "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
            "downsample_padding": 1, "mid_block_scale_factor": 1,
            "resnet_time_scale_shift": "default",
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        })
    } else {
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": 96,
            "in_channels": 4, "out_channels": 4,
            "center_input_sample": false, "flip_sin_to_cos": true, "freq_shift": 0,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "attention_head_dim": [5, 10, 20, 20],
            "num_attention_heads": null,
            "cross_attention_dim": 1024,
            "use_linear_projection": true,
            "upcast_attention": true,
            "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
            "downsample_padding": 1, "mid_block_scale_factor": 1,
            "resnet_time_scale_shift": "default",
        })
    }
}

/// Writes `component/file` from `value` and parses it back with the config type the loader
/// uses, so a config the model code cannot read is caught here rather than at render time.
fn write_config<T: serde::de::DeserializeOwned>(
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
fn write_weights(
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
        let values = random_values(name, var.as_tensor(), seed);
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
fn random_values(name: &str, like: &Tensor, seed: u64) -> Vec<f32> {
    let dims = like.dims();
    let n = like.elem_count();
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

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| io_err(path, e))
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
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
        let like = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
        let w = random_values("down_blocks.0.resnets.0.norm1.weight", &like, 3);
        assert!(w.iter().all(|v| (v - 1.0).abs() < 0.6));
        let b = random_values("down_blocks.0.resnets.0.norm1.bias", &like, 3);
        assert!(b.iter().all(|v| v.abs() < 0.3));
        assert_eq!(
            b,
            random_values("down_blocks.0.resnets.0.norm1.bias", &like, 3)
        );
        assert_ne!(
            b,
            random_values("down_blocks.0.resnets.0.norm1.bias", &like, 4)
        );
    }
}
