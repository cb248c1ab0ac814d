//! The cascade plan of a job: its stages, the timesteps the model is evaluated at, the views of
//! every step and what they cost. Resolves every method default, so the engine executes the
//! plan without deciding anything itself, and `tessera plan` prints exactly what will run.

use serde::{Deserialize, Serialize};

use crate::family::{Family, PlanPreset, SchedulerFamily};
use crate::method::frecas::{self, FrecasPreset, StageSpec};
use crate::method::freescale::{self, DilationSchedule, DEFAULT_COSINE_SCALE, DEFAULT_DILATE_TAU};
use crate::method::guidance;
use crate::method::params::{Method, MethodSpec, TileWeights};
use crate::resize::ResizeFilter;
use crate::sched::{dynamic_mu, Scheduler, SchedulerConfig, SchedulerKind};
use crate::spec::{
    check_side_multiple, check_side_range, latent_pixels, RenderSpec, Size, SpecError,
    PIXELS_PER_LATENT, SIZE_MULTIPLE,
};
use crate::tiling::{GlobalViewConfig, GlobalViews, LocalViewConfig, LocalViews};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

impl From<SpecError> for PlanError {
    fn from(e: SpecError) -> Self {
        PlanError(e.0)
    }
}

pub type Result<T> = std::result::Result<T, PlanError>;

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(PlanError(msg.into()))
}

/// Default views per model call.
pub const DEFAULT_VIEW_BATCH: usize = 4;
/// FreeScale's reference step count; `dilate_tau` counts in its steps.
const FREESCALE_REFERENCE_STEPS: usize = 50;
/// Text tokens of a CLIP prompt (the CA-map's channel count for SD 2.x and SDXL).
const CLIP_TEXT_TOKENS: usize = 77;

fn default_text_tokens() -> usize {
    CLIP_TEXT_TOKENS
}

/// What planning needs to know about a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchInfo {
    /// Preset name or model directory, for the report.
    pub name: String,
    pub family: Family,
    /// Training size in pixels (square).
    pub training_size: u32,
    pub latent_channels: usize,
    pub scheduler: SchedulerConfig,
    /// Parameters of UNet, VAE and text encoders together.
    pub parameters: u64,
    /// Bytes per weight on the worker (2 for f16 on a GPU, 4 for f32 on a CPU).
    pub weight_bytes: u64,
    /// Channels of the UNet's first block (activations scale with it).
    pub base_channels: usize,
    /// Text tokens the denoiser attends to (the CA-map's channel count).
    #[serde(default = "default_text_tokens")]
    pub text_tokens: usize,
    /// The largest latent side one model call accepts (SD3: its position embeddings'
    /// `pos_embed_max_size` × patch size); none for a UNet.
    #[serde(default)]
    pub max_view_latent: Option<usize>,
}

impl ArchInfo {
    /// A built-in preset of [`crate::family::PLAN_PRESETS`]: `sdxl` (SDXL base 1.0), `sd21` (SD 2.1, 768,
    /// v-prediction), `sd21-base` (SD 2.1 base, 512, epsilon).
    pub fn preset(name: &str) -> Result<Self> {
        let Some(p) = PlanPreset::find(name) else {
            return invalid(format!(
                "architecture {name:?} is not a preset: use {}, or --model DIR",
                PlanPreset::names()
            ));
        };
        Ok(Self {
            name: name.into(),
            family: p.family,
            training_size: p.training_size,
            latent_channels: p.family.info().latent_channels,
            scheduler: p
                .scheduler_config()
                .map_err(|e| PlanError(format!("preset scheduler: {e}")))?,
            parameters: p.parameters,
            weight_bytes: 2,
            base_channels: p.base_channels,
            text_tokens: p.text_tokens,
            max_view_latent: p.max_view_latent,
        })
    }

    fn flow_matching(&self) -> bool {
        self.family.info().scheduler == SchedulerFamily::FlowMatching
    }

    /// diffusers' `mu` for a latent of `latent` (h, w) when the scheduler shifts by the
    /// image size.
    fn shift_mu(&self, latent: [usize; 2]) -> Option<f64> {
        let p = self.family.info().patch_size.max(1);
        self.scheduler
            .use_dynamic_shifting
            .then(|| dynamic_mu(&self.scheduler, (latent[0] / p) * (latent[1] / p)))
    }

    fn training_latent(&self) -> usize {
        (self.training_size / PIXELS_PER_LATENT) as usize
    }
}

/// How a stage's timesteps are stepped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StageSchedule {
    /// Steps `start..steps` of a diffusers schedule of `steps` steps (`mu`: the shift of a
    /// flow-matching schedule that shifts by the image size).
    Schedule {
        scheduler: SchedulerKind,
        steps: usize,
        start: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mu: Option<f64>,
    },
    /// FreCaS: DDIM from each listed timestep back by `1000 / inference_steps`.
    Frecas { inference_steps: usize },
    /// FreCaS on a flow-matching model: entries `indices` of the shifted 1000-step schedule,
    /// each step from one entry to the next (the last to the entry after it).
    FrecasFlow {
        indices: Vec<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mu: Option<f64>,
    },
}

/// Guidance applied to a stage's merged predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuidancePlan {
    /// Conditional prediction only (guidance ≤ 1).
    None,
    Cfg {
        scale: f64,
    },
    /// FreCaS' frequency-aware CFG; `low_latent` is the previous stage's latent (h, w).
    FaCfg {
        high: f64,
        low: f64,
        low_latent: [usize; 2],
    },
}

/// Where a stage's starting latent comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StageEntry {
    /// Seeded Gaussian noise (or `--latents`).
    Noise,
    /// `--init-image`, resized and encoded; the stage runs no steps.
    InitImage { filter: ResizeFilter },
    /// The previous stage's result, decoded, resized, encoded and noised.
    Previous {
        /// True: its last predicted clean latent (FreCaS); false: its final latent.
        from_predicted_x0: bool,
        filter: ResizeFilter,
    },
}

/// FreeScale's restrained structure in a stage > 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestraintPlan {
    pub cosine_scale: f64,
    /// Exponent outside the mask, when a mask is given.
    pub cosine_scale_bg: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    /// [width, height] in pixels.
    pub size: [u32; 2],
    /// Latent [height, width].
    pub latent: [usize; 2],
    pub entry: StageEntry,
    /// Timesteps the model is evaluated at, in order (empty for an init-image stage).
    pub timesteps: Vec<f64>,
    pub schedule: StageSchedule,
    /// Latent [height, width] of a local view.
    pub tile: [usize; 2],
    pub tile_overlap: f64,
    pub tile_weights: TileWeights,
    pub local_views: usize,
    pub global_views: usize,
    /// Kernel scale s of the latent-level fusion G (kernel 2s − 1); 0 when there is none.
    pub fusion_scale: usize,
    /// Each view is larger than the training size: FreeScale's scale fusion inside the UNet.
    pub in_unet_fusion: bool,
    /// FreeScale's fast mode for the in-UNet global branch.
    pub fast: bool,
    /// Conv dilation inside views larger than the training size (1: none) and how many of the
    /// stage's steps use it.
    pub dilation: usize,
    pub dilated_steps: usize,
    pub freeu: bool,
    pub guidance: GuidancePlan,
    pub restraint: Option<RestraintPlan>,
    /// Capture cross-attention maps at the stage's last step.
    pub camap_capture: bool,
    /// Reuse weight of the previous stage's maps.
    pub camap_inject: Option<f64>,
    pub evaluations_per_step: usize,
    pub evaluations: usize,
}

impl StagePlan {
    pub fn latent_hw(&self) -> (usize, usize) {
        (self.latent[0], self.latent[1])
    }

    /// Model calls per step: local and global views go out in separate batches of up to
    /// `view_batch`. A step on W workers runs in about ⌈tasks / W⌉ rounds of calls.
    pub fn tasks_per_step(&self, view_batch: usize) -> usize {
        let b = view_batch.max(1);
        self.local_views.div_ceil(b) + self.global_views.div_ceil(b)
    }

    /// One local view covers the whole latent: no tiling, no global views.
    pub fn is_whole(&self) -> bool {
        self.local_views == 1 && self.global_views == 0
    }

    pub fn local_config(&self) -> LocalViewConfig {
        local_view_config(self.tile[0].max(self.tile[1]), self.tile_overlap)
    }

    pub fn global_config(&self) -> GlobalViewConfig {
        GlobalViewConfig::for_training_size(self.tile[0].max(self.tile[1]))
    }

    /// The stage's FreeScale dilation: [`Self::dilation`] for its first
    /// [`Self::dilated_steps`] steps.
    pub fn dilation_schedule(&self) -> DilationSchedule {
        DilationSchedule {
            factor: self.dilation,
            steps: self.dilated_steps,
        }
    }
}

/// Local tiles of side `window` at `overlap`: the reference's jitter of up to window / 8,
/// capped so neighbours drifting apart by twice the jitter still overlap.
pub fn local_view_config(window: usize, overlap: f64) -> LocalViewConfig {
    let stride = ((window as f64 * (1.0 - overlap)).round() as usize).max(1);
    LocalViewConfig {
        window,
        overlap,
        jitter_range: (window / 8).min(window.saturating_sub(stride) / 2),
        padding: Default::default(),
    }
}

/// Rough peak memory, in bytes (formulas in `estimate_memory`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    pub coordinator_bytes: u64,
    pub worker_weights_bytes: u64,
    pub worker_activation_bytes: u64,
    pub worker_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub method: Method,
    pub arch: String,
    /// SDXL's latent space (its preview colours differ from SD 2.1's).
    #[serde(default)]
    pub sdxl: bool,
    /// Training size in pixels.
    pub training_size: u32,
    pub guided: bool,
    pub view_batch: usize,
    /// SDXL size conditioning (height, width) used by every view: the base stage's size.
    pub size_conditioning: [u32; 2],
    pub stages: Vec<StagePlan>,
    pub total_evaluations: usize,
    pub memory: MemoryEstimate,
}

/// Doubling stages from the training size up to `size`: as many as it takes for the largest
/// side, each an exact halving of the next (rounded to the 64-pixel grid).
pub fn default_stages(size: Size, training: u32) -> Vec<Size> {
    let ratio = f64::from(size.width.max(size.height)) / f64::from(training);
    if ratio <= 1.0 {
        return vec![size];
    }
    let n = 1 + ratio.log2().ceil() as u32;
    let round = |v: u32, k: u32| -> u32 {
        let x = f64::from(v) / f64::from(1u32 << k) / 64.0;
        ((x.round() as u32).max(1)) * 64
    };
    (0..n)
        .map(|k| {
            let d = n - 1 - k;
            if d == 0 {
                return size;
            }
            Size {
                width: round(size.width, d),
                height: round(size.height, d),
            }
        })
        .collect()
}

/// Pixels a side must be a multiple of under `method`: one latent pixel for plain sampling (as
/// diffusers' pipelines accept), 8 for cascades, whose tiles and strided views must line up
/// with the UNet's grid.
/// Cascade stages are tiled and strided: whole multiples of 8 latent pixels keep tiles, strided
/// views and the denoiser's grid aligned. A single stage needs whole latent pixels, and for a
/// transformer whole patches (SD3: 2×2 latent pixels, so 16 px).
fn side_multiple(method: Method, arch: &ArchInfo) -> u32 {
    if method == Method::Single {
        PIXELS_PER_LATENT * arch.family.info().patch_size as u32
    } else {
        SIZE_MULTIPLE
    }
}

fn on_grid(size: Size, multiple: u32) -> bool {
    size.width.is_multiple_of(multiple) && size.height.is_multiple_of(multiple)
}

fn resolve_stages(spec: &RenderSpec, arch: &ArchInfo, method: Method) -> Result<Vec<Size>> {
    let target = Size {
        width: spec.width,
        height: spec.height,
    };
    let multiple = side_multiple(method, arch);
    let Some(given) = &spec.method.stages else {
        // The stages derive from --size (their halves are put on the grid), so only --size
        // can break a rule, and the fix offered must keep every rule at once.
        if !on_grid(target, multiple) {
            return invalid(size_off_grid(spec, arch, method));
        }
        return Ok(match method {
            Method::Single => vec![target],
            _ => default_stages(target, arch.training_size),
        });
    };
    if given.is_empty() {
        return invalid("--stages is empty: list sizes like 1024x1024,2048x2048");
    }
    for (k, s) in given.iter().enumerate() {
        let name = format!("--stages' {} ({s})", listed_stage(k + 1));
        check_side_multiple(&format!("{name}: width"), s.width, multiple)?;
        check_side_multiple(&format!("{name}: height"), s.height, multiple)?;
        if k > 0 {
            let p = given[k - 1];
            if s.width < p.width || s.height < p.height || *s == p {
                return invalid(format!(
                    "--stages: {s} is not larger than {p} before it: list the stages smallest first"
                ));
            }
        }
    }
    let last = *given.last().expect("not empty");
    if last != target {
        return invalid(format!(
            "the last of --stages is {last} but --size is {target}: make them equal (or drop \
             --size: it defaults to the last stage)"
        ));
    }
    if method == Method::Single && given.len() > 1 {
        return invalid(
            "--method single renders one stage: drop --stages or pick a cascade method",
        );
    }
    Ok(given.clone())
}

/// "first stage", "second stage", … of the stages a user listed (counted from 1, as people
/// count them).
fn listed_stage(n: usize) -> String {
    match n {
        1 => "first stage".into(),
        2 => "second stage".into(),
        3 => "third stage".into(),
        n => format!("stage {n}"),
    }
}

/// The refusal of a `--size` off the method's grid, with the nearest sizes below and above it
/// that keep every size rule (the method a size resolves to may change with it).
fn size_off_grid(spec: &RenderSpec, arch: &ArchInfo, method: Method) -> String {
    let multiple = side_multiple(method, arch);
    let size = Size {
        width: spec.width,
        height: spec.height,
    };
    let why = if method == Method::Single {
        match multiple / PIXELS_PER_LATENT {
            1 => format!("{multiple} pixels (one latent pixel)"),
            p => format!("{multiple} pixels (one {p}×{p}-latent-pixel patch of the transformer)"),
        }
    } else {
        format!(
            "{multiple} pixels{}, as the {method} cascade needs",
            latent_pixels(multiple)
        )
    };
    let fixes: Vec<String> = nearest_valid_sizes(spec, arch, size)
        .iter()
        .map(|s| format!("--size {s}"))
        .collect();
    let hint = match fixes.as_slice() {
        [] => String::new(),
        [one] => format!(": use {one}"),
        [a, b, ..] => format!(": use {a} or {b}"),
    };
    format!("--size {size}: each side must be a multiple of {why}{hint}")
}

/// The nearest size at or below `size` and the nearest at or above it that pass every size
/// rule for `spec` without --stages: in range, on the grid of the method each resolves to.
fn nearest_valid_sizes(spec: &RenderSpec, arch: &ArchInfo, size: Size) -> Vec<Size> {
    let round = |v: u32, m: u32, up: bool| if up { v.div_ceil(m) * m } else { v / m * m };
    let mut found: Vec<Size> = Vec::new();
    for up in [false, true] {
        let nearest = [side_multiple(Method::Single, arch), SIZE_MULTIPLE]
            .into_iter()
            .map(|m| Size {
                width: round(size.width, m, up),
                height: round(size.height, m, up),
            })
            .find(|&s| keeps_size_rules(spec, arch, s));
        if let Some(s) = nearest.filter(|s| !found.contains(s)) {
            found.push(s);
        }
    }
    found
}

fn keeps_size_rules(spec: &RenderSpec, arch: &ArchInfo, size: Size) -> bool {
    let probe = RenderSpec {
        width: size.width,
        height: size.height,
        method: MethodSpec {
            stages: None,
            ..spec.method.clone()
        },
        ..spec.clone()
    };
    let method = resolve_method(&probe, arch);
    check_side_range("--size width", size.width).is_ok()
        && check_side_range("--size height", size.height).is_ok()
        && on_grid(size, side_multiple(method, arch))
        && resolve_stages(&probe, arch, method).is_ok()
}

/// FreCaS stage timing: the user's `--end-times`/`--stage-steps`, else the reference preset
/// for this many stages, else the 3-stage pattern stretched (first 400/30, middle 200/5,
/// last 0/15).
fn frecas_timing(
    ms: &MethodSpec,
    arch: &ArchInfo,
    sizes: &[Size],
    total_steps: usize,
) -> Result<(Vec<StageSpec>, FrecasPreset)> {
    let n = sizes.len();
    let preset = frecas_preset(arch.family, n);
    let ends = ms
        .end_times
        .clone()
        .unwrap_or_else(|| preset.stages.iter().map(|s| s.end_time).collect());
    let steps = match &ms.stage_steps {
        Some(s) => s.clone(),
        None => split_steps(
            &preset.stages.iter().map(|s| s.steps).collect::<Vec<_>>(),
            total_steps,
        )?,
    };
    if ends.len() != n {
        return invalid(format!(
            "--end-times lists {} values for {n} stages: give one per stage",
            ends.len()
        ));
    }
    if steps.len() != n {
        return invalid(format!(
            "--stage-steps lists {} values for {n} stages: give one per stage",
            steps.len()
        ));
    }
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        if steps[k] == 0 || steps[k] > crate::spec::MAX_STEPS {
            return invalid(format!(
                "stage {k} has {} steps: use 1 to {}",
                steps[k],
                crate::spec::MAX_STEPS
            ));
        }
        if ends[k] >= arch.scheduler.num_train_timesteps {
            return invalid(format!(
                "end time {} of stage {k} is not a training timestep (0 to {})",
                ends[k],
                arch.scheduler.num_train_timesteps - 1
            ));
        }
        out.push(StageSpec {
            size: (sizes[k].height as usize, sizes[k].width as usize),
            end_time: ends[k],
            steps: steps[k],
        });
    }
    Ok((out, preset))
}

/// The reference preset for `n` stages, else the 3-stage pattern stretched to `n` (first
/// 400/30, middle 200/5, last 0/15; one stage 0/50) with the model's preset weights.
fn frecas_preset(family: Family, n: usize) -> FrecasPreset {
    if let Some(p) = FrecasPreset::reference(family, n) {
        return p;
    }
    let mut p = FrecasPreset::weights_of(family);
    p.stages = (0..n)
        .map(|k| {
            let (end_time, steps) = match (k, n) {
                (_, 1) => (0, 50),
                (0, _) => (400, 30),
                (k, n) if k + 1 == n => (0, 15),
                _ => (200, 5),
            };
            StageSpec {
                size: (0, 0),
                end_time,
                steps,
            }
        })
        .collect();
    p
}

/// `--steps` spread over the stages in the preset's proportions (every reference preset has
/// 50 steps in all, so the default of 50 gives the preset itself); each stage gets at least
/// two steps (a FreCaS stage's DDIM stride comes from steps − 1) and the total is kept.
pub fn split_steps(preset: &[usize], total: usize) -> Result<Vec<usize>> {
    let n = preset.len();
    if total < 2 * n {
        return invalid(format!(
            "--steps {total} is too few for {n} FreCaS-timed stages: give at least {} (two per \
             stage), or --stage-steps",
            2 * n
        ));
    }
    let sum: usize = preset.iter().sum();
    let mut out: Vec<usize> = preset
        .iter()
        .map(|&p| ((p * total) as f64 / sum as f64).round().max(2.0) as usize)
        .collect();
    // Settle rounding on the largest stages so the total is exact.
    while out.iter().sum::<usize>() > total {
        let i = (0..n).max_by_key(|&i| (out[i], n - i)).expect("n > 0");
        out[i] -= 1;
    }
    while out.iter().sum::<usize>() < total {
        let i = (0..n).max_by_key(|&i| (preset[i], n - i)).expect("n > 0");
        out[i] += 1;
    }
    Ok(out)
}

fn check_fraction(name: &str, v: f64, range: std::ops::RangeInclusive<f64>) -> Result<()> {
    if !v.is_finite() || !range.contains(&v) {
        return invalid(format!(
            "{name} {v} is out of range: use {} to {}",
            range.start(),
            range.end()
        ));
    }
    Ok(())
}

/// Resolves the method defaults of `spec` for `arch` and lays out every stage, in the order
/// of a diffusers pipeline: check the inputs, resolve the method and its stages, time the
/// stages, lay each one out, estimate the memory.
pub fn plan(spec: &RenderSpec, arch: &ArchInfo) -> Result<Plan> {
    spec.validate()?;
    let method = resolve_method(spec, arch);
    let sizes = resolve_stages(spec, arch, method)?;
    let settings = Settings::resolve(spec, arch, method, sizes.len())?;
    let timing = stage_timing(spec, arch, &settings, &sizes)?;
    let layout = Layout {
        spec,
        max_view_latent: arch.max_view_latent,
        settings: &settings,
        sizes: &sizes,
        facfg: timing.facfg,
        camap: timing.camap,
    };
    let mut stages = sizes
        .iter()
        .zip(timing.stages)
        .enumerate()
        .map(|(k, (size, t))| layout.stage(k, size, t))
        .collect::<Result<Vec<_>>>()?;
    drop_camap_of_a_stage_without_steps(&mut stages);
    let memory = estimate_memory(&stages, arch, settings.view_batch, settings.guided);
    Ok(Plan {
        method,
        arch: arch.name.clone(),
        sdxl: arch.family == Family::Sdxl,
        training_size: arch.training_size,
        guided: settings.guided,
        view_batch: settings.view_batch,
        size_conditioning: [sizes[0].height, sizes[0].width],
        total_evaluations: stages.iter().map(|s| s.evaluations).sum(),
        stages,
        memory,
    })
}

/// `--method`, else single when the picture fits the training size in one stage, else
/// hybrid.
fn resolve_method(spec: &RenderSpec, arch: &ArchInfo) -> Method {
    let ms = &spec.method;
    if let Some(m) = ms.method {
        return m;
    }
    let fits = spec.width <= arch.training_size && spec.height <= arch.training_size;
    if fits && ms.stages.as_ref().is_none_or(|s| s.len() <= 1) {
        Method::Single
    } else {
        Method::Hybrid
    }
}

/// The method settings every stage shares, defaults resolved and checked.
#[derive(Debug, Clone)]
struct Settings {
    method: Method,
    guided: bool,
    /// FreCaS' timing, FA-CFG and CA-maps (frecas, hybrid).
    frecas_like: bool,
    /// FreeScale's restraint, dilation and FreeU (freescale, hybrid).
    freescale_like: bool,
    /// Latent side of the training size.
    training_latent: usize,
    cosine_scale: f64,
    overlap: f64,
    view_batch: usize,
    dilate_tau: usize,
    /// Latent side of a local view.
    tile_latent: usize,
    freeu: bool,
    /// FreeScale's dilated convolutions, where the family has convolutions to dilate.
    dilation: bool,
    filter: ResizeFilter,
}

impl Settings {
    fn resolve(spec: &RenderSpec, arch: &ArchInfo, method: Method, n: usize) -> Result<Self> {
        let ms = &spec.method;
        let frecas_like = matches!(method, Method::Frecas | Method::Hybrid);
        let freescale_like = matches!(method, Method::Freescale | Method::Hybrid);
        check_method_flags(spec, arch, method, n)?;
        let cosine_scale = ms.cosine_scale.unwrap_or(DEFAULT_COSINE_SCALE);
        check_fraction("--cosine-scale", cosine_scale, 0.0..=100.0)?;
        if let Some(bg) = ms.cosine_scale_bg {
            check_fraction("--cosine-scale-bg", bg, 0.0..=100.0)?;
        }
        let overlap = ms.tile_overlap.unwrap_or(0.5);
        check_fraction("--tile-overlap", overlap, 0.0..=0.9)?;
        let view_batch = ms.view_batch.unwrap_or(DEFAULT_VIEW_BATCH);
        if view_batch == 0 || view_batch > 256 {
            return invalid(format!("--view-batch {view_batch}: use 1 to 256"));
        }
        let tile_px = ms.tile_size.unwrap_or(arch.training_size);
        check_side_multiple("--tile-size", tile_px, SIZE_MULTIPLE)?;
        Ok(Self {
            method,
            guided: guidance::uses_guidance(spec.guidance),
            frecas_like,
            freescale_like,
            training_latent: arch.training_latent(),
            cosine_scale,
            overlap,
            view_batch,
            dilate_tau: ms.dilate_tau.unwrap_or(DEFAULT_DILATE_TAU),
            tile_latent: (tile_px / PIXELS_PER_LATENT) as usize,
            freeu: ms.freeu.unwrap_or(freescale_like) && arch.family.info().hooks.freeu,
            dilation: arch.family.info().hooks.dilation,
            filter: ms.resize.unwrap_or(if method == Method::Frecas {
                ResizeFilter::Nearest
            } else {
                ResizeFilter::Bicubic
            }),
        })
    }
}

/// Flags that only some methods, or only cascades, or only some model families, can honour.
fn check_method_flags(spec: &RenderSpec, arch: &ArchInfo, method: Method, n: usize) -> Result<()> {
    let ms = &spec.method;
    check_family_flags(spec, arch)?;
    let frecas_like = matches!(method, Method::Frecas | Method::Hybrid);
    let freescale_like = matches!(method, Method::Freescale | Method::Hybrid);
    if ms.mask && !freescale_like {
        return invalid(format!(
            "--mask shapes FreeScale's restrained structure, which {method} does not use: \
             use --method freescale or hybrid"
        ));
    }
    if ms.mask && !ms.init_image && n < 2 {
        return invalid("--mask acts on stages after the first: render at least two stages");
    }
    if ms.init_image && n < 2 {
        return invalid(
            "--init-image upscales a picture: give a --size (or --stages) larger than the first stage",
        );
    }
    if frecas_like && !arch.flow_matching() && spec.scheduler == Some(SchedulerKind::Euler) {
        return invalid(format!(
            "{method} steps its stages with DDIM (FreCaS' timing): drop --scheduler, or use \
             --method freescale for Euler"
        ));
    }
    Ok(())
}

/// FreeScale's dilation and FreeU change UNet convolutions and skips: a family without them
/// (SD3's transformer) refuses the flags; a flow-matching family steps with flow-matching
/// Euler only.
fn check_family_flags(spec: &RenderSpec, arch: &ArchInfo) -> Result<()> {
    let (ms, info) = (&spec.method, arch.family.info());
    if ms.freeu == Some(true) && !info.hooks.freeu {
        return invalid(format!(
            "--freeu scales a UNet's backbone and skips; {} ({}) is a transformer without \
             them: drop --freeu",
            info.checkpoints, info.pipeline_class
        ));
    }
    if ms.dilate_tau.is_some() && !info.hooks.dilation {
        return invalid(format!(
            "--dilate-tau sets FreeScale's dilated UNet convolutions; {} ({}) has none: drop \
             --dilate-tau",
            info.checkpoints, info.pipeline_class
        ));
    }
    if arch.flow_matching() && spec.scheduler == Some(SchedulerKind::Ddim) {
        return invalid(format!(
            "{} is a flow-matching model: it steps with flow-matching Euler, not DDIM: drop \
             --scheduler (or pass --scheduler euler)",
            info.checkpoints
        ));
    }
    if !arch.flow_matching() && spec.scheduler == Some(SchedulerKind::FlowEuler) {
        return invalid(
            "--scheduler flow-euler is for flow-matching models (SD3): use ddim or euler",
        );
    }
    Ok(())
}

/// The timesteps of one stage and how they are stepped.
#[derive(Debug, Clone, PartialEq)]
struct StageTiming {
    timesteps: Vec<f64>,
    schedule: StageSchedule,
}

/// Every stage's timing, and the FreCaS weights chosen with it.
#[derive(Debug, Clone, PartialEq)]
struct Timing {
    stages: Vec<StageTiming>,
    /// FA-CFG `[high, low]`.
    facfg: [f64; 2],
    /// CA-map reuse weight.
    camap: f64,
}

/// FreCaS' timing for the FreCaS-like methods, else steps of one diffusers schedule.
fn stage_timing(
    spec: &RenderSpec,
    arch: &ArchInfo,
    settings: &Settings,
    sizes: &[Size],
) -> Result<Timing> {
    if settings.frecas_like {
        frecas_stage_timing(spec, arch, sizes)
    } else {
        Ok(Timing {
            stages: schedule_stage_timing(spec, arch, settings.method, sizes)?,
            facfg: [35.0, 7.5],
            camap: 0.0,
        })
    }
}

/// FreCaS: each stage DDIM-stepped (a flow-matching model: Euler-stepped along its shifted
/// schedule) from its start time to its end time, with the preset's gamma, FA-CFG weights
/// and CA-map weight unless given.
fn frecas_stage_timing(spec: &RenderSpec, arch: &ArchInfo, sizes: &[Size]) -> Result<Timing> {
    let ms = &spec.method;
    let (stage_specs, preset) = frecas_timing(ms, arch, sizes, spec.steps)?;
    let gamma = ms.gamma.unwrap_or(preset.gamma);
    check_fraction("--gamma", gamma, 0.01..=10.0)?;
    let facfg = ms.facfg.unwrap_or(preset.facfg);
    for w in facfg {
        check_fraction("--facfg weight", w, 0.0..=100.0)?;
    }
    let camap = ms.camap.unwrap_or(preset.camap_weight);
    check_fraction("--camap", camap, 0.0..=1.0)?;
    let stages = if arch.flow_matching() {
        frecas_flow_timing(arch, &stage_specs, sizes)?
    } else {
        let alphas = arch
            .scheduler
            .alphas_cumprod()
            .map_err(|e| PlanError(e.to_string()))?;
        frecas::plan_stages(&stage_specs, gamma, &alphas)
            .map_err(|e| PlanError(e.to_string()))?
            .into_iter()
            .map(|p| StageTiming {
                timesteps: p.timesteps.iter().map(|&t| t as f64).collect(),
                schedule: StageSchedule::Frecas {
                    inference_steps: p.ddim_inference_steps,
                },
            })
            .collect()
    };
    Ok(Timing {
        stages,
        facfg,
        camap,
    })
}

/// FreCaS on a flow-matching model: each stage's entries of the 1000-step shifted schedule
/// (the scheduler shifting by the first stage's size where it shifts by size).
fn frecas_flow_timing(
    arch: &ArchInfo,
    stage_specs: &[StageSpec],
    sizes: &[Size],
) -> Result<Vec<StageTiming>> {
    let mu = arch.shift_mu(latent_of(&sizes[0]));
    let n_train = arch.scheduler.num_train_timesteps;
    let full =
        Scheduler::flow(&arch.scheduler, n_train, mu).map_err(|e| PlanError(e.to_string()))?;
    let planned = frecas::plan_flow_stages(stage_specs).map_err(|e| PlanError(e.to_string()))?;
    planned
        .into_iter()
        .map(|p| {
            let timesteps = p
                .indices
                .iter()
                .map(|&i| {
                    full.timesteps().get(i).copied().ok_or_else(|| {
                        PlanError(format!("schedule entry {i} is past the model's {n_train}"))
                    })
                })
                .collect::<Result<Vec<f64>>>()?;
            Ok(StageTiming {
                timesteps,
                schedule: StageSchedule::FrecasFlow {
                    indices: p.indices,
                    mu,
                },
            })
        })
        .collect()
}

/// FreeScale's timing: the first stage runs the whole schedule, the later ones restart at
/// `--restart-step` (default int(0.3 · steps)).
fn schedule_stage_timing(
    spec: &RenderSpec,
    arch: &ArchInfo,
    method: Method,
    sizes: &[Size],
) -> Result<Vec<StageTiming>> {
    let n = sizes.len();
    let kind = match (spec.scheduler, method) {
        // A flow-matching model has one sampler (check_family_flags refused DDIM).
        _ if arch.flow_matching() => SchedulerKind::FlowEuler,
        (Some(k), _) => k,
        (None, Method::Freescale) => SchedulerKind::Euler,
        (None, _) => arch
            .scheduler
            .kind()
            .map_err(|e| PlanError(e.to_string()))?,
    };
    let mu = arch.shift_mu(latent_of(&sizes[0]));
    let sched = match kind {
        SchedulerKind::FlowEuler => Scheduler::flow(&arch.scheduler, spec.steps, mu),
        _ => Scheduler::new(kind, &arch.scheduler, spec.steps),
    }
    .map_err(|e| PlanError(e.to_string()))?;
    let restart = spec
        .method
        .restart_step
        .unwrap_or_else(|| freescale::restart_index(spec.steps));
    if n > 1 && restart >= spec.steps {
        return invalid(format!(
            "--restart-step {restart} leaves no steps of {}: use 0 to {}",
            spec.steps,
            spec.steps - 1
        ));
    }
    Ok((0..n)
        .map(|k| {
            let start = if k == 0 { 0 } else { restart };
            StageTiming {
                timesteps: sched.timesteps()[start..].to_vec(),
                schedule: StageSchedule::Schedule {
                    scheduler: kind,
                    steps: spec.steps,
                    start,
                    mu,
                },
            }
        })
        .collect())
}

/// Latent [height, width] of a size in pixels.
fn latent_of(size: &Size) -> [usize; 2] {
    [
        (size.height / PIXELS_PER_LATENT) as usize,
        (size.width / PIXELS_PER_LATENT) as usize,
    ]
}

/// How a stage's latent is cut into views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StageViews {
    /// Latent [height, width] of a local view.
    tile: [usize; 2],
    local: usize,
    global: usize,
}

/// The views of stage `k`: one whole view when the latent fits a tile (or for single), else
/// the overlapping local tiles and, unless `no_fusion`, the strided global views.
fn stage_views(
    k: usize,
    latent: [usize; 2],
    settings: &Settings,
    no_fusion: bool,
) -> Result<StageViews> {
    let tile_latent = settings.tile_latent;
    let whole =
        settings.method == Method::Single || (latent[0] <= tile_latent && latent[1] <= tile_latent);
    if whole {
        return Ok(StageViews {
            tile: latent,
            local: 1,
            global: 0,
        });
    }
    let in_stage = |e: crate::error::MathError| PlanError(format!("stage {k}: {e}"));
    let local = LocalViews::new(
        latent[0],
        latent[1],
        &local_view_config(tile_latent, settings.overlap),
        None,
    )
    .map_err(in_stage)?
    .len();
    let global = if no_fusion {
        0
    } else {
        GlobalViews::new(
            latent[0],
            latent[1],
            &GlobalViewConfig::for_training_size(tile_latent),
        )
        .map_err(in_stage)?
        .len()
    };
    Ok(StageViews {
        tile: [tile_latent.min(latent[0]), tile_latent.min(latent[1])],
        local,
        global,
    })
}

/// Kernel scale s of the latent-level fusion: tiles across the latent's longer side; 0
/// without global views.
fn fusion_scale(latent: [usize; 2], global_views: usize, tile_latent: usize) -> usize {
    if global_views == 0 {
        return 0;
    }
    latent[0]
        .div_ceil(tile_latent)
        .max(latent[1].div_ceil(tile_latent))
}

/// How many of a stage's steps FreeScale dilates: those before `dilate_tau` of its schedule,
/// or under FreCaS timing those where FreeScale's 50-step schedule would (t at or above the
/// timestep of its step tau).
fn dilated_steps(schedule: &StageSchedule, timesteps: &[f64], dilate_tau: usize) -> usize {
    match schedule {
        StageSchedule::Schedule { start, .. } => {
            dilate_tau.saturating_sub(*start).min(timesteps.len())
        }
        StageSchedule::Frecas { .. } | StageSchedule::FrecasFlow { .. } => {
            let t_min = 1000.0 * (1.0 - dilate_tau as f64 / FREESCALE_REFERENCE_STEPS as f64);
            timesteps.iter().filter(|&&t| t >= t_min).count()
        }
    }
}

/// What every stage's layout reads: the spec, the shared settings, the stage sizes and the
/// FreCaS weights.
struct Layout<'a> {
    spec: &'a RenderSpec,
    /// The largest latent side one model call accepts.
    max_view_latent: Option<usize>,
    settings: &'a Settings,
    sizes: &'a [Size],
    facfg: [f64; 2],
    camap: f64,
}

impl Layout<'_> {
    /// Stage `k` of `size`: its entry, views, fusion, dilation, guidance, restraint and
    /// CA-map reuse.
    fn stage(&self, k: usize, size: &Size, timing: StageTiming) -> Result<StagePlan> {
        let (s, ms) = (self.settings, &self.spec.method);
        let StageTiming {
            mut timesteps,
            schedule,
        } = timing;
        let latent = latent_of(size);
        let entry = self.entry(k);
        if matches!(entry, StageEntry::InitImage { .. }) {
            timesteps.clear();
        }
        let views = stage_views(k, latent, s, ms.no_fusion)?;
        if let Some(max) = self.max_view_latent {
            if views.tile[0] > max || views.tile[1] > max {
                return invalid(format!(
                    "stage {k}: a view of {}x{} px is larger than the model's position \
                     embedding covers ({} px a side): use --tile-size {} or less{}",
                    views.tile[1] * PIXELS_PER_LATENT as usize,
                    views.tile[0] * PIXELS_PER_LATENT as usize,
                    max * PIXELS_PER_LATENT as usize,
                    max * PIXELS_PER_LATENT as usize,
                    if s.method == Method::Single {
                        ", and a cascade method (--method hybrid) for larger pictures"
                    } else {
                        ""
                    }
                ));
            }
        }
        let b = s.training_latent;
        let view_larger = views.tile[0] > b || views.tile[1] > b;
        let dilation = if s.freescale_like && view_larger && s.dilation {
            let steps = dilated_steps(&schedule, &timesteps, s.dilate_tau);
            DilationSchedule::new(views.tile[1], b, steps).map_err(|e| PlanError(e.to_string()))?
        } else {
            DilationSchedule::NONE
        };
        let camap_on = s.frecas_like && self.camap > 0.0;
        let evaluations_per_step = (views.local + views.global) * if s.guided { 2 } else { 1 };
        Ok(StagePlan {
            size: [size.width, size.height],
            latent,
            entry,
            evaluations: evaluations_per_step * timesteps.len(),
            timesteps,
            schedule,
            tile: views.tile,
            tile_overlap: s.overlap,
            tile_weights: ms.tile_weights,
            local_views: views.local,
            global_views: views.global,
            fusion_scale: fusion_scale(latent, views.global, s.tile_latent),
            in_unet_fusion: s.method != Method::Single && !ms.no_fusion && view_larger,
            fast: ms.fast,
            dilation: dilation.factor,
            dilated_steps: dilation.steps,
            freeu: s.freeu,
            guidance: self.guidance(k),
            restraint: self.restraint(k),
            camap_capture: camap_on && k + 1 < self.sizes.len(),
            camap_inject: (camap_on && k > 0).then_some(self.camap),
            evaluations_per_step,
        })
    }

    /// Noise or the init image for the first stage, the previous stage's result after it.
    fn entry(&self, k: usize) -> StageEntry {
        let filter = self.settings.filter;
        if k > 0 {
            StageEntry::Previous {
                from_predicted_x0: self.settings.frecas_like,
                filter,
            }
        } else if self.spec.method.init_image {
            StageEntry::InitImage { filter }
        } else {
            StageEntry::Noise
        }
    }

    /// FA-CFG after the first stage of a FreCaS-like cascade, else plain CFG (none unguided).
    fn guidance(&self, k: usize) -> GuidancePlan {
        if !self.settings.guided {
            GuidancePlan::None
        } else if self.settings.frecas_like && k > 0 {
            GuidancePlan::FaCfg {
                high: self.facfg[0],
                low: self.facfg[1],
                low_latent: latent_of(&self.sizes[k - 1]),
            }
        } else {
            GuidancePlan::Cfg {
                scale: self.spec.guidance,
            }
        }
    }

    /// FreeScale's restrained structure after the first stage.
    fn restraint(&self, k: usize) -> Option<RestraintPlan> {
        let ms = &self.spec.method;
        (self.settings.freescale_like && k > 0).then(|| RestraintPlan {
            cosine_scale: self.settings.cosine_scale,
            cosine_scale_bg: ms.mask.then(|| ms.cosine_scale_bg.unwrap_or(0.5)),
        })
    }
}

/// A CA-map captured in a stage that runs no steps (an init image) does not exist.
fn drop_camap_of_a_stage_without_steps(stages: &mut [StagePlan]) {
    if let Some(first) = stages.first_mut() {
        if first.timesteps.is_empty() {
            first.camap_capture = false;
            if let Some(s) = stages.get_mut(1) {
                s.camap_inject = None;
            }
        }
    }
}

/// Peak memory, roughly:
/// - coordinator: per stage about 12 latent-sized f32 buffers (latent, upscaled latent and its
///   noise, merged local and global conditional/unconditional predictions, weights, guidance
///   and step temporaries), the transition's pixels (decoded and resized, 3 channels, f32) and
///   a captured CA-map (text tokens × 2 halves per latent pixel); the largest stage counts.
/// - worker: the weights, plus activations of one call: views × CFG halves × tile tokens ×
///   base channels × 24 live tensors of that size (the UNet's widest resolution dominates;
///   attention is computed in query chunks), at the weights' precision.
fn estimate_memory(
    stages: &[StagePlan],
    arch: &ArchInfo,
    view_batch: usize,
    guided: bool,
) -> MemoryEstimate {
    let mut coordinator = 0u64;
    let mut activations = 0u64;
    for (k, s) in stages.iter().enumerate() {
        let px = (s.latent[0] * s.latent[1]) as u64;
        let latent_bytes = px * arch.latent_channels as u64 * 4;
        let mut bytes = 12 * latent_bytes;
        if k > 0 {
            let prev = &stages[k - 1];
            let prev_px = (prev.size[0] as u64) * (prev.size[1] as u64);
            let this_px = (s.size[0] as u64) * (s.size[1] as u64);
            bytes += 3 * 4 * (prev_px + this_px);
        }
        if s.camap_capture {
            bytes += px * arch.text_tokens as u64 * 2 * 4;
        }
        coordinator = coordinator.max(bytes);
        let views = view_batch.min(s.local_views.max(1)) as u64;
        let halves = if guided { 2 } else { 1 };
        let tokens = (s.tile[0] * s.tile[1]) as u64;
        activations = activations
            .max(views * halves * tokens * arch.base_channels as u64 * 24 * arch.weight_bytes);
    }
    let weights = arch.parameters * arch.weight_bytes;
    MemoryEstimate {
        coordinator_bytes: coordinator,
        worker_weights_bytes: weights,
        worker_activation_bytes: activations,
        worker_bytes: weights + activations,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A 50-step SDXL-style spec at `size`² (also for other modules' tests).
    pub(crate) fn spec(size: u32, method: Option<Method>) -> RenderSpec {
        RenderSpec {
            loras: Vec::new(),
            prompt: "a lighthouse".into(),
            negative_prompt: None,
            width: size,
            height: size,
            steps: 50,
            guidance: 7.5,
            scheduler: None,
            seed: 1,
            method: MethodSpec {
                method,
                ..Default::default()
            },
            output: Default::default(),
        }
    }

    #[test]
    fn sdxl_8k_freescale_has_225_local_and_64_global_views() {
        let arch = ArchInfo::preset("sdxl").unwrap();
        let p = plan(&spec(8192, Some(Method::Freescale)), &arch).unwrap();
        let sizes: Vec<u32> = p.stages.iter().map(|s| s.size[0]).collect();
        assert_eq!(sizes, vec![1024, 2048, 4096, 8192]);
        let last = p.stages.last().unwrap();
        assert_eq!((last.local_views, last.global_views), (225, 64));
        assert_eq!(last.evaluations_per_step, 2 * 289);
        // Stages > 0 start at int(0.3 · 50) = 15 of SDXL's leading Euler schedule.
        assert_eq!(last.timesteps.len(), 35);
        assert_eq!(last.timesteps[0], 681.0);
        assert_eq!(p.stages[0].timesteps.len(), 50);
        assert_eq!((p.stages[1].local_views, p.stages[1].global_views), (9, 4));
        assert_eq!(
            (p.stages[2].local_views, p.stages[2].global_views),
            (49, 16)
        );
        assert!(p.stages[0].is_whole());
        assert_eq!(p.total_evaluations, 2 * (50 + 35 * (13 + 65 + 289)));
    }

    #[test]
    fn frecas_preset_timing_and_guidance() {
        let arch = ArchInfo::preset("sdxl").unwrap();
        let p = plan(&spec(2048, Some(Method::Frecas)), &arch).unwrap();
        assert_eq!(p.stages.len(), 2);
        assert_eq!(p.stages[1].timesteps[0], 343.0);
        assert_eq!(p.stages[1].timesteps.len(), 10);
        assert_eq!(
            p.stages[1].guidance,
            GuidancePlan::FaCfg {
                high: 35.0,
                low: 7.5,
                low_latent: [128, 128]
            }
        );
        assert!(p.stages[0].camap_capture);
        assert_eq!(p.stages[1].camap_inject, Some(0.6));
        assert!(!p.stages[1].freeu);
        assert!(p.stages[1].restraint.is_none());
        assert!(matches!(
            p.stages[1].entry,
            StageEntry::Previous {
                from_predicted_x0: true,
                filter: ResizeFilter::Nearest
            }
        ));
    }

    /// `tessera plan --arch sd3 --method frecas --size 2048x2048 --stages
    /// 1024x1024,2048x2048 --end-times 50,0 --stage-steps 20,8`: the timesteps printed by
    /// tests/parity/ref_frecas_sd3_schedule.py, the reference's own `scheduler_wrapper` on its
    /// flow-matching scheduler (SD3 medium's shift 3). Stage 2 starts 69 entries before the
    /// schedule's end (`get_next_starttimestep_rf(50, 1024, 2048)`), at entry 930.
    #[test]
    #[allow(clippy::excessive_precision)]
    fn sd3_frecas_timesteps_match_the_reference_scheduler_wrapper() {
        let arch = ArchInfo::preset("sd3").unwrap();
        let s = RenderSpec {
            method: MethodSpec {
                method: Some(Method::Frecas),
                stages: Some(vec![
                    Size {
                        width: 1024,
                        height: 1024,
                    },
                    Size {
                        width: 2048,
                        height: 2048,
                    },
                ]),
                end_times: Some(vec![50, 0]),
                stage_steps: Some(vec![20, 8]),
                ..Default::default()
            },
            ..spec(2048, None)
        };
        let p = plan(&s, &arch).unwrap();
        let want0 = [
            1000.0,
            982.7942504882812,
            964.362060546875,
            944.567626953125,
            923.2540283203125,
            900.2393798828125,
            875.3117065429688,
            848.2220458984375,
            818.6763305664062,
            786.3248291015625,
            750.7477416992188,
            711.4375610351562,
            667.7741088867188,
            618.9918212890625,
            564.1344604492188,
            501.9920349121094,
            431.00994873046875,
            349.15771484375,
            253.73133850097656,
            143.50180053710938,
        ];
        let want1 = [
            188.48167419433594,
            165.18649291992188,
            141.04881286621094,
            116.02210235595703,
            90.05628204345703,
            63.09751510620117,
            35.08771896362305,
            8.928571701049805,
        ];
        assert_eq!(p.stages[0].timesteps, want0);
        assert_eq!(p.stages[1].timesteps, want1);
        let indices = |k: usize| match &p.stages[k].schedule {
            StageSchedule::FrecasFlow { indices, mu: None } => indices.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(indices(1), vec![930, 940, 950, 960, 970, 980, 990, 999]);
        assert_eq!(indices(0)[19], 949);
        // FA-CFG and CA-map weights of the reference's SD3 preset; no FreeU, no dilation.
        assert_eq!(
            p.stages[1].guidance,
            GuidancePlan::FaCfg {
                high: 35.0,
                low: 7.5,
                low_latent: [128, 128]
            }
        );
        assert_eq!(p.stages[1].camap_inject, Some(0.5));
        assert!(!p.stages[1].freeu);
        assert_eq!(p.stages[1].dilation, 1);
    }

    #[test]
    fn sd3_refuses_unet_only_flags_and_ddim() {
        let arch = ArchInfo::preset("sd3").unwrap();
        let with = |f: &dyn Fn(&mut RenderSpec)| {
            let mut s = spec(2048, None);
            f(&mut s);
            plan(&s, &arch).unwrap_err().0
        };
        let e = with(&|s| s.method.freeu = Some(true));
        assert!(e.contains("drop --freeu") && e.contains("SD3"), "{e}");
        let e = with(&|s| s.method.dilate_tau = Some(20));
        assert!(e.contains("drop --dilate-tau"), "{e}");
        let e = with(&|s| s.scheduler = Some(SchedulerKind::Ddim));
        assert!(e.contains("flow-matching"), "{e}");
        // The defaults leave FreeU and dilation off; hybrid works, single at 1024 too.
        let p = plan(&spec(2048, None), &arch).unwrap();
        assert_eq!(p.method, Method::Hybrid);
        assert!(p.stages.iter().all(|s| !s.freeu && s.dilation == 1));
        let single = plan(&spec(1024, None), &arch).unwrap();
        assert_eq!(single.stages[0].timesteps.len(), 50);
        assert_eq!(single.stages[0].timesteps[0], 1000.0);
        // Views the position embedding cannot cover, and sizes the patches cannot tile.
        let e = with(&|s| {
            s.method.method = Some(Method::Single);
            s.width = 4096;
            s.height = 4096;
        });
        assert!(e.contains("--tile-size 3072 or less"), "{e}");
        let e = with(&|s| {
            s.method.method = Some(Method::Single);
            s.width = 1032;
            s.height = 1024;
        });
        assert!(e.contains("multiple of 16"), "{e}");
        // Euler on SD3 is flow-matching Euler.
        let mut s = spec(1024, Some(Method::Single));
        s.scheduler = Some(SchedulerKind::Euler);
        let p = plan(&s, &arch).unwrap();
        assert!(matches!(
            p.stages[0].schedule,
            StageSchedule::Schedule {
                scheduler: SchedulerKind::FlowEuler,
                ..
            }
        ));
    }

    #[test]
    fn method_defaults_to_single_at_training_size_and_hybrid_above() {
        let arch = ArchInfo::preset("sd21-base").unwrap();
        assert_eq!(
            plan(&spec(512, None), &arch).unwrap().method,
            Method::Single
        );
        let p = plan(&spec(1024, None), &arch).unwrap();
        assert_eq!(p.method, Method::Hybrid);
        assert!(p.stages[1].restraint.is_some());
        assert!(p.stages[1].freeu);
    }

    #[test]
    fn steps_split_like_the_preset() {
        assert_eq!(split_steps(&[40, 10], 50).unwrap(), vec![40, 10]);
        assert_eq!(split_steps(&[30, 5, 15], 50).unwrap(), vec![30, 5, 15]);
        assert_eq!(split_steps(&[40, 10], 4).unwrap(), vec![2, 2]);
        assert_eq!(split_steps(&[40, 10], 7).unwrap(), vec![5, 2]);
        assert_eq!(split_steps(&[30, 5, 15], 6).unwrap(), vec![2, 2, 2]);
        assert_eq!(split_steps(&[30, 5, 15], 9).unwrap(), vec![4, 2, 3]);
        assert_eq!(split_steps(&[30, 5, 15], 100).unwrap(), vec![60, 10, 30]);
        assert!(split_steps(&[30, 5, 15], 5).is_err());
    }

    #[test]
    fn default_stages_double_from_the_training_size() {
        let s = |w, h| Size {
            width: w,
            height: h,
        };
        assert_eq!(
            default_stages(s(4096, 2048), 1024),
            vec![s(1024, 512), s(2048, 1024), s(4096, 2048)]
        );
        assert_eq!(default_stages(s(512, 512), 1024), vec![s(512, 512)]);
        assert_eq!(
            default_stages(s(1536, 1536), 1024),
            vec![s(768, 768), s(1536, 1536)]
        );
    }

    #[test]
    fn a_whole_stage_tile_is_one_view_with_in_unet_fusion() {
        let arch = ArchInfo::preset("sdxl").unwrap();
        let mut s = spec(2048, Some(Method::Freescale));
        s.method.tile_size = Some(2048);
        let p = plan(&s, &arch).unwrap();
        let st = &p.stages[1];
        assert!(st.is_whole());
        assert!(st.in_unet_fusion);
        assert_eq!(st.dilation, 2);
        assert_eq!(st.dilated_steps, 35 - 15);
        // Step j of the stage is step 15 + j of the schedule: dilated while 15 + j < 35.
        assert_eq!(st.dilation_schedule().dilation_at(19), 2);
        assert_eq!(st.dilation_schedule().dilation_at(20), 1);
        assert_eq!(p.stages[0].dilation_schedule(), DilationSchedule::NONE);
    }

    fn settings(spec: &RenderSpec, arch: &ArchInfo) -> Settings {
        let method = resolve_method(spec, arch);
        let n = resolve_stages(spec, arch, method).unwrap().len();
        Settings::resolve(spec, arch, method, n).unwrap()
    }

    #[test]
    fn a_stage_within_a_tile_is_one_view_and_a_larger_one_is_tiled() {
        let arch = ArchInfo::preset("sdxl").unwrap();
        let s = settings(&spec(4096, Some(Method::Freescale)), &arch);
        assert_eq!(
            stage_views(0, [128, 128], &s, false).unwrap(),
            StageViews {
                tile: [128, 128],
                local: 1,
                global: 0
            }
        );
        assert_eq!(
            stage_views(1, [256, 256], &s, false).unwrap(),
            StageViews {
                tile: [128, 128],
                local: 9,
                global: 4
            }
        );
        assert_eq!(stage_views(1, [256, 256], &s, true).unwrap().global, 0);
        // A wide stage's tile is cut to the latent's height.
        assert_eq!(
            stage_views(1, [64, 256], &s, false).unwrap().tile,
            [64, 128]
        );
    }

    #[test]
    fn fusion_scale_counts_tiles_across_the_longer_side() {
        assert_eq!(fusion_scale([256, 256], 4, 128), 2);
        assert_eq!(fusion_scale([256, 640], 10, 128), 5);
        assert_eq!(fusion_scale([256, 256], 0, 128), 0);
    }

    #[test]
    fn dilated_steps_follow_the_schedule_or_freescales_timesteps_under_frecas() {
        let schedule = |start| StageSchedule::Schedule {
            scheduler: SchedulerKind::Euler,
            steps: 50,
            start,
            mu: None,
        };
        let ts = vec![0.0; 35];
        assert_eq!(dilated_steps(&schedule(15), &ts, 35), 20);
        assert_eq!(dilated_steps(&schedule(40), &ts, 35), 0);
        assert_eq!(dilated_steps(&schedule(0), &ts[..10], 35), 10);
        // FreeScale's step 35 of 50 sits at t ≈ 300: FreCaS steps above it dilate.
        let frecas = StageSchedule::Frecas {
            inference_steps: 50,
        };
        assert_eq!(
            dilated_steps(&frecas, &[700.0, 500.0, 301.0, 299.0, 100.0], 35),
            3
        );
    }

    #[test]
    fn freescale_timing_restarts_the_later_stages() {
        let arch = ArchInfo::preset("sdxl").unwrap();
        let mut s = spec(2048, Some(Method::Freescale));
        s.steps = 10;
        let sizes = [1024, 2048].map(|w| Size {
            width: w,
            height: w,
        });
        let t = schedule_stage_timing(&s, &arch, Method::Freescale, &sizes).unwrap();
        assert_eq!(t[0].timesteps.len(), 10);
        assert_eq!(t[1].timesteps.len(), 10 - 3);
        assert_eq!(t[1].timesteps[0], t[0].timesteps[3]);
        assert_eq!(
            t[1].schedule,
            StageSchedule::Schedule {
                scheduler: SchedulerKind::Euler,
                steps: 10,
                start: 3,
                mu: None
            }
        );
    }

    #[test]
    fn an_init_image_stage_runs_no_steps_and_passes_no_camap_on() {
        let arch = ArchInfo::preset("sdxl").unwrap();
        let mut s = spec(2048, Some(Method::Hybrid));
        s.method.init_image = true;
        let p = plan(&s, &arch).unwrap();
        assert!(matches!(p.stages[0].entry, StageEntry::InitImage { .. }));
        assert!(p.stages[0].timesteps.is_empty());
        assert_eq!(p.stages[0].evaluations, 0);
        assert!(!p.stages[0].camap_capture);
        assert_eq!(p.stages[1].camap_inject, None);
        // Without the init image the same cascade passes its map on.
        s.method.init_image = false;
        let p = plan(&s, &arch).unwrap();
        assert!(p.stages[0].camap_capture);
        assert!(p.stages[1].camap_inject.is_some());
    }

    /// The sizes a refusal offers ("… use --size AxB or --size CxD").
    fn offered_sizes(err: &str) -> Vec<Size> {
        let hint = err.split(": use ").nth(1).unwrap_or("");
        hint.split("--size ")
            .filter_map(|t| t.split_whitespace().next()?.parse().ok())
            .collect()
    }

    #[test]
    fn an_off_grid_size_is_refused_in_the_users_words_with_sizes_that_keep_every_rule() {
        // The tiny models' training size: 500 asks for a 3-stage hybrid cascade.
        let tiny = ArchInfo {
            training_size: 128,
            ..ArchInfo::preset("sdxl").unwrap()
        };
        let err = plan(&spec(500, None), &tiny).unwrap_err().0;
        assert_eq!(
            err,
            "--size 500x500: each side must be a multiple of 64 pixels (8 latent pixels), as \
             the hybrid cascade needs: use --size 448x448 or --size 512x512"
        );
        // At SDXL's training size 500 is plain sampling, whose grid is one latent pixel.
        let sdxl = ArchInfo::preset("sdxl").unwrap();
        let err = plan(&spec(500, None), &sdxl).unwrap_err().0;
        assert!(
            err.ends_with("use --size 496x496 or --size 504x504"),
            "{err}"
        );
        // Just above the training size the method changes with the size offered.
        let err = plan(&spec(1030, None), &sdxl).unwrap_err().0;
        assert!(
            err.ends_with("use --size 1024x1024 or --size 1088x1088"),
            "{err}"
        );

        // Whatever the method and shape, every size offered plans: one round trip per mistake.
        let methods = [None, Some(Method::Single), Some(Method::Freescale)];
        let methods = methods
            .into_iter()
            .chain([Some(Method::Frecas), Some(Method::Hybrid)]);
        let mut refused = 0;
        for method in methods {
            for w in (64..=560).step_by(12) {
                for h in [64, 100, 128, 250, 333, 520] {
                    let s = RenderSpec {
                        width: w,
                        height: h,
                        ..spec(w, method)
                    };
                    let Err(e) = plan(&s, &tiny) else { continue };
                    refused += 1;
                    assert!(e.0.starts_with("--size") && !e.0.contains("stage"), "{e}");
                    let offered = offered_sizes(&e.0);
                    assert!(!offered.is_empty(), "{e}");
                    for o in offered {
                        let fixed = RenderSpec {
                            width: o.width,
                            height: o.height,
                            ..s.clone()
                        };
                        assert!(plan(&fixed, &tiny).is_ok(), "{e}: {o} fails too");
                    }
                }
            }
        }
        assert!(refused > 100, "only {refused} sizes refused");
    }

    #[test]
    fn listed_stages_are_named_as_the_user_wrote_them() {
        let arch = ArchInfo::preset("sdxl").unwrap();
        let stages = |sizes: &[u32]| MethodSpec {
            stages: Some(
                sizes
                    .iter()
                    .map(|&v| Size {
                        width: v,
                        height: v,
                    })
                    .collect(),
            ),
            ..Default::default()
        };
        let s = RenderSpec {
            method: stages(&[1024, 2000]),
            ..spec(2000, None)
        };
        let err = plan(&s, &arch).unwrap_err().0;
        assert!(
            err.starts_with(
                "--stages' second stage (2000x2000): width 2000 is not a multiple of 64"
            ) && err.ends_with("use 1984 or 2048"),
            "{err}"
        );
        let s = RenderSpec {
            method: stages(&[1024, 2048]),
            ..spec(4096, None)
        };
        let err = plan(&s, &arch).unwrap_err().0;
        assert!(err.contains("drop --size"), "{err}");
    }

    #[test]
    fn bad_method_flags_say_what_to_change() {
        let arch = ArchInfo::preset("sdxl").unwrap();
        let cases: Vec<(RenderSpec, &str)> = vec![
            (
                RenderSpec {
                    method: MethodSpec {
                        method: Some(Method::Frecas),
                        end_times: Some(vec![200]),
                        ..Default::default()
                    },
                    ..spec(2048, None)
                },
                "give one per stage",
            ),
            (
                RenderSpec {
                    method: MethodSpec {
                        stages: Some(vec![
                            Size {
                                width: 2048,
                                height: 2048,
                            },
                            Size {
                                width: 1024,
                                height: 1024,
                            },
                        ]),
                        ..Default::default()
                    },
                    ..spec(1024, None)
                },
                "smallest first",
            ),
            (
                RenderSpec {
                    method: MethodSpec {
                        stages: Some(vec![Size {
                            width: 1024,
                            height: 1024,
                        }]),
                        ..Default::default()
                    },
                    ..spec(2048, None)
                },
                "make them equal",
            ),
            (
                RenderSpec {
                    scheduler: Some(SchedulerKind::Euler),
                    ..spec(2048, Some(Method::Frecas))
                },
                "DDIM",
            ),
            (
                RenderSpec {
                    method: MethodSpec {
                        method: Some(Method::Frecas),
                        mask: true,
                        ..Default::default()
                    },
                    ..spec(2048, None)
                },
                "--method freescale or hybrid",
            ),
            (
                RenderSpec {
                    method: MethodSpec {
                        method: Some(Method::Freescale),
                        restart_step: Some(50),
                        ..Default::default()
                    },
                    ..spec(2048, None)
                },
                "--restart-step",
            ),
            (
                RenderSpec {
                    method: MethodSpec {
                        tile_size: Some(1000),
                        ..Default::default()
                    },
                    ..spec(2048, None)
                },
                "--tile-size",
            ),
        ];
        for (s, want) in cases {
            let err = plan(&s, &arch).unwrap_err().0;
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }
}
