//! Where a diffusers parameter lives in an original (LDM/SGM) checkpoint: the reverse of
//! diffusers' `scripts/convert_diffusers_to_original_sdxl.py` and
//! `convert_diffusers_to_original_stable_diffusion.py`, for any number of levels and layers per
//! block (the scripts hard-code SDXL's and SD's), and of `single_file_utils`' OpenCLIP rules.

/// How the original tensor becomes the diffusers one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Same shape and values.
    Same,
    /// Rows `[part·n, (part+1)·n)` of a fused `in_proj` (q, k, v stacked along dim 0).
    Fused { part: usize },
    /// A 1×1 convolution read as a linear layer (the VAE's attention: `[C, C, 1, 1]`).
    DropTrailingOnes,
    /// OpenCLIP's `text_projection` is applied as `x @ P`; diffusers' Linear holds `Pᵀ`.
    Transposed,
}

/// One diffusers parameter's original key and transform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub key: String,
    pub transform: Transform,
}

impl Source {
    fn same(key: String) -> Self {
        Self {
            key,
            transform: Transform::Same,
        }
    }
}

/// The UNet's layout: `layers` resnets per down level, and which up levels hold attention.
#[derive(Debug, Clone)]
pub struct UNetLayout {
    pub layers: usize,
    pub up_has_attention: Vec<bool>,
}

impl UNetLayout {
    /// The layout a diffusers `unet/config.json` describes.
    pub fn from_config(cfg: &serde_json::Value) -> Option<Self> {
        let layers = match &cfg["layers_per_block"] {
            serde_json::Value::Array(a) => a.first()?.as_u64()?,
            v => v.as_u64().unwrap_or(2),
        };
        let up = cfg["up_block_types"].as_array()?;
        Some(Self {
            layers: layers as usize,
            up_has_attention: up
                .iter()
                .map(|t| t.as_str().is_some_and(|s| s.contains("CrossAttn")))
                .collect(),
        })
    }
}

const UNET: &str = "model.diffusion_model.";

/// Where the text encoders live in an SGM (SDXL) file: CLIP ViT-L with HF names, OpenCLIP bigG.
pub const SDXL_TEXT_1: &str = "conditioner.embedders.0.transformer.";
pub const SDXL_TEXT_2: &str = "conditioner.embedders.1.model.";
/// SD 2.x's OpenCLIP ViT-H in an LDM file.
pub const SD2_TEXT: &str = "cond_stage_model.model.";

/// A UNet parameter, e.g. `down_blocks.1.attentions.0.proj_in.weight` →
/// `model.diffusion_model.input_blocks.4.1.proj_in.weight`.
pub fn unet(name: &str, layout: &UNetLayout) -> Option<Source> {
    const FIXED: [(&str, &str); 7] = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
    ];
    for (from, to) in FIXED {
        if let Some(rest) = name.strip_prefix(from) {
            return Some(Source::same(format!("{UNET}{to}{rest}")));
        }
    }
    let step = layout.layers + 1;
    let key = if let Some(rest) = name.strip_prefix("down_blocks.") {
        let (i, rest) = split_index(rest)?;
        unet_level(rest, "input_blocks", 1 + i * step, (i + 1) * step, "0.op.")?
    } else if let Some(rest) = name.strip_prefix("up_blocks.") {
        let (i, rest) = split_index(rest)?;
        let up = if *layout.up_has_attention.get(i)? {
            "2."
        } else {
            "1."
        };
        unet_level(
            rest,
            "output_blocks",
            i * step,
            i * step + layout.layers,
            up,
        )?
    } else if let Some(rest) = name.strip_prefix("mid_block.") {
        if let Some(rest) = rest.strip_prefix("attentions.0.") {
            format!("middle_block.1.{rest}")
        } else {
            let (j, rest) = split_index(rest.strip_prefix("resnets.")?)?;
            format!("middle_block.{}.{}", 2 * j, resnet(rest)?)
        }
    } else {
        return None;
    };
    Some(Source::same(format!("{UNET}{key}")))
}

/// Inside one down or up level: resnet `j` and attention `j` at block `first + j`, the
/// resampler at block `resample` (`down_blocks.i.downsamplers.0.conv.X` → `…op.X`;
/// `up_blocks.i.upsamplers.0.conv.X` → `…conv.X` behind the attention, if any).
fn unet_level(
    rest: &str,
    blocks: &str,
    first: usize,
    resample: usize,
    resampler: &str,
) -> Option<String> {
    if let Some(r) = rest.strip_prefix("resnets.") {
        let (j, r) = split_index(r)?;
        return Some(format!("{blocks}.{}.0.{}", first + j, resnet(r)?));
    }
    if let Some(r) = rest.strip_prefix("attentions.") {
        let (j, r) = split_index(r)?;
        return Some(format!("{blocks}.{}.1.{r}", first + j));
    }
    if let Some(r) = rest.strip_prefix("downsamplers.0.conv.") {
        return Some(format!("{blocks}.{resample}.{resampler}{r}"));
    }
    let r = rest.strip_prefix("upsamplers.0.")?;
    Some(format!("{blocks}.{resample}.{resampler}{r}"))
}

/// A resnet's parts: diffusers `norm1` is LDM's `in_layers.0`, and so on.
fn resnet(rest: &str) -> Option<String> {
    const PARTS: [(&str, &str); 6] = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("time_emb_proj.", "emb_layers.1."),
        ("conv_shortcut.", "skip_connection."),
    ];
    PARTS
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}")))
}

/// `"3.rest"` → `(3, "rest")`.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

const VAE: &str = "first_stage_model.";

/// A VAE parameter; `levels` is the number of encoder (and decoder) levels, since the
/// decoder's levels are numbered from the bottom in the original layout.
pub fn vae(name: &str, levels: usize) -> Option<Source> {
    let (half, rest) = name.split_once('.')?;
    if half != "encoder" && half != "decoder" {
        // quant_conv, post_quant_conv.
        return Some(Source::same(format!("{VAE}{name}")));
    }
    let (key, transform) = vae_half(half, rest, levels)?;
    Some(Source {
        key: format!("{VAE}{half}.{key}"),
        transform,
    })
}

fn vae_half(half: &str, rest: &str, levels: usize) -> Option<(String, Transform)> {
    let same = |k: String| Some((k, Transform::Same));
    if let Some(r) = rest.strip_prefix("conv_norm_out.") {
        return same(format!("norm_out.{r}"));
    }
    if let Some(r) = rest.strip_prefix("mid_block.resnets.") {
        let (j, r) = split_index(r)?;
        return same(format!("mid.block_{}.{}", j + 1, vae_resnet(r)));
    }
    if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
        return vae_attention(r);
    }
    let (blocks, dir) = if half == "encoder" {
        ("down_blocks.", "down")
    } else {
        ("up_blocks.", "up")
    };
    let Some(r) = rest.strip_prefix(blocks) else {
        return same(rest.to_string());
    };
    let (i, r) = split_index(r)?;
    let level = if half == "encoder" {
        i
    } else {
        levels.checked_sub(i + 1)?
    };
    if let Some(r) = r.strip_prefix("resnets.") {
        let (j, r) = split_index(r)?;
        return same(format!("{dir}.{level}.block.{j}.{}", vae_resnet(r)));
    }
    let r = r
        .strip_prefix("downsamplers.0.")
        .or_else(|| r.strip_prefix("upsamplers.0."))?;
    let sampler = if half == "encoder" {
        "downsample"
    } else {
        "upsample"
    };
    same(format!("{dir}.{level}.{sampler}.{r}"))
}

fn vae_resnet(rest: &str) -> String {
    match rest.strip_prefix("conv_shortcut.") {
        Some(r) => format!("nin_shortcut.{r}"),
        None => rest.to_string(),
    }
}

/// The VAE's mid attention: `mid.attn_1.{norm,q,k,v,proj_out}`, 1×1 convs in the original.
fn vae_attention(rest: &str) -> Option<(String, Transform)> {
    const PARTS: [(&str, &str); 5] = [
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    ];
    let (to, r) = PARTS
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|r| (*to, r)))?;
    let transform = if to != "norm." && r == "weight" {
        Transform::DropTrailingOnes
    } else {
        Transform::Same
    };
    Some((format!("mid.attn_1.{to}{r}"), transform))
}

/// A parameter of an HF CLIP text model stored under `prefix` with HF names (SDXL's first
/// encoder: `conditioner.embedders.0.transformer.`).
pub fn hf_clip(name: &str, prefix: &str) -> Option<Source> {
    Some(Source::same(format!("{prefix}{name}")))
}

/// A parameter of an HF CLIP text model stored as OpenCLIP under `prefix` (SD 2.x:
/// `cond_stage_model.model.`, SDXL's second encoder: `conditioner.embedders.1.model.`).
pub fn open_clip(name: &str, prefix: &str) -> Option<Source> {
    let same = |k: String| Some(Source::same(format!("{prefix}{k}")));
    match name {
        "text_model.embeddings.token_embedding.weight" => {
            return same("token_embedding.weight".into())
        }
        "text_model.embeddings.position_embedding.weight" => {
            return same("positional_embedding".into())
        }
        "text_projection.weight" => {
            return Some(Source {
                key: format!("{prefix}text_projection"),
                transform: Transform::Transposed,
            })
        }
        _ => {}
    }
    if let Some(r) = name.strip_prefix("text_model.final_layer_norm.") {
        return same(format!("ln_final.{r}"));
    }
    let (n, r) = split_index(name.strip_prefix("text_model.encoder.layers.")?)?;
    let block = format!("{prefix}transformer.resblocks.{n}.");
    for (part, code) in [("q_proj.", 0), ("k_proj.", 1), ("v_proj.", 2)] {
        if let Some(kind) = r
            .strip_prefix("self_attn.")
            .and_then(|s| s.strip_prefix(part))
        {
            return Some(Source {
                key: format!("{block}attn.in_proj_{kind}"),
                transform: Transform::Fused { part: code },
            });
        }
    }
    const PARTS: [(&str, &str); 5] = [
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("self_attn.out_proj.", "attn.out_proj."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ];
    PARTS
        .iter()
        .find_map(|(from, to)| r.strip_prefix(from).map(|x| format!("{block}{to}{x}")))
        .map(Source::same)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl() -> UNetLayout {
        UNetLayout {
            layers: 2,
            up_has_attention: vec![true, true, false],
        }
    }

    fn key(s: Option<Source>) -> String {
        s.map(|s| s.key).unwrap_or_default()
    }

    #[test]
    fn unet_names_follow_the_conversion_scripts_tables() {
        let l = sdxl();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            (
                "down_blocks.0.resnets.1.norm1.bias",
                "input_blocks.2.0.in_layers.0.bias",
            ),
            (
                "down_blocks.1.attentions.0.proj_in.weight",
                "input_blocks.4.1.proj_in.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.2.resnets.0.conv_shortcut.weight",
                "input_blocks.7.0.skip_connection.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "middle_block.2.emb_layers.1.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv2.bias",
                "output_blocks.2.0.out_layers.3.bias",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.2.conv.weight",
            ),
            (
                "up_blocks.1.attentions.2.norm.weight",
                "output_blocks.5.1.norm.weight",
            ),
            (
                "up_blocks.2.resnets.0.conv1.weight",
                "output_blocks.6.0.in_layers.2.weight",
            ),
            ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
            ("conv_norm_out.weight", "out.0.weight"),
        ];
        for (hf, sd) in cases {
            assert_eq!(key(unet(hf, &l)), format!("{UNET}{sd}"), "{hf}");
        }
    }

    #[test]
    fn vae_and_text_names_and_transforms() {
        let v = |n| vae(n, 4).unwrap();
        assert_eq!(
            v("decoder.up_blocks.0.resnets.2.conv1.weight").key,
            "first_stage_model.decoder.up.3.block.2.conv1.weight"
        );
        assert_eq!(
            v("encoder.down_blocks.1.downsamplers.0.conv.bias").key,
            "first_stage_model.encoder.down.1.downsample.conv.bias"
        );
        assert_eq!(
            v("decoder.up_blocks.1.upsamplers.0.conv.weight").key,
            "first_stage_model.decoder.up.2.upsample.conv.weight"
        );
        assert_eq!(
            v("encoder.down_blocks.1.resnets.0.conv_shortcut.weight").key,
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"
        );
        let q = v("decoder.mid_block.attentions.0.to_out.0.weight");
        assert_eq!(
            (q.key.as_str(), q.transform),
            (
                "first_stage_model.decoder.mid.attn_1.proj_out.weight",
                Transform::DropTrailingOnes
            )
        );
        assert_eq!(
            v("encoder.mid_block.resnets.1.norm2.weight").key,
            "first_stage_model.encoder.mid.block_2.norm2.weight"
        );
        assert_eq!(
            v("post_quant_conv.weight").key,
            "first_stage_model.post_quant_conv.weight"
        );
        let p = "cond_stage_model.model.";
        let k = open_clip("text_model.encoder.layers.3.self_attn.v_proj.bias", p).unwrap();
        assert_eq!(
            (k.key.as_str(), k.transform),
            (
                "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_bias",
                Transform::Fused { part: 2 }
            )
        );
        assert_eq!(
            open_clip("text_model.encoder.layers.0.mlp.fc2.weight", p)
                .unwrap()
                .key,
            "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.weight"
        );
        assert_eq!(
            open_clip("text_projection.weight", p).unwrap().transform,
            Transform::Transposed
        );
        assert_eq!(
            open_clip("text_model.embeddings.position_embedding.weight", p)
                .unwrap()
                .key,
            "cond_stage_model.model.positional_embedding"
        );
    }
}
