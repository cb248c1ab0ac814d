//! `--latents` / `--output-latents`: a safetensors file holding exactly one tensor.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

/// Reads the one tensor of a safetensors file, whatever its name.
pub fn read_latents(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read latents from {}", path.display()))?;
    latents_from_bytes(&path.display().to_string(), &bytes)
}

/// The one tensor of safetensors `bytes`; `name` says where they came from in messages.
pub fn latents_from_bytes(name: &str, bytes: &[u8]) -> Result<Tensor> {
    let tensors =
        candle_core::safetensors::load_buffer(bytes, &Device::Cpu).with_context(|| {
            format!("cannot read latents from {name} (expected a safetensors file)")
        })?;
    let mut it = tensors.into_iter();
    match (it.next(), it.next()) {
        (Some((_, t)), None) => Ok(t),
        (None, _) => bail!("{name} holds no tensor; it must hold exactly one latent"),
        (Some(_), Some(_)) => {
            bail!("{name} holds several tensors; it must hold exactly one latent")
        }
    }
}

/// Writes `latents` as the tensor `latents`, via a temporary file and a rename.
pub fn write_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let tmp = crate::assemble::partial_path(path);
    let t = latents.to_device(&Device::Cpu)?.contiguous()?;
    candle_core::safetensors::save(&std::collections::HashMap::from([("latents", t)]), &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_multi_tensor_files() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("tessera-lat-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("l.safetensors");
        let t = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((1, 4, 2, 3))?;
        write_latents(&p, &t)?;
        let back = read_latents(&p)?;
        assert_eq!(back.to_vec3::<f32>().ok(), None); // 4-D
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            t.flatten_all()?.to_vec1::<f32>()?
        );
        let two = dir.join("two.safetensors");
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("a", t.clone()), ("b", t)]),
            &two,
        )?;
        assert!(read_latents(&two)
            .unwrap_err()
            .to_string()
            .contains("several"));
        assert!(read_latents(&dir.join("none")).is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
