//! The model families Tessera runs, and what each is to the code around its denoiser: the
//! latent it works in, what it predicts and how it is stepped, what it is conditioned on, which
//! method hooks it carries; and the named models of each family (`plan --arch NAME`, `model
//! synth --arch NAME`, `--model synthetic:NAME`). Whatever differs by family is read here, so a
//! new family is one more row, not a hunt through the code.

use serde::{Deserialize, Serialize};

use crate::sched::{SchedulerConfig, SchedulerError};

/// A family of checkpoints sharing one denoiser architecture, latent space and conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Stable Diffusion 2.x (`StableDiffusionPipeline`).
    Sd2,
    /// Stable Diffusion XL (`StableDiffusionXLPipeline`).
    Sdxl,
    /// Stable Diffusion 3 and 3.5 (`StableDiffusion3Pipeline`): the MMDiT transformer.
    Sd3,
}

/// What the denoiser's output estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// The noise ε (diffusers' `epsilon`).
    Epsilon,
    /// v = α·ε − σ·x₀ (diffusers' `v_prediction`).
    V,
    /// The rectified-flow velocity ε − x₀ (flow-matching models; no `prediction_type` key).
    FlowVelocity,
}

impl Prediction {
    /// The scheduler config's `prediction_type` value, where the scheduler has one.
    pub fn config_name(self) -> Option<&'static str> {
        match self {
            Self::Epsilon => Some("epsilon"),
            Self::V => Some("v_prediction"),
            Self::FlowVelocity => None,
        }
    }
}

/// How a family's timesteps are stepped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerFamily {
    /// A discrete beta schedule over the training timesteps: DDIM and Euler discrete.
    DiscreteBeta,
    /// Flow matching: sigmas from 1 to 0, stepped along the predicted velocity.
    FlowMatching,
}

/// What a family's denoiser is conditioned on besides the latents and the timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conditioning {
    /// Per-token text embeddings (the cross-attention context); every family has them.
    pub text_embeddings: bool,
    /// A pooled text embedding of the whole prompt.
    pub pooled: bool,
    /// SDXL's micro-conditioning: original size, crop and target size.
    pub size_ids: bool,
}

/// The method hooks a family's denoiser carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hooks {
    /// FreeScale's scale fusion in every self-attention.
    pub scale_fusion: bool,
    /// FreCaS's cross-attention map capture and injection.
    pub attention_maps: bool,
    /// FreeScale's re-dilated convolutions.
    pub dilation: bool,
    /// FreeU's backbone and skip scaling.
    pub freeu: bool,
}

/// FreeU's factors (diffusers' `enable_freeu(s1, s2, b1, b2)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FreeUFactors {
    pub b1: f64,
    pub b2: f64,
    pub s1: f64,
    pub s2: f64,
}

/// One row of the family table.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyInfo {
    pub family: Family,
    /// `model_index.json`'s `_class_name` of the family's diffusers directories.
    pub pipeline_class: &'static str,
    /// The checkpoints of the family Tessera is checked against, for messages.
    pub checkpoints: &'static str,
    pub latent_channels: usize,
    /// Latent pixels per denoiser token side (1 for a UNet, 2 for SD3's MMDiT).
    pub patch_size: usize,
    /// The predictions the family's checkpoints use; the scheduler config names the one.
    pub predictions: &'static [Prediction],
    pub scheduler: SchedulerFamily,
    pub conditioning: Conditioning,
    pub hooks: Hooks,
    /// FreeU factors where the family supports FreeU.
    pub freeu: Option<FreeUFactors>,
}

/// The families in the order messages list them.
pub const FAMILIES: [FamilyInfo; 3] = [
    FamilyInfo {
        family: Family::Sd2,
        pipeline_class: "StableDiffusionPipeline",
        checkpoints: "SD 2.1",
        latent_channels: 4,
        patch_size: 1,
        predictions: &[Prediction::Epsilon, Prediction::V],
        scheduler: SchedulerFamily::DiscreteBeta,
        conditioning: Conditioning {
            text_embeddings: true,
            pooled: false,
            size_ids: false,
        },
        hooks: Hooks {
            scale_fusion: true,
            attention_maps: true,
            dilation: true,
            freeu: true,
        },
        // FreeU's recommended SD 2.x values.
        freeu: Some(FreeUFactors {
            b1: 1.4,
            b2: 1.6,
            s1: 0.9,
            s2: 0.2,
        }),
    },
    FamilyInfo {
        family: Family::Sdxl,
        pipeline_class: "StableDiffusionXLPipeline",
        checkpoints: "SDXL base",
        latent_channels: 4,
        patch_size: 1,
        predictions: &[Prediction::Epsilon],
        scheduler: SchedulerFamily::DiscreteBeta,
        conditioning: Conditioning {
            text_embeddings: true,
            pooled: true,
            size_ids: true,
        },
        hooks: Hooks {
            scale_fusion: true,
            attention_maps: true,
            dilation: true,
            freeu: true,
        },
        // FreeScale's SDXL values.
        freeu: Some(FreeUFactors {
            b1: 1.1,
            b2: 1.2,
            s1: 0.6,
            s2: 0.4,
        }),
    },
    FamilyInfo {
        family: Family::Sd3,
        pipeline_class: "StableDiffusion3Pipeline",
        checkpoints: "SD3 medium, SD3.5",
        latent_channels: 16,
        patch_size: 2,
        predictions: &[Prediction::FlowVelocity],
        scheduler: SchedulerFamily::FlowMatching,
        conditioning: Conditioning {
            text_embeddings: true,
            pooled: true,
            size_ids: false,
        },
        // Scale fusion and the CA-maps act on the joint attention; there are no convolutions
        // to dilate and no UNet skips for FreeU.
        hooks: Hooks {
            scale_fusion: true,
            attention_maps: true,
            dilation: false,
            freeu: false,
        },
        freeu: None,
    },
];

impl Family {
    /// This family's row of [`FAMILIES`].
    pub fn info(self) -> &'static FamilyInfo {
        FAMILIES
            .iter()
            .find(|f| f.family == self)
            .expect("every family has a row")
    }

    /// The family whose diffusers pipeline class is `class`.
    pub fn from_pipeline_class(class: &str) -> Option<Self> {
        FAMILIES
            .iter()
            .find(|f| f.pipeline_class == class)
            .map(|f| f.family)
    }

    /// "StableDiffusionPipeline (SD 2.1), StableDiffusionXLPipeline (SDXL base) and …".
    pub fn pipeline_classes() -> String {
        let names: Vec<String> = FAMILIES
            .iter()
            .map(|f| format!("{} ({})", f.pipeline_class, f.checkpoints))
            .collect();
        listed(&names, "and")
    }
}

/// A released checkpoint that `tessera plan --arch NAME` plans for without its files.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanPreset {
    pub name: &'static str,
    pub family: Family,
    /// Training size in pixels (square).
    pub training_size: u32,
    /// Parameters of the denoiser, VAE and text encoders of the released checkpoint.
    pub parameters: u64,
    /// Channels of the denoiser's first block.
    pub base_channels: usize,
    /// `_class_name` of the checkpoint's scheduler config.
    pub scheduler_class: &'static str,
    pub prediction: Prediction,
    /// Text tokens the denoiser attends to.
    pub text_tokens: usize,
    /// The largest latent side one model call accepts, where the model limits it.
    pub max_view_latent: Option<usize>,
}

// UNet + VAE + text encoder(s).
const SD21_PARAMS: u64 = 865_910_724 + 83_653_863 + 340_387_840;
const SDXL_PARAMS: u64 = 2_567_463_684 + 83_653_863 + 123_060_480 + 694_659_840;
// MMDiT + 16-channel VAE + CLIP-L and CLIP-G with projections + T5-XXL's encoder, as
// `synthetic:sd3` builds them (a worker test counts them).
pub const SD3_PARAMS: u64 =
    SD3_TRANSFORMER_PARAMS + 83_819_683 + 123_650_304 + 694_659_840 + 4_762_310_656;
// The published 2,028,328,000 plus the position embedding the checkpoint stores (192² × 1536).
const SD3_TRANSFORMER_PARAMS: u64 = 2_028_328_000 + 192 * 192 * 1536;

/// `plan --arch`'s presets, in the order messages list them: SD 2.1 (768, v-prediction), SD 2.1
/// base (512, epsilon), SDXL base 1.0, SD3 medium.
pub const PLAN_PRESETS: [PlanPreset; 4] = [
    PlanPreset {
        name: "sd21",
        family: Family::Sd2,
        training_size: 768,
        parameters: SD21_PARAMS,
        base_channels: 320,
        scheduler_class: "DDIMScheduler",
        prediction: Prediction::V,
        text_tokens: 77,
        max_view_latent: None,
    },
    PlanPreset {
        name: "sd21-base",
        family: Family::Sd2,
        training_size: 512,
        parameters: SD21_PARAMS,
        base_channels: 320,
        scheduler_class: "DDIMScheduler",
        prediction: Prediction::Epsilon,
        text_tokens: 77,
        max_view_latent: None,
    },
    PlanPreset {
        name: "sdxl",
        family: Family::Sdxl,
        training_size: 1024,
        parameters: SDXL_PARAMS,
        base_channels: 320,
        scheduler_class: "EulerDiscreteScheduler",
        prediction: Prediction::Epsilon,
        text_tokens: 77,
        max_view_latent: None,
    },
    PlanPreset {
        name: "sd3",
        family: Family::Sd3,
        training_size: 1024,
        parameters: SD3_PARAMS,
        // The transformer's width: 24 heads of 64.
        base_channels: 1536,
        scheduler_class: "FlowMatchEulerDiscreteScheduler",
        prediction: Prediction::FlowVelocity,
        // 77 CLIP tokens and the pipeline's 256 T5 tokens.
        text_tokens: 77 + 256,
        // pos_embed_max_size 192 patches of 2.
        max_view_latent: Some(384),
    },
];

/// The beta schedule every SD 2.x and SDXL checkpoint ships.
const SD_BETAS: &str = r#""beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000"#;

impl PlanPreset {
    /// The preset named `name`.
    pub fn find(name: &str) -> Option<&'static Self> {
        PLAN_PRESETS.iter().find(|p| p.name == name)
    }

    /// "sd21, sd21-base or sdxl".
    pub fn names() -> String {
        listed(&PLAN_PRESETS.map(|p| p.name.to_string()), "or")
    }

    /// The checkpoint's `scheduler/scheduler_config.json`, as released.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig, SchedulerError> {
        if self.family.info().scheduler == SchedulerFamily::FlowMatching {
            // SD3 medium's: a fixed shift of 3.
            return SchedulerConfig::from_json(
                format!(
                    r#"{{"_class_name": "{}", "num_train_timesteps": 1000, "shift": 3.0}}"#,
                    self.scheduler_class
                )
                .as_bytes(),
            );
        }
        let prediction = match self.prediction.config_name() {
            Some(name) => format!(r#", "prediction_type": "{name}""#),
            None => String::new(),
        };
        SchedulerConfig::from_json(
            format!(
                r#"{{"_class_name": "{}", {SD_BETAS}, "steps_offset": 1,
                    "timestep_spacing": "leading", "set_alpha_to_one": false,
                    "clip_sample": false{prediction}}}"#,
                self.scheduler_class
            )
            .as_bytes(),
        )
    }
}

/// A name that picks one family's model of random weights.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedModel {
    pub name: &'static str,
    pub family: Family,
    /// One line about it, for `--help`.
    pub about: &'static str,
}

/// The tiny models `tessera model synth --arch NAME` writes (training size 128).
pub const TINY_MODELS: [NamedModel; 3] = [
    NamedModel {
        name: "sdxl-tiny",
        family: Family::Sdxl,
        about: "SDXL base architecture (two text encoders, text_time conditioning), tiny \
                widths; training size 128x128",
    },
    NamedModel {
        name: "sd21-tiny",
        family: Family::Sd2,
        about: "SD 2.1 architecture (v-prediction, DDIM), tiny widths; training size 128x128",
    },
    NamedModel {
        name: "sd3-tiny",
        family: Family::Sd3,
        about: "SD3 architecture (MMDiT, CLIP-L + CLIP-G + T5, 16-channel VAE, flow matching), \
                tiny widths; training size 128x128",
    },
];

/// The full-size architectures `--model synthetic:NAME` loads with weights made on the device.
pub const SYNTHETIC_MODELS: [NamedModel; 3] = [
    NamedModel {
        name: "sdxl",
        family: Family::Sdxl,
        about: "SDXL base 1.0",
    },
    NamedModel {
        name: "sd21",
        family: Family::Sd2,
        about: "SD 2.1 (768, v-prediction)",
    },
    NamedModel {
        name: "sd3",
        family: Family::Sd3,
        about: "SD3 medium (MMDiT, 2B; T5-XXL encoder)",
    },
];

impl NamedModel {
    /// The entry of `models` named `name`.
    pub fn find<'a>(models: &'a [NamedModel], name: &str) -> Option<&'a NamedModel> {
        models.iter().find(|m| m.name == name)
    }

    /// The entry of `models` for `family`.
    pub fn of_family(models: &[NamedModel], family: Family) -> Option<&NamedModel> {
        models.iter().find(|m| m.family == family)
    }

    /// The names of `models`, each as `format` spells it, listed "a, b or c".
    pub fn names(models: &[NamedModel], format: impl Fn(&str) -> String) -> String {
        let names: Vec<String> = models.iter().map(|m| format(m.name)).collect();
        listed(&names, "or")
    }
}

/// "a", "a or b", "a, b or c".
fn listed(names: &[String], conjunction: &str) -> String {
    match names {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} {conjunction} {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::PredictionType;

    #[test]
    fn every_family_has_one_row_and_one_pipeline_class() {
        for f in [Family::Sd2, Family::Sdxl, Family::Sd3] {
            assert_eq!(f.info().family, f);
            assert_eq!(
                Family::from_pipeline_class(f.info().pipeline_class),
                Some(f)
            );
        }
        assert_eq!(
            Family::pipeline_classes(),
            "StableDiffusionPipeline (SD 2.1), StableDiffusionXLPipeline (SDXL base) and \
             StableDiffusion3Pipeline (SD3 medium, SD3.5)"
        );
        assert_eq!(Family::from_pipeline_class("FluxPipeline"), None);
    }

    #[test]
    fn presets_schedule_as_their_released_configs() {
        let sd21 = PlanPreset::find("sd21")
            .unwrap()
            .scheduler_config()
            .unwrap();
        assert_eq!(sd21.prediction().unwrap(), PredictionType::VPrediction);
        assert_eq!(sd21.class_name, "DDIMScheduler");
        let sdxl = PlanPreset::find("sdxl")
            .unwrap()
            .scheduler_config()
            .unwrap();
        assert_eq!(sdxl.prediction().unwrap(), PredictionType::Epsilon);
        assert_eq!(sdxl.class_name, "EulerDiscreteScheduler");
        let sd3 = PlanPreset::find("sd3").unwrap().scheduler_config().unwrap();
        assert!(sd3.is_flow_matching());
        assert_eq!(sd3.shift, 3.0);
        for p in &PLAN_PRESETS {
            assert!(
                p.family.info().predictions.contains(&p.prediction),
                "{}",
                p.name
            );
        }
    }

    #[test]
    fn names_are_listed_as_messages_spell_them() {
        assert_eq!(PlanPreset::names(), "sd21, sd21-base, sdxl or sd3");
        assert_eq!(
            NamedModel::names(&SYNTHETIC_MODELS, |n| format!("synthetic:{n}")),
            "synthetic:sdxl, synthetic:sd21 or synthetic:sd3"
        );
        assert_eq!(
            NamedModel::names(&TINY_MODELS, str::to_string),
            "sdxl-tiny, sd21-tiny or sd3-tiny"
        );
    }

    #[test]
    fn every_family_has_a_tiny_and_a_synthetic_model() {
        for f in &FAMILIES {
            assert!(NamedModel::of_family(&TINY_MODELS, f.family).is_some());
            assert!(NamedModel::of_family(&SYNTHETIC_MODELS, f.family).is_some());
        }
    }
}
