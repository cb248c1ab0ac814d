//! The job a user asks for, before a model resolves its defaults: what the command line's job
//! flags and the wire's `JobSpec` both become. [`JobRequest::to_spec`] turns it into the
//! [`RenderSpec`] that planning and rendering read, once the model's training size is known.

use super::{LoraRef, OutputFormat, RenderSpec, Size, SpecError};
use crate::method::params::MethodSpec;
use crate::sched::SchedulerKind;

/// Denoising steps when none are asked for.
pub const DEFAULT_STEPS: usize = 50;
/// Classifier-free guidance scale when none is asked for (diffusers' default for SD 2.1 and
/// SDXL).
pub const DEFAULT_GUIDANCE: f64 = 7.5;

#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest {
    pub prompt: String,
    /// `None` is different from `Some("")` for SDXL, whose pipeline then uses zero embeddings.
    pub negative_prompt: Option<String>,
    /// `None`: the last of `method.stages` when given, else the model's training size.
    pub size: Option<Size>,
    pub steps: usize,
    pub guidance: f64,
    /// `None`: the model's `scheduler_config.json` decides, as in diffusers.
    pub scheduler: Option<SchedulerKind>,
    /// `None`: a seed is drawn when the request is resolved.
    pub seed: Option<u64>,
    /// The cascade as asked for. Its `facfg` is not read: the weights travel as given in
    /// [`JobRequest::facfg`], so that a wrong count is refused with the other checks.
    pub method: MethodSpec,
    /// FreCaS' FA-CFG weights W_HIGH, W_LOW as given (two, once checked).
    pub facfg: Option<Vec<f64>>,
    pub output: OutputFormat,
    /// LoRAs by name, weight and hash (`--lora` on `submit` and `batch`).
    pub loras: Vec<LoraRef>,
}

impl Default for JobRequest {
    /// An empty prompt with every flag at its default.
    fn default() -> Self {
        JobRequest {
            prompt: String::new(),
            negative_prompt: None,
            size: None,
            steps: DEFAULT_STEPS,
            guidance: DEFAULT_GUIDANCE,
            scheduler: None,
            seed: None,
            method: MethodSpec::default(),
            facfg: None,
            output: OutputFormat::default(),
            loras: Vec::new(),
        }
    }
}

impl JobRequest {
    /// The render spec for a model trained at `training_size` (the size when none is asked
    /// for), with `draw_seed` called for a request without a seed. Refuses flags that do not
    /// fit together, naming them.
    pub fn to_spec(
        &self,
        training_size: u32,
        draw_seed: impl FnOnce() -> u64,
    ) -> Result<RenderSpec, SpecError> {
        // Without --size, the last of --stages is the picture's size, else the training size.
        let last_stage = self.method.stages.as_ref().and_then(|s| s.last().copied());
        let size = self.size.or(last_stage).unwrap_or(Size {
            width: training_size,
            height: training_size,
        });
        let facfg = match &self.facfg {
            None => None,
            Some(v) if v.len() == 2 => Some([v[0], v[1]]),
            Some(v) => {
                return Err(SpecError(format!(
                    "--facfg takes two weights W_HIGH,W_LOW (e.g. 35,7.5), got {} values",
                    v.len()
                )))
            }
        };
        if self.method.cosine_scale_bg.is_some() && !self.method.mask {
            return Err(SpecError(
                "--cosine-scale-bg applies outside a --mask: give a --mask too, or drop it".into(),
            ));
        }
        for lora in &self.loras {
            lora.check()?;
        }
        Ok(RenderSpec {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: size.width,
            height: size.height,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler,
            seed: self.seed.unwrap_or_else(draw_seed),
            method: MethodSpec {
                facfg,
                ..self.method.clone()
            },
            output: self.output,
            loras: self.loras.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> JobRequest {
        JobRequest {
            prompt: "a lighthouse".into(),
            ..JobRequest::default()
        }
    }

    #[test]
    fn a_request_without_size_or_seed_takes_the_training_size_and_a_drawn_seed() {
        let spec = request().to_spec(1024, || 42).unwrap();
        assert_eq!((spec.width, spec.height, spec.seed), (1024, 1024, 42));
        assert_eq!(
            (spec.steps, spec.guidance),
            (DEFAULT_STEPS, DEFAULT_GUIDANCE)
        );
        let seeded = JobRequest {
            seed: Some(7),
            size: Some(Size {
                width: 512,
                height: 256,
            }),
            ..request()
        };
        let spec = seeded.to_spec(1024, || unreachable!()).unwrap();
        assert_eq!((spec.width, spec.height, spec.seed), (512, 256, 7));
    }

    #[test]
    fn a_request_with_stages_but_no_size_renders_at_the_last_stage() {
        let mut r = request();
        r.method.stages = Some(vec![
            Size {
                width: 128,
                height: 96,
            },
            Size {
                width: 256,
                height: 192,
            },
        ]);
        let spec = r.to_spec(128, || 0).unwrap();
        assert_eq!((spec.width, spec.height), (256, 192));
    }

    #[test]
    fn facfg_weights_come_in_pairs() {
        let pair = JobRequest {
            facfg: Some(vec![30.0, 5.0]),
            ..request()
        };
        assert_eq!(
            pair.to_spec(512, || 0).unwrap().method.facfg,
            Some([30.0, 5.0])
        );
        let three = JobRequest {
            facfg: Some(vec![1.0, 2.0, 3.0]),
            ..request()
        };
        let e = three.to_spec(512, || 0).unwrap_err().0;
        assert!(
            e.contains("--facfg takes two weights") && e.contains("got 3"),
            "{e}"
        );
    }

    #[test]
    fn a_lora_is_named_by_plain_file_name_and_full_hash() {
        let lora = |name: &str, sha256: String| JobRequest {
            loras: vec![LoraRef {
                name: name.into(),
                weight: 0.5,
                sha256,
            }],
            ..request()
        };
        let good = format!("sha256:{}", "0f".repeat(32));
        let spec = lora("style.safetensors", good.clone()).to_spec(512, || 0);
        assert_eq!(spec.unwrap().loras[0].name, "style.safetensors");
        for (name, hash, says) in [
            ("../style.safetensors", good.clone(), "plain file name"),
            ("dir/style.safetensors", good.clone(), "plain file name"),
            ("..", good, "plain file name"),
            ("style.safetensors", "sha256:0f".into(), "64 lowercase hex"),
        ] {
            let e = lora(name, hash).to_spec(512, || 0).unwrap_err().0;
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_background_scale_needs_a_mask() {
        let mut r = request();
        r.method.cosine_scale_bg = Some(0.5);
        let e = r.to_spec(512, || 0).unwrap_err().0;
        assert!(
            e.contains("--cosine-scale-bg applies outside a --mask"),
            "{e}"
        );
        r.method.mask = true;
        assert!(r.to_spec(512, || 0).is_ok());
    }
}
