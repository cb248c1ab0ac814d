//! Parity of the UNet with diffusers on tiny random models of the SD 2.1 and SDXL
//! architectures. Fixtures come from `tests/parity/make_fixtures.py` (or the directory named
//! by `TESSERA_PARITY_FIXTURES`): `<arch>/model/unet/{config.json, *.safetensors}` and
//! `<arch>/reference.{safetensors,json}`.

mod common;
use common::{fixtures_root, rel_l2, to_test_device, tolerance};

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tessera_worker::hooks::{FreeU, UNetHooks};
use tessera_worker::model::loader::ModelDir;
use tessera_worker::model::unet::{AddedCond, UNet2DConditionModel, UNetConfig};

struct Fixture {
    unet: UNet2DConditionModel,
    refs: HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Fixture {
    fn load(arch: &str) -> Result<Self> {
        let dir = fixtures_root().join(arch);
        let unet_dir = dir.join("model/unet");
        let cfg_path = unet_dir.join("config.json");
        let cfg: UNetConfig =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).with_context(|| {
                format!(
                    "{} missing: run tests/parity/make_fixtures.py",
                    cfg_path.display()
                )
            })?)?;
        // Weights may be stored in f16 (SDXL fixture); both paths convert them to f32. The
        // project loader needs model_index.json; a bare unet/ folder is read directly.
        let model_dir = dir.join("model");
        let unet = if model_dir.join("model_index.json").is_file() {
            ModelDir::open(&model_dir)?
                .weights("unet", common::dtype(), &common::device())?
                .build(|vb| UNet2DConditionModel::new(vb, &cfg))?
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&unet_dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("no safetensors in {}", unet_dir.display());
            }
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(&files, common::dtype(), &common::device())?
            };
            UNet2DConditionModel::new(vb, &cfg)?
        };
        let refs = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?
            .into_iter()
            .map(|(k, v)| Ok((k, to_test_device(&v.to_dtype(DType::F32)?)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
        Ok(Self { unet, refs, json })
    }

    fn get(&self, key: &str) -> Result<&Tensor> {
        self.refs
            .get(key)
            .with_context(|| format!("reference tensor {key} missing"))
    }

    fn run(&self, hooks: &mut UNetHooks) -> Result<Tensor> {
        let sample = self.get("unet.sample")?;
        let t = self
            .get("unet.timestep")?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?[0] as f64;
        let ctx = self.get("unet.encoder_hidden_states")?;
        let added = if self.unet.config().is_sdxl() {
            Some(AddedCond {
                text_embeds: self.get("unet.text_embeds")?.clone(),
                time_ids: self.get("unet.time_ids")?.clone(),
            })
        } else {
            None
        };
        Ok(self.unet.forward(sample, t, ctx, added.as_ref(), hooks)?)
    }

    fn check(&self, arch: &str, what: &str, got: &Tensor) -> Result<f64> {
        let err = rel_l2(got, self.get(what)?)?;
        println!("{arch} {what}: rel L2 {err:.3e}");
        if err.is_nan() || err > tolerance() {
            bail!(
                "{arch} {what}: relative L2 error {err:.3e} > {:e}",
                tolerance()
            );
        }
        Ok(err)
    }
}

fn parity(arch: &str) -> Result<()> {
    let fx = Fixture::load(arch)?;

    let mut hooks = UNetHooks {
        capture_cross_attention: true,
        ..Default::default()
    };
    let plain = fx.run(&mut hooks)?;
    fx.check(arch, "unet.out.plain", &plain)?;
    let expected: Vec<&String> = fx
        .refs
        .keys()
        .filter(|k| k.starts_with("unet.camap."))
        .collect();
    if expected.len() != hooks.captured.len() {
        bail!(
            "{arch}: captured {} maps, reference has {}",
            hooks.captured.len(),
            expected.len()
        );
    }
    let mut worst = 0f64;
    for map in &hooks.captured {
        let key = format!("unet.camap.{}", map.layer);
        let err = rel_l2(&map.probs, fx.get(&key)?)?;
        if err.is_nan() || err > tolerance() {
            bail!("{arch} {key}: relative L2 error {err:.3e}");
        }
        worst = worst.max(err);
    }
    println!(
        "{arch} camap ({} layers): worst rel L2 {worst:.3e}",
        hooks.captured.len()
    );

    let mut hooks = UNetHooks {
        freeu: Some(FreeU {
            b1: 1.1,
            b2: 1.2,
            s1: 0.6,
            s2: 0.4,
        }),
        ..Default::default()
    };
    fx.check(arch, "unet.out.freeu", &fx.run(&mut hooks)?)?;

    let spec = &fx.json["unet_dilation"];
    let dilation = spec["dilation"]
        .as_u64()
        .context("unet_dilation.dilation")? as usize;
    let mut hooks = UNetHooks::default();
    for conv in spec["convs"].as_array().context("unet_dilation.convs")? {
        hooks
            .dilation
            .insert(conv.as_str().context("conv path")?.to_string(), dilation);
    }
    fx.check(arch, "unet.out.dilated", &fx.run(&mut hooks)?)?;
    Ok(())
}

#[test]
fn unet_matches_diffusers_sd21() -> Result<()> {
    parity("sd21")
}

#[test]
fn unet_matches_diffusers_sdxl() -> Result<()> {
    parity("sdxl")
}

/// FreeScale's `scale_forward` on one transformer block (2× the training size, jitter off),
/// from the committed fixture made by `tests/parity/make_scale_fusion_fixture.py`, which runs
/// the reference `scale_attention.py` in diffusers: block parameters under `blk.` in
/// `sf_weights.safetensors`; x, ctx, out.fast0, out.fast1 in `sf_ref.safetensors`.
#[test]
fn scale_fusion_matches_freescale_reference() -> Result<()> {
    use tessera_worker::hooks::{ScaleFusion, SelfAttentionMode};
    use tessera_worker::model::attention::{BasicTransformerBlock, LayerGrid};
    let dir = fixtures_root().join("scale_fusion");
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("sf_weights.safetensors")],
            common::dtype(),
            &common::device(),
        )?
    };
    let blk = BasicTransformerBlock::new(vb.pp("blk"), 8, 2, 4, 6)?;
    let refs: std::collections::HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("sf_ref.safetensors"), &Device::Cpu)?
            .into_iter()
            .map(|(k, v)| Ok((k, to_test_device(&v)?)))
            .collect::<Result<_>>()?;
    let (x, ctx) = (&refs["x"], &refs["ctx"]);
    // 32×32 tokens at a layer 8× below a 256² latent; training latent 128² (SDXL at 2048²).
    let grid = LayerGrid {
        hw: (32, 32),
        input_hw: (256, 256),
    };
    for fast in [false, true] {
        let mut hooks = UNetHooks {
            self_attention: SelfAttentionMode::ScaleFusion(ScaleFusion {
                train_latent: (128, 128),
                fast,
                jitter_seed: None,
            }),
            ..Default::default()
        };
        let got = blk.forward(x, ctx, grid, &mut hooks)?;
        let want = &refs[&format!("out.fast{}", fast as u8)];
        // Compare the block's update (output − input) so the residual does not hide errors.
        let err = rel_l2(&(&got - x)?, &(want - x)?)?;
        println!("scale fusion fast={fast}: rel L2 of the update {err:.3e}");
        if err.is_nan() || err > tolerance() {
            bail!("scale fusion fast={fast}: relative L2 error {err:.3e}");
        }
    }
    Ok(())
}
