//! LoRAs merged into the weights as they load: `W + Σ weightᵢ · (alphaᵢ / rankᵢ) · Bᵢ·Aᵢ`,
//! what diffusers' `fuse_lora` computes (peft `LoraLayer.get_delta_weight`). Reads the kohya
//! format (`lora_unet_*`, `lora_te1_*`, `lora_te2_*`, `lora_te_*` with `lora_down`, `lora_up`,
//! `alpha`; module names in the diffusers or the original SGM layout; LoCon convolutions) and
//! the diffusers/PEFT format (`unet.….lora_A/lora_B`, `text_encoder.…`, alpha from the file's
//! `lora_adapter_metadata`). Every module of every file must match a weight of the model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use tessera_core::spec::LoraRef;

use super::single_file::names::{self, UNetLayout};

/// One `--lora FILE[:WEIGHT]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub weight: f64,
}

impl LoraSpec {
    /// `FILE` (weight 1) or `FILE:WEIGHT`.
    pub fn parse(arg: &str) -> Result<Self, String> {
        let (path, weight) = match arg.rsplit_once(':') {
            Some((p, w)) if !p.is_empty() && w.parse::<f64>().is_ok() => {
                (p, w.parse::<f64>().unwrap_or(1.0))
            }
            _ => (arg, 1.0),
        };
        if !weight.is_finite() {
            return Err(format!("--lora {arg}: the weight must be a finite number"));
        }
        if path.is_empty() {
            return Err("--lora needs a file: FILE or FILE:WEIGHT".into());
        }
        Ok(Self {
            path: PathBuf::from(path),
            weight,
        })
    }
}

/// The model part a LoRA module patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Target {
    pub fn of_component(component: &str) -> Option<Self> {
        match component {
            "unet" => Some(Target::Unet),
            "text_encoder" => Some(Target::TextEncoder),
            "text_encoder_2" => Some(Target::TextEncoder2),
            _ => None,
        }
    }
}

/// One patched weight: `scale · up · down`.
#[derive(Debug)]
struct Module {
    down: Tensor,
    up: Tensor,
    /// alpha / rank.
    scale: f64,
}

/// One loaded LoRA file.
#[derive(Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub weight: f64,
    /// `sha256:HEX` of the file's bytes.
    pub hash: String,
    modules: BTreeMap<(Target, String), Module>,
}

/// The LoRAs of a model load, with which of their modules have been applied.
#[derive(Debug, Default)]
pub struct LoraSet {
    pub files: Vec<LoraFile>,
    used: Mutex<BTreeSet<(usize, Target, String)>>,
}

impl LoraSet {
    pub fn load(specs: &[LoraSpec]) -> Result<Self, String> {
        let files = specs.iter().map(load_file).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            files,
            used: Mutex::default(),
        })
    }

    /// A set of files already loaded (a worker's, read from its --lora-dir).
    pub fn from_files(files: Vec<LoraFile>) -> Self {
        Self {
            files,
            used: Mutex::default(),
        }
    }

    /// Each file as a job names it: file name, weight and hash.
    pub fn refs(&self) -> Vec<LoraRef> {
        self.files
            .iter()
            .map(|f| LoraRef {
                name: f
                    .path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into(),
                weight: f.weight,
                sha256: f.hash.clone(),
            })
            .collect()
    }

    /// A `VarBuilder` serving `inner`'s weights of `target` with the LoRAs merged in.
    pub fn wrap(
        self: &Arc<Self>,
        target: Target,
        inner: VarBuilder<'static>,
        layout: Option<UNetLayout>,
    ) -> VarBuilder<'static> {
        let (dtype, device) = (inner.dtype(), inner.device().clone());
        let backend = LoraBackend {
            inner,
            target,
            layout,
            loras: self.clone(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device)
    }

    /// Every module of every file must have patched a weight: names the first few that did
    /// not, per file.
    pub fn check_all_used(&self) -> Result<(), String> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        for (i, file) in self.files.iter().enumerate() {
            let unmatched: Vec<String> = file
                .modules
                .keys()
                .filter(|(t, m)| !used.contains(&(i, *t, m.clone())))
                .map(|(t, m)| format!("{} {m}", target_name(*t)))
                .collect();
            if !unmatched.is_empty() {
                return Err(format!(
                    "LoRA {}: {} of its {} modules match no weight of this model (first: {}); \
                     is it for another model family?",
                    file.path.display(),
                    unmatched.len(),
                    file.modules.len(),
                    unmatched
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The sum of the deltas for `module` of `target`, as `shape`, or `None`.
    fn delta(
        &self,
        target: Target,
        keys: &[String],
        shape: &Shape,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for (i, file) in self.files.iter().enumerate() {
            let Some((key, m)) = keys
                .iter()
                .find_map(|k| file.modules.get(&(target, k.clone())).map(|m| (k, m)))
            else {
                continue;
            };
            let d = module_delta(m, shape, key)
                .map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "LoRA {}: {e}; is it for another model?",
                        file.path.display()
                    ))
                })?
                .affine(file.weight, 0.0)?;
            total = Some(match total {
                Some(t) => (t + d)?,
                None => d,
            });
            let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
            used.insert((i, target, key.clone()));
        }
        Ok(total)
    }
}

fn target_name(t: Target) -> &'static str {
    match t {
        Target::Unet => "unet",
        Target::TextEncoder => "text_encoder",
        Target::TextEncoder2 => "text_encoder_2",
    }
}

/// `scale · up · down` reshaped to the weight's shape (a linear LoRA on a 1×1 convolution, or
/// LoCon's `[r, in, kh, kw]` down and `[out, r, 1, 1]` up on a convolution).
fn module_delta(m: &Module, shape: &Shape, key: &str) -> candle_core::Result<Tensor> {
    let rank = m.down.dim(0)?;
    let out = m.up.dim(0)?;
    let up = m.up.reshape((out, rank))?;
    let down = m.down.reshape((rank, ()))?;
    let delta = up.matmul(&down)?.affine(m.scale, 0.0)?;
    if delta.elem_count() != shape.elem_count() {
        candle_core::bail!(
            "module {key}: its {}x{} update does not fit the weight of shape {shape:?}",
            out,
            down.dim(1)?
        );
    }
    delta.reshape(shape)
}

struct LoraBackend {
    inner: VarBuilder<'static>,
    target: Target,
    layout: Option<UNetLayout>,
    loras: Arc<LoraSet>,
}

impl LoraBackend {
    /// The names a LoRA may give the module of parameter `name`: diffusers' (dots or
    /// underscores, with or without `text_model.`) and, for the UNet, the original SGM one
    /// kohya's SDXL trainer uses (`input_blocks_4_1_…`).
    fn keys(&self, name: &str) -> Vec<String> {
        let Some(module) = name.strip_suffix(".weight") else {
            return Vec::new();
        };
        let module = module.strip_prefix("text_model.").unwrap_or(module);
        let mut keys = vec![module.replace('.', "_")];
        if let (Some(layout), Target::Unet) = (&self.layout, self.target) {
            if let Some(src) = names::unet(name, layout) {
                let sgm = src.key.trim_start_matches("model.diffusion_model.");
                keys.push(sgm.trim_end_matches(".weight").replace('.', "_"));
            }
        }
        keys
    }
}

impl SimpleBackend for LoraBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let base = self.inner.get_with_hints_dtype(s.clone(), name, h, dtype)?;
        match self.loras.delta(self.target, &self.keys(name), &s)? {
            None => Ok(base),
            Some(d) => {
                let d = d.to_device(base.device())?;
                (base.to_dtype(DType::F32)? + d)?.to_dtype(dtype)
            }
        }
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let base = self.inner.get_unchecked_dtype(name, dtype)?;
        let shape = base.shape().clone();
        match self.loras.delta(self.target, &self.keys(name), &shape)? {
            None => Ok(base),
            Some(d) => (base.to_dtype(DType::F32)? + d.to_device(base.device())?)?.to_dtype(dtype),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Reads one LoRA file (weights in f32 on the CPU; they are small).
fn load_file(spec: &LoraSpec) -> Result<LoraFile, String> {
    let shown = spec.path.display();
    let bytes =
        std::fs::read(&spec.path).map_err(|e| format!("LoRA {shown}: cannot read it ({e})"))?;
    load_bytes(spec, &bytes)
}

/// A LoRA file from its bytes, already read from `spec.path`.
pub fn load_bytes(spec: &LoraSpec, bytes: &[u8]) -> Result<LoraFile, String> {
    let shown = spec.path.display();
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| format!("LoRA {shown} is not a readable safetensors file ({e})"))?;
    let metadata = peft_metadata(bytes);
    let modules = parse_modules(tensors, &metadata).map_err(|e| format!("LoRA {shown}: {e}"))?;
    if modules.is_empty() {
        return Err(format!("LoRA {shown} holds no LoRA modules"));
    }
    Ok(LoraFile {
        path: spec.path.clone(),
        weight: spec.weight,
        hash: sha256(bytes),
        modules,
    })
}

pub fn sha256(bytes: &[u8]) -> String {
    hex_digest(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// [`sha256`] of a file read in pieces, so a large LoRA is never held whole to hash it.
pub fn hash_file(path: &std::path::Path) -> std::io::Result<String> {
    hash_reader(std::fs::File::open(path)?)
}

/// [`sha256`] of everything `reader` yields.
pub fn hash_reader(mut reader: impl std::io::Read) -> std::io::Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(hex_digest(ctx.finish()));
        }
        ctx.update(&buf[..n]);
    }
}

fn hex_digest(digest: ring::digest::Digest) -> String {
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// `lora_adapter_metadata` of a diffusers-saved file: `{"unet.lora_alpha": 8, "unet.r": 4, …}`.
fn peft_metadata(bytes: &[u8]) -> serde_json::Value {
    safetensors::SafeTensors::read_metadata(bytes)
        .ok()
        .and_then(|(_, m)| m.metadata().as_ref()?.get("lora_adapter_metadata").cloned())
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// A tensor's role: which module, and down (A), up (B) or alpha.
fn classify(key: &str) -> Option<(Target, String, &'static str)> {
    const KOHYA: [(&str, Target); 4] = [
        ("lora_unet_", Target::Unet),
        ("lora_te1_", Target::TextEncoder),
        ("lora_te2_", Target::TextEncoder2),
        ("lora_te_", Target::TextEncoder),
    ];
    const PEFT: [(&str, Target); 3] = [
        ("unet.", Target::Unet),
        ("text_encoder_2.", Target::TextEncoder2),
        ("text_encoder.", Target::TextEncoder),
    ];
    const PARTS: [(&str, &str); 5] = [
        (".lora_down.weight", "down"),
        (".lora_up.weight", "up"),
        (".alpha", "alpha"),
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
    ];
    let (stem, part) = PARTS
        .iter()
        .find_map(|(suffix, part)| key.strip_suffix(suffix).map(|s| (s, *part)))?;
    if let Some((rest, t)) = KOHYA
        .iter()
        .find_map(|(p, t)| stem.strip_prefix(p).map(|r| (r, *t)))
    {
        let rest = rest.strip_prefix("text_model_").unwrap_or(rest);
        return Some((t, rest.to_string(), part));
    }
    let (rest, t) = PEFT
        .iter()
        .find_map(|(p, t)| stem.strip_prefix(p).map(|r| (r, *t)))?;
    let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
    Some((t, rest.replace('.', "_"), part))
}

type Parts = BTreeMap<(Target, String), (Option<Tensor>, Option<Tensor>, Option<f64>)>;

fn parse_modules(
    tensors: std::collections::HashMap<String, Tensor>,
    metadata: &serde_json::Value,
) -> Result<BTreeMap<(Target, String), Module>, String> {
    let mut parts: Parts = BTreeMap::new();
    let mut unknown: Vec<String> = Vec::new();
    for (key, t) in tensors {
        let Some((target, module, part)) = classify(&key) else {
            unknown.push(key);
            continue;
        };
        let entry = parts.entry((target, module)).or_default();
        let f32 = |t: Tensor| t.to_dtype(DType::F32).map_err(|e| format!("{key}: {e}"));
        match part {
            "down" => entry.0 = Some(f32(t)?),
            "up" => entry.1 = Some(f32(t)?),
            _ => {
                let a = f32(t)?.flatten_all().and_then(|t| t.to_vec1::<f32>());
                entry.2 = a.ok().and_then(|v| v.first().copied()).map(f64::from);
            }
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(format!(
            "{} tensors are not LoRA weights Tessera reads (kohya lora_down/lora_up/alpha or \
             PEFT lora_A/lora_B; first: {})",
            unknown.len(),
            unknown
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let mut out = BTreeMap::new();
    for ((target, module), (down, up, alpha)) in parts {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(format!(
                "module {module} lacks its down (A) or up (B) weight"
            ));
        };
        let rank = down.dim(0).map_err(|e| e.to_string())?;
        let alpha = alpha
            .or_else(|| peft_alpha(metadata, target))
            .unwrap_or(rank as f64);
        let scale = alpha / rank.max(1) as f64;
        out.insert((target, module), Module { down, up, scale });
    }
    Ok(out)
}

fn peft_alpha(metadata: &serde_json::Value, target: Target) -> Option<f64> {
    let prefix = match target {
        Target::Unet => "unet",
        Target::TextEncoder => "text_encoder",
        Target::TextEncoder2 => "text_encoder_2",
    };
    metadata.get(format!("{prefix}.lora_alpha"))?.as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_flags_and_key_formats_are_read() {
        assert_eq!(LoraSpec::parse("a.safetensors").unwrap().weight, 1.0);
        let s = LoraSpec::parse("dir:x/b.safetensors:0.6").unwrap();
        assert_eq!(
            (s.path, s.weight),
            (PathBuf::from("dir:x/b.safetensors"), 0.6)
        );
        assert!(LoraSpec::parse("b.safetensors:inf").is_err());
        let k = classify("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight").unwrap();
        assert_eq!(
            (k.0, k.1.as_str(), k.2),
            (Target::Unet, "down_blocks_1_attentions_0_proj_in", "down")
        );
        let k = classify("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight")
            .unwrap();
        assert_eq!(
            (k.0, k.1.as_str(), k.2),
            (
                Target::TextEncoder,
                "encoder_layers_0_self_attn_q_proj",
                "up"
            )
        );
        let k = classify("lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha").unwrap();
        assert_eq!(
            (k.0, k.1.as_str()),
            (Target::TextEncoder2, "encoder_layers_1_mlp_fc1")
        );
        assert!(classify("unet.down_blocks.0.lora.down.weight").is_none());
    }

    #[test]
    fn a_locon_delta_has_the_convolutions_shape() {
        let dev = Device::Cpu;
        let m = Module {
            down: Tensor::ones((2, 3, 3, 3), DType::F32, &dev).unwrap(),
            up: Tensor::ones((4, 2, 1, 1), DType::F32, &dev).unwrap(),
            scale: 0.5,
        };
        let d = module_delta(&m, &Shape::from((4, 3, 3, 3)), "k").unwrap();
        assert_eq!(d.dims(), &[4, 3, 3, 3]);
        assert_eq!(d.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], 1.0);
        assert!(module_delta(&m, &Shape::from((4, 3)), "k").is_err());
    }

    #[test]
    fn merged_weights_follow_the_fuse_formula_and_leftovers_are_named() {
        let dev = Device::Cpu;
        let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &dev).unwrap();
        let path =
            std::env::temp_dir().join(format!("tessera-lora-{}.safetensors", std::process::id()));
        let tensors = std::collections::HashMap::from([
            (
                "lora_unet_a.lora_down.weight".to_string(),
                t(&[1.0, 2.0], &[1, 2]),
            ),
            (
                "lora_unet_a.lora_up.weight".to_string(),
                t(&[3.0, 4.0], &[2, 1]),
            ),
            ("lora_unet_a.alpha".to_string(), t(&[2.0], &[])),
            (
                "lora_unet_b.lora_down.weight".to_string(),
                t(&[1.0], &[1, 1]),
            ),
            ("lora_unet_b.lora_up.weight".to_string(), t(&[1.0], &[1, 1])),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let spec = LoraSpec {
            path: path.clone(),
            weight: 0.5,
        };
        let set = Arc::new(LoraSet::load(&[spec]).unwrap());
        let _ = std::fs::remove_file(&path);
        let base = std::collections::HashMap::from([(
            "a.weight".to_string(),
            Tensor::zeros((2, 2), DType::F32, &dev).unwrap(),
        )]);
        let inner = VarBuilder::from_tensors(base, DType::F32, &dev);
        let vb = set.wrap(Target::Unet, inner, None);
        let w = vb
            .get((2, 2), "a.weight")
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // 0.5 (weight) · 2/1 (alpha/rank) · up·down
        assert_eq!(w, vec![vec![3.0, 6.0], vec![4.0, 8.0]]);
        let e = set.check_all_used().unwrap_err();
        assert!(
            e.contains("1 of its 2 modules") && e.contains("unet b"),
            "{e}"
        );
    }
}
