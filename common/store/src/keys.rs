//! The store's key layout. Every key of a job starts with `tessera:job:{id}:`, so one prefix
//! delete removes a job; per-step keys carry stage and step, so a late result from a dead or
//! slow worker can never be read as another step's.

/// Root of every key Tessera writes.
pub const ROOT: &str = "tessera";

/// Live workers: one key per worker holding its description, kept alive by heartbeats (TTL).
pub const WORKERS_PREFIX: &str = "tessera:worker:";

pub fn worker(id: &str) -> String {
    format!("{WORKERS_PREFIX}{id}")
}

/// Every job the coordinator knows (sorted set: job id → submission time in ms).
pub const JOBS_INDEX: &str = "tessera:jobs";
/// Jobs waiting to run (sorted set: job id → priority-then-submission order, lowest first).
pub const JOB_QUEUE: &str = "tessera:queue";
/// Jobs a coordinator has started and not finished (set): what a restart resumes.
pub const JOBS_RUNNING: &str = "tessera:running";
/// Held (with a TTL) by the one coordinator that runs jobs.
pub const COORDINATOR_LOCK: &str = "tessera:coordinator:lock";

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
}
