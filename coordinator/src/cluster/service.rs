//! The client-facing `Coordinator` gRPC service. A standby or stopping coordinator answers
//! UNAVAILABLE (clients retry); every call answers within about [`CALL_DEADLINE`], with
//! UNAVAILABLE naming Redis when the store is away, rather than hanging on its retries.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tessera_proto::v1::coordinator_server::Coordinator;
use tessera_proto::v1::{
    FetchResultRequest, JobInfo, JobRef, ListJobsRequest, ListJobsResponse, PlanJobRequest,
    PlanJobResponse, Preview, ResultChunk, SubmitJobRequest, SubmitJobResponse,
};
use tessera_store::StoreError;
use tonic::{Request, Response, Status};

use super::admission;
use super::jobs::{now_ms, JobRecord, JobState, Jobs, ProgressRecord};
use super::lock::Leadership;
use super::outputs;
use super::runner::Runner;
use crate::notify;

/// Bytes per FetchResult message.
const CHUNK: usize = 1 << 20;
/// How long a client's call waits for Redis before it is answered UNAVAILABLE.
const STORE_PATIENCE: Duration = Duration::from_secs(10);
/// The most a client's call takes, whatever it waits on.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);

pub struct CoordinatorService {
    pub leader: Arc<Leadership>,
    /// Most jobs waiting in the queue (`--max-queued`).
    pub max_queued: u64,
}

fn store_status(e: StoreError) -> Status {
    Status::unavailable(format!("the coordinator's Redis is not answering: {e}"))
}

/// `call`, answered UNAVAILABLE when it takes longer than [`CALL_DEADLINE`].
async fn within_deadline<T>(
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::unavailable(format!(
                "the coordinator could not answer within {} s (is its Redis reachable?); try again",
                CALL_DEADLINE.as_secs()
            )))
        })
}

pub(crate) fn check_id(id: &str) -> Result<(), Status> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{id:?} is not a job id: use the id `tessera submit` printed (see `tessera list`)"
        )))
    }
}

pub(crate) fn new_job_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

impl CoordinatorService {
    fn runner(&self) -> Result<Arc<Runner>, Status> {
        self.leader.runner().cloned()
    }

    /// The job records as a client's call reads them: through a store that gives up on an
    /// outage after [`STORE_PATIENCE`].
    fn jobs(runner: &Runner) -> Jobs {
        Jobs {
            store: runner.jobs.store.with_retry_for(STORE_PATIENCE),
        }
    }

    /// Image `image` of a job, opened (without following links); when it is not there, why
    /// not and what to do.
    async fn image_file(
        runner: &Runner,
        record: &JobRecord,
        image: u32,
    ) -> Result<tokio::fs::File, Status> {
        if image < record.images_done {
            let path = runner.image_path(&record.id, image);
            let name = format!("{image}.png");
            let (dir, id) = (runner.opts.output_dir.clone(), record.id.clone());
            let opened = tokio::task::spawn_blocking(move || outputs::open_image(&dir, &id, &name))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            match opened {
                Ok(f) => return Ok(tokio::fs::File::from_std(f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Status::internal(format!(
                        "cannot read {}: {e}",
                        path.display()
                    )))
                }
            }
        }
        Err(Status::failed_precondition(match record.state {
            JobState::Queued | JobState::Running => format!(
                "image {} of job {} is not finished yet ({}): wait with `tessera watch {}`",
                image, record.id, record.state, record.id
            ),
            JobState::Failed => format!(
                "job {} failed: {}",
                record.id,
                record.error.clone().unwrap_or_default()
            ),
            JobState::Cancelled => format!("job {} was cancelled; it has no image", record.id),
            JobState::Succeeded => format!("the image of job {} has expired", record.id),
        }))
    }

    async fn job(runner: &Runner, id: &str) -> Result<(JobRecord, f64), Status> {
        check_id(id)?;
        let found = match runner.snapshot(id) {
            Some(live) => Some(live),
            None => Self::jobs(runner)
                .load(id)
                .await
                .map_err(store_status)?
                .map(|r| (r, -1.0)),
        };
        found.ok_or_else(|| {
            Status::not_found(format!(
                "no job {id:?}: it never existed or expired (see `tessera list`)"
            ))
        })
    }

    /// Submission after the job is admitted: its record stored and queued.
    async fn queue(
        runner: &Runner,
        req: SubmitJobRequest,
        max_queued: u64,
    ) -> Result<String, Status> {
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("the request has no job spec"))?;
        let (count, priority, output_dir) = admission::check_job_options(
            req.count,
            req.priority,
            &req.output_dir,
            &runner.opts.allowed_output_dirs,
        )?;
        let notify = match req.notify.trim() {
            "" => None,
            url => {
                Some(notify::check_url(url).map_err(|e| Status::invalid_argument(e.to_string()))?)
            }
        };
        let model = spec.model.clone();
        let served = runner.pool.members();
        // Planning a big job is CPU work: keep it off the async threads.
        let admitted = tokio::task::spawn_blocking(move || admission::admit(&spec, &served))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let jobs = Self::jobs(runner);
        let queued = jobs.queued_count().await.map_err(store_status)?;
        if queued >= max_queued {
            return Err(Status::resource_exhausted(format!(
                "the queue is full ({queued} jobs wait, --max-queued {max_queued}): wait for \
                 some to finish, or cancel some"
            )));
        }
        let id = new_job_id();
        let mut record = new_record(&id, model, admitted, count, priority, output_dir);
        record.0.notify = notify.map(|u| u.to_string());
        record.0.submitted_by = admission::check_submitter(&req.submitted_by)?;
        jobs.create(&record.0, &record.1)
            .await
            .map_err(store_status)?;
        tracing::info!(job = %id, model = %record.0.model, "job queued");
        crate::metrics::coordinator().jobs_submitted.inc();
        runner.notify();
        Ok(id)
    }
}

/// The record of a job just admitted, and its input files.
fn new_record(
    id: &str,
    model: String,
    admitted: admission::Admitted,
    count: u32,
    priority: i32,
    output_dir: Option<String>,
) -> (JobRecord, Vec<(String, Vec<u8>)>) {
    // Model evaluations (a guided view counts twice), as the plan counts them.
    let views_total = admitted.plan.total_evaluations as u64 * u64::from(count);
    let record = JobRecord {
        id: id.to_string(),
        seq: now_ms() as u64,
        state: JobState::Queued,
        model,
        model_info: admitted.model,
        spec: admitted.spec,
        plan: admitted.plan,
        count,
        priority,
        output_dir,
        inputs: admitted.inputs.iter().map(|(n, _)| n.clone()).collect(),
        images_done: 0,
        progress: ProgressRecord {
            stages: 0,
            views_total,
            phase: "queued".into(),
            ..Default::default()
        },
        error: None,
        resumed_from: None,
        warnings: Vec::new(),
        notify: None,
        submitted_by: String::new(),
        created_ms: now_ms(),
        started_ms: 0,
        finished_ms: 0,
    };
    (record, admitted.inputs)
}

type Events<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn submit_job(
        &self,
        req: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let runner = self.runner()?;
        let id = within_deadline(Self::queue(&runner, req.into_inner(), self.max_queued)).await?;
        Ok(Response::new(SubmitJobResponse { job_id: id }))
    }

    async fn get_job(&self, req: Request<JobRef>) -> Result<Response<JobInfo>, Status> {
        let runner = self.runner()?;
        let (record, eta) = within_deadline(Self::job(&runner, &req.into_inner().job_id)).await?;
        Ok(Response::new(record.to_wire(eta)))
    }

    type WatchJobStream = Events<JobInfo>;

    async fn watch_job(
        &self,
        req: Request<JobRef>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = req.into_inner().job_id;
        let runner = self.runner()?;
        let (first, eta) = within_deadline(Self::job(&runner, &id)).await?;
        let leader = self.leader.clone();
        let stream = async_stream(move |tx| async move {
            let mut last = first.to_wire(eta);
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            let mut terminal = first.state.is_terminal();
            while !terminal {
                let next = async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    runner.get(&id).await
                };
                let got = tokio::select! {
                    got = next => got,
                    _ = leader.stopped() => {
                        // The client reconnects (to this coordinator's successor).
                        let bye = Status::unavailable("the coordinator is shutting down");
                        let _ = tx.send(Err(bye)).await;
                        return;
                    }
                };
                let now = match got {
                    Ok(Some((r, eta))) => {
                        terminal = r.state.is_terminal();
                        r.to_wire(eta)
                    }
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Status::not_found(format!("job {id} expired"))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("watch {id}: {e}");
                        continue;
                    }
                };
                if now != last || terminal {
                    last = now.clone();
                    if tx.send(Ok(now)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn cancel_job(&self, req: Request<JobRef>) -> Result<Response<JobInfo>, Status> {
        let id = req.into_inner().job_id;
        let runner = self.runner()?;
        let cancel = async {
            let (record, _) = Self::job(&runner, &id).await?;
            if matches!(record.state, JobState::Succeeded | JobState::Failed) {
                return Err(Status::failed_precondition(format!(
                    "job {id} already {}; there is nothing to cancel",
                    record.state
                )));
            }
            runner
                .cancel(&id)
                .await
                .map_err(store_status)?
                .ok_or_else(|| Status::not_found(format!("job {id} is gone")))
        };
        let after = within_deadline(cancel).await?;
        Ok(Response::new(after.to_wire(-1.0)))
    }

    async fn list_jobs(
        &self,
        _req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let runner = self.runner()?;
        let jobs = Self::jobs(&runner);
        let stored = within_deadline(async {
            let ids = jobs.all().await.map_err(store_status)?;
            jobs.load_many(&ids).await.map_err(store_status)
        })
        .await?;
        // Jobs running here report their live progress.
        let jobs = stored
            .into_iter()
            .map(|r| match runner.snapshot(&r.id) {
                Some((live, eta)) => live.to_wire(eta),
                None => r.to_wire(-1.0),
            })
            .collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    type FetchResultStream = Events<ResultChunk>;

    async fn fetch_result(
        &self,
        req: Request<FetchResultRequest>,
    ) -> Result<Response<Self::FetchResultStream>, Status> {
        let req = req.into_inner();
        let runner = self.runner()?;
        let (record, _) = within_deadline(Self::job(&runner, &req.job_id)).await?;
        if req.image >= record.count {
            return Err(Status::invalid_argument(format!(
                "job {} has {} image{}: ask for --image 0 to {}",
                record.id,
                record.count,
                if record.count == 1 { "" } else { "s" },
                record.count - 1
            )));
        }
        // Finished images are files under the coordinator's output directory, streamed from
        // there a chunk at a time (a gigapixel PNG never passes through memory whole).
        let file = Self::image_file(&runner, &record, req.image).await?;
        let total = file
            .metadata()
            .await
            .map_err(|e| Status::internal(format!("cannot read the image's size: {e}")))?
            .len();
        Ok(Response::new(file_chunks(file, total)))
    }

    async fn get_preview(&self, req: Request<JobRef>) -> Result<Response<Preview>, Status> {
        let runner = self.runner()?;
        let png = within_deadline(async {
            let (record, _) = Self::job(&runner, &req.into_inner().job_id).await?;
            Self::jobs(&runner)
                .store
                .get_async(&tessera_store::keys::job_preview(&record.id))
                .await
                .map_err(store_status)
        })
        .await?
        .unwrap_or_default();
        Ok(Response::new(Preview { png }))
    }

    async fn plan_job(
        &self,
        req: Request<PlanJobRequest>,
    ) -> Result<Response<PlanJobResponse>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("the request has no job spec"))?;
        let served = self.runner()?.pool.members();
        let arch = admission::served_arch(&spec.model, &served)?;
        let (_, plan) = admission::plan_spec(&spec, &arch)?;
        Ok(Response::new(PlanJobResponse {
            plan_json: serde_json::to_string_pretty(&plan)
                .map_err(|e| Status::internal(e.to_string()))?,
            text: tessera_core::describe::plan_text(&plan),
        }))
    }
}

/// A file as a stream of chunks of up to [`CHUNK`] bytes, each carrying the file's size.
fn file_chunks(file: tokio::fs::File, total: u64) -> Events<ResultChunk> {
    let chunks = futures::stream::unfold(Some(file), move |file| async move {
        use tokio::io::AsyncReadExt;
        let mut file = file?;
        let mut data = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            match file.read(&mut data[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    let status = Status::internal(format!("reading the image: {e}"));
                    return Some((Err(status), None));
                }
            }
        }
        if filled == 0 {
            return None;
        }
        data.truncate(filled);
        let chunk = ResultChunk {
            data,
            total_bytes: total,
        };
        Some((Ok(chunk), Some(file)))
    });
    Box::pin(chunks)
}

/// A stream fed by a task through a channel.
fn async_stream<T, F, Fut>(f: F) -> Events<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
