//! What planning needs to know about a model directory, read from its configs and the
//! safetensors headers without loading any weights (so `tessera plan --model` is instant).

use std::path::Path;

use tessera_core::plan::ArchInfo;

use super::denoiser::DenoiserConfig;
use super::loader::{ModelDir, ModelError, Result};
use super::single_file::Prediction;

/// Parameter count of the safetensors files directly in `dir` (fp16/bf16 variants of the
/// same weights are skipped when a plain file exists).
fn count_parameters(dir: &Path) -> Result<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let plain: Vec<_> = files
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            !name.contains(".fp16.") && !name.contains(".bf16.")
        })
        .cloned()
        .collect();
    let chosen = if plain.is_empty() { files } else { plain };
    let mut total = 0u64;
    for path in chosen {
        let io = |source| ModelError::Io {
            path: path.clone(),
            source,
        };
        let corrupt = |reason: String| ModelError::CorruptWeights {
            path: path.clone(),
            reason,
        };
        use std::io::Read;
        let mut f = std::fs::File::open(&path).map_err(io)?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(io)?;
        let n = u64::from_le_bytes(len);
        if n > 100 << 20 {
            return Err(corrupt(format!("header of {n} bytes")));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(io)?;
        let json: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| corrupt(e.to_string()))?;
        for (name, entry) in json.as_object().into_iter().flatten() {
            if name == "__metadata__" {
                continue;
            }
            let shape = entry["shape"].as_array().cloned().unwrap_or_default();
            total += shape
                .iter()
                .map(|d| d.as_u64().unwrap_or(0))
                .product::<u64>();
        }
    }
    Ok(total)
}

/// A synthetic model has no files to count: its components are built over a backend that only
/// records the shapes asked for.
fn synthetic_parameters(dir: &ModelDir, denoiser: &DenoiserConfig) -> Result<u64> {
    use super::text::{ClipTextConfig, ClipTextModel};
    use super::vae::{AutoencoderKL, VaeConfig};
    use crate::random_models::full_size::count_parameters;
    let err = |e: candle_core::Error| ModelError::Other(format!("synthetic model: {e}"));
    let mut total = count_parameters(|vb| denoiser.build(vb).map(|_| ())).map_err(err)?;
    let vae: VaeConfig = dir.config("vae")?;
    total += count_parameters(|vb| AutoencoderKL::new(vb, &vae).map(|_| ())).map_err(err)?;
    let sd3 = denoiser.family() == tessera_core::family::Family::Sd3;
    for (name, projection) in [("text_encoder", sd3), ("text_encoder_2", true)] {
        if dir.index().components.contains(name) {
            let cfg: ClipTextConfig = dir.config(name)?;
            total += count_parameters(|vb| ClipTextModel::new(vb, &cfg, projection).map(|_| ()))
                .map_err(err)?;
        }
    }
    if dir.index().components.contains("text_encoder_3") {
        let cfg: super::t5::T5Config = dir.config("text_encoder_3")?;
        total += count_parameters(|vb| super::t5::T5EncoderModel::new(vb, &cfg).map(|_| ()))
            .map_err(err)?;
    }
    Ok(total)
}

/// The plan's view of the model at `path`; `weight_bytes` is the precision workers will use.
pub fn arch_info(path: &Path, weight_bytes: u64) -> Result<ArchInfo> {
    arch_info_with(path, weight_bytes, None)
}

/// [`arch_info`] with a single file's prediction type overridden.
pub fn arch_info_with(
    path: &Path,
    weight_bytes: u64,
    prediction: Option<Prediction>,
) -> Result<ArchInfo> {
    let dir = ModelDir::open_with(path, prediction)?;
    let denoiser = DenoiserConfig::read(&dir)?;
    let scheduler = dir.scheduler_config()?;
    let parameters = if let Some(file) = dir.single_file() {
        file.parameter_count()
    } else if dir.is_synthetic() {
        synthetic_parameters(&dir, &denoiser)?
    } else {
        let mut parameters = 0;
        for component in [
            "unet",
            "transformer",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "text_encoder_3",
        ] {
            parameters += count_parameters(&dir.component_dir(component))?;
        }
        parameters
    };
    Ok(ArchInfo {
        name: path.display().to_string(),
        family: denoiser.family(),
        training_size: denoiser.training_size(),
        latent_channels: denoiser.latent_channels(),
        scheduler,
        parameters,
        weight_bytes,
        base_channels: denoiser.base_channels(),
        text_tokens: denoiser.text_tokens(),
        max_view_latent: denoiser.max_view_latent(),
    })
}
