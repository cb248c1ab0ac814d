//! `tessera model synth --layout … --dtype …`: a random SDXL or SD 2.1 model, tiny or at the
//! published full size (the `synthetic:` architectures), written one tensor at a time either
//! as a diffusers directory or as one original-layout (LDM/SGM) `.safetensors` file — the
//! files ComfyUI and A1111 load, with OpenCLIP's fused `in_proj` and transposed
//! `text_projection`.
//!
//! The parameters are those the model code asks for (recorded by constructing each component
//! over a backend that allocates nothing), and each value comes from the seeded stream of its
//! component and diffusers name ([`random_values`]), so both layouts of one seed hold the same
//! weights, and a tiny f32 directory holds what [`super::tiny::synthesize`] writes. The
//! original names are [`names`]' mapping run backwards, not a second table.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_nn::VarBuilder;
use serde_json::{json, Value};

use super::diffusers_dir::{
    io_err, pretty, random_values, write_file, write_model, SeedStream, Size, SYNTH_MARKER,
};
use super::full_size::parameter_shapes;
use super::safetensors_stream::{data_size, write_streamed, PlannedTensor, WeightDtype};
use super::tiny::prepare_dir;
use crate::model::loader::{read_json, ModelError, Result};
use crate::model::single_file::names::{self, Source, Transform, UNetLayout};
use crate::model::text::{ClipTextConfig, ClipTextModel};
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::{AutoencoderKL, VaeConfig};

/// How the model is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `model_index.json` and one folder per component, as diffusers saves a pipeline.
    Diffusers,
    /// One `.safetensors` file with the original (LDM/SGM) names.
    SingleFile,
}

/// What to write.
#[derive(Debug, Clone, Copy)]
pub struct StreamedModel {
    /// SDXL (else SD 2.1).
    pub sdxl: bool,
    pub size: Size,
    pub layout: Layout,
    pub dtype: WeightDtype,
    pub seed: u64,
}

/// One component's parameters by their diffusers names, and the seed of its values.
struct ComponentPlan {
    name: &'static str,
    file: &'static str,
    seed: u64,
    params: BTreeMap<String, Vec<usize>>,
}

impl ComponentPlan {
    fn values(&self, name: &str) -> Result<Vec<f32>> {
        let shape = self
            .params
            .get(name)
            .ok_or_else(|| ModelError::Other(format!("{} has no parameter {name}", self.name)))?;
        Ok(random_values(name, shape, self.seed))
    }
}

/// A model planned and its configs written; [`Self::write`] writes the weights.
pub struct StreamedWrite {
    model: StreamedModel,
    out: PathBuf,
    components: Vec<ComponentPlan>,
    /// Original layout only: each file key's diffusers parts.
    original: BTreeMap<String, OriginalTensor>,
}

/// One tensor of the original file: how its diffusers parameters make it, and which they are.
struct OriginalTensor {
    transform: Transform,
    /// (component index, part of a fused tensor, diffusers name), ordered by part.
    parts: Vec<(usize, usize, String)>,
}

/// One component's diffusers → original name mapping.
type NameMap = Box<dyn Fn(&str) -> Option<Source>>;

impl StreamedWrite {
    /// Checks `out`, writes the configs and tokenizers (a directory) and plans every tensor.
    pub fn prepare(model: StreamedModel, out: &Path) -> Result<Self> {
        let marker = json!({
            "arch": arch_name(model), "seed": model.seed, "dtype": model.dtype.name(),
        });
        let (components, original) = match model.layout {
            Layout::Diffusers => {
                prepare_dir(out)?;
                write_file(&out.join(SYNTH_MARKER), &pretty(&marker))?;
                write_model(model.sdxl, model.size, out, None)?;
                let components = plan_components(out, model.sdxl, model.seed)?;
                (components, BTreeMap::new())
            }
            Layout::SingleFile => {
                check_new_file(out)?;
                let configs = ScratchDir::new()?;
                write_model(model.sdxl, model.size, &configs.0, None)?;
                let components = plan_components(&configs.0, model.sdxl, model.seed)?;
                let layout = OriginalLayout::read(&configs.0)?;
                let original = original_keys(&components, &layout, model.sdxl)?;
                (components, original)
            }
        };
        Ok(Self {
            model,
            out: out.to_path_buf(),
            components,
            original,
        })
    }

    /// Bytes of weights to be written.
    pub fn bytes(&self) -> u64 {
        let dtype = self.model.dtype;
        match self.model.layout {
            Layout::Diffusers => self
                .components
                .iter()
                .map(|c| data_size(&planned(&c.params), dtype))
                .sum(),
            Layout::SingleFile => data_size(&self.original_tensors(), dtype),
        }
    }

    /// Writes the weights, one tensor at a time; `progress` gets the bytes after each.
    pub fn write(&self, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let dtype = self.model.dtype;
        let meta = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("tessera-synth".to_string(), arch_name(self.model)),
        ]);
        match self.model.layout {
            Layout::Diffusers => {
                for c in &self.components {
                    let path = self.out.join(c.name).join(c.file);
                    let tensors = planned(&c.params);
                    write_streamed(
                        &path,
                        &tensors,
                        dtype,
                        &meta,
                        |t| c.values(&t.name),
                        progress,
                    )?;
                }
                Ok(())
            }
            Layout::SingleFile => {
                let tensors = self.original_tensors();
                let values = |t: &PlannedTensor| self.original_values(&t.name);
                write_streamed(&self.out, &tensors, dtype, &meta, values, progress)
            }
        }
    }

    /// The original file's keys and shapes, in key order.
    fn original_tensors(&self) -> Vec<PlannedTensor> {
        self.original
            .iter()
            .map(|(key, t)| {
                let (c, _, name) = &t.parts[0];
                let shape = &self.components[*c].params[name];
                PlannedTensor {
                    name: key.clone(),
                    shape: original_shape(shape, t.transform, t.parts.len()),
                }
            })
            .collect()
    }

    /// An original tensor's values from its diffusers parts: q, k and v stacked, the
    /// projection transposed, the rest as they are.
    fn original_values(&self, key: &str) -> Result<Vec<f32>> {
        let OriginalTensor { transform, parts } = self
            .original
            .get(key)
            .ok_or_else(|| ModelError::Other(format!("no tensor {key} planned")))?;
        let mut out = Vec::new();
        for (c, _, name) in parts {
            out.extend(self.components[*c].values(name)?);
        }
        if *transform == Transform::Transposed {
            let (c, _, name) = &parts[0];
            let shape = &self.components[*c].params[name];
            let (rows, cols) = (shape[0], shape[1]);
            let t = &out;
            return Ok((0..rows * cols)
                .map(|i| t[(i % rows) * cols + i / rows])
                .collect());
        }
        Ok(out)
    }
}

/// Writes a random kohya-format LoRA of `rank` over every attention projection of the UNet
/// (`attn1` and `attn2`'s `to_q`, `to_k`, `to_v`, `to_out.0`) of `model`'s architecture:
/// `lora_unet_….lora_down.weight` `[rank, in]`, `.lora_up.weight` `[out, rank]` and `.alpha`
/// (= rank), in `model.dtype`. Returns the number of modules.
pub fn write_random_lora(
    model: StreamedModel,
    rank: usize,
    out: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<usize> {
    check_new_file(out)?;
    let configs = ScratchDir::new()?;
    write_model(model.sdxl, model.size, &configs.0, None)?;
    let components = plan_components(&configs.0, model.sdxl, model.seed)?;
    let unet = components
        .iter()
        .find(|c| c.name == "unet")
        .ok_or_else(|| ModelError::Other("no unet planned".into()))?;
    let mut tensors = Vec::new();
    let mut modules = 0;
    for (name, shape) in &unet.params {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let projection = ["to_q", "to_k", "to_v", "to_out.0"]
            .iter()
            .any(|p| module.ends_with(&format!(".{p}")));
        if !projection || !module.contains(".attn") || shape.len() != 2 {
            continue;
        }
        let key = format!("lora_unet_{}", module.replace('.', "_"));
        let planned = |suffix: &str, shape: Vec<usize>| PlannedTensor {
            name: format!("{key}.{suffix}"),
            shape,
        };
        tensors.push(planned("alpha", vec![]));
        tensors.push(planned("lora_down.weight", vec![rank, shape[1]]));
        tensors.push(planned("lora_up.weight", vec![shape[0], rank]));
        modules += 1;
    }
    let meta = BTreeMap::from([("ss_network_dim".to_string(), rank.to_string())]);
    let values = |t: &PlannedTensor| {
        Ok(if t.name.ends_with(".alpha") {
            vec![rank as f32]
        } else {
            random_values(&t.name, &t.shape, model.seed)
        })
    };
    write_streamed(out, &tensors, model.dtype, &meta, values, progress)?;
    Ok(modules)
}

/// `sdxl-full f16 seed 1`, for the marker and the file's metadata.
fn arch_name(m: StreamedModel) -> String {
    let arch = match (m.sdxl, m.size) {
        (true, Size::Full) => "sdxl",
        (false, Size::Full) => "sd21",
        (true, Size::Tiny) => "sdxl-tiny",
        (false, Size::Tiny) => "sd21-tiny",
    };
    format!("{arch} {} seed {}", m.dtype.name(), m.seed)
}

fn planned(params: &BTreeMap<String, Vec<usize>>) -> Vec<PlannedTensor> {
    params
        .iter()
        .map(|(name, shape)| PlannedTensor {
            name: name.clone(),
            shape: shape.clone(),
        })
        .collect()
}

/// The shape in the original file of a diffusers tensor of `shape`.
fn original_shape(shape: &[usize], transform: Transform, parts: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    match transform {
        Transform::Same => {}
        Transform::DropTrailingOnes => s.extend([1, 1]),
        Transform::Transposed => s.reverse(),
        Transform::Fused { .. } => s[0] *= parts,
    }
    s
}

/// Constructs each component from its config to record its parameters, in the order (and so
/// with the seeds) [`write_model`] gives them.
fn plan_components(dir: &Path, sdxl: bool, seed: u64) -> Result<Vec<ComponentPlan>> {
    let mut seeds = SeedStream::new(Some(seed));
    let plan = |name: &'static str,
                file: &'static str,
                seed: u64,
                construct: &dyn Fn(VarBuilder<'static>) -> candle_core::Result<()>| {
        let params = parameter_shapes(construct)
            .map_err(|e| ModelError::Other(format!("planning {name}: {e}")))?;
        Ok::<_, ModelError>(ComponentPlan {
            name,
            file,
            seed,
            params,
        })
    };
    let config = |c: &str| dir.join(c).join("config.json");
    let mut out = Vec::new();
    let encoders: &[(&'static str, bool)] = if sdxl {
        &[("text_encoder", false), ("text_encoder_2", true)]
    } else {
        &[("text_encoder", false)]
    };
    for &(name, projection) in encoders {
        let cfg: ClipTextConfig = read_json(&config(name))?;
        let build = |vb| ClipTextModel::new(vb, &cfg, projection).map(|_| ());
        out.push(plan(name, "model.safetensors", seeds.next(), &build)?);
    }
    const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
    let unet: UNetConfig = read_json(&config("unet"))?;
    let build = |vb| UNet2DConditionModel::new(vb, &unet).map(|_| ());
    out.push(plan("unet", WEIGHTS, seeds.next(), &build)?);
    let vae: VaeConfig = read_json(&config("vae"))?;
    let build = |vb| AutoencoderKL::new(vb, &vae).map(|_| ());
    out.push(plan("vae", WEIGHTS, seeds.next(), &build)?);
    Ok(out)
}

/// Every diffusers parameter's original key (through [`names`]), grouped: a fused `in_proj`
/// gathers q, k and v (ordered by part).
fn original_keys(
    components: &[ComponentPlan],
    layout: &OriginalLayout,
    sdxl: bool,
) -> Result<BTreeMap<String, OriginalTensor>> {
    let mut out: BTreeMap<String, OriginalTensor> = BTreeMap::new();
    for (c, comp) in components.iter().enumerate() {
        let source = source_of(comp, layout, sdxl);
        for name in comp.params.keys() {
            let src = source(name).ok_or_else(|| {
                ModelError::Other(format!(
                    "{} parameter {name} has no original-layout name",
                    comp.name
                ))
            })?;
            let part = match src.transform {
                Transform::Fused { part } => part,
                _ => 0,
            };
            let entry = out.entry(src.key).or_insert(OriginalTensor {
                transform: src.transform,
                parts: Vec::new(),
            });
            entry.parts.push((c, part, name.clone()));
        }
    }
    for (key, OriginalTensor { transform, parts }) in &mut out {
        parts.sort_by_key(|p| p.1);
        let fused = matches!(transform, Transform::Fused { .. });
        let expected = if fused { 3 } else { 1 };
        let parts_ok = parts.iter().enumerate().all(|(i, p)| p.1 == i);
        if parts.len() != expected || !parts_ok {
            return Err(ModelError::Other(format!(
                "{key}: {} diffusers parameters map onto it",
                parts.len()
            )));
        }
    }
    Ok(out)
}

/// The name mapping of one component.
fn source_of(comp: &ComponentPlan, layout: &OriginalLayout, sdxl: bool) -> NameMap {
    match comp.name {
        "unet" => {
            let unet = layout.unet.clone();
            Box::new(move |n| names::unet(n, &unet))
        }
        "vae" => {
            let levels = layout.vae_levels;
            Box::new(move |n| names::vae(n, levels))
        }
        "text_encoder" if sdxl => Box::new(|n| names::hf_clip(n, names::SDXL_TEXT_1)),
        "text_encoder" => Box::new(|n| names::open_clip(n, names::SD2_TEXT)),
        _ => Box::new(|n| names::open_clip(n, names::SDXL_TEXT_2)),
    }
}

/// What the original names depend on beyond a parameter's own name.
struct OriginalLayout {
    unet: UNetLayout,
    vae_levels: usize,
}

impl OriginalLayout {
    fn read(dir: &Path) -> Result<Self> {
        let unet: Value = read_json(&dir.join("unet").join("config.json"))?;
        let vae: VaeConfig = read_json(&dir.join("vae").join("config.json"))?;
        let unet = UNetLayout::from_config(&unet).ok_or_else(|| {
            ModelError::Other("unet/config.json: no layers_per_block or up_block_types".into())
        })?;
        Ok(Self {
            unet,
            vae_levels: vae.block_out_channels.len(),
        })
    }
}

fn check_new_file(out: &Path) -> Result<()> {
    if out.extension().is_none_or(|x| x != "safetensors") {
        return Err(ModelError::Other(format!(
            "{}: a single-file checkpoint's name ends in .safetensors",
            out.display()
        )));
    }
    if out.exists() {
        return Err(ModelError::Other(format!(
            "{} exists: remove it or choose a new name",
            out.display()
        )));
    }
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => fs::create_dir_all(dir).map_err(|e| io_err(dir, e)),
        None => Ok(()),
    }
}

/// A scratch directory under the system's temporary folder, removed when dropped: where a
/// single file's components are planned from configs the file itself does not carry.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tessera-synth-scratch-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::diffusion::DiffusionModel;
    use crate::model::loader::ModelDir;
    use crate::model::single_file::{detect, infer, Prediction};
    use crate::random_models::tiny::{synthesize, TinyArch};
    use candle_core::{DType, Device};

    fn write(model: StreamedModel, out: &Path) -> StreamedWrite {
        let w = StreamedWrite::prepare(model, out).unwrap();
        let mut done = 0;
        w.write(&mut |n| done += n).unwrap();
        assert_eq!(done, w.bytes());
        w
    }

    fn values(vb: &VarBuilder, name: &str, shape: &[usize]) -> Vec<f32> {
        vb.get(shape, name)
            .and_then(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Every parameter of every component, read by the real loaders from the directory and
    /// from the single file, is the same; both load as whole models; the file is one the
    /// safetensors crate accepts (offsets contiguous, sizes matching the dtype).
    #[test]
    fn both_layouts_of_one_seed_load_to_the_same_tensors() {
        let scratch = ScratchDir::new().unwrap();
        let root = &scratch.0;
        let cases = [(true, WeightDtype::F16), (false, WeightDtype::Bf16)];
        for (sdxl, dtype) in cases {
            let model = |layout| StreamedModel {
                sdxl,
                size: Size::Tiny,
                layout,
                dtype,
                seed: 5,
            };
            let dir = root.join(format!("dir-{sdxl}"));
            let file = root.join(format!("file-{sdxl}.safetensors"));
            let plan = write(model(Layout::Diffusers), &dir);
            write(model(Layout::SingleFile), &file);
            let bytes = fs::read(&file).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert!(
                st.tensors()
                    .iter()
                    .all(|(_, t)| t.data().len()
                        == t.shape().iter().product::<usize>() * dtype.size())
            );
            let (d, f) = (
                ModelDir::open(&dir).unwrap(),
                ModelDir::open(&file).unwrap(),
            );
            for c in &plan.components {
                let a = d.weights(c.name, DType::F32, &Device::Cpu).unwrap().vb();
                let b = f.weights(c.name, DType::F32, &Device::Cpu).unwrap().vb();
                for (name, shape) in &c.params {
                    assert_eq!(values(&a, name, shape), values(&b, name, shape), "{name}");
                }
            }
            for path in [&dir, &file] {
                DiffusionModel::load(path, &Device::Cpu, DType::F32).unwrap();
            }
        }
        // A tiny f32 directory holds what `synthesize` writes.
        let plan = write(
            StreamedModel {
                sdxl: true,
                size: Size::Tiny,
                layout: Layout::Diffusers,
                dtype: WeightDtype::F32,
                seed: 3,
            },
            &root.join("streamed"),
        );
        synthesize(TinyArch::SdxlTiny, &root.join("synth"), 3).unwrap();
        let d = ModelDir::open(root.join("synth")).unwrap();
        let unet = &plan.components[2];
        let vb = d.weights("unet", DType::F32, &Device::Cpu).unwrap().vb();
        for (name, shape) in &unet.params {
            assert_eq!(
                values(&vb, name, shape),
                unet.values(name).unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn a_random_lora_covers_the_unets_attention_and_merges() {
        let scratch = ScratchDir::new().unwrap();
        let root = &scratch.0;
        let model = StreamedModel {
            sdxl: true,
            size: Size::Tiny,
            layout: Layout::Diffusers,
            dtype: WeightDtype::F16,
            seed: 2,
        };
        let file = root.join("lora.safetensors");
        let modules = write_random_lora(model, 4, &file, &mut |_| {}).unwrap();
        // Tiny SDXL: 1 + 2·1 + 2·… transformer blocks; each has 2 attentions × 4 projections.
        assert!(modules > 0 && modules.is_multiple_of(8), "{modules}");
        write(model, &root.join("dir"));
        let spec = crate::model::lora::LoraSpec::parse(file.to_str().unwrap()).unwrap();
        let loras = crate::model::lora::LoraSet::load(&[spec]).unwrap();
        let dir = ModelDir::open(root.join("dir"))
            .unwrap()
            .with_loras(std::sync::Arc::new(loras));
        DiffusionModel::load_from(dir, &Device::Cpu, DType::F32).unwrap();
    }

    /// At full size the configs a single file's shapes imply are the published ones the
    /// directory writes (checked from the planned shapes; nothing is written).
    #[test]
    fn a_full_size_single_file_implies_the_directorys_configs() {
        let scratch = ScratchDir::new().unwrap();
        let root = &scratch.0;
        for sdxl in [true, false] {
            let model = StreamedModel {
                sdxl,
                size: Size::Full,
                layout: Layout::SingleFile,
                dtype: WeightDtype::F16,
                seed: 0,
            };
            let plan = StreamedWrite::prepare(model, &root.join("m.safetensors")).unwrap();
            let params: u64 = plan
                .components
                .iter()
                .flat_map(|c| c.params.values())
                .map(|s| s.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(plan.bytes(), 2 * params);
            let shapes: infer::Shapes = plan
                .original_tensors()
                .into_iter()
                .map(|t| (t.name, t.shape))
                .collect();
            let kind = detect::detect(&shapes).unwrap();
            let (unet, _) =
                infer::unet_config(&shapes, kind, Prediction::default_for(kind)).unwrap();
            let (vae, _) = infer::vae_config(&shapes, kind).unwrap();
            let configs = ScratchDir::new().unwrap();
            write_model(sdxl, Size::Full, &configs.0, None).unwrap();
            let same = |inferred: &Value, component: &str| {
                let written: Value =
                    read_json(&configs.0.join(component).join("config.json")).unwrap();
                for (k, v) in inferred.as_object().unwrap() {
                    // Token ids follow the tokenizer; SD 2.1's encoder has no projection layer.
                    let unused = k.ends_with("token_id") || (!sdxl && k == "projection_dim");
                    if !unused && written.get(k).is_some() {
                        assert_eq!(&written[k], v, "{component} {k}");
                    }
                }
            };
            same(&unet, "unet");
            same(&vae, "vae");
            let text = if sdxl {
                let te1 =
                    infer::text_config(&shapes, names::SDXL_TEXT_1, false, "quick_gelu", false);
                same(&te1.unwrap(), "text_encoder");
                infer::text_config(&shapes, names::SDXL_TEXT_2, true, "gelu", true)
            } else {
                infer::text_config(&shapes, names::SD2_TEXT, true, "gelu", false)
            };
            same(
                &text.unwrap(),
                if sdxl {
                    "text_encoder_2"
                } else {
                    "text_encoder"
                },
            );
        }
    }
}
