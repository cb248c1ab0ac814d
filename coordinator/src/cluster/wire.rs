//! The job flags on the wire: the client turns `JobArgs` into a proto `JobSpec`, the
//! coordinator turns it back and checks it. Both directions live here so they cannot drift.
//! Numbers travel signed, so that a negative value is refused with a message naming its
//! flag rather than failing to decode.

use std::path::PathBuf;

use tessera_core::method::params::{Method, TileWeights};
use tessera_core::resize::ResizeFilter;
use tessera_core::sched::SchedulerKind;
use tessera_core::spec::{BitDepth, DziMode, Size};
use tessera_proto::v1;

use crate::cli::job::JobArgs;

/// A spec the coordinator refuses, with what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn size_to_wire(s: Size) -> v1::Size {
    v1::Size {
        width: i64::from(s.width),
        height: i64::from(s.height),
    }
}

/// The job flags (and the bytes of any files they name) as a proto spec.
pub fn to_wire(model: &str, job: &JobArgs, files: WireFiles) -> v1::JobSpec {
    v1::JobSpec {
        model: model.to_string(),
        prompt: job.prompt.clone().unwrap_or_default(),
        negative_prompt: job.negative_prompt.clone(),
        size: job.size.map(size_to_wire),
        steps: Some(job.steps as i64),
        guidance: Some(job.guidance),
        scheduler: job.scheduler.map(|s| s.to_string()),
        seed: job.seed,
        method: job.method.map(|m| m.to_string()),
        stages: job
            .stages
            .iter()
            .flatten()
            .map(|s| size_to_wire(*s))
            .collect(),
        restart_step: job.restart_step.map(|v| v as i64),
        cosine_scale: job.cosine_scale,
        dilate_tau: job.dilate_tau.map(|v| v as i64),
        fast: job.fast,
        end_times: job.end_times.iter().flatten().map(|&v| v as i64).collect(),
        stage_steps: job
            .stage_steps
            .iter()
            .flatten()
            .map(|&v| v as i64)
            .collect(),
        gamma: job.gamma,
        facfg: job.facfg.clone().unwrap_or_default(),
        camap: job.camap,
        tile_overlap: job.tile_overlap,
        tile_size: job.tile_size.map(i64::from),
        tile_weights: Some(job.tile_weights.to_string()),
        no_fusion: job.no_fusion,
        freeu: job.freeu,
        view_batch: job.view_batch.map(|v| v as i64),
        resize: job.resize.map(|r| r.to_string()),
        cosine_scale_bg: job.cosine_scale_bg,
        latents: files.latents,
        init_image: files.init_image,
        mask: files.mask,
        bit_depth: Some(job.bit_depth.bits()),
        dzi: Some(job.dzi.to_string()),
    }
}

/// File contents sent with a job.
#[derive(Debug, Default, Clone)]
pub struct WireFiles {
    pub latents: Vec<u8>,
    pub init_image: Vec<u8>,
    pub mask: Vec<u8>,
}

fn count(flag: &str, v: i64, min: i64) -> Result<usize, Invalid> {
    if v < min {
        return Err(Invalid(format!(
            "{flag} {v} is out of range: use a whole number of at least {min}"
        )));
    }
    usize::try_from(v).map_err(|_| Invalid(format!("{flag} {v} is too large")))
}

fn side(flag: &str, what: &str, v: i64) -> Result<u32, Invalid> {
    if v <= 0 {
        return Err(Invalid(format!(
            "{flag}: {what} {v} must be a positive number of pixels, e.g. 1024x1024"
        )));
    }
    u32::try_from(v).map_err(|_| {
        Invalid(format!(
            "{flag}: {what} {v} is far too large (at most {} pixels)",
            tessera_core::spec::MAX_SIDE
        ))
    })
}

fn size_from_wire(flag: &str, s: &v1::Size) -> Result<Size, Invalid> {
    Ok(Size {
        width: side(flag, "width", s.width)?,
        height: side(flag, "height", s.height)?,
    })
}

fn finite(flag: &str, v: Option<f64>) -> Result<Option<f64>, Invalid> {
    match v {
        Some(x) if !x.is_finite() => Err(Invalid(format!("{flag} {x} is not a finite number"))),
        other => Ok(other),
    }
}

fn parsed<T: std::str::FromStr>(
    flag: &str,
    v: &Option<String>,
    choices: &str,
) -> Result<Option<T>, Invalid> {
    match v {
        None => Ok(None),
        Some(s) => s
            .parse::<T>()
            .map(Some)
            .map_err(|_| Invalid(format!("{flag} {s:?} is not known: use one of {choices}"))),
    }
}

/// The job flags back from the wire, with every number checked for sign and range. Files
/// come back as flags that say they were given; their bytes stay in the request.
pub fn from_wire(spec: &v1::JobSpec) -> Result<JobArgs, Invalid> {
    let non_empty = |v: &[u8]| (!v.is_empty()).then(|| PathBuf::from("(submitted)"));
    Ok(JobArgs {
        prompt: Some(spec.prompt.clone()),
        negative_prompt: spec.negative_prompt.clone(),
        size: spec
            .size
            .as_ref()
            .map(|s| size_from_wire("--size", s))
            .transpose()?,
        steps: match spec.steps {
            Some(v) => count("--steps", v, 1)?,
            None => 50,
        },
        guidance: finite("--guidance", spec.guidance)?.unwrap_or(7.5),
        scheduler: parsed::<SchedulerKind>("--scheduler", &spec.scheduler, "ddim, euler")?,
        seed: spec.seed,
        method: parsed::<Method>(
            "--method",
            &spec.method,
            "single, freescale, frecas, hybrid",
        )?,
        stages: if spec.stages.is_empty() {
            None
        } else {
            Some(
                spec.stages
                    .iter()
                    .map(|s| size_from_wire("--stages", s))
                    .collect::<Result<_, _>>()?,
            )
        },
        restart_step: spec
            .restart_step
            .map(|v| count("--restart-step", v, 0))
            .transpose()?,
        cosine_scale: finite("--cosine-scale", spec.cosine_scale)?,
        dilate_tau: spec
            .dilate_tau
            .map(|v| count("--dilate-tau", v, 0))
            .transpose()?,
        fast: spec.fast,
        end_times: if spec.end_times.is_empty() {
            None
        } else {
            Some(
                spec.end_times
                    .iter()
                    .map(|&v| count("--end-times", v, 0))
                    .collect::<Result<_, _>>()?,
            )
        },
        stage_steps: if spec.stage_steps.is_empty() {
            None
        } else {
            Some(
                spec.stage_steps
                    .iter()
                    .map(|&v| count("--stage-steps", v, 1))
                    .collect::<Result<_, _>>()?,
            )
        },
        gamma: finite("--gamma", spec.gamma)?,
        facfg: if spec.facfg.is_empty() {
            None
        } else {
            for &w in &spec.facfg {
                finite("--facfg", Some(w))?;
            }
            Some(spec.facfg.clone())
        },
        camap: finite("--camap", spec.camap)?,
        tile_overlap: finite("--tile-overlap", spec.tile_overlap)?,
        tile_size: spec
            .tile_size
            .map(|v| side("--tile-size", "side", v))
            .transpose()?,
        tile_weights: parsed::<TileWeights>(
            "--tile-weights",
            &spec.tile_weights,
            "gaussian, uniform",
        )?
        .unwrap_or_default(),
        no_fusion: spec.no_fusion,
        freeu: spec.freeu,
        view_batch: spec
            .view_batch
            .map(|v| count("--view-batch", v, 1))
            .transpose()?,
        resize: parsed::<ResizeFilter>("--resize", &spec.resize, "bicubic, bilinear, nearest")?,
        init_image: non_empty(&spec.init_image),
        mask: non_empty(&spec.mask),
        cosine_scale_bg: finite("--cosine-scale-bg", spec.cosine_scale_bg)?,
        dzi: parsed::<DziMode>("--dzi", &spec.dzi, "auto, always, never")?.unwrap_or_default(),
        bit_depth: match spec.bit_depth {
            None | Some(8) => BitDepth::Eight,
            Some(16) => BitDepth::Sixteen,
            Some(v) => {
                return Err(Invalid(format!(
                    "--bit-depth {v} is not supported: use 8 or 16"
                )))
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        job: JobArgs,
    }

    fn args(line: &[&str]) -> JobArgs {
        Flags::parse_from(std::iter::once("t").chain(line.iter().copied())).job
    }

    #[test]
    fn flags_survive_the_round_trip() {
        let job = args(&[
            "--prompt",
            "a lighthouse",
            "--size",
            "512x256",
            "--steps",
            "7",
            "--guidance",
            "3.5",
            "--seed",
            "11",
            "--method",
            "hybrid",
            "--stages",
            "256x128,512x256",
            "--end-times",
            "200,0",
            "--stage-steps",
            "4,3",
            "--facfg",
            "30,5",
            "--camap",
            "0.5",
            "--tile-weights",
            "uniform",
            "--view-batch",
            "2",
            "--resize",
            "nearest",
            "--fast",
        ]);
        let wire = to_wire("tiny", &job, WireFiles::default());
        assert_eq!(wire.model, "tiny");
        let back = from_wire(&wire).unwrap();
        assert_eq!(format!("{back:?}"), format!("{job:?}"));
    }

    #[test]
    fn bad_numbers_name_their_flag() {
        let mut w = to_wire("m", &args(&["--prompt", "x"]), WireFiles::default());
        w.steps = Some(-3);
        assert!(from_wire(&w).unwrap_err().0.contains("--steps -3"));
        w.steps = Some(10);
        w.size = Some(v1::Size {
            width: -64,
            height: 64,
        });
        assert!(from_wire(&w).unwrap_err().0.contains("width -64"));
        w.size = None;
        w.guidance = Some(f64::NAN);
        assert!(from_wire(&w).unwrap_err().0.contains("--guidance"));
        w.guidance = None;
        w.method = Some("dreamy".into());
        let e = from_wire(&w).unwrap_err().0;
        assert!(e.contains("--method") && e.contains("hybrid"), "{e}");
    }
}
