//! `--model synthetic:sdxl`, `synthetic:sd21` and `synthetic:sd3`: the published full-size
//! architectures (SDXL base 1.0, SD 2.1 768, SD3 medium) with random weights made on the device when the model loads, so a
//! benchmark or a trial of a GPU node needs no weights on disk and no download.
//!
//! Everything else about such a model is ordinary: its configs and tokenizers (the standard
//! CLIP vocabulary; SD3's stay tiny) are
//! written once into a small directory under the system's temporary folder, and the loader
//! opens that like any model directory; only [`ModelDir::weights`](crate::model::loader::ModelDir)
//! hands out random tensors instead of reading safetensors. The images it makes are noise.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use tessera_core::family::{Family, NamedModel, SYNTHETIC_MODELS};

use super::diffusers_dir::{write_model, Size, SYNTH_MARKER};
use super::sd3_dir::write_sd3_model;
use crate::model::loader::{ModelError, Result};

pub const PREFIX: &str = "synthetic:";
/// Bumped when the written configs change, so a stale cached directory is not reused.
const LAYOUT_VERSION: u32 = 2;

/// `Some(name)` when `path` spells a synthetic model (`synthetic:sdxl`).
pub fn synthetic_name(path: &Path) -> Option<&str> {
    path.to_str()?.strip_prefix(PREFIX)
}

/// The directory holding the configs of `synthetic:name`, written on first use.
pub fn config_dir(name: &str) -> Result<PathBuf> {
    let Some(model) = NamedModel::find(&SYNTHETIC_MODELS, name) else {
        return Err(ModelError::Other(format!(
            "unknown synthetic model {PREFIX}{name}: use {}",
            NamedModel::names(&SYNTHETIC_MODELS, |n| format!("{PREFIX}{n}"))
        )));
    };
    let family = model.family;
    let dir = std::env::temp_dir().join(format!("tessera-synthetic-{name}-v{LAYOUT_VERSION}"));
    if dir.join(SYNTH_MARKER).is_file() {
        return Ok(dir);
    }
    // Written beside and renamed into place, so concurrent processes (a coordinator and its
    // workers on one host, or threads of one) never read a half-written directory.
    static ATTEMPT: AtomicU64 = AtomicU64::new(0);
    let attempt = ATTEMPT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.with_extension(format!("partial-{}-{attempt}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let io = |path: &Path, source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    match family {
        Family::Sd3 => write_sd3_model(Size::Full, &tmp, None, true)?,
        _ => write_model(family == Family::Sdxl, Size::Full, &tmp, None)?,
    }
    let marker =
        serde_json::json!({ "arch": name, "weights": "random, made on the device at load" });
    fs::write(tmp.join(SYNTH_MARKER), marker.to_string()).map_err(|e| io(&tmp, e))?;
    if fs::rename(&tmp, &dir).is_err() {
        // Another process won the race; its directory is identical.
        let _ = fs::remove_dir_all(&tmp);
        if !dir.join(SYNTH_MARKER).is_file() {
            return Err(ModelError::Other(format!(
                "cannot create {}: remove it and try again",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

/// Random weights for any component, made on `device` as the model code asks for each tensor,
/// following the initialisation hint it gives (Kaiming for linear and conv weights, ones for
/// norm scales, and so on), so activations keep sensible magnitudes through the network.
pub fn random_weights(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomBackend), dtype, device.clone())
}

struct RandomBackend;

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        shape: Shape,
        _name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // Drawn in f32 (the random kernels' type everywhere), then cast; the f32 copy of the
        // largest SDXL tensor is ~100 MB and lives only for this call. Detached: a `Var` (or
        // anything computed from one) makes candle record every later op for backprop, which
        // would keep all of a forward pass's activations alive.
        let t = init.var(shape, DType::F32, dev)?.as_tensor().clone();
        Ok(t.to_dtype(dtype)?.detach())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("synthetic weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Counts the parameters a constructor asks for without allocating them.
pub fn count_parameters(
    construct: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> candle_core::Result<u64> {
    let shapes = parameter_shapes(construct)?;
    Ok(shapes
        .values()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum())
}

/// The names and shapes of the parameters a constructor asks for, without allocating them:
/// every tensor handed out is one zero broadcast to the requested shape.
pub fn parameter_shapes(
    construct: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> candle_core::Result<BTreeMap<String, Vec<usize>>> {
    let shapes = Arc::new(Mutex::new(BTreeMap::new()));
    let vb = VarBuilder::from_backend(Box::new(ShapeOnly(shapes.clone())), DType::F32, Device::Cpu);
    construct(vb)?;
    let shapes = shapes
        .lock()
        .map_err(|_| candle_core::Error::Msg("parameter shape map poisoned".into()))?;
    Ok(shapes.clone())
}

struct ShapeOnly(Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

impl SimpleBackend for ShapeOnly {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut shapes) = self.0.lock() {
            shapes.insert(name.to_string(), shape.dims().to_vec());
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("parameter counting needs a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::arch_info;
    use crate::model::loader::ModelDir;
    use crate::model::unet::{UNet2DConditionModel, UNetConfig};

    #[test]
    fn synthetic_models_have_the_published_sizes() -> anyhow::Result<()> {
        // Parameter counts published for the real models: SDXL's UNet 2.567 B, SD 2.1's 865.9 M.
        let sdxl = arch_info(Path::new("synthetic:sdxl"), 2)?;
        assert_eq!(sdxl.family, Family::Sdxl);
        assert_eq!(sdxl.training_size, 1024);
        let dir = ModelDir::open("synthetic:sdxl")?;
        let cfg: UNetConfig = dir.config("unet")?;
        let unet = count_parameters(|vb| UNet2DConditionModel::new(vb, &cfg).map(|_| ()))?;
        assert!((2_560_000_000..2_575_000_000).contains(&unet), "{unet}");
        // UNet + VAE (83.7 M) + CLIP ViT-L (123 M) + OpenCLIP bigG (695 M).
        assert!(
            (3_450_000_000..3_500_000_000).contains(&sdxl.parameters),
            "{}",
            sdxl.parameters
        );

        let sd21 = arch_info(Path::new("synthetic:sd21"), 2)?;
        assert_eq!(sd21.family, Family::Sd2);
        assert_eq!(sd21.training_size, 768);
        let cfg: UNetConfig = ModelDir::open("synthetic:sd21")?.config("unet")?;
        let unet = count_parameters(|vb| UNet2DConditionModel::new(vb, &cfg).map(|_| ()))?;
        assert!((860_000_000..870_000_000).contains(&unet), "{unet}");

        let e = ModelDir::open("synthetic:flux").unwrap_err().to_string();
        assert!(
            e.contains("synthetic:sdxl, synthetic:sd21 or synthetic:sd3"),
            "{e}"
        );
        Ok(())
    }

    /// `synthetic:sd3` is SD3 medium: a 2.03 B MMDiT, and in all what `plan --arch sd3`
    /// counts (the preset's figure is pinned to this count).
    #[test]
    fn synthetic_sd3_has_sd3_mediums_size() -> anyhow::Result<()> {
        use crate::model::sd3::transformer::{Sd3Transformer2DModel, Sd3TransformerConfig};
        let sd3 = arch_info(Path::new("synthetic:sd3"), 2)?;
        assert_eq!(
            (sd3.family, sd3.training_size, sd3.latent_channels),
            (Family::Sd3, 1024, 16)
        );
        assert_eq!((sd3.text_tokens, sd3.max_view_latent), (333, Some(384)));
        let cfg: Sd3TransformerConfig = ModelDir::open("synthetic:sd3")?.config("transformer")?;
        let mmdit = count_parameters(|vb| Sd3Transformer2DModel::new(vb, &cfg).map(|_| ()))?;
        eprintln!("sd3: transformer {mmdit}, all {}", sd3.parameters);
        // The published 2,028,328,000 parameters, plus the position embedding (a buffer in
        // diffusers, a tensor of the checkpoint): 192² positions × 1536.
        assert_eq!(mmdit, 2_028_328_000 + 192 * 192 * 1536);
        assert_eq!(sd3.parameters, tessera_core::family::SD3_PARAMS);
        Ok(())
    }

    #[test]
    fn random_weights_build_a_working_model() -> anyhow::Result<()> {
        // The tiny geometry keeps this fast; the backend is what is under test.
        let vb = random_weights(DType::F32, &Device::Cpu);
        let lin = candle_nn::linear(64, 32, vb.pp("l"))?;
        let w = lin.weight().flatten_all()?.to_vec1::<f32>()?;
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        let var = w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32;
        // Kaiming normal with fan-in 64: std = sqrt(2/64) = 0.177.
        assert!((var.sqrt() - 0.177).abs() < 0.03, "std {}", var.sqrt());
        // Plain tensors, not variables: no op history is kept through a forward pass.
        assert!(!lin.weight().is_variable() && !lin.weight().track_op());
        let norm = candle_nn::group_norm(4, 8, 1e-5, vb.pp("n"))?;
        let x = Tensor::randn(0f32, 1.0, (1, 8, 2, 2), &Device::Cpu)?;
        assert_eq!(
            candle_core::Module::forward(&norm, &x)?.dims(),
            &[1, 8, 2, 2]
        );
        Ok(())
    }
}
