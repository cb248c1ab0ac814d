//! AutoencoderKL parity with diffusers on the tiny fixture models (tests/parity/fixtures).

mod common;
use common::{fixture_dir, references, rel_l2, tolerance};

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use tessera_worker::model::loader::ModelDir;
use tessera_worker::model::vae::{AutoencoderKL, TileSpec, VaeConfig};

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

    // One tile covering everything is the plain path, bit for bit.
    let latent = get("vae.latent")?;
    let one = TileSpec {
        tile_latent: 16,
        overlap_latent: 4,
    };
    let tiled = vae.tiled_decode(&latent, one)?;
    assert_eq!(
        tiled
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        decoded
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
    );
    let tiled_post = vae.tiled_encode(&get("vae.image")?, one)?;
    assert_eq!(
        tiled_post
            .mean()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        post.mean()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
    );
    // Several tiles: right shape, finite, same neighbourhood as the plain decode.
    let small = TileSpec {
        tile_latent: 6,
        overlap_latent: 2,
    };
    let tiled = vae.tiled_decode(&latent, small)?;
    assert_eq!(tiled.dims(), decoded.dims());
    let e_tiled = rel_l2(&tiled, &decoded)?;
    eprintln!("{arch}: 6/2 tiled decode vs plain {e_tiled:.3}");
    assert!(e_tiled.is_finite());
    let tiled_post = vae.tiled_encode(&get("vae.image")?, small)?;
    assert_eq!(tiled_post.mean().dims(), post.mean().dims());
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
    let img = Tensor::zeros((1, 3, 20, 20), common::dtype(), &common::device())?;
    assert!(vae
        .tiled_encode(
            &img,
            TileSpec {
                tile_latent: 2,
                overlap_latent: 1
            }
        )
        .is_err());
    let z = Tensor::zeros((1, 4, 8, 8), common::dtype(), &common::device())?;
    assert!(vae
        .tiled_decode(
            &z,
            TileSpec {
                tile_latent: 2,
                overlap_latent: 2
            }
        )
        .is_err());
    Ok(())
}
