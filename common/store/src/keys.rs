//! The store's key layout. Every key of a job starts with `tessera:job:{id}:`, so one prefix
//! delete removes a job; per-step keys carry stage and step, so a late result from a dead or
//! slow worker can never be read as another step's.
//!
//! **Hash tags (Redis Cluster).** Every key ends in a hash tag, `{…}`: a Redis Cluster places
//! a key by the part between its first `{` and the next `}` only, and one Redis ignores it, so
//! both store kinds share this one layout. The tag is a function of the key's name
//! ([`tag_of`] names the rule of each kind), and keys that a multi-key operation touches
//! together share it:
//!
//! - the **control tag** [`CONTROL_TAG`]: the coordinator lock, its generation, the store's
//!   epoch, the job indexes and every job's record and input files. The lock scripts and the
//!   job batches (submit, start, finish, sweep) touch these together, so they live in one slot;
//!   they are small.
//! - one of [`BUCKETS`] **bucket tags** for everything else, the bulk: a task's keys (its
//!   views, predictions and CA-map capture: one bucket per task, as a worker's guarded write
//!   checks the input beside the output), a VAE tile's stage keys (input and output: one
//!   bucket per tile), each checkpoint tensor, an image's spec, plan and embeddings (one
//!   bucket: the prompt task's guarded write checks the spec), previews and results. Bucket
//!   tags are chosen so that bucket `i` lies in slots `[i·64, (i+1)·64)`: the buckets cover the
//!   slot space evenly, so every master of any cluster gets its share of them.
//!
//! The tag is a suffix, so every prefix (a job, a step, a checkpoint) still covers all its
//! keys, and job ids cannot hold `{` or `}` (the worker refuses them; the coordinator makes
//! hex ids), so a key's first `{` is its tag's.
//!
//! **Fence copies.** A Lua script can only touch keys of one slot, so the coordinator's fence
//! (its lock, in the control slot) is copied into every bucket: [`fence_copy`] of a bucket
//! holds the lock holder's token, written by each new holder before it writes anything else
//! (`RedisStore::arm_fence`), and a fenced write to a bucket key checks its bucket's copy.

use std::sync::LazyLock;

/// Root of every key Tessera writes.
pub const ROOT: &str = "tessera";

/// Every job the coordinator knows (sorted set: job id → submission time in ms).
pub const JOBS_INDEX: &str = "tessera:jobs{tessera}";
/// Jobs waiting to run (sorted set: job id → priority-then-submission order, lowest first).
pub const JOB_QUEUE: &str = "tessera:queue{tessera}";
/// Jobs a coordinator has started and not finished (set): what a restart resumes.
pub const JOBS_RUNNING: &str = "tessera:running{tessera}";
/// Held (with a TTL) by the one coordinator that runs jobs; its value, `HOLDER#GENERATION`,
/// is the fence every write of that coordinator checks.
pub const COORDINATOR_LOCK: &str = "tessera:coordinator:lock{tessera}";
/// Counts lock acquisitions, so each holder's token is new.
pub const COORDINATOR_GENERATION: &str = "tessera:coordinator:generation{tessera}";
/// Written once by the first coordinator on a store and never deleted: when it is gone, Redis
/// lost its data (it restarted without persistence).
pub const STORE_EPOCH: &str = "tessera:store:epoch{tessera}";

/// The hash tag of the coordinator's state (see the module docs).
pub const CONTROL_TAG: &str = "{tessera}";
/// How many bucket tags the bulk keys spread over: enough that every master of a cluster of
/// a few dozen gets a fair share, few enough that a new lock holder copies its fence token
/// into all of them in a moment.
pub const BUCKETS: usize = 256;
/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// A cluster job's record: state, spec, plan and progress (JSON).
pub fn job_record(job: &str) -> String {
    format!("{}record{CONTROL_TAG}", job_prefix(job))
}

/// A submitted input file of a cluster job (`latents`, `init_image`, `mask`): written with
/// the record in one batch at submission.
pub fn job_input(job: &str, name: &str) -> String {
    format!("{}input:{name}{CONTROL_TAG}", job_prefix(job))
}

/// A finished image of a cluster job (PNG bytes).
pub fn job_result(job: &str, image: u32) -> String {
    bucketed(format!("{}result:{image}", job_prefix(job)))
}

/// The latest live preview of a cluster job (a small PNG), replaced after every step.
pub fn job_preview(job: &str) -> String {
    bucketed(format!("{}preview", job_prefix(job)))
}

/// The engine's namespace for image `image` of a cluster job: under the job's prefix, so
/// deleting the job deletes it.
pub fn image_job(job: &str, image: u32) -> String {
    format!("{job}:i{image}")
}

pub fn job_prefix(job: &str) -> String {
    format!("{ROOT}:job:{job}:")
}

/// The bucket of a job's spec, plan, embeddings and checkpoint position: one, as the prompt
/// task writes the embeddings guarded by the spec.
fn meta(job: &str, name: &str) -> String {
    let prefix = job_prefix(job);
    let tag = bucket_tag(bucket_of(&format!("{prefix}meta")));
    format!("{prefix}{name}{tag}")
}

/// The job's render spec (JSON).
pub fn spec(job: &str) -> String {
    meta(job, "spec")
}

/// The job's plan (JSON).
pub fn plan(job: &str) -> String {
    meta(job, "plan")
}

/// Prompt embeddings; `part` is cond, uncond, pooled_cond or pooled_uncond.
pub fn embedding(job: &str, part: &str) -> String {
    meta(job, &format!("emb:{part}"))
}

/// The current checkpoint's position (JSON: stage, steps of it done, whether it is complete).
/// Written after the tensors it names, so it never points at data that is not there.
pub fn checkpoint_state(job: &str) -> String {
    meta(job, "ckpt:state")
}

/// Prefix of the tensors of the checkpoint after `step` steps of `stage`. Each checkpoint has
/// its own keys, so writing one never overwrites the one the state still names.
pub fn checkpoint_prefix(job: &str, stage: usize, step: usize) -> String {
    format!("{}ckpt:s{stage}:t{step}:", job_prefix(job))
}

/// A checkpoint tensor: `latent`, and at a stage's end `x0` and `camap`; each in its own
/// bucket.
pub fn checkpoint(job: &str, stage: usize, step: usize, part: &str) -> String {
    bucketed(format!("{}{part}", checkpoint_prefix(job, stage, step)))
}

/// Prefix of everything belonging to one step: deleted once the step is merged.
pub fn step_prefix(job: &str, stage: usize, step: usize) -> String {
    format!("{}s{stage}:t{step}:", job_prefix(job))
}

/// Input or output `part` of task `task` at a step; a task's keys share the bucket of
/// `…:task{task}:`.
pub fn task(job: &str, stage: usize, step: usize, task: usize, part: &str) -> String {
    let basis = format!("{}task{task}:", step_prefix(job, stage, step));
    let tag = bucket_tag(bucket_of(&basis));
    format!("{basis}{part}{tag}")
}

/// Stage-level values (the upscaled latent of a stage, its CA-map, transition images). Keys
/// that differ only in their last `:` part share a bucket: a VAE tile's input and output
/// (`vae:decode:r0c1:latent`, `…:image`).
pub fn stage(job: &str, stage: usize, part: &str) -> String {
    let name = format!("{}stage{stage}:{part}", job_prefix(job));
    let basis = name.rsplit_once(':').map_or(name.as_str(), |(b, _)| b);
    let tag = bucket_tag(bucket_of(basis));
    format!("{name}{tag}")
}

/// `name` in the bucket of its whole name.
fn bucketed(name: String) -> String {
    let tag = bucket_tag(bucket_of(&name));
    name + tag
}

/// The bucket (0..[`BUCKETS`]) that `basis` falls in.
fn bucket_of(basis: &str) -> usize {
    usize::from(crc16(basis.as_bytes())) % BUCKETS
}

/// The hash tag of bucket `i`, braces included: `{i.n}` for the first `n` that puts it in
/// slots `[i·64, (i+1)·64)` (found once, in a few hundred tries per bucket).
pub fn bucket_tag(i: usize) -> &'static str {
    static TAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
        let width = usize::from(SLOTS) / BUCKETS;
        (0..BUCKETS)
            .map(|i| {
                (0u32..)
                    .map(|n| format!("{i}.{n}"))
                    .find(|t| usize::from(slot_of_tag(t.as_bytes())) / width == i)
                    .map(|t| format!("{{{t}}}"))
                    .expect("some tag falls in every bucket's slots")
            })
            .collect()
    });
    &TAGS[i % BUCKETS]
}

/// The part of `key` a Redis Cluster hashes: between the first `{` and the next `}` when that
/// is not empty, else the whole key (the Redis Cluster specification's rule).
pub fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.find('}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key)
}

/// The cluster slot of `key`.
pub fn slot(key: &str) -> u16 {
    slot_of_tag(hash_tag(key).as_bytes())
}

fn slot_of_tag(tag: &[u8]) -> u16 {
    crc16(tag) % SLOTS
}

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster places keys
/// by.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The copy of the coordinator's fence token in the slot of hash tag `tag` (without braces).
pub fn fence_copy(tag: &str) -> String {
    format!("{ROOT}:fence{{{tag}}}")
}

/// Every bucket's fence copy: what a new lock holder writes its token to.
pub fn fence_copies() -> Vec<String> {
    (0..BUCKETS)
        .map(|i| fence_copy(hash_tag(bucket_tag(i))))
        .collect()
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

/// Where `key` lies among job `job`'s per-step and per-stage keys: `Step(stage, step)` for a
/// [`task`] key, `Stage(stage)` for a [`stage`] key, `None` anywhere else (the job's durable
/// keys, another job's, or a key whose hash tag is not the one its name calls for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scratch {
    Step(usize, usize),
    Stage(usize),
}

pub fn scratch_of(job: &str, key: &str) -> Option<Scratch> {
    let (name, _) = key.split_once('{')?;
    let rest = name.strip_prefix(&job_prefix(job))?;
    if let Some((k, part)) = numbered(rest, "stage") {
        return (stage(job, k, part) == key).then_some(Scratch::Stage(k));
    }
    let (k, rest) = numbered(rest, "s")?;
    let (j, rest) = numbered(rest, "t")?;
    let (t, part) = numbered(rest, "task")?;
    (task(job, k, j, t, part) == key).then_some(Scratch::Step(k, j))
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
        assert_eq!(scratch_of("j:i0", "tessera:job:j:i0:s1:tx:task{1.0}"), None);
        assert_eq!(scratch_of("j:i0", "tessera:job:j:i0:stage:x{1.0}"), None);
        // The right name in another bucket, or without its tag, is not the job's key.
        let good = task("j:i0", 2, 7, 3, "out");
        let (name, _) = good.split_once('{').unwrap();
        let other = (0..BUCKETS)
            .map(|i| format!("{name}{}", bucket_tag(i)))
            .find(|k| *k != good)
            .unwrap();
        assert_eq!(scratch_of("j:i0", &other), None);
        assert_eq!(scratch_of("j:i0", name), None);
    }

    #[test]
    fn slots_follow_the_redis_cluster_rule() {
        // The specification's check value, and slots redis-cli reports (CLUSTER KEYSLOT).
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_eq!(hash_tag("foo{}{bar}"), "foo{}{bar}");
        assert_eq!(hash_tag("foo{{bar}}zap"), "{bar");
        assert_eq!(hash_tag("foo{bar}{zap}"), "bar");
    }

    #[test]
    fn buckets_cover_the_slots_evenly_and_tasks_spread() {
        for i in 0..BUCKETS {
            assert_eq!(
                usize::from(slot(bucket_tag(i))) / 64,
                i,
                "{}",
                bucket_tag(i)
            );
        }
        // Every key is tagged, every kind of multi-key operation stays in one slot.
        assert_eq!(
            slot(&task("j", 1, 2, 3, "in")),
            slot(&task("j", 1, 2, 3, "out"))
        );
        assert_eq!(slot(&spec("j:i0")), slot(&embedding("j:i0", "cond")));
        assert_eq!(
            slot(&stage("j", 0, "vae:decode:r0c1:latent")),
            slot(&stage("j", 0, "vae:decode:r0c1:image"))
        );
        for key in [
            JOBS_INDEX,
            JOB_QUEUE,
            JOBS_RUNNING,
            COORDINATOR_GENERATION,
            STORE_EPOCH,
        ]
        .into_iter()
        .map(String::from)
        .chain([job_record("j"), job_input("j", "mask")])
        {
            assert_eq!(slot(&key), slot(COORDINATOR_LOCK), "{key}");
        }
        for i in 0..BUCKETS {
            assert_eq!(slot(&fence_copies()[i]), slot(bucket_tag(i)));
        }
        // A step's 289 tasks reach a third of the slot space each side of a 3-way split.
        let thirds = (0..289).fold([0; 3], |mut n, t| {
            n[usize::from(slot(&task("j:i0", 1, 4, t, "in"))) * 3 / 16384] += 1;
            n
        });
        assert!(thirds.iter().all(|&n| n > 70), "{thirds:?}");
    }
}
