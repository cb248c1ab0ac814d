//! The client-facing `Coordinator` gRPC service.

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
use super::jobs::{now_ms, JobRecord, JobState, ProgressRecord};
use super::runner::Runner;

/// Bytes per FetchResult message.
const CHUNK: usize = 1 << 20;

pub struct CoordinatorService {
    pub runner: Arc<Runner>,
}

fn store_status(e: StoreError) -> Status {
    Status::unavailable(format!("the coordinator's Redis is not answering: {e}"))
}

fn check_id(id: &str) -> Result<(), Status> {
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

fn new_job_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

impl CoordinatorService {
    /// Live workers; read afresh from Redis when none serves `model`, so a worker that
    /// joined a moment ago is not refused.
    async fn members_serving(&self, model: &str) -> Vec<tessera_proto::v1::WorkerDescription> {
        let pool = &self.runner.pool;
        if pool.serving(model).is_empty() {
            if let Ok(live) = super::membership::live_workers(&self.runner.jobs.store).await {
                pool.update_members(live);
            }
        }
        pool.members()
    }

    /// Image `image` of a job, opened; when it is not there, why not and what to do.
    async fn image_file(&self, record: &JobRecord, image: u32) -> Result<tokio::fs::File, Status> {
        if image < record.images_done {
            let path = self.runner.image_path(&record.id, image);
            match tokio::fs::File::open(&path).await {
                Ok(f) => return Ok(f),
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

    async fn job(&self, id: &str) -> Result<(JobRecord, f64), Status> {
        check_id(id)?;
        self.runner
            .get(id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no job {id:?}: it never existed or expired (see `tessera list`)"
                ))
            })
    }
}

type Events<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn submit_job(
        &self,
        req: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let req = req.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("the request has no job spec"))?;
        let (count, priority, output_dir) =
            admission::check_job_options(req.count, req.priority, &req.output_dir)?;
        let model = spec.model.clone();
        let served = self.members_serving(&model).await;
        // Planning a big job is CPU work: keep it off the async threads.
        let admitted = tokio::task::spawn_blocking(move || admission::admit(&spec, &served))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let jobs = &self.runner.jobs;
        let id = new_job_id();
        let seq = now_ms() as u64;
        // Model evaluations (a guided view counts twice), as the plan counts them.
        let views_total = admitted.plan.total_evaluations as u64 * u64::from(count);
        let record = JobRecord {
            id: id.clone(),
            seq,
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
            created_ms: now_ms(),
            started_ms: 0,
            finished_ms: 0,
        };
        jobs.create(&record, &admitted.inputs)
            .await
            .map_err(store_status)?;
        tracing::info!(job = %id, model = %record.model, "job queued");
        self.runner.notify();
        Ok(Response::new(SubmitJobResponse { job_id: id }))
    }

    async fn get_job(&self, req: Request<JobRef>) -> Result<Response<JobInfo>, Status> {
        let (record, eta) = self.job(&req.into_inner().job_id).await?;
        Ok(Response::new(record.to_wire(eta)))
    }

    type WatchJobStream = Events<JobInfo>;

    async fn watch_job(
        &self,
        req: Request<JobRef>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = req.into_inner().job_id;
        let (first, eta) = self.job(&id).await?;
        let runner = self.runner.clone();
        let stream = async_stream(move |tx| async move {
            let mut last = first.to_wire(eta);
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            let mut terminal = first.state.is_terminal();
            while !terminal {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = match runner.get(&id).await {
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
        let (record, _) = self.job(&id).await?;
        if matches!(record.state, JobState::Succeeded | JobState::Failed) {
            return Err(Status::failed_precondition(format!(
                "job {id} already {}; there is nothing to cancel",
                record.state
            )));
        }
        let after = self
            .runner
            .cancel(&id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("job {id} is gone")))?;
        Ok(Response::new(after.to_wire(-1.0)))
    }

    async fn list_jobs(
        &self,
        _req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let ids = self.runner.jobs.all().await.map_err(store_status)?;
        let stored = self
            .runner
            .jobs
            .load_many(&ids)
            .await
            .map_err(store_status)?;
        // Jobs running here report their live progress.
        let jobs = stored
            .into_iter()
            .map(|r| match self.runner.snapshot(&r.id) {
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
        let (record, _) = self.job(&req.job_id).await?;
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
        let file = self.image_file(&record, req.image).await?;
        let total = file
            .metadata()
            .await
            .map_err(|e| Status::internal(format!("cannot read the image's size: {e}")))?
            .len();
        Ok(Response::new(file_chunks(file, total)))
    }

    async fn get_preview(&self, req: Request<JobRef>) -> Result<Response<Preview>, Status> {
        let (record, _) = self.job(&req.into_inner().job_id).await?;
        let png = self
            .runner
            .jobs
            .store
            .get_async(&tessera_store::keys::job_preview(&record.id))
            .await
            .map_err(store_status)?
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
        let served = self.members_serving(&spec.model).await;
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
