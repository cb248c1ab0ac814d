//! A worker's models per LoRA set (`tessera worker --lora-dir`): a job names its LoRAs by file
//! name, weight and hash; the worker reads them only from its own LoRA directory (plain names,
//! no symlink followed), checks each hash, and keeps a model with those LoRAs merged into its
//! weights for the next task of any job with the same set. The base model stays loaded for jobs
//! without LoRAs; a few merged models are kept, least recently used dropped first.
//!
//! Why merged rather than applied per call: a merged model runs at the base model's speed, and
//! its UNet and text encoders are built again from the memory-mapped base weights (pages the
//! base model already brought into the page cache) with the LoRA deltas added as each weight
//! loads. The price is one more copy of the weights per cached set (README, "LoRAs on a
//! cluster").

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use tessera_core::spec::LoraRef;

use crate::model::diffusion::DiffusionModel;
use crate::model::loader::ModelDir;
use crate::model::lora::{self, LoraFile, LoraSet, LoraSpec};
use crate::model::single_file::Prediction;

/// Merged models kept at once, besides the base model.
pub const CACHED_SETS: usize = 3;

/// Why a job's LoRAs cannot be served here. Every one fails the job: another try on this
/// worker would fail the same way.
#[derive(Debug, thiserror::Error)]
#[error("worker {worker}: {message}")]
pub struct LoraError {
    pub worker: String,
    pub message: String,
}

/// How to build a model with LoRAs: the base model's file or directory and its options.
pub struct LoraModels {
    worker: String,
    dir: Option<PathBuf>,
    model_path: PathBuf,
    prediction: Option<Prediction>,
    device: Device,
    dtype: DType,
    /// Most recently used last.
    cache: Mutex<Vec<(Vec<LoraRef>, Arc<DiffusionModel>)>>,
    /// One set is built at a time: two tasks of a new set wait for one build.
    building: Mutex<()>,
}

impl LoraModels {
    pub fn new(
        worker: String,
        dir: Option<PathBuf>,
        model_path: PathBuf,
        prediction: Option<Prediction>,
        device: Device,
        dtype: DType,
    ) -> Self {
        Self {
            worker,
            dir,
            model_path,
            prediction,
            device,
            dtype,
            cache: Mutex::default(),
            building: Mutex::default(),
        }
    }

    /// The model with `loras` merged in, built on first use.
    pub fn model(&self, loras: &[LoraRef]) -> Result<Arc<DiffusionModel>, LoraError> {
        if let Some(m) = self.cached(loras) {
            return Ok(m);
        }
        let _one = self.building.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = self.cached(loras) {
            return Ok(m);
        }
        let started = std::time::Instant::now();
        let set = Arc::new(LoraSet::from_files(self.read_all(loras)?));
        let dir = ModelDir::open_with(&self.model_path, self.prediction)
            .map_err(|e| self.error(e.to_string()))?
            .with_loras(set);
        let model = DiffusionModel::load_from(dir, &self.device, self.dtype)
            .map_err(|e| self.error(format!("merging the job's LoRAs: {e}")))?;
        let model = Arc::new(model);
        tracing::info!(
            loras = ?loras.iter().map(|l| &l.name).collect::<Vec<_>>(),
            seconds = started.elapsed().as_secs_f64(),
            "built a model with LoRAs"
        );
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHED_SETS {
            cache.remove(0);
        }
        cache.push((loras.to_vec(), model.clone()));
        Ok(model)
    }

    fn cached(&self, loras: &[LoraRef]) -> Option<Arc<DiffusionModel>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let at = cache.iter().position(|(k, _)| k == loras)?;
        let entry = cache.remove(at);
        let model = entry.1.clone();
        cache.push(entry);
        Some(model)
    }

    fn read_all(&self, loras: &[LoraRef]) -> Result<Vec<LoraFile>, LoraError> {
        let Some(dir) = &self.dir else {
            let names: Vec<&str> = loras.iter().map(|l| l.name.as_str()).collect();
            return Err(self.error(format!(
                "the job names LoRA {} but this worker has no --lora-dir",
                names.join(", ")
            )));
        };
        loras.iter().map(|l| self.read_one(dir, l)).collect()
    }

    /// One LoRA from `dir`, by plain name, checked against the job's hash.
    fn read_one(&self, dir: &Path, lora: &LoraRef) -> Result<LoraFile, LoraError> {
        lora.check().map_err(|e| self.error(e.0))?;
        let path = dir.join(&lora.name);
        let bytes = read_no_follow(&path).map_err(|e| {
            self.error(format!(
                "LoRA {} cannot be read from {} ({e})",
                lora.name,
                dir.display()
            ))
        })?;
        let hash = lora::sha256(&bytes);
        if hash != lora.sha256 {
            return Err(self.error(format!(
                "LoRA {} in {} has hash {hash}, but the job asks for {}: \
                 the workers' copies differ from the client's",
                lora.name,
                dir.display(),
                lora.sha256
            )));
        }
        let spec = LoraSpec {
            path,
            weight: lora.weight,
        };
        lora::load_bytes(&spec, &bytes).map_err(|e| self.error(e))
    }

    fn error(&self, message: String) -> LoraError {
        LoraError {
            worker: self.worker.clone(),
            message,
        }
    }
}

/// Reads a regular file without following a symlink at its last component.
fn read_no_follow(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::other("it is a symlink, which is not followed"),
            _ => e,
        })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models(dir: &Path) -> LoraModels {
        LoraModels::new(
            "w1".into(),
            Some(dir.to_path_buf()),
            PathBuf::from("no-model"),
            None,
            Device::Cpu,
            DType::F32,
        )
    }

    fn lora(name: &str, sha256: String) -> LoraRef {
        LoraRef {
            name: name.into(),
            weight: 1.0,
            sha256,
        }
    }

    #[test]
    fn a_missing_a_mismatched_or_a_linked_lora_is_refused_naming_file_and_worker() {
        let dir = std::env::temp_dir().join(format!("tessera-lora-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("style.safetensors"), b"not a lora").unwrap();
        let link = dir.join("link.safetensors");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.join("style.safetensors"), &link).unwrap();
        let m = models(&dir);
        let zero = format!("sha256:{}", "0".repeat(64));
        let right = lora::sha256(b"not a lora");
        let cases = [
            (lora("absent.safetensors", zero.clone()), "cannot be read"),
            (lora("style.safetensors", zero.clone()), "has hash"),
            (lora("link.safetensors", right.clone()), "symlink"),
            (
                lora("../style.safetensors", right.clone()),
                "plain file name",
            ),
            (
                lora("style.safetensors", right),
                "not a readable safetensors",
            ),
        ];
        for (l, expect) in cases {
            let e = m
                .model(std::slice::from_ref(&l))
                .err()
                .expect("refused")
                .to_string();
            assert!(e.starts_with("worker w1: "), "{e}");
            assert!(e.contains(expect) && e.contains(&l.name), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_worker_without_a_lora_dir_says_so() {
        let mut m = models(Path::new("/nonexistent"));
        m.dir = None;
        let e = m
            .model(&[lora("a.safetensors", "sha256:0".into())])
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("no --lora-dir") && e.contains("a.safetensors"),
            "{e}"
        );
    }
}
