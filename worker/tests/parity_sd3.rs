//! SD3 parity with diffusers / transformers on the tiny fixture model of
//! tests/parity/make_sd3_fixtures.py: tokenizers (CLIP ×2, T5), text encoders, prompt
//! encoding with and without T5, the MMDiT transformer in SD3.5's layout (qk_norm, a dual
//! attention block; fp16 weights) and SD3 medium's, its text→image attention maps, the
//! 16-channel VAE and the flow-matching schedule.

mod common;
use common::{fixture_dir, references, rel_l2, tolerance};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use tessera_core::sched::{Scheduler, SchedulerConfig};
use tessera_worker::hooks::UNetHooks;
use tessera_worker::model::diffusion::DiffusionModel;
use tessera_worker::model::loader::ModelDir;
use tessera_worker::model::sd3::transformer::{Sd3Transformer2DModel, Sd3TransformerConfig};
use tessera_worker::model::t5::T5Tokenizer;
use tessera_worker::model::tokenizer::ClipTokenizer;
use tessera_worker::model::vae::{AutoencoderKL, VaeConfig};

const ARCH: &str = "sd3";

fn model_dir() -> PathBuf {
    fixture_dir(ARCH).join("model")
}

fn get(refs: &HashMap<String, Tensor>, k: &str) -> Result<Tensor> {
    refs.get(k)
        .cloned()
        .with_context(|| format!("sd3: no tensor {k}"))
}

fn check(what: &str, got: &Tensor, want: &Tensor) -> Result<f64> {
    let e = rel_l2(got, want)?;
    eprintln!("sd3 {what}: {e:.2e}");
    assert!(e <= tolerance(), "sd3 {what}: rel err {e}");
    Ok(e)
}

fn prompts() -> Result<Vec<(String, String)>> {
    let path = fixture_dir(ARCH).join("reference.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let obj = json["prompts"].as_object().context("no prompts")?;
    Ok(obj
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect())
}

/// The fixture model as FreCaS runs SD3: a copy without `text_encoder_3` and `tokenizer_3`,
/// both null in `model_index.json`.
fn without_t5() -> Result<PathBuf> {
    let dst = std::env::temp_dir().join(format!("tessera-parity-sd3-no-t5-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&model_dir(), &dst, &["text_encoder_3", "tokenizer_3"])?;
    let index = dst.join("model_index.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
    json["text_encoder_3"] = serde_json::json!([null, null]);
    json["tokenizer_3"] = serde_json::json!([null, null]);
    std::fs::write(&index, serde_json::to_string_pretty(&json)?)?;
    Ok(dst)
}

fn copy_dir(src: &Path, dst: &Path, skip: &[&str]) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dst.join(&name), &[])?;
        } else {
            std::fs::copy(entry.path(), dst.join(&name))?;
        }
    }
    Ok(())
}

#[test]
fn tokenizers_match_transformers() -> Result<()> {
    let refs = references(ARCH)?;
    let ids = |k: &str| -> Result<Vec<i64>> { Ok(get(&refs, k)?.flatten_all()?.to_vec1::<i64>()?) };
    let clip = [
        (
            "tokens",
            ClipTokenizer::from_dir(&model_dir().join("tokenizer"))?,
        ),
        (
            "tokens_2",
            ClipTokenizer::from_dir(&model_dir().join("tokenizer_2"))?,
        ),
    ];
    let t5 = T5Tokenizer::from_file(&model_dir().join("tokenizer_3/tokenizer.json"), 256)
        .map_err(anyhow::Error::msg)?;
    for (key, text) in prompts()? {
        for (prefix, tok) in &clip {
            let got: Vec<i64> = tok.encode(&text)?.into_iter().map(i64::from).collect();
            assert_eq!(got, ids(&format!("{prefix}.{key}"))?, "{prefix} {key}");
        }
        let got: Vec<i64> = t5
            .encode(&text)
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(got, ids(&format!("tokens_3.{key}"))?, "t5 {key}");
    }
    Ok(())
}

/// The whole prompt encoding of `StableDiffusion3Pipeline.encode_prompt`, with T5 and as a
/// directory without it (zeros in T5's place; the negative prompt "" when none is given).
#[test]
fn prompt_encoding_matches_the_pipeline_with_and_without_t5() -> Result<()> {
    let refs = references(ARCH)?;
    let dev = common::device();
    let model = DiffusionModel::load(&model_dir(), &dev, common::dtype())?;
    assert!(model.has_t5());
    let e = model.encode_prompt("a red lighthouse on a cliff", Some("blurry, low quality"))?;
    check(
        "prompt embeds (T5)",
        &e.cond,
        &get(&refs, "encode.prompt_embeds")?,
    )?;
    check(
        "pooled",
        e.pooled_cond.as_ref().context("pooled")?,
        &get(&refs, "encode.pooled")?,
    )?;
    check(
        "negative pooled",
        e.pooled_uncond.as_ref().context("pooled")?,
        &get(&refs, "encode.negative_pooled")?,
    )?;
    let dir = without_t5()?;
    let model = DiffusionModel::load(&dir, &dev, common::dtype());
    std::fs::remove_dir_all(&dir)?;
    let model = model?;
    assert!(!model.has_t5());
    let e = model.encode_prompt("a red lighthouse on a cliff", None)?;
    check(
        "negative embeds (no T5)",
        &e.uncond,
        &get(&refs, "encode_no_t5.negative_prompt_embeds")?,
    )?;
    check(
        "negative pooled (no T5)",
        e.pooled_uncond.as_ref().context("pooled")?,
        &get(&refs, "encode_no_t5.negative_pooled")?,
    )?;
    Ok(())
}

fn load_transformer(dir: &Path, component: Option<&str>) -> Result<Sd3Transformer2DModel> {
    let (root, comp) = match component {
        Some(c) => (dir.to_path_buf(), c.to_string()),
        None => (
            dir.parent().context("parent")?.to_path_buf(),
            dir.file_name()
                .context("name")?
                .to_string_lossy()
                .into_owned(),
        ),
    };
    let cfg: Sd3TransformerConfig = serde_json::from_str(&std::fs::read_to_string(
        root.join(&comp).join("config.json"),
    )?)?;
    let file = root.join(&comp).join("diffusion_pytorch_model.safetensors");
    // SAFETY: read-only map of a fixture file.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[file], common::dtype(), &common::device())?
    };
    Ok(Sd3Transformer2DModel::new(vb, &cfg)?)
}

#[test]
fn transformer_and_its_text_maps_match_diffusers() -> Result<()> {
    let refs = references(ARCH)?;
    let inputs = |m: &Sd3Transformer2DModel, hooks: &mut UNetHooks| -> Result<Tensor> {
        let t = get(&refs, "transformer.timestep")?.to_dtype(candle_core::DType::F32)?;
        let t = t.flatten_all()?.to_vec1::<f32>()?[0] as f64;
        Ok(m.forward(
            &get(&refs, "transformer.sample")?,
            t,
            &get(&refs, "transformer.encoder_hidden_states")?,
            &get(&refs, "transformer.pooled")?,
            hooks,
        )?)
    };
    // SD3.5's layout, weights stored in f16.
    let sd35 = load_transformer(&model_dir(), Some("transformer"))?;
    let mut hooks = UNetHooks {
        capture_cross_attention: true,
        ..Default::default()
    };
    let out = inputs(&sd35, &mut hooks)?;
    check(
        "transformer (SD3.5 layout, fp16 weights)",
        &out,
        &get(&refs, "transformer.out")?,
    )?;
    assert_eq!(hooks.captured.len(), 3);
    let mut worst = 0f64;
    for m in &hooks.captured {
        assert_eq!((m.height, m.width), (4, 6), "{}", m.layer);
        let want = get(&refs, &format!("transformer.camap.{}", m.layer))?;
        worst = worst.max(rel_l2(&m.probs, &want)?);
    }
    eprintln!("sd3 text maps (worst layer): {worst:.2e}");
    assert!(worst <= tolerance(), "text maps {worst}");
    // SD3 medium's layout.
    let medium = load_transformer(&fixture_dir(ARCH).join("transformer_sd3_medium"), None)?;
    let out = inputs(&medium, &mut UNetHooks::default())?;
    check(
        "transformer (SD3 medium layout)",
        &out,
        &get(&refs, "transformer_medium.out")?,
    )?;
    Ok(())
}

#[test]
fn vae_with_sixteen_channels_matches_diffusers() -> Result<()> {
    let refs = references(ARCH)?;
    let dir = ModelDir::open(model_dir())?;
    let cfg: VaeConfig = dir.config("vae")?;
    assert_eq!((cfg.latent_channels, cfg.shift_factor), (16, Some(0.0609)));
    let vae = dir
        .weights("vae", common::dtype(), &common::device())?
        .build(|vb| AutoencoderKL::new(vb, &cfg))?;
    let post = vae.encode(&get(&refs, "vae.image")?)?;
    check(
        "vae posterior mean",
        post.mean(),
        &get(&refs, "vae.posterior_mean")?,
    )?;
    check(
        "vae posterior logvar",
        post.logvar(),
        &get(&refs, "vae.posterior_logvar")?,
    )?;
    let dec = vae.decode(&get(&refs, "vae.latent")?)?;
    check("vae decode", &dec, &get(&refs, "vae.decoded")?)?;
    Ok(())
}

#[test]
fn flow_matching_timesteps_match_the_pipeline() -> Result<()> {
    let refs = references(ARCH)?;
    let cfg = SchedulerConfig::from_file(&model_dir().join("scheduler/scheduler_config.json"))?;
    for (case, steps) in [("cfg", 4), ("no_t5", 3)] {
        let s = Scheduler::flow(&cfg, steps, None)?;
        let want = get(&refs, &format!("pipe.{case}.timesteps"))?
            .to_device(&Device::Cpu)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        assert_eq!(s.timesteps(), want.as_slice(), "{case}");
    }
    Ok(())
}
