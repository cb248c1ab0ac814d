//! AutoencoderKL parity with diffusers on the tiny fixture models (tests/parity/fixtures).

mod common;
use common::{fixture_dir, references, rel_l2, tolerance};

use anyhow::{Context, Result};
use candle_core::Tensor;
use tessera_worker::model::loader::ModelDir;
use tessera_worker::model::vae::{AutoencoderKL, VaeConfig};

fn load_vae(arch: &str) -> Result<AutoencoderKL> {
    let dir = ModelDir::open(fixture_dir(arch).join("model"))?;
    let cfg: VaeConfig = dir.config("vae")?;
    let w = dir.weights("vae", common::dtype(), &common::device())?;
    Ok(AutoencoderKL::new(w.vb(), &cfg)?)
}

fn check(arch: &str) -> Result<()> {
    let refs = references(arch)?;
    let get = |k: &str| {
        refs.get(k)
            .cloned()
            .with_context(|| format!("{arch}: no tensor {k}"))
    };
    let vae = load_vae(arch)?;

    let post = vae.encode(&get("vae.image")?)?;
    let e_mean = rel_l2(post.mean(), &get("vae.posterior_mean")?)?;
    let e_logvar = rel_l2(post.logvar(), &get("vae.posterior_logvar")?)?;
    let decoded = vae.decode(&get("vae.latent")?)?;
    let e_dec = rel_l2(&decoded, &get("vae.decoded")?)?;
    eprintln!("{arch}: posterior mean {e_mean:.2e}, logvar {e_logvar:.2e}, decoded {e_dec:.2e}");
    assert!(
        e_mean <= tolerance(),
        "{arch} posterior mean rel err {e_mean}"
    );
    assert!(
        e_logvar <= tolerance(),
        "{arch} posterior logvar rel err {e_logvar}"
    );
    assert!(e_dec <= tolerance(), "{arch} decoded rel err {e_dec}");
    Ok(())
}

#[test]
fn vae_matches_diffusers_sd21() -> Result<()> {
    check("sd21")
}

#[test]
fn vae_matches_diffusers_sdxl_fp16_weights() -> Result<()> {
    check("sdxl")
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let vae = load_vae("sd21")?;
    let wrong = Tensor::zeros((1, 5, 8, 8), common::dtype(), &common::device())?;
    assert!(vae.decode(&wrong).is_err());
    assert!(vae.encode(&wrong).is_err());
    Ok(())
}
