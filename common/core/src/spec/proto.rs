//! A [`JobRequest`] on the wire: the client turns it into a proto `JobSpec`, the coordinator
//! turns it back and checks it. Both directions live here, beside the type, so they cannot
//! drift. Numbers travel signed, so that a negative value is refused with a message naming
//! its flag rather than failing to decode.
//!
//! The files a job names (latents, init image, mask) travel as bytes in the same `JobSpec`,
//! filled in by the client; the request only says whether an init image or a mask was given.

use tessera_proto::v1;

use super::{
    BitDepth, DziMode, JobRequest, LoraRef, OutputFormat, Size, SpecError, DEFAULT_GUIDANCE,
};
use super::{DEFAULT_STEPS, MAX_SIDE};
use crate::method::params::{Method, MethodSpec, TileWeights};
use crate::resize::ResizeFilter;
use crate::sched::SchedulerKind;

fn size_to_proto(s: Size) -> v1::Size {
    v1::Size {
        width: i64::from(s.width),
        height: i64::from(s.height),
    }
}

/// The request as a proto spec, with no model named and no file bytes: the sender adds both.
impl From<&JobRequest> for v1::JobSpec {
    fn from(job: &JobRequest) -> Self {
        let m = &job.method;
        v1::JobSpec {
            model: String::new(),
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            size: job.size.map(size_to_proto),
            steps: Some(job.steps as i64),
            guidance: Some(job.guidance),
            scheduler: job.scheduler.map(|s| s.to_string()),
            seed: job.seed,
            method: m.method.map(|m| m.to_string()),
            stages: m
                .stages
                .iter()
                .flatten()
                .map(|s| size_to_proto(*s))
                .collect(),
            restart_step: m.restart_step.map(|v| v as i64),
            cosine_scale: m.cosine_scale,
            dilate_tau: m.dilate_tau.map(|v| v as i64),
            fast: m.fast,
            end_times: m.end_times.iter().flatten().map(|&v| v as i64).collect(),
            stage_steps: m.stage_steps.iter().flatten().map(|&v| v as i64).collect(),
            gamma: m.gamma,
            facfg: job.facfg.clone().unwrap_or_default(),
            camap: m.camap,
            tile_overlap: m.tile_overlap,
            tile_size: m.tile_size.map(i64::from),
            tile_weights: Some(m.tile_weights.to_string()),
            no_fusion: m.no_fusion,
            freeu: m.freeu,
            view_batch: m.view_batch.map(|v| v as i64),
            resize: m.resize.map(|r| r.to_string()),
            cosine_scale_bg: m.cosine_scale_bg,
            latents: Vec::new(),
            init_image: Vec::new(),
            mask: Vec::new(),
            bit_depth: Some(job.output.bit_depth.bits()),
            dzi: Some(job.output.dzi.to_string()),
            loras: job
                .loras
                .iter()
                .map(|l| v1::LoraRef {
                    name: l.name.clone(),
                    weight: l.weight,
                    sha256: l.sha256.clone(),
                })
                .collect(),
        }
    }
}

/// The request back from the wire, with every number checked for sign and range. An init
/// image or a mask counts as given when its bytes are there; the bytes stay in the spec.
impl TryFrom<&v1::JobSpec> for JobRequest {
    type Error = SpecError;

    fn try_from(spec: &v1::JobSpec) -> Result<Self, SpecError> {
        let size = spec
            .size
            .as_ref()
            .map(|s| size_from_proto("--size", s))
            .transpose()?;
        let steps = match spec.steps {
            Some(v) => count("--steps", v, 1)?,
            None => DEFAULT_STEPS,
        };
        let guidance = finite("--guidance", spec.guidance)?.unwrap_or(DEFAULT_GUIDANCE);
        let scheduler = parsed::<SchedulerKind>("--scheduler", &spec.scheduler, "ddim, euler")?;
        let (method, facfg) = method_from_proto(spec)?;
        Ok(JobRequest {
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            size,
            steps,
            guidance,
            scheduler,
            seed: spec.seed,
            method,
            facfg,
            output: output_from_proto(spec)?,
            loras: spec
                .loras
                .iter()
                .map(|l| LoraRef {
                    name: l.name.clone(),
                    weight: l.weight,
                    sha256: l.sha256.clone(),
                })
                .collect(),
        })
    }
}

/// The cascade's flags, checked in the order the flags are listed, and the FA-CFG weights.
fn method_from_proto(spec: &v1::JobSpec) -> Result<(MethodSpec, Option<Vec<f64>>), SpecError> {
    let method = parsed::<Method>(
        "--method",
        &spec.method,
        "single, freescale, frecas, hybrid",
    )?;
    let stages = non_empty(&spec.stages, |s| size_from_proto("--stages", s))?;
    let restart_step = spec
        .restart_step
        .map(|v| count("--restart-step", v, 0))
        .transpose()?;
    let cosine_scale = finite("--cosine-scale", spec.cosine_scale)?;
    let dilate_tau = spec
        .dilate_tau
        .map(|v| count("--dilate-tau", v, 0))
        .transpose()?;
    let end_times = non_empty(&spec.end_times, |&v| count("--end-times", v, 0))?;
    let stage_steps = non_empty(&spec.stage_steps, |&v| count("--stage-steps", v, 1))?;
    let gamma = finite("--gamma", spec.gamma)?;
    let facfg = non_empty(&spec.facfg, |&w| {
        finite("--facfg", Some(w))?;
        Ok(w)
    })?;
    let camap = finite("--camap", spec.camap)?;
    let tile_overlap = finite("--tile-overlap", spec.tile_overlap)?;
    let tile_size = spec
        .tile_size
        .map(|v| side("--tile-size", "side", v))
        .transpose()?;
    let tile_weights =
        parsed::<TileWeights>("--tile-weights", &spec.tile_weights, "gaussian, uniform")?
            .unwrap_or_default();
    let view_batch = spec
        .view_batch
        .map(|v| count("--view-batch", v, 1))
        .transpose()?;
    let resize = parsed::<ResizeFilter>("--resize", &spec.resize, "bicubic, bilinear, nearest")?;
    let cosine_scale_bg = finite("--cosine-scale-bg", spec.cosine_scale_bg)?;
    let method = MethodSpec {
        method,
        stages,
        restart_step,
        cosine_scale,
        cosine_scale_bg,
        dilate_tau,
        fast: spec.fast,
        end_times,
        stage_steps,
        gamma,
        facfg: None,
        camap,
        tile_overlap,
        tile_size,
        tile_weights,
        no_fusion: spec.no_fusion,
        freeu: spec.freeu,
        view_batch,
        resize,
        init_image: !spec.init_image.is_empty(),
        mask: !spec.mask.is_empty(),
    };
    Ok((method, facfg))
}

fn output_from_proto(spec: &v1::JobSpec) -> Result<OutputFormat, SpecError> {
    let dzi = parsed::<DziMode>("--dzi", &spec.dzi, "auto, always, never")?.unwrap_or_default();
    let bit_depth = match spec.bit_depth {
        None => BitDepth::default(),
        Some(8) => BitDepth::Eight,
        Some(16) => BitDepth::Sixteen,
        Some(v) => {
            return Err(SpecError(format!(
                "--bit-depth {v} is not supported: use 8 or 16"
            )))
        }
    };
    Ok(OutputFormat { bit_depth, dzi })
}

/// A repeated field: `None` when empty (the flag was not given), else each value checked.
fn non_empty<T, U>(
    values: &[T],
    check: impl Fn(&T) -> Result<U, SpecError>,
) -> Result<Option<Vec<U>>, SpecError> {
    if values.is_empty() {
        return Ok(None);
    }
    values.iter().map(check).collect::<Result<_, _>>().map(Some)
}

fn count(flag: &str, v: i64, min: i64) -> Result<usize, SpecError> {
    if v < min {
        return Err(SpecError(format!(
            "{flag} {v} is out of range: use a whole number of at least {min}"
        )));
    }
    usize::try_from(v).map_err(|_| SpecError(format!("{flag} {v} is too large")))
}

fn side(flag: &str, what: &str, v: i64) -> Result<u32, SpecError> {
    if v <= 0 {
        return Err(SpecError(format!(
            "{flag}: {what} {v} must be a positive number of pixels, e.g. 1024x1024"
        )));
    }
    u32::try_from(v).map_err(|_| {
        SpecError(format!(
            "{flag}: {what} {v} is far too large (at most {MAX_SIDE} pixels)"
        ))
    })
}

fn size_from_proto(flag: &str, s: &v1::Size) -> Result<Size, SpecError> {
    Ok(Size {
        width: side(flag, "width", s.width)?,
        height: side(flag, "height", s.height)?,
    })
}

fn finite(flag: &str, v: Option<f64>) -> Result<Option<f64>, SpecError> {
    match v {
        Some(x) if !x.is_finite() => Err(SpecError(format!("{flag} {x} is not a finite number"))),
        other => Ok(other),
    }
}

fn parsed<T: std::str::FromStr>(
    flag: &str,
    v: &Option<String>,
    choices: &str,
) -> Result<Option<T>, SpecError> {
    match v {
        None => Ok(None),
        Some(s) => s
            .parse::<T>()
            .map(Some)
            .map_err(|_| SpecError(format!("{flag} {s:?} is not known: use one of {choices}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(width: u32, height: u32) -> Size {
        Size { width, height }
    }

    #[test]
    fn requests_survive_the_round_trip() {
        let job = JobRequest {
            prompt: "a lighthouse".into(),
            size: Some(size(512, 256)),
            steps: 7,
            guidance: 3.5,
            seed: Some(11),
            method: MethodSpec {
                method: Some(Method::Hybrid),
                stages: Some(vec![size(256, 128), size(512, 256)]),
                end_times: Some(vec![200, 0]),
                stage_steps: Some(vec![4, 3]),
                camap: Some(0.5),
                tile_weights: TileWeights::Uniform,
                view_batch: Some(2),
                resize: Some(ResizeFilter::Nearest),
                fast: true,
                ..MethodSpec::default()
            },
            facfg: Some(vec![30.0, 5.0]),
            loras: vec![LoraRef {
                name: "style.safetensors".into(),
                weight: 0.6,
                sha256: format!("sha256:{}", "ab".repeat(32)),
            }],
            ..JobRequest::default()
        };
        let wire = v1::JobSpec {
            model: "tiny".into(),
            ..v1::JobSpec::from(&job)
        };
        assert_eq!(wire.model, "tiny");
        let back = JobRequest::try_from(&wire).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn given_files_come_back_as_given() {
        let job = JobRequest {
            prompt: "x".into(),
            ..JobRequest::default()
        };
        let wire = v1::JobSpec {
            mask: vec![1],
            ..v1::JobSpec::from(&job)
        };
        let back = JobRequest::try_from(&wire).unwrap();
        assert!(back.method.mask && !back.method.init_image);
    }

    #[test]
    fn bad_numbers_name_their_flag() {
        let job = JobRequest {
            prompt: "x".into(),
            ..JobRequest::default()
        };
        let mut w = v1::JobSpec {
            model: "m".into(),
            ..v1::JobSpec::from(&job)
        };
        w.steps = Some(-3);
        assert!(JobRequest::try_from(&w)
            .unwrap_err()
            .0
            .contains("--steps -3"));
        w.steps = Some(10);
        w.size = Some(v1::Size {
            width: -64,
            height: 64,
        });
        assert!(JobRequest::try_from(&w)
            .unwrap_err()
            .0
            .contains("width -64"));
        w.size = None;
        w.guidance = Some(f64::NAN);
        assert!(JobRequest::try_from(&w)
            .unwrap_err()
            .0
            .contains("--guidance"));
        w.guidance = None;
        w.method = Some("dreamy".into());
        let e = JobRequest::try_from(&w).unwrap_err().0;
        assert!(e.contains("--method") && e.contains("hybrid"), "{e}");
    }
}
