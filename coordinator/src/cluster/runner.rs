//! Runs cluster jobs: takes queued jobs in order (a few at a time, so their tasks interleave
//! on the workers), drives each through the engine on its own thread, streams the finished
//! PNGs into files under the coordinator's output directory, and on a restart resumes every
//! job that was running from its checkpoint.
//!
//! Every write goes through the fenced store (see [`super::lock`]). When this coordinator
//! stops — asked to, or because another took the lock — [`Runner::halt`] stops every job
//! thread at its next task boundary without recording an end: the jobs stay running in the
//! store, and the next coordinator resumes them from their last checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tessera_core::describe;
use tessera_core::plan::Plan;
use tessera_core::spec::RenderSpec;
use tessera_store::{keys, RedisStore, Store, StoreError};
use tokio::sync::Notify;

use super::jobs::{now_ms, JobRecord, JobState, Jobs, ProgressRecord, ResumeRecord};
use super::outputs;
use super::pool::{JobDispatch, ModelId, Pool};
use crate::dispatch::DispatchError;
use crate::engine::{Engine, EngineError, JobInputs, ModelInfo, PreviewHook, Progress};
use crate::metrics::{self, MeteredStore};
use crate::notify::{JobMessage, Notifier};
use crate::sync::lock;
use crate::{assemble, image_input, latent_file, preview};

#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// How long finished jobs (record and results) stay fetchable.
    pub job_ttl: Duration,
    /// Jobs running at once.
    pub max_jobs: usize,
    /// Finished images live in `output_dir/JOB/N.png` (never in Redis: a gigapixel PNG is
    /// gigabytes) until their job expires.
    pub output_dir: PathBuf,
    /// Where clients may have copies written (`--allow-output-dir`, canonical); none: nowhere.
    pub allowed_output_dirs: Vec<PathBuf>,
    /// Who is told when a job ends (`--notify`, and each job's own `submit --notify`).
    pub notifier: Notifier,
}

/// The message of a job Redis lost with its data.
pub const STORE_LOST: &str = "the store lost this job (Redis restarted without its data: it      ran without persistence); resubmit it, and run Redis with appendonly yes";

struct Active {
    record: JobRecord,
    /// Stops the job's tasks: set by a cancel, a halt, or the store's loss.
    cancelled: Arc<AtomicBool>,
    /// The store lost the job's data.
    lost: Arc<AtomicBool>,
    started: Instant,
    /// Views already done when this coordinator took the job up (for the pace).
    views_at_start: u64,
}

pub struct Runner {
    pub jobs: Jobs,
    pub pool: Pool,
    pub opts: RunnerOptions,
    active: Mutex<HashMap<String, Active>>,
    wake: Notify,
    /// Serializes starting and cancelling queued jobs.
    admission: tokio::sync::Mutex<()>,
    runtime: tokio::runtime::Handle,
    /// This coordinator stopped running jobs (see [`Runner::halt`]).
    halted: AtomicBool,
}

impl Runner {
    pub fn new(jobs: Jobs, pool: Pool, opts: RunnerOptions) -> Arc<Self> {
        Arc::new(Self {
            jobs,
            pool,
            opts,
            active: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            admission: tokio::sync::Mutex::new(()),
            runtime: tokio::runtime::Handle::current(),
            halted: AtomicBool::new(false),
        })
    }

    /// Stops every job thread at its next task boundary, without recording an end (the jobs
    /// stay running in the store for the next coordinator), and starts no more jobs.
    pub fn halt(&self) {
        self.halted.store(true, Ordering::Relaxed);
        for a in lock(&self.active).values() {
            a.cancelled.store(true, Ordering::Relaxed);
        }
        self.wake.notify_one();
    }

    /// Whether job threads must stop without a trace: halted, or a write refused by the fence.
    fn halted(&self) -> bool {
        self.halted.load(Ordering::Relaxed) || self.jobs.store.fence_lost()
    }

    /// Redis restarted without its data: every job running here is lost. Each ends as failed
    /// with [`STORE_LOST`], its record written again so that it is still listed.
    pub fn store_lost(&self) {
        let active = lock(&self.active);
        if !active.is_empty() {
            tessera_worker::status!(
                "Redis lost its data: failing the {} jobs running here",
                active.len()
            );
        }
        tracing::error!("Redis lost its data (restarted without persistence)");
        for a in active.values() {
            a.lost.store(true, Ordering::Relaxed);
            a.cancelled.store(true, Ordering::Relaxed);
        }
    }

    /// Job threads still running.
    pub fn running_jobs(&self) -> usize {
        lock(&self.active).len()
    }

    fn store(&self) -> &RedisStore {
        &self.jobs.store
    }

    /// A new job was queued.
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// The live record of a running job, with its ETA in seconds (negative when unknown).
    pub fn snapshot(&self, id: &str) -> Option<(JobRecord, f64)> {
        let active = lock(&self.active);
        let a = active.get(id)?;
        let p = &a.record.progress;
        let done = p.views_done.saturating_sub(a.views_at_start);
        let eta = if done == 0 {
            -1.0
        } else {
            let per_view = a.started.elapsed().as_secs_f64() / done as f64;
            per_view * p.views_total.saturating_sub(p.views_done) as f64
        };
        Some((a.record.clone(), eta))
    }

    /// The job as it stands: live when it runs here, else from the store.
    pub async fn get(
        &self,
        id: &str,
    ) -> Result<Option<(JobRecord, f64)>, tessera_store::StoreError> {
        if let Some(s) = self.snapshot(id) {
            return Ok(Some(s));
        }
        Ok(self.jobs.load(id).await?.map(|r| (r, -1.0)))
    }

    /// Resumes the jobs a previous coordinator left running, then starts queued jobs as
    /// capacity allows, forever.
    pub async fn run(self: Arc<Self>) {
        match self.jobs.running().await {
            Ok(ids) => {
                for id in ids {
                    match self.jobs.load(&id).await {
                        Ok(Some(record)) if !record.state.is_terminal() => {
                            tessera_worker::status!("resuming job {id}");
                            tracing::info!(job = %id, "resuming a job left running");
                            self.launch(record);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(job = %id, "cannot load the job to resume it: {e}")
                        }
                    }
                }
            }
            Err(e) => tracing::error!("cannot list running jobs: {e}"),
        }
        let mut last_sweep = Instant::now();
        while !self.halted() {
            if let Err(e) = self.start_queued().await {
                tracing::warn!("starting queued jobs: {e}");
            }
            self.publish_jobs().await;
            if last_sweep.elapsed() > Duration::from_secs(5) {
                last_sweep = Instant::now();
                match self.jobs.sweep().await {
                    Ok(gone) => {
                        for id in gone {
                            self.remove_images(&id);
                        }
                    }
                    Err(e) => tracing::warn!("sweeping expired jobs: {e}"),
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// The jobs queued and running, into the metrics.
    async fn publish_jobs(&self) {
        if let Ok(queued) = self.jobs.queued_count().await {
            let running = self.running_jobs();
            metrics::coordinator().set_jobs(queued as usize, running);
        }
    }

    /// Tells the job's `--notify` URL and the coordinator's that the job ended, off this
    /// thread; counts the end in the metrics.
    fn tell_end(&self, record: &JobRecord, keep: bool) {
        metrics::coordinator().job_finished(&record.state.to_string());
        let kept = if keep { record.count } else { 0 };
        let images = (0..kept)
            .map(|n| self.image_path(&record.id, n).display().to_string())
            .collect();
        let message = JobMessage::ended(record, images);
        (self.opts.notifier).send(&self.runtime, record.notify.as_deref(), message);
    }

    async fn start_queued(self: &Arc<Self>) -> Result<(), tessera_store::StoreError> {
        let _turn = self.admission.lock().await;
        let free = self.opts.max_jobs.saturating_sub(lock(&self.active).len());
        if free == 0 || self.halted() {
            return Ok(());
        }
        for id in self.jobs.queued().await?.into_iter().take(free) {
            if lock(&self.active).contains_key(&id) {
                continue;
            }
            let Some(mut record) = self.jobs.load(&id).await? else {
                continue;
            };
            if record.state != JobState::Queued {
                continue;
            }
            record.state = JobState::Running;
            record.started_ms = now_ms();
            record.progress.phase = "starting".into();
            self.jobs.mark_running(&record).await?;
            tracing::info!(job = %id, "job started");
            self.launch(record);
        }
        Ok(())
    }

    fn launch(self: &Arc<Self>, record: JobRecord) {
        let id = record.id.clone();
        let cancelled = Arc::new(AtomicBool::new(self.halted()));
        lock(&self.active).insert(
            id.clone(),
            Active {
                views_at_start: record.progress.views_done,
                record,
                cancelled: cancelled.clone(),
                lost: Arc::default(),
                started: Instant::now(),
            },
        );
        let me = self.clone();
        let job = id.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                me.run_job(&job, cancelled);
                lock(&me.active).remove(&job);
                me.wake.notify_one();
            });
        if let Err(e) = spawned {
            // The job stays in the running set, so the next coordinator resumes it.
            lock(&self.active).remove(&id);
            tracing::error!(job = %id, "cannot start a thread for the job: {e}");
        }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut JobRecord)) -> Option<JobRecord> {
        let mut active = lock(&self.active);
        let a = active.get_mut(id)?;
        f(&mut a.record);
        Some(a.record.clone())
    }

    fn save(&self, record: &JobRecord) {
        if let Err(e) = self.runtime.block_on(self.jobs.save(record)) {
            tracing::warn!(job = %record.id, "cannot save progress: {e}");
        }
    }

    /// The job thread: every image still to do, then the end of the job — unless this
    /// coordinator halted, when the job is left as it stands for the next one.
    fn run_job(&self, id: &str, cancelled: Arc<AtomicBool>) {
        let Some(record) = self.update(id, |_| {}) else {
            return;
        };
        let outcome = self.render_images(&record, &cancelled);
        let lost = lock(&self.active)
            .get(id)
            .is_some_and(|a| a.lost.load(Ordering::Relaxed));
        let outcome = match outcome {
            _ if lost => Err(JobEnd::Failed(STORE_LOST.to_string())),
            Err(JobEnd::Cancelled | JobEnd::Failed(_)) if self.halted() => Err(JobEnd::Halted),
            other => other,
        };
        let Some(mut record) = self.update(id, |_| {}) else {
            return;
        };
        record.finished_ms = now_ms();
        let keep = match outcome {
            Err(JobEnd::Halted) => {
                tracing::info!(job = %id, "job left for the next coordinator");
                return;
            }
            Ok(()) => {
                record.state = JobState::Succeeded;
                record.progress.phase = "done".into();
                tessera_worker::status!("job {id} succeeded");
                true
            }
            Err(JobEnd::Cancelled) => {
                record.state = JobState::Cancelled;
                record.progress.phase = "cancelled".into();
                tessera_worker::status!("job {id} cancelled");
                false
            }
            Err(JobEnd::Failed(message)) => {
                record.state = JobState::Failed;
                record.progress.phase = "failed".into();
                tessera_worker::status!("job {id} failed: {message}");
                record.error = Some(message);
                false
            }
        };
        self.update(id, |r| *r = record.clone());
        if !keep {
            self.remove_images(id);
        }
        self.record_end(&record, keep);
        self.tell_end(&record, keep);
    }

    /// Writes the job's end to the store. An outage longer than the store's own retries is
    /// waited out, as a step's is: given up, the job would stay listed as running with nothing
    /// running it until the next coordinator.
    fn record_end(&self, record: &JobRecord, keep: bool) {
        let id = &record.id;
        loop {
            let finish = self.jobs.finish(record, self.opts.job_ttl, keep);
            match self.runtime.block_on(finish) {
                Ok(()) => return,
                Err(StoreError::Unavailable(e)) if !self.halted() => {
                    wait_for_store(id, &e, "recording the end")
                }
                Err(e) => {
                    tracing::error!(job = %id, "cannot record the end of the job: {e}");
                    return;
                }
            }
        }
    }

    /// Every image of the job still to do, in turn, on one engine that dispatches to the pool.
    fn render_images(&self, record: &JobRecord, cancelled: &Arc<AtomicBool>) -> Result<(), JobEnd> {
        let store = self.store();
        let inputs = load_inputs(store, record).map_err(|e| JobEnd::Failed(format!("{e:#}")))?;
        let metered = MeteredStore { inner: store };
        let on_waiting = |waiting: bool| {
            self.update(&record.id, |r| {
                r.progress.phase = if waiting {
                    "waiting for workers".into()
                } else {
                    "denoising".into()
                }
            });
        };
        let dispatch = JobDispatch {
            pool: self.pool.clone(),
            model: ModelId {
                name: record.model.clone(),
                fingerprint: record.model_info.fingerprint.clone(),
            },
            priority: record.priority,
            job_seq: record.seq,
            cancelled: cancelled.clone(),
            waiting: &on_waiting,
        };
        let job = JobRun {
            runner: self,
            record,
            engine: Engine {
                store: &metered,
                workers: &dispatch,
                model: ModelInfo {
                    scheduler: record.model_info.scheduler.clone(),
                    latent_channels: record.model_info.latent_channels,
                },
            },
            inputs,
            cancelled,
        };
        for n in record.images_done..record.count {
            if self.halted() {
                return Err(JobEnd::Halted);
            }
            job.render_image(n)?;
        }
        Ok(())
    }

    /// Where image `n` of job `id` is kept: `output_dir/ID/N.png`.
    pub fn image_path(&self, id: &str, n: u32) -> PathBuf {
        self.opts.output_dir.join(id).join(format!("{n}.png"))
    }

    /// Deletes a job's images (it expired, failed or was cancelled).
    fn remove_images(&self, id: &str) {
        let dir = self.opts.output_dir.join(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::debug!(job = %id, "removed {}", dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(job = %id, "cannot remove {}: {e}", dir.display()),
        }
    }

    /// Decodes the final latent on the workers and streams it into the image's file (via
    /// `NAME.partial`, renamed when complete).
    fn write_image(
        &self,
        engine: &Engine<'_>,
        plan: &Plan,
        image: &ImageOut<'_>,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<(), ImageError> {
        if let Some(job) = image.path.parent().and_then(Path::file_name) {
            let job = job.to_string_lossy();
            outputs::job_dir(&self.opts.output_dir, &job)
                .map_err(|e| ImageError::File(anyhow::anyhow!("creating the job's folder: {e}")))?;
        }
        let mut png = assemble::OutputFiles::create(
            image.path,
            image.spec,
            image.parameters,
            assemble::dzi::AUTO_THRESHOLD,
        )
        .map_err(ImageError::File)?;
        engine.decode_output(image.job, plan, image.latents, &mut png, progress)?;
        png.finish().map_err(ImageError::File)
    }

    /// Stops a job: a queued one at once, a running one once its current tasks are abandoned
    /// (the engine checks between tasks). Returns the job's record afterwards.
    pub async fn cancel(&self, id: &str) -> Result<Option<JobRecord>, tessera_store::StoreError> {
        let flag = lock(&self.active).get(id).map(|a| a.cancelled.clone());
        match flag {
            Some(flag) => {
                flag.store(true, Ordering::Relaxed);
                let deadline = Instant::now() + Duration::from_secs(60);
                while lock(&self.active).contains_key(id) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            None => {
                let _turn = self.admission.lock().await;
                if let Some(mut record) = self.jobs.load(id).await? {
                    if record.state == JobState::Queued {
                        record.state = JobState::Cancelled;
                        record.progress.phase = "cancelled".into();
                        record.finished_ms = now_ms();
                        self.jobs.finish(&record, self.opts.job_ttl, false).await?;
                        self.tell_end(&record, false);
                    }
                }
            }
        }
        self.jobs.load(id).await
    }
}

/// Why an operator's action on a job was not done.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Store(#[from] tessera_store::StoreError),
    #[error("no job {0:?}: it never existed or expired")]
    NotFound(String),
    /// The action does not apply to the job as it stands; the message says what to do.
    #[error("{0}")]
    Refused(String),
}

impl Runner {
    async fn existing(&self, id: &str) -> Result<JobRecord, ActionError> {
        self.jobs
            .load(id)
            .await?
            .ok_or_else(|| ActionError::NotFound(id.to_string()))
    }

    /// A queued job's new place in the queue. A running job keeps its tasks' order (its
    /// tasks are already in the workers' queue), so only queued jobs move.
    pub async fn set_priority(&self, id: &str, priority: i32) -> Result<JobRecord, ActionError> {
        let _turn = self.admission.lock().await;
        let mut record = self.existing(id).await?;
        if record.state != JobState::Queued {
            return Err(ActionError::Refused(format!(
                "job {id} is {}: only a queued job's priority can change",
                record.state
            )));
        }
        record.priority = priority;
        self.jobs.reprioritise(&record).await?;
        self.notify();
        Ok(record)
    }

    /// A failed job queued again as a new job `new_id` with the same spec, plan and seed
    /// (the failed one stays listed with its error). Jobs with submitted files cannot be:
    /// their files went with the failure.
    pub async fn requeue(
        &self,
        id: &str,
        new_id: &str,
        max_queued: u64,
    ) -> Result<JobRecord, ActionError> {
        let old = self.existing(id).await?;
        if old.state != JobState::Failed {
            return Err(ActionError::Refused(format!(
                "job {id} is {}: only a failed job can be requeued",
                old.state
            )));
        }
        if !old.inputs.is_empty() {
            return Err(ActionError::Refused(format!(
                "job {id} was submitted with files ({}), removed when it failed: submit it \
                 again with `tessera submit`",
                old.inputs.join(", ")
            )));
        }
        let queued = self.jobs.queued_count().await?;
        if queued >= max_queued {
            return Err(ActionError::Refused(format!(
                "the queue is full ({queued} jobs wait, --max-queued {max_queued}): wait for \
                 some to finish, or cancel some"
            )));
        }
        let record = requeued_record(&old, new_id);
        self.jobs.create(&record, &[]).await?;
        tracing::info!(job = %new_id, from = %id, "failed job requeued");
        self.notify();
        Ok(record)
    }
}

/// A fresh queued record for the spec and plan of `old`.
fn requeued_record(old: &JobRecord, id: &str) -> JobRecord {
    let now = now_ms();
    JobRecord {
        id: id.to_string(),
        seq: now as u64,
        state: JobState::Queued,
        images_done: 0,
        progress: ProgressRecord {
            views_total: old.progress.views_total,
            phase: "queued".into(),
            ..Default::default()
        },
        error: None,
        resumed_from: None,
        warnings: Vec::new(),
        created_ms: now,
        started_ms: 0,
        finished_ms: 0,
        ..old.clone()
    }
}

/// One job's images, rendered in turn on the job's thread.
struct JobRun<'a> {
    runner: &'a Runner,
    record: &'a JobRecord,
    engine: Engine<'a>,
    /// The submitted files, decoded once for all the images.
    inputs: JobInputs,
    cancelled: &'a AtomicBool,
}

impl JobRun<'_> {
    /// Image `n` (seed + n): denoised, decoded into its file, copied to `--output-dir` (a
    /// failed copy is a warning on the job, the image stays fetchable), then counted as done
    /// and its scratch keys cleared.
    fn render_image(&self, n: u32) -> Result<(), JobEnd> {
        let (id, plan) = (&self.record.id, &self.record.plan);
        let mut spec = self.record.spec.clone();
        spec.seed = self.record.spec.seed.wrapping_add(u64::from(n));
        let image_job = keys::image_job(id, n);
        let on_progress = |p: Progress| self.progress(n, p);
        let latents = self.denoise(&image_job, &spec, &on_progress)?;
        let parameters = png_parameters(&spec, plan, self.record);
        let path = self.runner.image_path(id, n);
        let image = ImageOut {
            job: &image_job,
            spec: &spec,
            latents: &latents,
            path: &path,
            parameters: &parameters,
        };
        self.decode(&image, &on_progress)?;
        let warning = self.copy_out(&path, n);
        if let Some(r) = self.runner.update(id, |r| {
            r.images_done = n + 1;
            r.warnings.extend(warning);
        }) {
            self.runner.save(&r);
        }
        if let Err(e) = self.engine.finish(&image_job) {
            tracing::warn!(job = %id, "cannot clear image {n}'s scratch keys: {e}");
        }
        Ok(())
    }

    /// Copies finished image `n` to the client's `--output-dir`, if it asked for one; a
    /// failure comes back as the job's warning.
    fn copy_out(&self, path: &Path, n: u32) -> Option<String> {
        let (id, count) = (&self.record.id, self.record.count);
        let dir = self.record.output_dir.as_deref()?;
        let name = output_name(id, n, count);
        let copied = outputs::check_request(&self.runner.opts.allowed_output_dirs, dir)
            .map_err(std::io::Error::other)
            .and_then(|(dir, root)| outputs::copy_under(&root, &dir, &name, path));
        let e = copied.err()?;
        let warning = format!(
            "image {n} was not copied to --output-dir {dir}: {e}; it stays fetchable with \
             `tessera fetch {id}`"
        );
        tracing::warn!(job = %id, "{warning}");
        tessera_worker::status!("job {id}: {warning}");
        Some(warning)
    }

    /// The image's final latent. A store outage longer than the store's own retries is waited
    /// out and the image resumed from its checkpoint rather than the job lost.
    fn denoise(
        &self,
        image_job: &str,
        spec: &RenderSpec,
        on_progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<Tensor, JobEnd> {
        let (id, plan) = (&self.record.id, &self.record.plan);
        loop {
            let inputs = clone_inputs(&self.inputs, &self.runner.jobs.store, id, plan.sdxl);
            match self.engine.run(image_job, spec, plan, inputs, on_progress) {
                Ok(out) => return Ok(out.latents),
                Err(_) if self.runner.halted() => return Err(JobEnd::Halted),
                Err(EngineError::Dispatch(DispatchError::Cancelled)) => {
                    return Err(JobEnd::Cancelled)
                }
                Err(EngineError::Store(e)) if !self.cancelled.load(Ordering::Relaxed) => {
                    wait_for_store(id, &e, "resuming")
                }
                Err(e) => return Err(JobEnd::Failed(e.to_string())),
            }
        }
    }

    /// Decodes and writes the image, starting the decode again after a store outage.
    fn decode(
        &self,
        image: &ImageOut<'_>,
        on_progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<(), JobEnd> {
        let plan = &self.record.plan;
        loop {
            match self
                .runner
                .write_image(&self.engine, plan, image, on_progress)
            {
                Ok(()) => return Ok(()),
                Err(_) if self.runner.halted() => return Err(JobEnd::Halted),
                Err(ImageError::Engine(EngineError::Dispatch(DispatchError::Cancelled))) => {
                    return Err(JobEnd::Cancelled)
                }
                Err(ImageError::Engine(EngineError::Store(e)))
                    if !self.cancelled.load(Ordering::Relaxed) =>
                {
                    wait_for_store(&self.record.id, &e, "decoding again")
                }
                Err(e) => return Err(JobEnd::Failed(e.to_string())),
            }
        }
    }

    /// Image `n`'s progress into the live record, saved after every step so that a watcher
    /// (and a restarted coordinator) sees it.
    fn progress(&self, n: u32, p: Progress) {
        if let Progress::Step {
            stage,
            step,
            steps,
            timings,
            ..
        } = p
        {
            let m = metrics::coordinator();
            m.steps.inc();
            m.step_seconds.observe(timings.wall);
            m.critical_path_seconds.observe(timings.critical);
            // `tessera bench scale` reads these lines to time the steps.
            tracing::info!(
                job = %self.record.id,
                image = n,
                stage,
                step,
                steps,
                at_ms = now_ms(),
                coordinator_ms = timings.coordinator() * 1e3,
                critical_ms = timings.critical * 1e3,
                workers_ms = timings.workers * 1e3,
                timings = %serde_json::to_string(&timings).unwrap_or_default(),
                "step finished"
            );
        }
        if let Progress::Views(v) = p {
            let halves = if self.record.plan.guided { 2 } else { 1 };
            metrics::coordinator().evaluations.inc_by(v as u64 * halves);
        }
        let snapshot = self.runner.update(&self.record.id, |r| {
            record_progress(r, &self.record.plan, n, p)
        });
        if let (Some(r), true) = (
            snapshot,
            matches!(p, Progress::Step { .. } | Progress::Resumed { .. }),
        ) {
            self.runner.save(&r);
        }
    }
}

/// Applies one progress event of image `n` to the job's record.
fn record_progress(r: &mut JobRecord, plan: &Plan, n: u32, p: Progress) {
    let halves: u64 = if plan.guided { 2 } else { 1 };
    let pr = &mut r.progress;
    pr.image = n;
    match p {
        Progress::Resumed { stage, step } => {
            r.resumed_from = Some(ResumeRecord {
                image: n,
                stage: stage as u32,
                step: step as u32,
            });
            let per_image = plan.total_evaluations as u64;
            let before: u64 = plan.stages[..stage]
                .iter()
                .map(|s| s.evaluations as u64)
                .sum();
            let here = plan.stages[stage].evaluations_per_step as u64 * step as u64;
            pr.views_done = u64::from(n) * per_image + before + here;
            pr.stage = stage as u32;
            pr.step = step as u32;
        }
        Progress::Stage {
            stage,
            stages,
            steps,
            ..
        } => {
            pr.stage = stage as u32;
            pr.stages = stages as u32;
            pr.step = 0;
            pr.steps = steps as u32;
            pr.phase = "denoising".into();
        }
        Progress::Step { step, steps, .. } => {
            pr.step = step as u32;
            pr.steps = steps as u32;
        }
        Progress::Views(v) => pr.views_done += v as u64 * halves,
        Progress::Decoding => pr.phase = "decoding".into(),
    }
}

enum JobEnd {
    Cancelled,
    Failed(String),
    /// This coordinator stopped running jobs; the job stays as it is for the next one.
    Halted,
}

/// `ID.png`, or `ID-N.png` for jobs of several images: the name of a copy in `--output-dir`.
pub fn output_name(id: &str, image: u32, count: u32) -> String {
    if count == 1 {
        format!("{id}.png")
    } else {
        format!("{id}-{image}.png")
    }
}

/// The PNG's generation parameters, with the model's fingerprint.
pub(crate) fn png_parameters(spec: &RenderSpec, plan: &Plan, record: &JobRecord) -> String {
    let mut text = describe::png_parameters(spec, plan, &record.model);
    if !record.model_info.fingerprint.is_empty() {
        text.push_str(&format!(
            ", Model fingerprint: {}",
            record.model_info.fingerprint
        ));
    }
    text
}

/// One finished image to decode and write.
struct ImageOut<'a> {
    job: &'a str,
    spec: &'a RenderSpec,
    latents: &'a Tensor,
    path: &'a Path,
    parameters: &'a str,
}

#[derive(Debug, thiserror::Error)]
enum ImageError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0:#}")]
    File(anyhow::Error),
}

/// The job's submitted files, decoded as `tessera render` decodes them.
fn load_inputs(store: &RedisStore, record: &JobRecord) -> anyhow::Result<JobInputs> {
    let get = |name: &str| -> anyhow::Result<Option<Vec<u8>>> {
        if !record.inputs.iter().any(|i| i == name) {
            return Ok(None);
        }
        Ok(Some(
            Store::get(store, &keys::job_input(&record.id, name))?.ok_or_else(|| {
                anyhow::anyhow!("the job's {name} input is missing from the store")
            })?,
        ))
    };
    let first = record.plan.stages[0].size;
    let target = (record.spec.width, record.spec.height);
    let initial_latents = get("latents")?
        .map(|b| latent_file::latents_from_bytes("--latents", &b))
        .transpose()?;
    let init_image = get("init_image")?
        .map(|b| image_input::decode_init_image(Path::new("(submitted)"), &b, (first[0], first[1])))
        .transpose()?;
    let mask = get("mask")?
        .map(|b| image_input::decode_mask(Path::new("(submitted)"), &b, target))
        .transpose()?;
    Ok(JobInputs {
        initial_latents,
        init_image,
        mask,
        preview: None,
    })
}

/// Each image of a job starts from the same inputs (tensors: cheap to clone), and writes its
/// live preview to the job's preview key after every step.
fn clone_inputs(inputs: &JobInputs, store: &RedisStore, job: &str, sdxl: bool) -> JobInputs {
    let (store, key, job) = (store.clone(), keys::job_preview(job), job.to_string());
    let preview = PreviewHook(Box::new(move |x0: &Tensor| {
        let written = preview::preview_png(x0, sdxl, preview::PREVIEW_SIDE)
            .and_then(|png| Ok(store.put(&key, &png)?));
        // A missed preview costs the job nothing; the next step writes another.
        if let Err(e) = written {
            tracing::debug!(job = %job, "no preview this step: {e}");
        }
    }));
    JobInputs {
        initial_latents: inputs.initial_latents.clone(),
        init_image: inputs.init_image.clone(),
        mask: inputs.mask.clone(),
        preview: Some(preview),
    }
}

/// The pause before `then` is tried again after a store outage outlasted the store's own
/// retries (the store is waited out, never the job given up for it).
fn wait_for_store(job: &str, e: &dyn std::fmt::Display, then: &str) {
    tracing::warn!(job = %job, "store unavailable ({e}); {then} shortly");
    std::thread::sleep(Duration::from_secs(2));
}
