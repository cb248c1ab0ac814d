//! The dashboard's JSON API: the jobs (a page at a time), one job, the workers, and the
//! operator's actions. Reads and changes go through the coordinator's own code: the gRPC
//! service's calls (submit, cancel — the same checks and messages as the command line), the
//! job records and the runner.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tessera_proto::v1::coordinator_server::Coordinator;
use tessera_proto::v1::JobRef;
use tessera_store::StoreError;

use super::views::{JobView, WorkerView};
use super::Dash;
use crate::cluster::admission;
use crate::cluster::jobs::{JobRecord, JobState, Jobs};
use crate::cluster::runner::{png_parameters, ActionError, Runner};
use crate::cluster::service::{check_id, new_job_id, CALL_DEADLINE};

/// How long a request waits for Redis before it is answered 503.
const STORE_PATIENCE: Duration = Duration::from_secs(10);
pub const PER_PAGE: usize = 50;
const MAX_PER_PAGE: usize = 200;
/// Records read per round trip when the gallery looks for finished jobs.
const SCAN_CHUNK: usize = 200;

/// An answer other than success: its status and a message that says what to do.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json(self.status, &serde_json::json!({ "error": self.message }))
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::FailedPrecondition | Code::AlreadyExists => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, s.message())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the coordinator's Redis is not answering: {e}"),
        )
    }
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        match e {
            ActionError::Store(e) => e.into(),
            ActionError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, e.to_string()),
            ActionError::Refused(m) => Self::new(StatusCode::CONFLICT, m),
        }
    }
}

/// `value` as a JSON answer.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(body),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

type Answer = Result<Response, ApiError>;

/// `work`, answered 503 when it takes longer than the gRPC calls may.
async fn within_deadline<T>(
    work: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout(CALL_DEADLINE, work)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the coordinator could not answer in time (is its Redis reachable?); try again",
            ))
        })
}

impl Dash {
    /// The runner, while this coordinator leads; a standby answers 503.
    pub fn runner(&self) -> Result<Arc<Runner>, ApiError> {
        Ok(self.leader.runner()?.clone())
    }

    /// The job records, read through a store that gives up after [`STORE_PATIENCE`].
    pub fn jobs(runner: &Runner) -> Jobs {
        Jobs {
            store: runner.jobs.store.with_retry_for(STORE_PATIENCE),
        }
    }

    /// The job as it stands: live where it runs here.
    pub async fn record(&self, id: &str) -> Result<(Arc<Runner>, JobRecord, f64), ApiError> {
        check_id(id)?;
        let runner = self.runner()?;
        let found = match runner.snapshot(id) {
            Some(live) => Some(live),
            None => Self::jobs(&runner).load(id).await?.map(|r| (r, -1.0)),
        };
        let (record, eta) = found.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no job {id:?}: it never existed or expired"),
            )
        })?;
        Ok((runner, record, eta))
    }

    /// The current view of each stored record (live for jobs running here).
    pub fn view_all(runner: &Runner, records: &[JobRecord]) -> Vec<JobView> {
        records
            .iter()
            .map(|r| match runner.snapshot(&r.id) {
                Some((live, eta)) => JobView::new(&live, eta),
                None => JobView::new(r, -1.0),
            })
            .collect()
    }

    /// The workers: live ones from the pool, lost ones remembered.
    pub fn worker_views(&self) -> Vec<WorkerView> {
        let live = self
            .leader
            .runner()
            .map(|r| r.pool.snapshots())
            .unwrap_or_default();
        let beats = self.members.last_seen();
        crate::sync::lock(&self.seen).update(&live, &beats)
    }
}

/// Which jobs a list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListView {
    /// Every job, newest first.
    All,
    /// Queued jobs in the order they will run.
    Queue,
    Running,
    /// Succeeded jobs, newest first (the gallery).
    Finished,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ListQuery {
    pub view: ListView,
    pub page: usize,
    pub per_page: usize,
}

impl ListQuery {
    /// `view=all|queue|running|finished&page=N&per_page=N` (all, 0 and 50 when left out).
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut q = Self {
            view: ListView::All,
            page: 0,
            per_page: PER_PAGE,
        };
        let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || {
                value
                    .parse::<usize>()
                    .map_err(|_| bad(format!("{key}={value:?} is not a number")))
            };
            match key {
                "view" => {
                    q.view = match value {
                        "all" => ListView::All,
                        "queue" => ListView::Queue,
                        "running" => ListView::Running,
                        "finished" => ListView::Finished,
                        other => {
                            return Err(bad(format!(
                                "view={other:?}: use all, queue, running or finished"
                            )))
                        }
                    }
                }
                "page" => q.page = number()?,
                "per_page" => q.per_page = number()?.clamp(1, MAX_PER_PAGE),
                _ => {}
            }
        }
        Ok(q)
    }
}

#[derive(Serialize)]
struct JobPage {
    view: &'static str,
    page: usize,
    per_page: usize,
    total: usize,
    jobs: Vec<JobView>,
}

/// `GET /api/jobs`: one page of a list of jobs.
pub async fn jobs(State(dash): State<Arc<Dash>>, RawQuery(query): RawQuery) -> Answer {
    let q = ListQuery::parse(query.as_deref())?;
    let runner = dash.runner()?;
    let page = within_deadline(list_page(&runner, &q)).await?;
    Ok(json(StatusCode::OK, &page))
}

async fn list_page(runner: &Runner, q: &ListQuery) -> Result<JobPage, ApiError> {
    let jobs = Dash::jobs(runner);
    let start = q.page.saturating_mul(q.per_page);
    let (total, records) = match q.view {
        ListView::Finished => finished_page(&jobs, start, q.per_page).await?,
        view => {
            let ids = match view {
                ListView::Queue => jobs.queued().await?,
                ListView::Running => jobs.running().await?,
                _ => jobs.all().await?,
            };
            let wanted: Vec<String> = ids.iter().skip(start).take(q.per_page).cloned().collect();
            (ids.len(), jobs.load_many(&wanted).await?)
        }
    };
    Ok(JobPage {
        view: match q.view {
            ListView::All => "all",
            ListView::Queue => "queue",
            ListView::Running => "running",
            ListView::Finished => "finished",
        },
        page: q.page,
        per_page: q.per_page,
        total,
        jobs: Dash::view_all(runner, &records),
    })
}

/// The succeeded jobs `start..start + n` (newest first) and how many there are, reading the
/// records a chunk at a time.
async fn finished_page(
    jobs: &Jobs,
    start: usize,
    n: usize,
) -> Result<(usize, Vec<JobRecord>), ApiError> {
    let ids = jobs.all().await?;
    let (mut total, mut page) = (0, Vec::new());
    for chunk in ids.chunks(SCAN_CHUNK) {
        for r in jobs.load_many(chunk).await? {
            if r.state == JobState::Succeeded {
                if total >= start && page.len() < n {
                    page.push(r);
                }
                total += 1;
            }
        }
    }
    Ok((total, page))
}

/// `GET /api/overview`: counts for the page's header.
pub async fn overview(State(dash): State<Arc<Dash>>) -> Answer {
    let runner = dash.runner()?;
    let counts = within_deadline(counts(&runner)).await?;
    Ok(json(StatusCode::OK, &counts))
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub jobs: u64,
    pub queued: u64,
    pub running: usize,
    pub workers: usize,
}

pub async fn counts(runner: &Runner) -> Result<Counts, ApiError> {
    let jobs = Dash::jobs(runner);
    Ok(Counts {
        jobs: jobs.listed_count().await?,
        queued: jobs.queued_count().await?,
        running: runner.running_jobs(),
        workers: runner.pool.members().len(),
    })
}

#[derive(Serialize)]
struct ImageView {
    n: u32,
    parameters: String,
}

/// `GET /api/jobs/ID`: the job, its plan in words and its finished images' parameters.
pub async fn job(State(dash): State<Arc<Dash>>, Path(id): Path<String>) -> Answer {
    let (_, record, eta) = within_deadline(dash.record(&id)).await?;
    let images: Vec<ImageView> = (0..record.images_done)
        .map(|n| {
            let mut spec = record.spec.clone();
            spec.seed = spec.seed.wrapping_add(u64::from(n));
            ImageView {
                n,
                parameters: png_parameters(&spec, &record.plan, &record),
            }
        })
        .collect();
    let body = serde_json::json!({
        "job": JobView::new(&record, eta),
        "plan": tessera_core::describe::plan_text(&record.plan),
        "images": images,
    });
    Ok(json(StatusCode::OK, &body))
}

/// `GET /api/workers`.
pub async fn workers(State(dash): State<Arc<Dash>>) -> Answer {
    Ok(json(StatusCode::OK, &dash.worker_views()))
}

/// `POST /api/jobs/ID/cancel`: as `tessera cancel`.
pub async fn cancel(State(dash): State<Arc<Dash>>, Path(id): Path<String>) -> Answer {
    let req = tonic::Request::new(JobRef { job_id: id });
    let info = dash.service.cancel_job(req).await?.into_inner();
    dash.bump();
    let (_, record, eta) = within_deadline(dash.record(&info.job_id)).await?;
    Ok(json(StatusCode::OK, &JobView::new(&record, eta)))
}

fn body_field<'a>(
    body: &'a serde_json::Value,
    name: &str,
) -> Result<&'a serde_json::Value, ApiError> {
    body.get(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request has no {name:?}"),
        )
    })
}

fn parse_body(body: &Bytes) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request is not JSON: {e}"),
        )
    })
}

/// `POST /api/jobs/ID/priority` with `{"priority": N}`: a queued job's new place.
pub async fn priority(
    State(dash): State<Arc<Dash>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    check_id(&id)?;
    let body = parse_body(&body)?;
    let given = body_field(&body, "priority")?;
    let p = given
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("--priority {given} is not a whole number"),
            )
        })?;
    // The same range check, and message, as a submission's --priority.
    admission::check_job_options(1, p, "", &[])?;
    let runner = dash.runner()?;
    let record = within_deadline(async { Ok(runner.set_priority(&id, p).await?) }).await?;
    dash.bump();
    Ok(json(StatusCode::OK, &JobView::new(&record, -1.0)))
}

/// `POST /api/jobs/ID/requeue`: a failed job queued again as a new job.
pub async fn requeue(State(dash): State<Arc<Dash>>, Path(id): Path<String>) -> Answer {
    check_id(&id)?;
    let runner = dash.runner()?;
    let new_id = new_job_id();
    let record =
        within_deadline(async { Ok(runner.requeue(&id, &new_id, dash.max_queued).await?) }).await?;
    dash.bump();
    Ok(json(StatusCode::OK, &JobView::new(&record, -1.0)))
}

/// `POST /api/jobs` with `{"args": ["--model", "m", "--prompt", "…", …]}`: the flags of
/// `tessera submit`, parsed by its own parser and admitted by the same checks.
pub async fn submit(State(dash): State<Arc<Dash>>, body: Bytes) -> Answer {
    let body = parse_body(&body)?;
    let args: Vec<String> = body_field(&body, "args")?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "\"args\" must be a list of strings",
            )
        })?;
    let req = (dash.parse_submit)(&args).map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, m))?;
    let id = dash
        .service
        .submit_job(tonic::Request::new(req))
        .await?
        .into_inner()
        .job_id;
    dash.bump();
    Ok(json(StatusCode::OK, &serde_json::json!({ "id": id })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_are_read_with_defaults_and_limits() {
        let q = ListQuery::parse(None).unwrap();
        assert_eq!((q.view, q.page, q.per_page), (ListView::All, 0, PER_PAGE));
        let q = ListQuery::parse(Some("view=queue&page=3&per_page=100000&x=1")).unwrap();
        assert_eq!(
            (q.view, q.page, q.per_page),
            (ListView::Queue, 3, MAX_PER_PAGE)
        );
        let e = ListQuery::parse(Some("page=-1")).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(ListQuery::parse(Some("view=mine"))
            .unwrap_err()
            .message
            .contains("finished"));
    }

    #[test]
    fn grpc_refusals_keep_their_message_under_the_matching_http_status() {
        let e = ApiError::from(tonic::Status::invalid_argument("--steps 0: use 1 or more"));
        assert_eq!(
            (e.status, e.message.as_str()),
            (StatusCode::BAD_REQUEST, "--steps 0: use 1 or more")
        );
        let e = ApiError::from(tonic::Status::resource_exhausted("the queue is full"));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
    }
}
