//! Checking a submitted job before anything is stored or touched on disk: every flag, every
//! file, the plan, the model, and whether a worker serving it has the memory the plan needs. A
//! refusal is INVALID_ARGUMENT (NOT_FOUND for an unknown model, RESOURCE_EXHAUSTED for a job no
//! worker can hold) with a message that says what to change.

use std::path::{Path, PathBuf};

use tessera_core::plan::{self, ArchInfo, Plan};
use tessera_core::sched::SchedulerConfig;
use tessera_core::spec::{JobRequest, RenderSpec};
use tessera_proto::v1::{self, WorkerDescription};
use tonic::Status;

use super::jobs::ModelRecord;
use super::outputs;
use crate::{image_input, latent_file};

/// Most images one job may ask for.
pub const MAX_COUNT: i64 = 10_000;
/// Priorities run from -MAX_PRIORITY to MAX_PRIORITY.
pub const MAX_PRIORITY: i32 = 1000;

/// A job that passed every check.
#[derive(Debug)]
pub struct Admitted {
    pub spec: RenderSpec,
    pub plan: Plan,
    pub model: ModelRecord,
    /// Input files to store, by name.
    pub inputs: Vec<(String, Vec<u8>)>,
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}

/// What admission needs to know of a served model.
#[derive(Debug)]
struct ServedModel {
    arch: ArchInfo,
    scheduler: SchedulerConfig,
    latent_channels: usize,
    fingerprint: String,
}

/// The served model named in `spec`, its planner info and scheduler.
fn find_model(name: &str, served: &[WorkerDescription]) -> Result<ServedModel, Status> {
    let mut names: Vec<String> = served
        .iter()
        .flat_map(|w| w.models.iter().map(|m| m.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    let listing = if names.is_empty() {
        "no worker is connected yet; start one with `tessera worker --model DIR`".to_string()
    } else {
        format!("served now: {}", names.join(", "))
    };
    if name.trim().is_empty() {
        return Err(invalid(format!(
            "--model is missing: name a model the workers serve ({listing})"
        )));
    }
    let m = served
        .iter()
        .flat_map(|w| w.models.iter())
        .find(|m| m.name == name)
        .ok_or_else(|| Status::not_found(format!("no worker serves model {name:?} ({listing})")))?;
    let arch: ArchInfo = serde_json::from_str(&m.arch_json)
        .map_err(|e| Status::internal(format!("worker's description of {name:?}: {e}")))?;
    let scheduler: SchedulerConfig = serde_json::from_str(&m.scheduler_json)
        .map_err(|e| Status::internal(format!("worker's scheduler of {name:?}: {e}")))?;
    Ok(ServedModel {
        arch,
        scheduler,
        latent_channels: m.latent_channels as usize,
        fingerprint: m.fingerprint.clone(),
    })
}

/// Checks a job; the seed is drawn here when the client left it open.
pub fn admit(spec: &v1::JobSpec, served: &[WorkerDescription]) -> Result<Admitted, Status> {
    let model = find_model(&spec.model, served)?;
    let (rspec, plan) = plan_spec(spec, &model.arch)?;
    check_capacity(&plan, &spec.model, served)?;
    let inputs = check_files(spec, &rspec, &plan, model.latent_channels)?;
    Ok(Admitted {
        spec: rspec,
        plan,
        model: ModelRecord {
            scheduler: model.scheduler,
            latent_channels: model.latent_channels,
            fingerprint: model.fingerprint,
        },
        inputs,
    })
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Refuses a plan that needs more memory per worker than any worker serving `model` has.
/// Workers that do not know their memory are given the benefit of the doubt.
fn check_capacity(plan: &Plan, model: &str, served: &[WorkerDescription]) -> Result<(), Status> {
    let sizes: Vec<u64> = served
        .iter()
        .filter(|w| w.models.iter().any(|m| m.name == model))
        .map(|w| w.device_memory_bytes)
        .collect();
    let need = plan.memory.worker_bytes;
    let Some(&largest) = sizes.iter().max() else {
        return Ok(());
    };
    if sizes.contains(&0) || largest >= need {
        return Ok(());
    }
    Err(Status::resource_exhausted(format!(
        "the plan needs about {} per worker ({} of weights and {} of activations), but the \
         largest worker serving {model:?} has {}: give the largest stage smaller tiles \
         (--tile-size), fewer views per call (--view-batch 1) or more stages, or add a worker \
         with more memory",
        gib(need),
        gib(plan.memory.worker_weights_bytes),
        gib(plan.memory.worker_activation_bytes),
        gib(largest)
    )))
}

/// The render spec and plan of a wire spec for a model of architecture `arch`.
pub fn plan_spec(spec: &v1::JobSpec, arch: &ArchInfo) -> Result<(RenderSpec, Plan), Status> {
    let request = JobRequest::try_from(spec).map_err(|e| invalid(e.0))?;
    let rspec = request
        .to_spec(arch.training_size, rand::random)
        .map_err(|e| invalid(e.0))?;
    rspec.validate().map_err(|e| invalid(e.0))?;
    let plan = plan::plan(&rspec, arch).map_err(|e| invalid(e.to_string()))?;
    Ok((rspec, plan))
}

/// Planning without a live worker is possible for `PlanJob` when the request names a
/// built-in architecture instead of a served model.
pub fn served_arch(name: &str, served: &[WorkerDescription]) -> Result<ArchInfo, Status> {
    if let Ok(arch) = ArchInfo::preset(name) {
        if !served
            .iter()
            .any(|w| w.models.iter().any(|m| m.name == name))
        {
            return Ok(arch);
        }
    }
    find_model(name, served).map(|m| m.arch)
}

fn check_files(
    spec: &v1::JobSpec,
    rspec: &RenderSpec,
    plan: &Plan,
    channels: usize,
) -> Result<Vec<(String, Vec<u8>)>, Status> {
    let mut inputs = Vec::new();
    let first = plan.stages[0].size;
    if !spec.latents.is_empty() {
        let t = latent_file::latents_from_bytes("--latents", &spec.latents)
            .map_err(|e| invalid(format!("{e:#}")))?;
        let (h, w) = plan.stages[0].latent_hw();
        let dims = t.dims().to_vec();
        let ok = dims == [1, channels, h, w] || dims == [channels, h, w];
        if !ok {
            return Err(invalid(format!(
                "--latents holds a tensor of shape {dims:?}, but the first stage ({}x{}) needs \
                 [1, {channels}, {h}, {w}]: pass matching --size/--stages or other latents",
                first[0], first[1]
            )));
        }
        inputs.push(("latents".to_string(), spec.latents.clone()));
    }
    if !spec.init_image.is_empty() {
        image_input::decode_init_image(
            Path::new("(submitted)"),
            &spec.init_image,
            (first[0], first[1]),
        )
        .map_err(|e| invalid(format!("{e:#}")))?;
        inputs.push(("init_image".to_string(), spec.init_image.clone()));
    }
    if !spec.mask.is_empty() {
        image_input::decode_mask(
            Path::new("(submitted)"),
            &spec.mask,
            (rspec.width, rspec.height),
        )
        .map_err(|e| invalid(format!("{e:#}")))?;
        inputs.push(("mask".to_string(), spec.mask.clone()));
    }
    Ok(inputs)
}

/// Longest `submit --by` kept.
const MAX_SUBMITTER: usize = 64;

/// `submit --by`: a short printable label (it is shown on pages and in terminals).
pub fn check_submitter(by: &str) -> Result<String, Status> {
    let by = by.trim();
    if by.chars().count() > MAX_SUBMITTER || by.chars().any(char::is_control) {
        return Err(invalid(format!(
            "--by takes a name of at most {MAX_SUBMITTER} printable characters"
        )));
    }
    Ok(by.to_string())
}

/// `--count`, `--priority` and `--output-dir` (against the allowed roots, from the path
/// alone), checked.
pub fn check_job_options(
    count: i64,
    priority: i32,
    output_dir: &str,
    allowed_output_dirs: &[PathBuf],
) -> Result<(u32, i32, Option<String>), Status> {
    let count = match count {
        0 => 1,
        c if (1..=MAX_COUNT).contains(&c) => c as u32,
        c => {
            return Err(invalid(format!(
                "--count {c} is out of range: use 1 to {MAX_COUNT}"
            )))
        }
    };
    if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&priority) {
        return Err(invalid(format!(
            "--priority {priority} is out of range: use -{MAX_PRIORITY} to {MAX_PRIORITY}"
        )));
    }
    let dir = if output_dir.is_empty() {
        None
    } else {
        let (clean, _) =
            outputs::check_request(allowed_output_dirs, output_dir).map_err(invalid)?;
        Some(clean.display().to_string())
    };
    Ok((count, priority, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submitters_are_short_printable_labels() {
        assert_eq!(check_submitter("  ana ").unwrap(), "ana");
        assert_eq!(check_submitter("").unwrap(), "");
        let long = "x".repeat(65);
        for bad in [long.as_str(), "ana\x1b[31m", "a\nb"] {
            let e = check_submitter(bad).unwrap_err();
            assert!(e.message().contains("--by takes a name"), "{}", e.message());
        }
    }

    #[test]
    fn job_options_are_checked() {
        let roots = [PathBuf::from("/srv/out")];
        assert_eq!(check_job_options(0, 0, "", &[]).unwrap(), (1, 0, None));
        assert_eq!(
            check_job_options(-1, 0, "", &roots).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(check_job_options(1, 5000, "", &roots)
            .unwrap_err()
            .message()
            .contains("--priority"));
        assert!(check_job_options(1, 0, "relative/dir", &roots)
            .unwrap_err()
            .message()
            .contains("absolute"));
        assert!(check_job_options(1, 0, "/srv/out/x", &[])
            .unwrap_err()
            .message()
            .contains("--allow-output-dir"));
        let (_, _, dir) = check_job_options(1, 0, "/srv/out/x/", &roots).unwrap();
        assert_eq!(dir.as_deref(), Some("/srv/out/x"));
    }

    #[test]
    fn a_plan_no_worker_can_hold_is_refused_with_its_estimate() {
        let arch = ArchInfo::preset("sdxl").unwrap();
        let spec = v1::JobSpec {
            model: "m".into(),
            prompt: "p".into(),
            ..Default::default()
        };
        let (_, plan) = plan_spec(&spec, &arch).unwrap();
        let worker = |bytes: u64| WorkerDescription {
            models: vec![v1::ModelDescription {
                name: "m".into(),
                ..Default::default()
            }],
            device_memory_bytes: bytes,
            ..Default::default()
        };
        let need = plan.memory.worker_bytes;
        assert!(check_capacity(&plan, "m", &[worker(need)]).is_ok());
        assert!(check_capacity(&plan, "m", &[worker(need / 2), worker(0)]).is_ok());
        let e = check_capacity(&plan, "m", &[worker(need / 2), worker(need / 4)]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains(&gib(need)), "{}", e.message());
        assert!(e.message().contains("--tile-size"), "{}", e.message());
    }

    #[test]
    fn unknown_models_are_not_found() {
        let e = find_model("nope", &[]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("tessera worker"), "{}", e.message());
        assert_eq!(
            find_model("", &[]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
