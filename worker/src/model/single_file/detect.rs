//! What a `.safetensors` file is, from its tensor names and shapes (the checks of diffusers'
//! `single_file_utils.infer_diffusers_model_type`, plus the other kinds of file users have):
//! an SDXL base-architecture or SD 2.x checkpoint Tessera runs, or something else, named in
//! one line together with what Tessera supports.

use std::collections::BTreeMap;

/// The checkpoints Tessera reads from one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    Sdxl,
    Sd2,
}

/// What the file holds, when it is not a supported checkpoint.
pub fn describe_unsupported(shapes: &BTreeMap<String, Vec<usize>>) -> String {
    let has = |k: &str| shapes.contains_key(k);
    let any = |p: &str| shapes.keys().any(|k| k.starts_with(p) || k.contains(p));
    let what = if any("lora_unet_") || any("lora_te") || any(".lora_A.") || any(".lora_down.") {
        "a LoRA (pass it with --lora, over a base model)"
    } else if any("model.diffusion_model.joint_blocks.") || any("joint_blocks.0.context_block") {
        "a Stable Diffusion 3 checkpoint in the original layout (run SD3 as a diffusers directory)"
    } else if any("double_blocks.0.img_attn") {
        "a Flux checkpoint (Tessera does not run Flux)"
    } else if has("model.diffusion_model.input_blocks.0.0.weight")
        && shapes
            .get("model.diffusion_model.input_blocks.0.0.weight")
            .is_some_and(|s| s.get(1) != Some(&4))
    {
        "an inpainting or otherwise conditioned UNet (its first convolution does not take 4 latent channels)"
    } else if any("cond_stage_model.transformer.") {
        "a Stable Diffusion 1.x checkpoint (Tessera runs SD 2.x and SDXL)"
    } else if any("conditioner.embedders.0.model.") && !any("conditioner.embedders.1.") {
        "an SDXL refiner checkpoint (Tessera runs SDXL base-architecture models)"
    } else if !any("model.diffusion_model.")
        && (any("first_stage_model.")
            || has("encoder.conv_in.weight")
            || has("decoder.conv_in.weight"))
    {
        "a VAE alone (Tessera needs a whole checkpoint: UNet, VAE and text encoders)"
    } else if any("model.diffusion_model.") {
        "a UNet checkpoint of an architecture Tessera does not know"
    } else {
        "not a Stable Diffusion checkpoint"
    };
    what.to_string()
}

/// SDXL has its OpenCLIP bigG second encoder under `conditioner.embedders.1`; SD 2.x has a
/// 1024-wide cross-attention context and its OpenCLIP ViT-H under `cond_stage_model.model`.
pub fn detect(shapes: &BTreeMap<String, Vec<usize>>) -> Result<CheckpointKind, String> {
    let unet_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight");
    let latent_unet = unet_in.is_some_and(|s| s.len() == 4 && s[1] == 4);
    let any = |p: &str| shapes.keys().any(|k| k.starts_with(p));
    if latent_unet
        && any("conditioner.embedders.0.transformer.text_model.")
        && any("conditioner.embedders.1.model.transformer.resblocks.")
        && shapes.contains_key("model.diffusion_model.label_emb.0.0.weight")
    {
        return Ok(CheckpointKind::Sdxl);
    }
    if latent_unet && any("cond_stage_model.model.transformer.resblocks.") && !any("conditioner.") {
        return Ok(CheckpointKind::Sd2);
    }
    Err(describe_unsupported(shapes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(keys: &[(&str, &[usize])]) -> BTreeMap<String, Vec<usize>> {
        keys.iter()
            .map(|(k, s)| (k.to_string(), s.to_vec()))
            .collect()
    }

    const UNET_IN: (&str, &[usize]) = (
        "model.diffusion_model.input_blocks.0.0.weight",
        &[320, 4, 3, 3],
    );

    #[test]
    fn sdxl_and_sd2_are_told_apart_and_others_are_named() {
        let sdxl = shapes(&[
            UNET_IN,
            ("model.diffusion_model.label_emb.0.0.weight", &[1280, 2816]),
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            (
                "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight",
                &[1280],
            ),
        ]);
        assert_eq!(detect(&sdxl), Ok(CheckpointKind::Sdxl));
        let sd2 = shapes(&[
            UNET_IN,
            (
                "cond_stage_model.model.transformer.resblocks.0.ln_1.weight",
                &[1024],
            ),
        ]);
        assert_eq!(detect(&sd2), Ok(CheckpointKind::Sd2));
        type Keys<'a> = &'a [(&'a str, &'a [usize])];
        let cases: [(Keys, &str); 6] = [
            (
                &[
                    UNET_IN,
                    (
                        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                        &[768],
                    ),
                ],
                "Stable Diffusion 1.x",
            ),
            (
                &[(
                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                    &[4, 320],
                )],
                "a LoRA",
            ),
            (
                &[(
                    "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight",
                    &[4, 4],
                )],
                "Stable Diffusion 3",
            ),
            (
                &[("double_blocks.0.img_attn.norm.key_norm.scale", &[128])],
                "Flux",
            ),
            (
                &[
                    ("encoder.conv_in.weight", &[128, 3, 3, 3]),
                    ("decoder.conv_in.weight", &[512, 4, 3, 3]),
                ],
                "a VAE alone",
            ),
            (
                &[
                    (
                        "model.diffusion_model.input_blocks.0.0.weight",
                        &[320, 9, 3, 3],
                    ),
                    (
                        "cond_stage_model.model.transformer.resblocks.0.ln_1.weight",
                        &[1024],
                    ),
                ],
                "inpainting",
            ),
        ];
        for (keys, want) in cases {
            let e = detect(&shapes(keys)).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
