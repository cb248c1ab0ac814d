//! The store's key layout. Every key of a job starts with `tessera:job:{id}:`, so one prefix
//! delete removes a job; per-step keys carry stage and step, so a late result from a dead or
//! slow worker can never be read as another step's.

/// Root of every key Tessera writes.
pub const ROOT: &str = "tessera";

/// Every job the coordinator knows (sorted set: job id → submission time in ms).
pub const JOBS_INDEX: &str = "tessera:jobs";
/// Jobs waiting to run (sorted set: job id → priority-then-submission order, lowest first).
pub const JOB_QUEUE: &str = "tessera:queue";
/// Jobs a coordinator has started and not finished (set): what a restart resumes.
pub const JOBS_RUNNING: &str = "tessera:running";
/// Held (with a TTL) by the one coordinator that runs jobs; its value, `HOLDER#GENERATION`,
/// is the fence every write of that coordinator checks.
pub const COORDINATOR_LOCK: &str = "tessera:coordinator:lock";
/// Counts lock acquisitions, so each holder's token is new.
pub const COORDINATOR_GENERATION: &str = "tessera:coordinator:generation";
/// Written once by the first coordinator on a store and never deleted: when it is gone, Redis
/// lost its data (it restarted without persistence).
pub const STORE_EPOCH: &str = "tessera:store:epoch";

/// A cluster job's record: state, spec, plan and progress (JSON).
pub fn job_record(job: &str) -> String {
    format!("{}record", job_prefix(job))
}

/// A submitted input file of a cluster job (`latents`, `init_image`, `mask`).
pub fn job_input(job: &str, name: &str) -> String {
    format!("{}input:{name}", job_prefix(job))
}

/// A finished image of a cluster job (PNG bytes).
pub fn job_result(job: &str, image: u32) -> String {
    format!("{}result:{image}", job_prefix(job))
}

/// The latest live preview of a cluster job (a small PNG), replaced after every step.
pub fn job_preview(job: &str) -> String {
    format!("{}preview", job_prefix(job))
}

/// The engine's namespace for image `image` of a cluster job: under the job's prefix, so
/// deleting the job deletes it.
pub fn image_job(job: &str, image: u32) -> String {
    format!("{job}:i{image}")
}

pub fn job_prefix(job: &str) -> String {
    format!("{ROOT}:job:{job}:")
}

/// The job's render spec (JSON).
pub fn spec(job: &str) -> String {
    format!("{}spec", job_prefix(job))
}

/// The job's plan (JSON).
pub fn plan(job: &str) -> String {
    format!("{}plan", job_prefix(job))
}

/// Prompt embeddings; `part` is cond, uncond, pooled_cond or pooled_uncond.
pub fn embedding(job: &str, part: &str) -> String {
    format!("{}emb:{part}", job_prefix(job))
}

/// The current checkpoint's position (JSON: stage, steps of it done, whether it is complete).
/// Written after the tensors it names, so it never points at data that is not there.
pub fn checkpoint_state(job: &str) -> String {
    format!("{}ckpt:state", job_prefix(job))
}

/// Prefix of the tensors of the checkpoint after `step` steps of `stage`. Each checkpoint has
/// its own keys, so writing one never overwrites the one the state still names.
pub fn checkpoint_prefix(job: &str, stage: usize, step: usize) -> String {
    format!("{}ckpt:s{stage}:t{step}:", job_prefix(job))
}

/// A checkpoint tensor: `latent`, and at a stage's end `x0` and `camap`.
pub fn checkpoint(job: &str, stage: usize, step: usize, part: &str) -> String {
    format!("{}{part}", checkpoint_prefix(job, stage, step))
}

/// Prefix of everything belonging to one step: deleted once the step is merged.
pub fn step_prefix(job: &str, stage: usize, step: usize) -> String {
    format!("{}s{stage}:t{step}:", job_prefix(job))
}

/// Input or output `part` of task `task` at a step.
pub fn task(job: &str, stage: usize, step: usize, task: usize, part: &str) -> String {
    format!("{}task{task}:{part}", step_prefix(job, stage, step))
}

/// Stage-level values (the upscaled latent of a stage, its CA-map, transition images).
pub fn stage(job: &str, stage: usize, part: &str) -> String {
    format!("{}stage{stage}:{part}", job_prefix(job))
}

/// The keys a task's success must leave in the store (the coordinator checks them before it
/// counts the task done): its outputs, and for prompt encoding both embeddings.
pub fn task_outputs(task: &tessera_core::task::Task) -> Vec<String> {
    use tessera_core::task::TaskKind;
    match &task.kind {
        TaskKind::EncodePrompt { .. } => {
            vec![embedding(&task.job, "uncond"), embedding(&task.job, "cond")]
        }
        TaskKind::Denoise(d) => std::iter::once(d.output_cond.clone())
            .chain(d.output_uncond.clone())
            .collect(),
        TaskKind::Decode { output, .. }
        | TaskKind::Encode { output, .. }
        | TaskKind::EncodeTile { output, .. } => vec![output.clone()],
    }
}

/// Where `key` lies among job `job`'s per-step and per-stage keys: `Step(stage, step)` under
/// [`step_prefix`], `Stage(stage)` under [`stage`], `None` anywhere else (the job's durable
/// keys, or another job's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scratch {
    Step(usize, usize),
    Stage(usize),
}

pub fn scratch_of(job: &str, key: &str) -> Option<Scratch> {
    let rest = key.strip_prefix(&job_prefix(job))?;
    if let Some((k, _)) = numbered(rest, "stage") {
        return Some(Scratch::Stage(k));
    }
    let (k, rest) = numbered(rest, "s")?;
    let (j, _) = numbered(rest, "t")?;
    Some(Scratch::Step(k, j))
}

/// `TAG<digits>:rest` → (the number, rest).
fn numbered<'a>(s: &'a str, tag: &str) -> Option<(usize, &'a str)> {
    let s = s.strip_prefix(tag)?;
    let end = s.find(|c: char| !c.is_ascii_digit())?;
    let n = s[..end].parse().ok()?;
    Some((n, s[end..].strip_prefix(':')?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_keys_are_distinct_and_under_the_job() {
        let a = task("j1", 1, 3, 0, "out");
        let b = task("j1", 1, 13, 0, "out");
        let c = task("j1", 11, 3, 0, "out");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with(&job_prefix("j1")));
        assert!(a.starts_with(&step_prefix("j1", 1, 3)));
        assert!(!b.starts_with(&step_prefix("j1", 1, 1)));
    }

    #[test]
    fn scratch_keys_are_told_from_durable_ones() {
        assert_eq!(
            scratch_of("j:i0", &task("j:i0", 2, 7, 3, "out")),
            Some(Scratch::Step(2, 7))
        );
        assert_eq!(
            scratch_of("j:i0", &stage("j:i0", 1, "vae:decode:r0c0:latent")),
            Some(Scratch::Stage(1))
        );
        for durable in [
            spec("j:i0"),
            embedding("j:i0", "cond"),
            checkpoint("j:i0", 1, 2, "latent"),
            checkpoint_state("j:i0"),
            job_record("j"),
        ] {
            assert_eq!(scratch_of("j:i0", &durable), None, "{durable}");
        }
        assert_eq!(scratch_of("k:i0", &task("j:i0", 1, 1, 1, "out")), None);
        assert_eq!(scratch_of("j:i0", "tessera:job:j:i0:s1:tx:task"), None);
        assert_eq!(scratch_of("j:i0", "tessera:job:j:i0:stage:x"), None);
    }
}
