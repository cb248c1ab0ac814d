//! Job records in Redis: what a job is (spec, plan, model), where it is (state, progress),
//! and the indexes a coordinator needs after a restart (queue, running set, all jobs).
//! Every change that touches more than one key is one atomic batch, so a crash never leaves
//! a job half-submitted or both queued and running; the coordinator's store is fenced, so each
//! batch lands only while this coordinator holds the lock.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tessera_core::plan::Plan;
use tessera_core::sched::SchedulerConfig;
use tessera_core::spec::RenderSpec;
use tessera_proto::v1;
use tessera_store::{keys, RedisStore, StoreError, WriteBatch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    pub fn to_wire(self) -> v1::JobState {
        match self {
            Self::Queued => v1::JobState::Queued,
            Self::Running => v1::JobState::Running,
            Self::Succeeded => v1::JobState::Succeeded,
            Self::Failed => v1::JobState::Failed,
            Self::Cancelled => v1::JobState::Cancelled,
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressRecord {
    pub image: u32,
    pub stage: u32,
    pub stages: u32,
    pub step: u32,
    pub steps: u32,
    pub views_done: u64,
    pub views_total: u64,
    pub phase: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRecord {
    pub image: u32,
    pub stage: u32,
    pub step: u32,
}

/// The coordinator's view of the model a job runs on, fixed at submission.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRecord {
    pub scheduler: SchedulerConfig,
    pub latent_channels: usize,
    /// The served model's fingerprint: only workers carrying it run the job's tasks.
    #[serde(default)]
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// Submission time in ms: the order among jobs of equal priority.
    pub seq: u64,
    pub state: JobState,
    /// The served model's name.
    pub model: String,
    pub model_info: ModelRecord,
    /// The first image's spec; image `n` uses seed + n.
    pub spec: RenderSpec,
    pub plan: Plan,
    pub count: u32,
    pub priority: i32,
    pub output_dir: Option<String>,
    /// Which submitted input files are stored (`latents`, `init_image`, `mask`).
    pub inputs: Vec<String>,
    pub images_done: u32,
    pub progress: ProgressRecord,
    pub error: Option<String>,
    pub resumed_from: Option<ResumeRecord>,
    /// What went wrong beside the render without failing it (a copy to `--output-dir`).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The client's `submit --notify` URL, told when the job ends (kept in the record so a
    /// coordinator that resumes the job still tells it).
    #[serde(default)]
    pub notify: Option<String>,
    /// Who submitted it, as the client said (`submit --by`); a label, not an identity.
    #[serde(default)]
    pub submitted_by: String,
    pub created_ms: i64,
    pub started_ms: i64,
    pub finished_ms: i64,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Queue order: higher priority first, then submission time. `seq` is the submission time
/// in ms (below 2^42 until 2109) and priorities are limited to ±1000 at submission, so the
/// score stays an exact integer in a double.
pub fn queue_score(priority: i32, seq: u64) -> f64 {
    -(f64::from(priority)) * (1u64 << 42) as f64 + seq as f64
}

impl JobRecord {
    pub fn to_wire(&self, eta_seconds: f64) -> v1::JobInfo {
        let p = &self.progress;
        v1::JobInfo {
            job_id: self.id.clone(),
            state: self.state.to_wire() as i32,
            model: self.model.clone(),
            prompt: self.spec.prompt.clone(),
            width: self.spec.width,
            height: self.spec.height,
            method: self.plan.method.to_string(),
            seed: self.spec.seed,
            count: self.count,
            priority: self.priority,
            progress: Some(v1::JobProgress {
                image: p.image,
                images_done: self.images_done,
                stage: p.stage,
                stages: p.stages,
                step: p.step,
                steps: p.steps,
                views_done: p.views_done,
                views_total: p.views_total,
                eta_seconds,
                phase: p.phase.clone(),
            }),
            error: self.error.clone().unwrap_or_default(),
            created_unix_ms: self.created_ms,
            started_unix_ms: self.started_ms,
            finished_unix_ms: self.finished_ms,
            resumed_from: self.resumed_from.map(|r| v1::ResumePoint {
                image: r.image,
                stage: r.stage,
                step: r.step,
            }),
            output_dir: self.output_dir.clone().unwrap_or_default(),
            warnings: self.warnings.clone(),
            model_fingerprint: self.model_info.fingerprint.clone(),
        }
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<JobRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Codec {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn encode(record: &JobRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError::Codec {
        key: keys::job_record(&record.id),
        message: e.to_string(),
    })
}

/// Job records and indexes over a Redis store.
#[derive(Clone)]
pub struct Jobs {
    pub store: RedisStore,
}

impl Jobs {
    /// Stores a new job with its input files and queues it, all or nothing.
    pub async fn create(
        &self,
        record: &JobRecord,
        inputs: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let id = &record.id;
        let encoded = encode(record)?;
        let mut batch = WriteBatch::new();
        batch.set(&keys::job_record(id), &encoded);
        for (name, data) in inputs {
            batch.set(&keys::job_input(id, name), data);
        }
        batch.zadd(keys::JOBS_INDEX, id, record.seq as f64).zadd(
            keys::JOB_QUEUE,
            id,
            queue_score(record.priority, record.seq),
        );
        self.store.write_batch("submit", &batch).await.map(drop)
    }

    /// Jobs waiting in the queue.
    pub async fn queued_count(&self) -> Result<u64, StoreError> {
        self.count(keys::JOB_QUEUE, "queue length").await
    }

    /// Jobs listed (every state, until they expire).
    pub async fn listed_count(&self) -> Result<u64, StoreError> {
        self.count(keys::JOBS_INDEX, "job count").await
    }

    async fn count(&self, index: &str, what: &str) -> Result<u64, StoreError> {
        let mut cmd = redis::cmd("ZCARD");
        cmd.arg(index);
        self.store
            .with_retry(what, |mut c| {
                let cmd = cmd.clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await
    }

    pub async fn load(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let key = keys::job_record(id);
        match self.store.get_async(&key).await? {
            None => Ok(None),
            Some(bytes) => decode(&key, &bytes).map(Some),
        }
    }

    /// Records of several jobs in one round trip; expired ones are left out.
    pub async fn load_many(&self, ids: &[String]) -> Result<Vec<JobRecord>, StoreError> {
        let names: Vec<String> = ids.iter().map(|id| keys::job_record(id)).collect();
        let values = self.store.get_many_async(&names).await?;
        names
            .iter()
            .zip(values)
            .filter_map(|(key, v)| v.map(|bytes| decode(key, &bytes)))
            .collect()
    }

    pub async fn save(&self, record: &JobRecord) -> Result<(), StoreError> {
        self.store
            .put_async(&keys::job_record(&record.id), &encode(record)?)
            .await
    }

    /// A queued job's record and queue place after its priority changed, atomically.
    pub async fn reprioritise(&self, record: &JobRecord) -> Result<(), StoreError> {
        let id = &record.id;
        let encoded = encode(record)?;
        let mut batch = WriteBatch::new();
        batch.set(&keys::job_record(id), &encoded).zadd(
            keys::JOB_QUEUE,
            id,
            queue_score(record.priority, record.seq),
        );
        self.store.write_batch("priority", &batch).await.map(drop)
    }

    /// Queued → running, atomically.
    pub async fn mark_running(&self, record: &JobRecord) -> Result<(), StoreError> {
        let id = &record.id;
        let encoded = encode(record)?;
        let mut batch = WriteBatch::new();
        batch
            .set(&keys::job_record(id), &encoded)
            .zrem(keys::JOB_QUEUE, id)
            .sadd(keys::JOBS_RUNNING, id);
        self.store.write_batch("start job", &batch).await.map(drop)
    }

    /// Records the end of a job and starts its expiry clock. `keep_results` is false for
    /// cancelled and failed jobs: everything but the record goes at once. (Each finished
    /// image's scratch keys are cleared as it finishes.)
    pub async fn finish(
        &self,
        record: &JobRecord,
        ttl: Duration,
        keep_results: bool,
    ) -> Result<(), StoreError> {
        let id = &record.id;
        let prefix = keys::job_prefix(id);
        if !keep_results {
            self.store.delete_prefix_async(&prefix).await?;
        } else {
            for name in &record.inputs {
                self.store.delete_async(&keys::job_input(id, name)).await?;
            }
        }
        let encoded = encode(record)?;
        let mut batch = WriteBatch::new();
        batch
            .set(&keys::job_record(id), &encoded)
            .zadd(keys::JOBS_INDEX, id, record.seq as f64)
            .zrem(keys::JOB_QUEUE, id)
            .srem(keys::JOBS_RUNNING, id);
        self.store.write_batch("finish job", &batch).await?;
        self.store.expire_prefix(&prefix, ttl).await?;
        Ok(())
    }

    /// The job ids a read-only command returns.
    async fn ids(&self, what: &str, cmd: redis::Cmd) -> Result<Vec<String>, StoreError> {
        self.store
            .with_retry(what, |mut c| {
                let cmd = cmd.clone();
                async move { cmd.query_async::<Vec<String>>(&mut c).await }
            })
            .await
    }

    /// Ids of queued jobs in run order.
    pub async fn queued(&self) -> Result<Vec<String>, StoreError> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(keys::JOB_QUEUE).arg(0).arg(-1);
        self.ids("queue", cmd).await
    }

    /// Jobs a coordinator started and did not finish.
    pub async fn running(&self) -> Result<Vec<String>, StoreError> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(keys::JOBS_RUNNING);
        self.ids("running jobs", cmd).await
    }

    /// Every job id, newest first.
    pub async fn all(&self) -> Result<Vec<String>, StoreError> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(keys::JOBS_INDEX).arg(0).arg(-1).arg("REV");
        self.ids("job index", cmd).await
    }

    /// Drops index entries of jobs whose records expired: one read and one transaction,
    /// however many jobs there are.
    pub async fn sweep(&self) -> Result<Vec<String>, StoreError> {
        let ids = self.all().await?;
        if ids.is_empty() {
            return Ok(ids);
        }
        let mut exists = redis::pipe();
        for id in &ids {
            exists.exists(keys::job_record(id));
        }
        let present: Vec<bool> = self
            .store
            .with_retry("sweep", |mut c| {
                let p = exists.clone();
                async move { p.query_async(&mut c).await }
            })
            .await?;
        let gone: Vec<String> = ids
            .iter()
            .zip(present)
            .filter(|(_, there)| !there)
            .map(|(id, _)| id.clone())
            .collect();
        let mut batch = WriteBatch::new();
        for id in &gone {
            batch
                .zrem(keys::JOBS_INDEX, id)
                .zrem(keys::JOB_QUEUE, id)
                .srem(keys::JOBS_RUNNING, id);
        }
        self.store.write_batch("sweep", &batch).await?;
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_order_is_priority_then_submission() {
        let mut jobs = [(0, 5u64), (10, 9), (0, 2), (-3, 1), (10, 20)];
        jobs.sort_by(|a, b| queue_score(a.0, a.1).total_cmp(&queue_score(b.0, b.1)));
        assert_eq!(jobs, [(10, 9), (10, 20), (0, 2), (0, 5), (-3, 1)]);
        // Exact at the limits.
        let now = now_ms() as u64;
        assert!(queue_score(1000, now) < queue_score(999, 0));
        assert!(queue_score(-1000, now) < queue_score(-1000, now + 1));
    }
}
