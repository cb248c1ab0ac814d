//! Reads a model directory in the diffusers layout: `model_index.json`, one folder per component
//! with its `config.json` and safetensors weights (single file or sharded with an index) — or a
//! single-file checkpoint in the original layout through [`super::single_file`], behind the
//! same interface.
//!
//! Every error names the file or tensor at fault, because the usual cause is a user's
//! incomplete download or a directory of the wrong model, and they need to know what to fix.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use tessera_core::family::Family;
use tessera_core::sched::SchedulerConfig;

use super::lora::{LoraSet, Target};
use super::single_file::names::UNetLayout;
use super::single_file::{self, CheckpointKind, Prediction, SingleFile};
use super::tokenizer::ClipTokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path} is missing; a diffusers model directory needs it")]
    MissingFile { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON for this component: {source}")]
    BadConfig {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: unsupported setting: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("no safetensors weights in {dir}{hint}")]
    NoWeights { dir: PathBuf, hint: String },
    #[error("{path} is truncated or corrupt ({reason}); download it again")]
    CorruptWeights { path: PathBuf, reason: String },
    #[error("{component} weights ({files}): {message}")]
    Build {
        component: String,
        files: String,
        message: String,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// What `model_index.json` tells us beyond the component list.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// The family of the directory's pipeline, from `_class_name`.
    pub family: Family,
    pub class_name: String,
    /// SDXL: encode an absent negative prompt as zeros rather than as "".
    pub force_zeros_for_empty_prompt: bool,
    pub components: BTreeSet<String>,
}

/// An opened model directory. Cheap: it reads only `model_index.json`.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    index: ModelIndex,
    /// `synthetic:NAME`: configs only, weights made at random on the device.
    synthetic: bool,
    /// A single-file checkpoint read in place.
    single: Option<Arc<SingleFile>>,
    /// LoRAs merged into the UNet's and text encoders' weights as they load.
    loras: Option<Arc<LoraSet>>,
}

impl ModelDir {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, None)
    }

    /// Opens a model directory or a single-file checkpoint; `prediction` overrides what a
    /// single file's model type implies (diffusers' `prediction_type`).
    pub fn open_with(path: impl AsRef<Path>, prediction: Option<Prediction>) -> Result<Self> {
        if single_file::is_single_file(path.as_ref()) {
            return Self::open_single(path.as_ref(), prediction);
        }
        let ext = path
            .as_ref()
            .extension()
            .and_then(|x| x.to_str())
            .unwrap_or_default();
        if path.as_ref().is_file() && ["ckpt", "pt", "pth", "bin"].contains(&ext) {
            return Err(ModelError::Other(format!(
                "{} is a pickled checkpoint, which Tessera does not load (it can run code); \
                 use its .safetensors version",
                path.as_ref().display()
            )));
        }
        if let Some(p) = prediction {
            return Err(ModelError::Other(format!(
                "--prediction-type {} applies to single-file checkpoints; the directory {} \
                 says its own in scheduler/scheduler_config.json",
                p.name(),
                path.as_ref().display()
            )));
        }
        Self::open_dir(path)
    }

    fn open_single(path: &Path, prediction: Option<Prediction>) -> Result<Self> {
        let file = SingleFile::open(path, prediction).map_err(ModelError::Other)?;
        let (family, class_name) = match file.kind() {
            CheckpointKind::Sdxl => (Family::Sdxl, "StableDiffusionXLPipeline"),
            CheckpointKind::Sd2 => (Family::Sd2, "StableDiffusionPipeline"),
        };
        let components = file.component_names().map(String::from).collect();
        Ok(Self {
            root: path.to_path_buf(),
            index: ModelIndex {
                family,
                class_name: class_name.to_string(),
                force_zeros_for_empty_prompt: family == Family::Sdxl,
                components,
            },
            synthetic: false,
            single: Some(Arc::new(file)),
            loras: None,
        })
    }

    fn open_dir(path: impl AsRef<Path>) -> Result<Self> {
        let synthetic = crate::random_models::full_size::synthetic_name(path.as_ref());
        let root = match synthetic {
            Some(name) => crate::random_models::full_size::config_dir(name)?,
            None => path.as_ref().to_path_buf(),
        };
        if !root.is_dir() {
            return Err(ModelError::NotADirectory(root));
        }
        let index_path = root.join("model_index.json");
        let value: serde_json::Value = read_json(&index_path)?;
        let class_name = value
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let Some(family) = Family::from_pipeline_class(&class_name) else {
            return Err(ModelError::Unsupported {
                path: index_path,
                message: format!(
                    "_class_name {class_name:?}; Tessera runs {} directories",
                    Family::pipeline_classes()
                ),
            });
        };
        let components = value
            .as_object()
            .map(|o| {
                o.iter()
                    // Components are `"name": [library, class]`; a null class means "absent".
                    .filter(|(k, v)| {
                        !k.starts_with('_')
                            && v.as_array()
                                .is_some_and(|a| a.len() == 2 && !a[1].is_null())
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        let force_zeros_for_empty_prompt = value
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(family == Family::Sdxl);
        Ok(Self {
            root,
            index: ModelIndex {
                family,
                class_name,
                force_zeros_for_empty_prompt,
                components,
            },
            synthetic: synthetic.is_some(),
            single: None,
            loras: None,
        })
    }

    /// Merges `loras` into the weights this model's components load from now on.
    pub fn with_loras(mut self, loras: Arc<LoraSet>) -> Self {
        self.loras = Some(loras);
        self
    }

    /// After the components are built: every LoRA module must have found its weight.
    pub fn check_loras_used(&self) -> Result<()> {
        match &self.loras {
            Some(l) => l.check_all_used().map_err(ModelError::Other),
            None => Ok(()),
        }
    }

    /// The UNet's block layout, for LoRA module names in the original SGM layout.
    fn unet_layout(&self) -> Option<UNetLayout> {
        UNetLayout::from_config(&self.config("unet").ok()?)
    }

    /// The single-file checkpoint this model is read from, if it is one.
    pub fn single_file(&self) -> Option<&SingleFile> {
        self.single.as_deref()
    }

    /// The scheduler configuration: `scheduler/scheduler_config.json`, or for a single file
    /// the one diffusers pairs with its model type.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        if let Some(file) = &self.single {
            let json = file.scheduler_config().to_string();
            return SchedulerConfig::from_json(json.as_bytes())
                .map_err(|e| ModelError::Other(format!("{}: {e}", file.path().display())));
        }
        let path = self.scheduler_config_path();
        if !path.is_file() {
            return Err(ModelError::MissingFile { path });
        }
        SchedulerConfig::from_file(&path)
            .map_err(|e| ModelError::Other(format!("{}: {e}", path.display())))
    }

    /// The CLIP tokenizer of `component` (`tokenizer`, `tokenizer_2`): from its folder, or for
    /// a single file the standard CLIP vocabulary Tessera ships (checkpoints carry none).
    pub fn clip_tokenizer(&self, component: &str) -> Result<ClipTokenizer> {
        let tokenizer = match &self.single {
            Some(file) => ClipTokenizer::standard(file.pad_token(component)),
            None => ClipTokenizer::from_dir(&self.component_dir(component)),
        };
        tokenizer.map_err(|e| ModelError::Other(e.to_string()))
    }

    /// A `synthetic:NAME` model, whose weights are random.
    pub fn is_synthetic(&self) -> bool {
        self.synthetic
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index(&self) -> &ModelIndex {
        &self.index
    }

    pub fn component_dir(&self, component: &str) -> PathBuf {
        self.root.join(component)
    }

    /// `component/config.json` parsed as `T`.
    pub fn config<T: DeserializeOwned>(&self, component: &str) -> Result<T> {
        if let Some(file) = &self.single {
            let value = file.config(component).cloned().ok_or_else(|| {
                ModelError::Other(format!(
                    "{} has no {component} (a single-file checkpoint holds {})",
                    file.path().display(),
                    file.component_names().collect::<Vec<_>>().join(", ")
                ))
            })?;
            return serde_json::from_value(value).map_err(|source| ModelError::BadConfig {
                path: file.path().join(component),
                source,
            });
        }
        read_json(&self.root.join(component).join("config.json"))
    }

    /// `scheduler/scheduler_config.json`.
    pub fn scheduler_config_path(&self) -> PathBuf {
        self.root.join("scheduler").join("scheduler_config.json")
    }

    /// Opens the safetensors weights of one component, validating every file's header first so a
    /// truncated download is reported against its file rather than as a missing tensor later.
    pub fn weights(
        &self,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<ComponentWeights> {
        let mut weights = self.base_weights(component, dtype, device)?;
        if let (Some(loras), Some(target)) = (&self.loras, Target::of_component(component)) {
            let layout = (target == Target::Unet)
                .then(|| self.unet_layout())
                .flatten();
            weights.vb = loras.wrap(target, weights.vb, layout);
        }
        Ok(weights)
    }

    fn base_weights(
        &self,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<ComponentWeights> {
        if self.synthetic {
            return Ok(ComponentWeights {
                component: component.to_string(),
                files: "synthetic random weights".to_string(),
                vb: crate::random_models::full_size::random_weights(dtype, device),
            });
        }
        if let Some(file) = &self.single {
            return single_file_weights(file, component, dtype, device);
        }
        let dir = self.root.join(component);
        let files = weight_files(&dir)?;
        for file in &files {
            check_safetensors(file)?;
        }
        // SAFETY: the files are memory-mapped read-only; a concurrent writer truncating them is
        // outside what a model directory supports (the same contract as diffusers' loaders).
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| {
                ModelError::CorruptWeights {
                    path: files[0].clone(),
                    reason: e.to_string(),
                }
            })?;
        Ok(ComponentWeights {
            component: component.to_string(),
            files: files
                .iter()
                .map(|f| display_relative(&self.root, f))
                .collect::<Vec<_>>()
                .join(", "),
            vb,
        })
    }
}

fn single_file_weights(
    file: &Arc<SingleFile>,
    component: &str,
    dtype: DType,
    device: &Device,
) -> Result<ComponentWeights> {
    let backend = file.backend(component).ok_or_else(|| {
        ModelError::Other(format!("{} has no {component}", file.path().display()))
    })?;
    Ok(ComponentWeights {
        component: component.to_string(),
        files: file.path().display().to_string(),
        vb: VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
    })
}

/// The weights of one component, ready for a model constructor.
pub struct ComponentWeights {
    component: String,
    files: String,
    vb: VarBuilder<'static>,
}

impl ComponentWeights {
    pub fn vb(&self) -> VarBuilder<'static> {
        self.vb.clone()
    }

    /// Runs a model constructor over these weights, turning candle's "cannot find tensor" and
    /// "shape mismatch" errors into ones that also name the component's files.
    pub fn build<T>(
        &self,
        construct: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
    ) -> Result<T> {
        construct(self.vb.clone()).map_err(|e| self.error(e))
    }

    pub fn error(&self, e: candle_core::Error) -> ModelError {
        ModelError::Build {
            component: self.component.clone(),
            files: self.files.clone(),
            message: first_line(&e.to_string()),
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_string()
}

fn display_relative(root: &Path, file: &Path) -> String {
    let parent = root.parent().unwrap_or(root);
    file.strip_prefix(parent)
        .unwrap_or(file)
        .display()
        .to_string()
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes).map_err(|source| ModelError::BadConfig {
        path: path.to_path_buf(),
        source,
    })
}

/// The weight files of a component folder, in the order diffusers would pick them: a single
/// `*.safetensors`, else a sharded index, else an fp16/bf16 variant.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFile {
            path: dir.to_path_buf(),
        });
    }
    for stem in ["diffusion_pytorch_model", "model"] {
        let single = dir.join(format!("{stem}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.is_file() {
            return sharded_files(dir, &index);
        }
    }
    for variant in ["fp16", "bf16"] {
        for stem in ["diffusion_pytorch_model", "model"] {
            let single = dir.join(format!("{stem}.{variant}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{stem}.safetensors.index.{variant}.json"));
            if index.is_file() {
                return sharded_files(dir, &index);
            }
        }
    }
    let has_bin = fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "bin"))
        })
        .unwrap_or(false);
    Err(ModelError::NoWeights {
        dir: dir.to_path_buf(),
        hint: if has_bin {
            " (found only pickled .bin weights: convert them to safetensors, e.g. by \
             save_pretrained(safe_serialization=True) in diffusers)"
                .into()
        } else {
            " (expected diffusion_pytorch_model.safetensors or model.safetensors)".into()
        },
    })
}

fn sharded_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct ShardIndex {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let idx: ShardIndex = read_json(index)?;
    let names: BTreeSet<&String> = idx.weight_map.values().collect();
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(ModelError::MissingFile { path });
        }
        files.push(path);
    }
    if files.is_empty() {
        return Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
            hint: format!(" ({} lists no shards)", index.display()),
        });
    }
    Ok(files)
}

/// Parses the header and checks that every tensor's bytes lie inside the file.
fn check_safetensors(path: &Path) -> Result<()> {
    let file = fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: read-only map of a file we just opened; see `ModelDir::weights`.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    safetensors::SafeTensors::deserialize(&mmap).map_err(|e| ModelError::CorruptWeights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use std::collections::HashMap;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("tessera-loader-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn write_index(root: &Path, class: &str) {
        fs::write(
            root.join("model_index.json"),
            format!(r#"{{"_class_name": "{class}", "unet": ["diffusers", "UNet2DConditionModel"], "safety_checker": [null, null]}}"#),
        )
        .unwrap();
    }

    fn save(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    #[test]
    fn reads_index_and_sharded_half_precision_weights() {
        let dir = TempDir::new("sharded");
        write_index(&dir.0, "StableDiffusionXLPipeline");
        let unet = dir.0.join("unet");
        fs::create_dir_all(&unet).unwrap();
        let a = Tensor::new(&[[1.5f32, -2.0, 3.25]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, 4.0], &Device::Cpu).unwrap();
        save(
            &unet.join("part-1.safetensors"),
            &[("a.weight", a.to_dtype(DType::F16).unwrap())],
        );
        save(
            &unet.join("part-2.safetensors"),
            &[("b.bias", b.to_dtype(DType::BF16).unwrap())],
        );
        fs::write(
            unet.join("diffusion_pytorch_model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"a.weight": "part-1.safetensors", "b.bias": "part-2.safetensors"}}"#,
        )
        .unwrap();

        let m = ModelDir::open(&dir.0).unwrap();
        assert_eq!(m.index().family, Family::Sdxl);
        assert!(m.index().force_zeros_for_empty_prompt);
        assert!(m.index().components.contains("unet"));
        assert!(!m.index().components.contains("safety_checker"));
        let w = m.weights("unet", DType::F32, &Device::Cpu).unwrap();
        let got = w.vb().get((1, 3), "a.weight").unwrap();
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(got.to_vec2::<f32>().unwrap(), vec![vec![1.5, -2.0, 3.25]]);
        assert_eq!(
            w.vb().get(2, "b.bias").unwrap().to_vec1::<f32>().unwrap(),
            vec![0.5, 4.0]
        );

        let e = w
            .build(|vb| vb.get((1, 4), "a.weight"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unet weights") && e.contains("part-1.safetensors"),
            "{e}"
        );
        assert!(e.contains("a.weight"), "{e}");
        let e = w
            .build(|vb| vb.get(3, "missing.weight"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.weight"), "{e}");
    }

    #[test]
    fn variant_fallback_and_clear_errors() {
        let dir = TempDir::new("errors");
        let e = ModelDir::open(dir.0.join("absent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = ModelDir::open(&dir.0).unwrap_err().to_string();
        assert!(e.contains("model_index.json is missing"), "{e}");
        write_index(&dir.0, "KandinskyPipeline");
        let e = ModelDir::open(&dir.0).unwrap_err().to_string();
        assert!(e.contains("StableDiffusionXLPipeline"), "{e}");

        write_index(&dir.0, "StableDiffusionPipeline");
        let m = ModelDir::open(&dir.0).unwrap();
        assert!(!m.index().force_zeros_for_empty_prompt);
        let vae = dir.0.join("vae");
        fs::create_dir_all(&vae).unwrap();
        fs::write(vae.join("diffusion_pytorch_model.bin"), b"pickle").unwrap();
        let e = m
            .weights("vae", DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("only pickled .bin"), "{e}");

        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        save(
            &vae.join("diffusion_pytorch_model.fp16.safetensors"),
            &[("x", t.to_dtype(DType::F16).unwrap())],
        );
        let w = m.weights("vae", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            w.vb().get(2, "x").unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0]
        );

        // Truncate the file: reported against the file, before any tensor is read.
        let f = vae.join("diffusion_pytorch_model.fp16.safetensors");
        let len = fs::metadata(&f).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        let e = m
            .weights("vae", DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("diffusion_pytorch_model.fp16.safetensors is truncated or corrupt"),
            "{e}"
        );

        let e = m
            .config::<serde_json::Value>("vae")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vae/config.json is missing"), "{e}");
        fs::write(vae.join("config.json"), "{ not json").unwrap();
        let e = m
            .config::<serde_json::Value>("vae")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vae/config.json is not valid JSON"), "{e}");
    }
}
