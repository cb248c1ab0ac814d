//! CLIP tokenizer and text encoder parity with transformers on the tiny fixture models.

mod common;
use common::{fixture_dir, references, rel_l2, tolerance};

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use tessera_worker::model::loader::ModelDir;
use tessera_worker::model::text::{ClipTextConfig, ClipTextModel};
use tessera_worker::model::tokenizer::ClipTokenizer;

fn prompts(arch: &str) -> Result<Vec<(String, String)>> {
    let path = fixture_dir(arch).join("reference.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let obj = json["prompts"]
        .as_object()
        .context("reference.json has no prompts object")?;
    Ok(obj
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect())
}

/// A copy of a tokenizer folder without `tokenizer.json`, to exercise the vocab + merges path
/// (the only one SDXL's real repository allows).
fn without_tokenizer_json(src: &Path, tag: &str) -> Result<PathBuf> {
    let dst = std::env::temp_dir().join(format!("tessera-parity-tok-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst)?;
    for name in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        if src.join(name).is_file() {
            std::fs::copy(src.join(name), dst.join(name))?;
        }
    }
    Ok(dst)
}

fn check_tokens(arch: &str, folder: &str, prefix: &str) -> Result<()> {
    let refs = references(arch)?;
    let src = fixture_dir(arch).join("model").join(folder);
    let plain = without_tokenizer_json(&src, &format!("{arch}-{folder}"))?;
    for (label, dir) in [
        ("tokenizer.json", src.clone()),
        ("vocab+merges", plain.clone()),
    ] {
        let tok = ClipTokenizer::from_dir(&dir)?;
        assert_eq!(tok.max_length(), 77);
        for (key, text) in prompts(arch)? {
            let want: Vec<i64> = refs
                .get(&format!("{prefix}.{key}"))
                .with_context(|| format!("no {prefix}.{key}"))?
                .flatten_all()?
                .to_vec1::<i64>()?;
            let got: Vec<i64> = tok.encode(&text)?.into_iter().map(i64::from).collect();
            assert_eq!(
                got, want,
                "{arch}/{folder} ({label}) prompt {key:?}: {text:?}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&plain);
    Ok(())
}

#[test]
fn tokens_match_transformers_sd21() -> Result<()> {
    check_tokens("sd21", "tokenizer", "tokens")
}

#[test]
fn tokens_match_transformers_sdxl() -> Result<()> {
    check_tokens("sdxl", "tokenizer", "tokens")?;
    check_tokens("sdxl", "tokenizer_2", "tokens_2")
}

fn check_encoder(arch: &str, component: &str, prefix: &str, with_projection: bool) -> Result<()> {
    let refs = references(arch)?;
    let get = |k: &str| {
        refs.get(k)
            .cloned()
            .with_context(|| format!("{arch}: no tensor {k}"))
    };
    let dir = ModelDir::open(fixture_dir(arch).join("model"))?;
    let cfg: ClipTextConfig = dir.config(component)?;
    let w = dir.weights(component, common::dtype(), &common::device())?;
    let model = ClipTextModel::new(w.vb(), &cfg, with_projection)?;
    let tokens_key = if component == "text_encoder_2" {
        "tokens_2.prompt"
    } else {
        "tokens.prompt"
    };
    let ids = get(tokens_key)?;
    let out = model.forward(&ids)?;
    // The same ids as u32 give the same result.
    let out_u32 = model.forward(&ids.to_dtype(DType::U32)?)?;
    assert_eq!(
        out_u32
            .last_hidden_state
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        out.last_hidden_state
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
    );
    let mut pairs = vec![
        ("last_hidden_state", out.last_hidden_state.clone()),
        ("penultimate", out.penultimate.clone()),
    ];
    if with_projection {
        pairs.push((
            "text_embeds",
            out.text_embeds.clone().context("no text_embeds")?,
        ));
    }
    for (name, got) in pairs {
        let want = get(&format!("{prefix}.prompt.{name}"))?;
        assert_eq!(got.dims(), want.dims(), "{arch} {prefix} {name}");
        let e = rel_l2(&got, &want)?;
        eprintln!("{arch} {prefix}.{name}: rel L2 {e:.2e}");
        assert!(e <= tolerance(), "{arch} {prefix}.{name}: rel err {e}");
    }
    Ok(())
}

#[test]
fn text_encoder_matches_transformers_sd21() -> Result<()> {
    check_encoder("sd21", "text_encoder", "text", false)
}

#[test]
fn text_encoders_match_transformers_sdxl_fp16_weights() -> Result<()> {
    check_encoder("sdxl", "text_encoder", "text", false)?;
    check_encoder("sdxl", "text_encoder_2", "text_2", true)
}

#[test]
fn missing_tokenizer_folder_is_an_error() {
    let e = ClipTokenizer::from_dir(Path::new("/nonexistent/tokenizer")).unwrap_err();
    assert!(e.to_string().contains("vocab.json"), "{e}");
}

/// Writes the tiny vocabulary to $TESSERA_DUMP_TINY_VOCAB (when set) for cross-checks in Python.
/// The vocabulary `tessera model synth` writes, tokenized by Tessera and by transformers'
/// CLIPTokenizer (ids committed by tests/parity/make_tiny_vocab_ids.py): accents, CJK, emoji,
/// contractions, special tokens inside the text, runs of the pad token "!", truncation.
#[test]
fn synthesized_vocab_tokenizes_like_transformers() -> Result<()> {
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(
        common::fixtures_root().join("tiny_vocab_ids.json"),
    )?)?;
    let dir = std::env::temp_dir().join(format!("tessera-tiny-vocab-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    tessera_worker::random_models::tiny_vocab::write_tiny_vocab(&dir, "!")?;
    let tok = ClipTokenizer::from_dir(&dir)?;
    let cases = expected["cases"].as_array().context("cases")?;
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().context("text")?;
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        assert_eq!(tok.encode(text)?, want, "token ids differ for {text:?}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
