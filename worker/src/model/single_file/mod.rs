//! Single-file checkpoints in the original (LDM/SGM) layout — the `.safetensors` files ComfyUI
//! and A1111 load — read in place: the file is memory-mapped, each component's config is
//! inferred from the tensor shapes ([`infer`]), and every parameter the model code asks for by
//! its diffusers name is read from its original key ([`names`]), a fused `in_proj` narrowed to
//! its q, k or v rows without loading the rest, and its mapped pages dropped from the resident
//! set once copied (`release_pages`). Nothing is converted on disk.

pub mod detect;
pub mod infer;
pub mod names;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use serde_json::Value;

pub use detect::CheckpointKind;
pub use infer::Prediction;
use infer::Shapes;
use names::{Source, Transform, UNetLayout};

/// How a component's diffusers names map onto the file.
#[derive(Debug, Clone)]
enum Mapping {
    Unet(UNetLayout),
    Vae { levels: usize },
    HfClip { prefix: &'static str },
    OpenClip { prefix: &'static str },
}

#[derive(Debug, Clone)]
struct Component {
    config: Value,
    mapping: Mapping,
}

/// An opened single-file checkpoint.
pub struct SingleFile {
    path: PathBuf,
    kind: CheckpointKind,
    prediction: Prediction,
    tensors: MmapedSafetensors,
    shapes: Shapes,
    components: BTreeMap<&'static str, Component>,
}

impl std::fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFile")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("prediction", &self.prediction)
            .finish()
    }
}

/// Whether `path` names a single checkpoint file rather than a directory.
pub fn is_single_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "safetensors") && !path.is_dir()
}

impl SingleFile {
    /// Opens and identifies `path`; `prediction` overrides the file's default (diffusers'
    /// `prediction_type` argument). Errors are one line naming the file.
    pub fn open(path: &Path, prediction: Option<Prediction>) -> Result<Self, String> {
        if !path.is_file() {
            return Err(format!(
                "{} does not exist or is not a file",
                path.display()
            ));
        }
        // SAFETY: a read-only map, under the same contract as a model directory's weights.
        let tensors = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
            format!(
                "{} is not a readable safetensors file ({e})",
                path.display()
            )
        })?;
        let shapes: Shapes = tensors
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.shape().to_vec()))
            .collect();
        let kind = detect::detect(&shapes).map_err(|what| {
            format!(
                "{} is {what}; Tessera runs single-file SDXL (base architecture) and SD 2.x \
                 checkpoints, or diffusers directories",
                path.display()
            )
        })?;
        let prediction = prediction.unwrap_or(Prediction::default_for(kind));
        let components = components(&shapes, kind, prediction)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            kind,
            prediction,
            tensors,
            shapes,
            components,
        })
    }

    pub fn kind(&self) -> CheckpointKind {
        self.kind
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// The diffusers component names the file holds.
    pub fn component_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.components.keys().copied()
    }

    /// A component's inferred `config.json`.
    pub fn config(&self, component: &str) -> Option<&Value> {
        self.components.get(component).map(|c| &c.config)
    }

    /// The scheduler config diffusers pairs with the file's model type.
    pub fn scheduler_config(&self) -> Value {
        infer::scheduler_config(self.kind, self.prediction)
    }

    /// Parameters in the file (for the plan's memory estimate; an SD 2.x file's unused last
    /// text block is counted too, a fraction of a percent).
    pub fn parameter_count(&self) -> u64 {
        self.shapes
            .values()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum()
    }

    /// The tokenizer pad token of `tokenizer` (`tokenizer` or `tokenizer_2`), as the published
    /// repositories configure them: SDXL's first pads with `<|endoftext|>`, the others with "!".
    pub fn pad_token(&self, tokenizer: &str) -> &'static str {
        match (self.kind, tokenizer) {
            (CheckpointKind::Sdxl, "tokenizer") => "<|endoftext|>",
            _ => "!",
        }
    }

    /// A `VarBuilder` backend serving `component`'s diffusers names from the file.
    pub fn backend(self: &Arc<Self>, component: &str) -> Option<ComponentBackend> {
        let mapping = self.components.get(component)?.mapping.clone();
        Some(ComponentBackend {
            file: self.clone(),
            mapping,
        })
    }
}

fn components(
    shapes: &Shapes,
    kind: CheckpointKind,
    prediction: Prediction,
) -> Result<BTreeMap<&'static str, Component>, String> {
    let (unet, layout) = infer::unet_config(shapes, kind, prediction)?;
    let (vae, levels) = infer::vae_config(shapes, kind)?;
    let mut out = BTreeMap::new();
    out.insert(
        "unet",
        Component {
            config: unet,
            mapping: Mapping::Unet(layout),
        },
    );
    out.insert(
        "vae",
        Component {
            config: vae,
            mapping: Mapping::Vae { levels },
        },
    );
    match kind {
        CheckpointKind::Sdxl => {
            let (p1, p2) = (names::SDXL_TEXT_1, names::SDXL_TEXT_2);
            let te1 = infer::text_config(shapes, p1, false, "quick_gelu", false)?;
            let te2 = infer::text_config(shapes, p2, true, "gelu", true)?;
            out.insert(
                "text_encoder",
                Component {
                    config: te1,
                    mapping: Mapping::HfClip { prefix: p1 },
                },
            );
            out.insert(
                "text_encoder_2",
                Component {
                    config: te2,
                    mapping: Mapping::OpenClip { prefix: p2 },
                },
            );
        }
        CheckpointKind::Sd2 => {
            let p = names::SD2_TEXT;
            let te = infer::text_config(shapes, p, true, "gelu", false)?;
            out.insert(
                "text_encoder",
                Component {
                    config: te,
                    mapping: Mapping::OpenClip { prefix: p },
                },
            );
        }
    }
    Ok(out)
}

/// Serves one component's parameters by their diffusers names.
pub struct ComponentBackend {
    file: Arc<SingleFile>,
    mapping: Mapping,
}

impl ComponentBackend {
    fn source(&self, name: &str) -> Option<Source> {
        match &self.mapping {
            Mapping::Unet(layout) => names::unet(name, layout),
            Mapping::Vae { levels } => names::vae(name, *levels),
            Mapping::HfClip { prefix } => names::hf_clip(name, prefix),
            Mapping::OpenClip { prefix } => names::open_clip(name, prefix),
        }
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let missing = || candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        };
        let src = self.source(name).ok_or_else(missing)?;
        let view =
            self.file
                .tensors
                .get(&src.key)
                .map_err(|_| candle_core::Error::CannotFindTensor {
                    path: format!("{} (diffusers {name})", src.key),
                })?;
        let t = match src.transform {
            Transform::Same => view.load(dev),
            Transform::Fused { part } => fused_part(&view, part, &src.key, dev),
            Transform::DropTrailingOnes => {
                let t = view.load(dev)?;
                let dims: Vec<usize> = t.dims().iter().copied().filter(|&d| d != 1).collect();
                t.reshape(dims)
            }
            Transform::Transposed => view.load(dev)?.t()?.contiguous(),
        };
        release_pages(view.data());
        t
    }
}

/// Drops the mapped pages of `bytes` — a tensor just copied out of the file — from this
/// process's resident set. They stay in the page cache (reading them again reads no disk),
/// but the whole 7 GB file is no longer held resident beside the weights built from it:
/// the peak of a load is the weights plus one tensor, not twice the model. Pages only partly
/// inside `bytes` are kept.
fn release_pages(bytes: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads a configuration value.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
        if page == 0 {
            return;
        }
        let start = bytes.as_ptr() as usize;
        let (first, end) = (
            start.div_ceil(page) * page,
            (start + bytes.len()) / page * page,
        );
        if end > first {
            // SAFETY: the range lies inside a read-only file mapping that stays mapped; after
            // MADV_DONTNEED a later read faults the same file contents back in, so no
            // reference into the map (this thread's or another's) sees different bytes.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
            }
        }
    }
}

/// Rows `[part·n, (part+1)·n)` of a fused q/k/v tensor, read from the map without loading the
/// other two thirds (the rows of a row-major tensor are one contiguous byte range).
fn fused_part(
    view: &safetensors::tensor::TensorView<'_>,
    part: usize,
    key: &str,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let shape = view.shape();
    let rows = shape.first().copied().unwrap_or(0);
    if rows % 3 != 0 {
        candle_core::bail!("{key}: {rows} rows do not split into q, k and v");
    }
    let n = rows / 3;
    let row_bytes = view.data().len() / rows.max(1);
    let bytes = &view.data()[part * n * row_bytes..(part + 1) * n * row_bytes];
    let mut part_shape = shape.to_vec();
    part_shape[0] = n;
    let part_view = safetensors::tensor::TensorView::new(view.dtype(), part_shape, bytes)
        .map_err(|e| candle_core::Error::Msg(format!("{key}: {e}")))?;
    part_view.load(dev)
}

impl SimpleBackend for ComponentBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dev)?.to_dtype(dtype)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source(name)
            .is_some_and(|s| self.file.shapes.contains_key(&s.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::loader::ModelDir;
    use crate::model::unet::UNetConfig;

    fn fixture(arch: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/parity/fixtures")
            .join(arch)
            .join("model.safetensors")
    }

    #[test]
    fn configs_are_inferred_from_the_shapes_of_a_converted_sdxl_file() {
        let dir = ModelDir::open(fixture("sdxl_single")).unwrap();
        let unet: UNetConfig = dir.config("unet").unwrap();
        assert_eq!(unet.block_out_channels, vec![8, 16, 16]);
        let cfg = dir.single_file().unwrap().config("unet").unwrap();
        assert_eq!(
            cfg["transformer_layers_per_block"],
            serde_json::json!([1, 1, 2])
        );
        assert_eq!(cfg["down_block_types"][0], "DownBlock2D");
        assert_eq!(cfg["addition_time_embed_dim"], 4);
        assert_eq!(cfg["cross_attention_dim"], 16);
        let te2 = dir.single_file().unwrap().config("text_encoder_2").unwrap();
        assert_eq!(
            (te2["vocab_size"].as_u64(), te2["projection_dim"].as_u64()),
            (Some(49408), Some(8))
        );
        let sched = dir.scheduler_config().unwrap();
        assert_eq!(sched.class_name, "EulerDiscreteScheduler");
    }

    #[test]
    fn sd2_files_default_to_v_prediction_and_take_an_override() {
        let file = fixture("sd21_single");
        let json = |p| {
            let dir = ModelDir::open_with(&file, p).unwrap();
            dir.single_file().unwrap().scheduler_config()
        };
        assert_eq!(json(None)["prediction_type"], "v_prediction");
        assert_eq!(json(None)["_class_name"], "DDIMScheduler");
        assert_eq!(
            json(Some(Prediction::Epsilon))["prediction_type"],
            "epsilon"
        );
        let dir = ModelDir::open(&file).unwrap();
        let te = dir.single_file().unwrap().config("text_encoder").unwrap();
        assert_eq!(te["num_hidden_layers"], 23);
    }

    fn le_bytes<T: Copy, const N: usize>(v: Vec<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
        v.into_iter().flat_map(f).collect()
    }

    #[test]
    fn fused_in_proj_rows_are_narrowed_in_every_precision() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = Tensor::arange(0f32, 12.0, &Device::Cpu)
                .unwrap()
                .reshape((6, 2))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let flat = t.flatten_all().unwrap();
            let (raw, st_dtype): (Vec<u8>, _) = match dtype {
                DType::F32 => (
                    le_bytes(flat.to_vec1::<f32>().unwrap(), f32::to_le_bytes),
                    safetensors::Dtype::F32,
                ),
                DType::F16 => (
                    le_bytes(flat.to_vec1::<half::f16>().unwrap(), half::f16::to_le_bytes),
                    safetensors::Dtype::F16,
                ),
                _ => (
                    le_bytes(
                        flat.to_vec1::<half::bf16>().unwrap(),
                        half::bf16::to_le_bytes,
                    ),
                    safetensors::Dtype::BF16,
                ),
            };
            let view = safetensors::tensor::TensorView::new(st_dtype, vec![6, 2], &raw).unwrap();
            let k = fused_part(&view, 1, "in_proj_weight", &Device::Cpu).unwrap();
            let got = k.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(got, vec![vec![4.0, 5.0], vec![6.0, 7.0]], "{dtype:?}");
        }
    }
}
