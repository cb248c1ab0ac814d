//! The diffusers configs of a single-file checkpoint's components, read from its tensor
//! shapes (as diffusers' `single_file_utils` builds `create_unet_diffusers_config_from_ldm`
//! and friends), with the fixed choices of both families where shapes cannot tell:
//! 64-channel attention heads (`num_head_channels: 64` in SD 2.x's and SDXL's original
//! configs; a narrower width is one head), 32 GroupNorm groups (fewer where a width is not a
//! multiple of 32, as in test models), and the published training sizes.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::detect::CheckpointKind;
use super::names::UNetLayout;

pub type Shapes = BTreeMap<String, Vec<usize>>;

/// `epsilon` or `v_prediction`, as diffusers' `prediction_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
}

impl Prediction {
    pub fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v_prediction",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "epsilon" => Some(Prediction::Epsilon),
            "v_prediction" | "v" => Some(Prediction::V),
            _ => None,
        }
    }

    /// diffusers' choice for a file that cannot tell (`_legacy_load_scheduler`): SD 2.x is
    /// v-prediction unless a `.ckpt`'s global step says 875000 (safetensors carry none), SDXL
    /// is epsilon.
    pub fn default_for(kind: CheckpointKind) -> Self {
        match kind {
            CheckpointKind::Sd2 => Prediction::V,
            CheckpointKind::Sdxl => Prediction::Epsilon,
        }
    }
}

pub(super) fn shape<'a>(shapes: &'a Shapes, key: &str) -> Result<&'a [usize], String> {
    shapes
        .get(key)
        .map(|s| s.as_slice())
        .ok_or_else(|| format!("tensor {key} is missing"))
}

fn dim(shapes: &Shapes, key: &str, d: usize) -> Result<usize, String> {
    shape(shapes, key)?
        .get(d)
        .copied()
        .ok_or_else(|| format!("tensor {key} has fewer than {} dimensions", d + 1))
}

/// How many `prefix<N>.` indices exist (the largest N plus one).
fn count(shapes: &Shapes, prefix: &str) -> usize {
    shapes
        .keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|n| n + 1)
        .max()
        .unwrap_or(0)
}

fn heads(width: usize) -> usize {
    if width >= 64 && width.is_multiple_of(64) {
        width / 64
    } else {
        1
    }
}

fn groups(widths: &[usize]) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    widths.iter().fold(32, |g, &w| gcd(g, w)).max(1)
}

const U: &str = "model.diffusion_model.";

/// The UNet's `config.json` and its block layout.
pub fn unet_config(
    shapes: &Shapes,
    kind: CheckpointKind,
    prediction: Prediction,
) -> Result<(Value, UNetLayout), String> {
    let DownLevels {
        layers,
        widths,
        depths,
    } = down_levels(shapes)?;
    let levels = widths.len();
    let attn = |i: usize| depths[i] > 0;
    let first_attn = (0..levels)
        .find(|&i| attn(i))
        .ok_or("the UNet has no attention")?;
    let attn_prefix = format!("{U}input_blocks.{}.1.", 1 + first_attn * (layers + 1));
    let cross = dim(
        shapes,
        &format!("{attn_prefix}transformer_blocks.0.attn2.to_k.weight"),
        1,
    )?;
    let linear = shape(shapes, &format!("{attn_prefix}proj_in.weight"))?.len() == 2;
    let down: Vec<&str> = (0..levels)
        .map(|i| {
            if attn(i) {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = (0..levels)
        .rev()
        .map(|i| {
            if attn(i) {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    let base = widths[0];
    let mut cfg = json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size(kind, prediction, base),
        "in_channels": dim(shapes, &format!("{U}input_blocks.0.0.weight"), 1)?,
        "out_channels": dim(shapes, &format!("{U}out.2.weight"), 0)?,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "down_block_types": down,
        "up_block_types": up,
        "transformer_layers_per_block": depths.iter().map(|&d| d.max(1)).collect::<Vec<_>>(),
        "attention_head_dim": widths.iter().map(|&w| heads(w)).collect::<Vec<_>>(),
        "cross_attention_dim": cross,
        "use_linear_projection": linear,
        "norm_num_groups": groups(&widths),
        // stabilityai/stable-diffusion-2-1 (v) upcasts attention; 2-base and SDXL do not.
        "upcast_attention": kind == CheckpointKind::Sd2 && prediction == Prediction::V,
    });
    if kind == CheckpointKind::Sdxl {
        add_sdxl_conditioning(shapes, &mut cfg)?;
    }
    let layout = UNetLayout {
        layers,
        up_has_attention: (0..levels).rev().map(attn).collect(),
    };
    Ok((cfg, layout))
}

/// Per down level of the UNet: its width and transformer depth (0: no attention), and the
/// resnets each level has.
struct DownLevels {
    layers: usize,
    widths: Vec<usize>,
    depths: Vec<usize>,
}

fn down_levels(shapes: &Shapes) -> Result<DownLevels, String> {
    let levels = count_downsamplers(shapes) + 1;
    let resnets = (0..count(shapes, &format!("{U}input_blocks.")))
        .filter(|b| shapes.contains_key(&format!("{U}input_blocks.{b}.0.in_layers.2.weight")))
        .count();
    if resnets == 0 || resnets % levels != 0 {
        return Err(format!(
            "the UNet's {resnets} down resnets do not divide into {levels} levels"
        ));
    }
    let layers = resnets / levels;
    let mut widths = Vec::new();
    let mut depths = Vec::new();
    for i in 0..levels {
        let block = format!("{U}input_blocks.{}.", 1 + i * (layers + 1));
        widths.push(dim(shapes, &format!("{block}0.out_layers.3.weight"), 0)?);
        depths.push(count(shapes, &format!("{block}1.transformer_blocks.")));
    }
    Ok(DownLevels {
        layers,
        widths,
        depths,
    })
}

fn count_downsamplers(shapes: &Shapes) -> usize {
    shapes
        .keys()
        .filter(|k| k.starts_with(&format!("{U}input_blocks.")) && k.ends_with(".0.op.weight"))
        .count()
}

/// SDXL's `text_time` embedding: 6 size ids of `addition_time_embed_dim` each beside the
/// pooled text, whose width is the second encoder's projection.
fn add_sdxl_conditioning(shapes: &Shapes, cfg: &mut Value) -> Result<(), String> {
    let adm = dim(shapes, &format!("{U}label_emb.0.0.weight"), 1)?;
    let pooled = dim(shapes, "conditioner.embedders.1.model.text_projection", 1)?;
    if adm <= pooled || (adm - pooled) % 6 != 0 {
        return Err(format!(
            "label_emb takes {adm} features, which is not the pooled text ({pooled}) and 6 size ids"
        ));
    }
    cfg["addition_embed_type"] = json!("text_time");
    cfg["addition_time_embed_dim"] = json!((adm - pooled) / 6);
    cfg["projection_class_embeddings_input_dim"] = json!(adm);
    Ok(())
}

/// Latent training size: SDXL 1024 px, SD 2.x 768 px (v) or 512 px (epsilon), as diffusers'
/// defaults for those model types; a UNet narrower than the published 320 channels is a test
/// model of 128 px.
fn sample_size(kind: CheckpointKind, prediction: Prediction, base: usize) -> usize {
    match (base >= 320, kind, prediction) {
        (false, _, _) => crate::random_models::tiny::TINY_SAMPLE_SIZE,
        (true, CheckpointKind::Sdxl, _) => 128,
        (true, CheckpointKind::Sd2, Prediction::V) => 96,
        (true, CheckpointKind::Sd2, Prediction::Epsilon) => 64,
    }
}

const V: &str = "first_stage_model.";

/// The VAE's `config.json` and its number of levels.
pub fn vae_config(shapes: &Shapes, kind: CheckpointKind) -> Result<(Value, usize), String> {
    let levels = count(shapes, &format!("{V}encoder.down."));
    let layers = count(shapes, &format!("{V}encoder.down.0.block."));
    if levels == 0 || layers == 0 {
        return Err(
            "the VAE's encoder blocks (first_stage_model.encoder.down.*) are missing".into(),
        );
    }
    let widths = (0..levels)
        .map(|i| {
            dim(
                shapes,
                &format!("{V}encoder.down.{i}.block.{}.conv2.weight", layers - 1),
                0,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let has = |k: &str| shapes.contains_key(&format!("{V}{k}"));
    let (scaling, upcast) = match kind {
        CheckpointKind::Sdxl => (0.13025, true),
        CheckpointKind::Sd2 => (0.18215, false),
    };
    let cfg = json!({
        "_class_name": "AutoencoderKL",
        "in_channels": dim(shapes, &format!("{V}encoder.conv_in.weight"), 1)?,
        "out_channels": dim(shapes, &format!("{V}decoder.conv_out.weight"), 0)?,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "latent_channels": dim(shapes, &format!("{V}decoder.conv_in.weight"), 1)?,
        "norm_num_groups": groups(&widths),
        "scaling_factor": scaling,
        "force_upcast": upcast,
        "use_quant_conv": has("quant_conv.weight"),
        "use_post_quant_conv": has("post_quant_conv.weight"),
        "mid_block_add_attention": has("encoder.mid.attn_1.q.weight"),
    });
    Ok((cfg, levels))
}

/// One text encoder's `config.json`. `open_clip`: stored as OpenCLIP (`transformer.resblocks`),
/// else with HF names under `prefix`. SD 2.x uses the penultimate layer of OpenCLIP ViT-H, so a
/// file with its full 24 blocks drops the last (as diffusers ignores `resblocks.23`); a file
/// converted from diffusers has only the 23 it uses.
pub fn text_config(
    shapes: &Shapes,
    prefix: &str,
    open_clip: bool,
    act: &str,
    with_projection: bool,
) -> Result<Value, String> {
    let (embedding, positions, blocks, fc) = if open_clip {
        (
            "token_embedding.weight",
            "positional_embedding",
            "transformer.resblocks.",
            "mlp.c_fc.weight",
        )
    } else {
        (
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.",
            "mlp.fc1.weight",
        )
    };
    let emb = shape(shapes, &format!("{prefix}{embedding}"))?;
    let (vocab, hidden) = (emb[0], *emb.get(1).ok_or("token embedding is not 2-D")?);
    let mut layers = count(shapes, &format!("{prefix}{blocks}"));
    if open_clip && prefix.starts_with("cond_stage_model.") && layers == 24 {
        layers = 23;
    }
    let projection = if with_projection {
        dim(shapes, &format!("{prefix}text_projection"), 1)?
    } else {
        hidden
    };
    Ok(json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": dim(shapes, &format!("{prefix}{blocks}0.{fc}"), 0)?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads(hidden),
        "max_position_embeddings": dim(shapes, &format!("{prefix}{positions}"), 0)?,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }))
}

/// The scheduler diffusers pairs with the model type: SDXL's Euler (its base repository's
/// `scheduler_config.json`), SD 2.x's DDIM (stable-diffusion-2-1's), both scaled-linear betas
/// 0.00085–0.012 over 1000 steps with leading spacing and an offset of 1.
pub fn scheduler_config(kind: CheckpointKind, prediction: Prediction) -> Value {
    let mut cfg = json!({
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": prediction.name(),
        "steps_offset": 1,
        "timestep_spacing": "leading",
    });
    match kind {
        CheckpointKind::Sdxl => {
            cfg["_class_name"] = json!("EulerDiscreteScheduler");
            cfg["interpolation_type"] = json!("linear");
            cfg["use_karras_sigmas"] = json!(false);
        }
        CheckpointKind::Sd2 => {
            cfg["_class_name"] = json!("DDIMScheduler");
            cfg["clip_sample"] = json!(false);
            cfg["set_alpha_to_one"] = json!(false);
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_groups_and_sizes_follow_the_published_configs() {
        assert_eq!(
            [heads(320), heads(640), heads(1280), heads(16)],
            [5, 10, 20, 1]
        );
        assert_eq!(heads(1024), 16);
        assert_eq!(
            [
                groups(&[320, 640]),
                groups(&[8, 16]),
                groups(&[128, 256, 512])
            ],
            [32, 8, 32]
        );
        assert_eq!(
            sample_size(CheckpointKind::Sd2, Prediction::Epsilon, 320),
            64
        );
        assert_eq!(sample_size(CheckpointKind::Sd2, Prediction::V, 320), 96);
        assert_eq!(
            sample_size(CheckpointKind::Sdxl, Prediction::Epsilon, 320),
            128
        );
        let s = scheduler_config(
            CheckpointKind::Sd2,
            Prediction::default_for(CheckpointKind::Sd2),
        );
        assert_eq!(
            (s["_class_name"].as_str(), s["prediction_type"].as_str()),
            (Some("DDIMScheduler"), Some("v_prediction"))
        );
    }
}
