//! Writes an SD3 model directory in the diffusers layout (`StableDiffusion3Pipeline`): the two
//! CLIP tokenizers and encoders with projections, the optional T5 encoder with a small
//! unigram tokenizer, the MMDiT transformer, the 16-channel VAE with its shift, and the
//! flow-matching scheduler. Tiny (`model synth --arch sd3-tiny`) or at SD3 medium's published
//! size (`synthetic:sd3`, configs only). Weights come from the same seeded writer as the UNet
//! models' ([`super::diffusers_dir`]).

use std::path::Path;

use serde_json::{json, Value};

use super::diffusers_dir::{
    clip_config, io_err, pretty, write_config, write_file, write_tokenizers, write_weights,
    SeedStream, Size, Vocabulary, DIFFUSERS_VERSION, TINY_TEXT_HIDDEN,
};
use super::tiny::TINY_SAMPLE_SIZE;
use crate::model::loader::Result;
use crate::model::sd3::transformer::{Sd3Transformer2DModel, Sd3TransformerConfig};
use crate::model::t5::{T5Config, T5EncoderModel};
use crate::model::text::{ClipTextConfig, ClipTextModel};
use crate::model::vae::{AutoencoderKL, VaeConfig};

/// What the tiny transformer attends to: the T5 width (and the padded CLIP width).
const TINY_JOINT_DIM: usize = 64;

/// Writes an SD3 model of `size` into `out` (weights from `seed` when given), with the T5
/// encoder when `with_t5`.
pub(crate) fn write_sd3_model(
    size: Size,
    out: &Path,
    seed: Option<u64>,
    with_t5: bool,
) -> Result<()> {
    let full = size == Size::Full;
    let mut seeds = SeedStream::new(seed);
    let vocab = write_tokenizers(out, true, false)?;
    write_clip_encoders(out, full, &vocab, seed.is_some(), &mut seeds)?;
    let s = seeds.next();
    if with_t5 {
        write_t5(out, full, seed.map(|_| s))?;
    }
    write_transformer(out, full, seed.map(|_| seeds.next()))?;
    write_vae(out, full, seed.map(|_| seeds.next()))?;
    write_config::<Value>(
        out,
        "scheduler",
        "scheduler_config.json",
        &json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": 1000,
            "shift": 3.0,
        }),
    )?;
    write_model_index(out, with_t5)
}

/// CLIP ViT-L and OpenCLIP bigG, both with their projections (`CLIPTextModelWithProjection`).
fn write_clip_encoders(
    out: &Path,
    full: bool,
    vocab: &Vocabulary,
    weights: bool,
    seeds: &mut SeedStream,
) -> Result<()> {
    let encoders = [
        ("text_encoder", "quick_gelu", (768, 3072, 12, 12)),
        ("text_encoder_2", "gelu", (1280, 5120, 32, 20)),
    ];
    for (name, act, full_dims) in encoders {
        let (hidden, inter, layers, heads) = if full {
            full_dims
        } else {
            (TINY_TEXT_HIDDEN, 64, 3, 4)
        };
        let cfg: ClipTextConfig = write_config(
            out,
            name,
            "config.json",
            &clip_config(
                vocab,
                full,
                (hidden, inter, layers, heads, hidden),
                act,
                true,
            ),
        )?;
        let s = seeds.next();
        if weights {
            write_weights(out, name, "model.safetensors", s, |vb| {
                ClipTextModel::new(vb, &cfg, true).map(|_| ())
            })?;
        }
    }
    Ok(())
}

/// T5 v1.1's encoder (XXL at full size) and its tokenizer.
fn write_t5(out: &Path, full: bool, seed: Option<u64>) -> Result<()> {
    let vocab = tiny_t5_vocab();
    let (d_model, d_kv, d_ff, layers, heads, vocab_size) = if full {
        (4096, 64, 10240, 24, 64, 32128)
    } else {
        (TINY_JOINT_DIM, 8, 96, 2, 4, vocab.len())
    };
    let cfg: T5Config = write_config(
        out,
        "text_encoder_3",
        "config.json",
        &json!({
            "architectures": ["T5EncoderModel"],
            "model_type": "t5",
            "vocab_size": vocab_size,
            "d_model": d_model, "d_kv": d_kv, "d_ff": d_ff,
            "num_layers": layers, "num_heads": heads,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": true,
            "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
            "torch_dtype": "float32",
        }),
    )?;
    if let Some(s) = seed {
        write_weights(out, "text_encoder_3", "model.safetensors", s, |vb| {
            T5EncoderModel::new(vb, &cfg).map(|_| ())
        })?;
    }
    write_t5_tokenizer(&out.join("tokenizer_3"), &vocab)
}

/// The tiny T5 vocabulary: the three specials, `▁`, every character alone and word-initial,
/// and whole words of the CLIP corpus' first lines (a unigram model prefers them).
fn tiny_t5_vocab() -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = ["<pad>", "</s>", "<unk>"]
        .iter()
        .map(|s| (s.to_string(), 0.0))
        .collect();
    v.push(("▁".into(), -2.0));
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'&-:;()".chars() {
        v.push((c.to_string(), -5.0));
        v.push((format!("▁{c}"), -4.0));
    }
    let mut seen = std::collections::BTreeSet::new();
    for w in super::tiny_vocab::corpus_words().take(200) {
        if w.chars().count() > 1 && seen.insert(w) {
            v.push((format!("▁{w}"), -3.0));
        }
    }
    v
}

/// `tokenizer.json` of a unigram model as T5's: NFKC and collapsed spaces, the Metaspace
/// pre-tokenizer, `</s>` appended.
fn write_t5_tokenizer(dir: &Path, vocab: &[(String, f64)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let metaspace =
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true});
    let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
    let eos = json!({"SpecialToken": {"id": "</s>", "type_id": 0}});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFKC"},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
        ]},
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [seq("A"), eos],
            "pair": [seq("A"), eos, seq("B"), eos],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}
        },
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false}
    });
    write_file(&dir.join("tokenizer.json"), &pretty(&tokenizer))?;
    write_file(
        &dir.join("tokenizer_config.json"),
        &pretty(&json!({
            "tokenizer_class": "T5TokenizerFast", "eos_token": "</s>", "pad_token": "<pad>",
            "unk_token": "<unk>", "extra_ids": 0, "model_max_length": 512
        })),
    )
}

/// SD3 medium's transformer at full size; three blocks of width 32 at a 128 px training size.
fn write_transformer(out: &Path, full: bool, seed: Option<u64>) -> Result<()> {
    let cfg_json = if full {
        json!({
            "_class_name": "SD3Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
            "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
            "joint_attention_dim": 4096, "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
            "dual_attention_layers": [], "qk_norm": null,
        })
    } else {
        json!({
            "_class_name": "SD3Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": TINY_SAMPLE_SIZE, "patch_size": 2, "in_channels": 16, "out_channels": 16,
            "num_layers": 3, "attention_head_dim": 8, "num_attention_heads": 4,
            "joint_attention_dim": TINY_JOINT_DIM, "caption_projection_dim": 32,
            "pooled_projection_dim": 2 * TINY_TEXT_HIDDEN, "pos_embed_max_size": 64,
            "dual_attention_layers": [], "qk_norm": null,
        })
    };
    let cfg: Sd3TransformerConfig = write_config(out, "transformer", "config.json", &cfg_json)?;
    if let Some(s) = seed {
        write_weights(
            out,
            "transformer",
            "diffusion_pytorch_model.safetensors",
            s,
            |vb| Sd3Transformer2DModel::new(vb, &cfg).map(|_| ()),
        )?;
    }
    Ok(())
}

/// SD3's 16-channel VAE (no quant convs, scaling 1.5305, shift 0.0609); 16–32 channels tiny.
fn write_vae(out: &Path, full: bool, seed: Option<u64>) -> Result<()> {
    let (channels, layers, groups) = if full {
        (json!([128, 256, 512, 512]), 2, 32)
    } else {
        (json!([16, 32, 32, 32]), 1, 8)
    };
    let cfg: VaeConfig = write_config(
        out,
        "vae",
        "config.json",
        &json!({
            "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
            "in_channels": 3, "out_channels": 3, "latent_channels": 16,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D",
                                 "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                               "UpDecoderBlock2D"],
            "block_out_channels": channels, "layers_per_block": layers,
            "norm_num_groups": groups, "act_fn": "silu",
            "sample_size": if full { 1024 } else { 8 * TINY_SAMPLE_SIZE },
            "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": false, "use_post_quant_conv": false, "force_upcast": true,
        }),
    )?;
    if let Some(s) = seed {
        write_weights(out, "vae", "diffusion_pytorch_model.safetensors", s, |vb| {
            AutoencoderKL::new(vb, &cfg).map(|_| ())
        })?;
    }
    Ok(())
}

fn write_model_index(out: &Path, with_t5: bool) -> Result<()> {
    let (t5, t5_tok) = if with_t5 {
        (
            json!(["transformers", "T5EncoderModel"]),
            json!(["transformers", "T5TokenizerFast"]),
        )
    } else {
        (json!([null, null]), json!([null, null]))
    };
    let index = json!({
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": t5,
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": t5_tok,
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    write_file(&out.join("model_index.json"), &pretty(&index))
}
