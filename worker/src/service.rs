//! The worker process of a cluster (`tessera worker`): loads one model, serves the `Worker`
//! gRPC service, and joins the coordinator through its `Membership` service with the worker
//! token, sending a heartbeat every second (joining again when the coordinator restarted or a
//! standby took over).
//!
//! Only the coordinator it joined can call it: at each join the worker makes a fresh random
//! call token, requires it on every call, and gives it to that coordinator alone. A task is
//! run only if every key it names lies in one step (or stage) of its own job, and its outputs
//! are written only while the task's input still exists — so a result that arrives after the
//! coordinator merged and cleared its step cannot leave keys behind, and no task can write
//! over a job's durable keys.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_core::plan::ArchInfo;
use tessera_core::spec::LoraRef;
use tessera_core::task::{Task, TaskKind};
use tessera_proto::auth::{AttachToken, RequireCallToken};
use tessera_proto::net::{self, ClientNet};
use tessera_proto::v1::membership_client::MembershipClient;
use tessera_proto::v1::worker_server::{Worker, WorkerServer};
use tessera_proto::v1::{
    DescribeRequest, HeartbeatRequest, JoinRequest, ModelDescription, RunTasksRequest,
    RunTasksResponse, TaskResult, WorkerDescription,
};
use tessera_store::{keys, RedisOptions, RedisStore, Store, StoreError};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::device::{compute_dtype, open_device};
use crate::lora_models::LoraModels;
use crate::metrics::WorkerMetrics;
use crate::model::arch::arch_info_with;
use crate::model::diffusion::DiffusionModel;
use crate::model::single_file::Prediction;
use crate::simulate::SimulatedModel;
use crate::tasks::{self, TaskError};

/// Longest wait between attempts to join.
const JOIN_WAIT_MAX: Duration = Duration::from_secs(2);
/// How long a join may take (the coordinator calls the worker back before it answers).
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("--lora-dir {0}: not a directory; give the directory that holds the LoRA files")]
    LoraDir(PathBuf),
    #[error("loading the model from {path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error(transparent)]
    Fingerprint(#[from] crate::fingerprint::FingerprintError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("the gRPC server stopped: {0}")]
    Serve(String),
    #[error("{0}")]
    Join(String),
}

/// What `tessera worker` was asked to do.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub model_dir: PathBuf,
    pub model_name: String,
    pub device: String,
    pub listen: SocketAddr,
    /// The URL the coordinator should call; derived from the listening address when absent.
    pub advertise: Option<String>,
    /// The coordinators to join (one leads; the others are standbys), tried in turn.
    pub coordinators: Vec<String>,
    pub redis_url: String,
    /// CA of Redis' certificate, for a `rediss://` URL to a server with a private CA.
    pub redis_ca: Option<PathBuf>,
    /// The workers' credential for joining (the coordinator's `--worker-token`).
    pub worker_token: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA that signed the coordinator's certificate (its URLs are then https://).
    pub tls_ca: Option<PathBuf>,
    pub tasks_per_call: u32,
    /// **Benchmark double** (`--simulate-eval-ms`): load no weights and answer every task after
    /// this many milliseconds per training-size evaluation with CFG (see [`crate::simulate`]).
    /// `None`, the default, runs the real model.
    pub simulate_eval_ms: Option<f64>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (`--metrics`).
    pub metrics: Option<SocketAddr>,
    /// A single-file checkpoint's prediction type, overriding its model type's default.
    pub prediction_type: Option<Prediction>,
    /// Where jobs' LoRAs are read from (`--lora-dir`).
    pub lora_dir: Option<PathBuf>,
}

/// What computes the tasks: the real model, or the benchmark double.
enum Served {
    Model(Box<DiffusionModel>),
    Simulated(SimulatedModel),
}

impl Served {
    fn backend(&self) -> tasks::Backend<'_> {
        match self {
            Self::Model(m) => tasks::Backend::Model(m),
            Self::Simulated(s) => tasks::Backend::Simulated(s),
        }
    }
}

struct Shared {
    id: String,
    served: Served,
    /// The stage CA-map view tasks cut their parts from.
    cache: tasks::ReadCache,
    model_name: String,
    store: RedisStore,
    description: WorkerDescription,
    /// One task computes on the device at a time; the store reads and writes of the others
    /// (of the coordinator's second call) overlap it.
    device_turn: std::sync::Mutex<()>,
    metrics: Arc<WorkerMetrics>,
    /// Models with a job's LoRAs merged in, built from the base model's files.
    lora_models: LoraModels,
    /// Each job's LoRAs, read once from its spec (the spec never changes).
    job_loras: Mutex<HashMap<String, Vec<LoraRef>>>,
}

/// Jobs whose LoRAs are remembered; the map starts over when it is full.
const REMEMBERED_JOBS: usize = 256;

impl Shared {
    /// The model a task runs on: the served one, or for a prompt or denoising task of a job
    /// with LoRAs, that model with them merged in. The error says whether to retry.
    fn lora_model(&self, task: &Task) -> Result<Option<Arc<DiffusionModel>>, (String, bool)> {
        let uses_loras = matches!(
            task.kind,
            TaskKind::EncodePrompt { .. } | TaskKind::Denoise(_)
        );
        if !uses_loras || matches!(self.served, Served::Simulated(_)) {
            return Ok(None);
        }
        let loras = self.job_loras(&task.job)?;
        if loras.is_empty() {
            return Ok(None);
        }
        (self.lora_models.model(&loras))
            .map(Some)
            .map_err(|e| (e.to_string(), false))
    }

    fn job_loras(&self, job: &str) -> Result<Vec<LoraRef>, (String, bool)> {
        let mut known = self.job_loras.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = known.get(job) {
            return Ok(l.clone());
        }
        #[derive(serde::Deserialize)]
        struct SpecLoras {
            #[serde(default)]
            loras: Vec<LoraRef>,
        }
        let key = keys::spec(job);
        let bytes = match self.store.get(&key) {
            Ok(Some(b)) => b,
            Ok(None) => return Err((format!("job {job} has no spec in the store"), true)),
            Err(e) => return Err((format!("reading {key}: {e}"), true)),
        };
        let spec: SpecLoras = serde_json::from_slice(&bytes)
            .map_err(|e| (format!("job {job}'s spec is unreadable: {e}"), false))?;
        if known.len() >= REMEMBERED_JOBS {
            known.clear();
        }
        known.insert(job.to_string(), spec.loras.clone());
        Ok(spec.loras)
    }
}

fn model_error(cfg: &WorkerConfig, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Model {
        path: cfg.model_dir.clone(),
        message: e.to_string(),
    }
}

/// Loads the model (or the benchmark double) and names its fingerprint.
async fn load(cfg: &WorkerConfig) -> Result<(Served, String), ServiceError> {
    let dir = cfg.model_dir.clone();
    let fingerprint = tokio::task::spawn_blocking(move || crate::fingerprint::fingerprint(&dir))
        .await
        .map_err(|e| model_error(cfg, e))??;
    // The override changes the images: workers that differ in it must not pass as one model.
    let fingerprint = match cfg.prediction_type {
        Some(p) => format!("{fingerprint}+prediction_type={}", p.name()),
        None => fingerprint,
    };
    if let Some(ms) = cfg.simulate_eval_ms {
        tracing::warn!(
            eval_ms = ms,
            "BENCHMARK DOUBLE: no weights loaded; tasks are simulated, outputs meaningless"
        );
        let double =
            SimulatedModel::from_dir(&cfg.model_dir, ms).map_err(|e| model_error(cfg, e))?;
        return Ok((Served::Simulated(double), fingerprint));
    }
    tracing::info!(model = %cfg.model_dir.display(), device = %cfg.device, "loading the model");
    let started = Instant::now();
    let (dir, device) = (cfg.model_dir.clone(), open_device(&cfg.device)?);
    let prediction = cfg.prediction_type;
    let model = tokio::task::spawn_blocking(move || {
        let dtype = compute_dtype(&device);
        DiffusionModel::load_with(&dir, &device, dtype, prediction)
    })
    .await
    .map_err(|e| model_error(cfg, e))?
    .map_err(|e| model_error(cfg, e))?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded");
    Ok((Served::Model(Box::new(model)), fingerprint))
}

/// Runs a worker until `shutdown` resolves (or the coordinator refuses it for good), then
/// leaves the cluster.
pub async fn serve(
    cfg: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let coordinator_net = coordinator_net(&cfg)?;
    if let Some(dir) = cfg.lora_dir.as_ref().filter(|d| !d.is_dir()) {
        return Err(ServiceError::LoraDir(dir.clone()));
    }
    let device = open_device(&cfg.device)?;
    let weight_bytes = if device.is_cpu() { 4 } else { 2 };
    let arch = arch_info_with(&cfg.model_dir, weight_bytes, cfg.prediction_type)
        .map_err(|e| model_error(&cfg, e))?;
    let redis = RedisOptions {
        url_from: Some("--redis URL or the TESSERA_REDIS variable".into()),
        ca: cfg.redis_ca.clone(),
        ..RedisOptions::default()
    };
    let store = RedisStore::connect(&cfg.redis_url, redis).await?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ServiceError::Listen {
            addr: cfg.listen.to_string(),
            message: e.to_string(),
        })?;
    let local = listener.local_addr().map_err(|e| ServiceError::Listen {
        addr: cfg.listen.to_string(),
        message: e.to_string(),
    })?;
    let tls = cfg.tls_cert.is_some();
    let address = match &cfg.advertise {
        Some(a) => net::normalize_url(a, tls),
        None => advertised_url(local, &cfg.coordinators[0], tls),
    };

    let (served, fingerprint) = load(&cfg).await?;
    let id = worker_id(local);
    let dtype = match &served {
        Served::Model(m) => m.dtype,
        Served::Simulated(_) => crate::simulate::GPU_DTYPE,
    };
    let description = describe(&id, &address, &cfg, &arch, (dtype, &fingerprint));
    let metrics = Arc::new(WorkerMetrics::new(&device));
    if let Some(addr) = cfg.metrics {
        serve_metrics(addr, metrics.clone()).await?;
    }
    let lora_models = LoraModels::new(
        id.clone(),
        cfg.lora_dir.clone(),
        cfg.model_dir.clone(),
        cfg.prediction_type,
        device.clone(),
        dtype,
    );
    let shared = Arc::new(Shared {
        lora_models,
        job_loras: Mutex::default(),
        id: id.clone(),
        served,
        cache: tasks::ReadCache::default(),
        model_name: cfg.model_name.clone(),
        store: store.clone(),
        description,
        device_turn: Default::default(),
        metrics,
    });

    let guard = RequireCallToken::default();
    let membership = Membership::new(&cfg, coordinator_net, guard.clone(), &shared)?;
    let (refuse, refused) = tokio::sync::oneshot::channel::<ServiceError>();
    let joining = tokio::spawn({
        let membership = membership.clone();
        async move {
            let _ = refuse.send(membership.stay_joined().await);
        }
    });

    let tls = cfg.tls_cert.as_deref().zip(cfg.tls_key.as_deref());
    let open = tessera_proto::auth::RequireToken::new(None);
    let (router, _health) =
        tessera_proto::server::router::<WorkerServer<WorkerService>>(tls, &open, true).await?;
    match cfg.simulate_eval_ms {
        Some(ms) => crate::status!(
            "worker {id} serving model {:?} ({fingerprint}) on {address} as a BENCHMARK DOUBLE \
             ({ms} ms per evaluation, no weights, meaningless outputs)",
            cfg.model_name
        ),
        None => crate::status!(
            "worker {id} serving model {:?} ({fingerprint}) on {address} (device {})",
            cfg.model_name,
            cfg.device
        ),
    }
    let refusal = Arc::new(Mutex::new(None));
    let ends = {
        let refusal = refusal.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                Ok(e) = refused => *refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
            }
        }
    };
    let result = router
        .add_service(WorkerServer::with_interceptor(
            WorkerService {
                shared: shared.clone(),
            },
            guard,
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            ends,
        )
        .await;
    joining.abort();
    // Leave at once rather than when the membership expires, so no new work is sent here.
    membership.leave().await;
    let refusal = refusal.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(e) = refusal {
        return Err(e);
    }
    result.map_err(|e| ServiceError::Serve(e.to_string()))
}

/// Starts `GET /metrics` on `addr` (no token: bind it where only the scraper reaches).
async fn serve_metrics(addr: SocketAddr, metrics: Arc<WorkerMetrics>) -> Result<(), ServiceError> {
    let listener =
        crate::metrics::bind("--metrics", addr)
            .await
            .map_err(|e| ServiceError::Listen {
                addr: format!("--metrics {addr}"),
                message: e.message,
            })?;
    let shown = listener.local_addr().map_or(addr, |a| a);
    let router = crate::metrics::router(Arc::new(move || metrics.encode()), None);
    crate::metrics::spawn_serve(listener, router);
    crate::status!("worker metrics on http://{shown}/metrics");
    Ok(())
}

/// How to reach the coordinators: every URL checked against the TLS settings up front.
fn coordinator_net(cfg: &WorkerConfig) -> Result<ClientNet, ServiceError> {
    let net = ClientNet {
        ca: cfg.tls_ca.clone(),
        connect_timeout: Some(Duration::from_secs(3)),
        call_timeout: None,
        ca_flag: "--tls-ca",
    };
    if cfg.coordinators.is_empty() {
        return Err(ServiceError::Join(
            "--coordinator is empty: name the coordinator's URL".into(),
        ));
    }
    for url in &cfg.coordinators {
        net::check_scheme(url, &net)?;
    }
    Ok(net)
}

/// A process-unique id that says where the worker runs.
fn worker_id(local: SocketAddr) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}-{}", local.port(), std::process::id())
}

/// The URL the coordinator should call: the listening address, or, when listening on every
/// interface, the local address of the route towards the coordinator.
fn advertised_url(local: SocketAddr, coordinator: &str, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if !local.ip().is_unspecified() {
        return format!("{scheme}://{local}");
    }
    let host_port = coordinator
        .split("://")
        .last()
        .unwrap_or(coordinator)
        .trim_end_matches('/');
    let ip = std::net::UdpSocket::bind(("0.0.0.0", 0))
        .and_then(|s| {
            s.connect(host_port)?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    format!("{scheme}://{}", SocketAddr::new(ip, local.port()))
}

fn describe(
    id: &str,
    address: &str,
    cfg: &WorkerConfig,
    arch: &ArchInfo,
    (dtype, fingerprint): (candle_core::DType, &str),
) -> WorkerDescription {
    WorkerDescription {
        worker_id: id.to_string(),
        address: address.to_string(),
        models: vec![ModelDescription {
            name: cfg.model_name.clone(),
            arch_json: serde_json::to_string(arch).unwrap_or_default(),
            scheduler_json: serde_json::to_string(&arch.scheduler).unwrap_or_default(),
            latent_channels: arch.latent_channels as u32,
            dtype: dtype.as_str().to_string(),
            fingerprint: fingerprint.to_string(),
        }],
        device: cfg.device.clone(),
        device_memory_bytes: device_memory(&cfg.device),
        tasks_per_call: cfg.tasks_per_call.max(1),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

type MembershipApi = MembershipClient<InterceptedService<Channel, AttachToken>>;

/// This worker's membership: the coordinators it may join, its credential for joining, and
/// the call token the coordinator it joined uses.
#[derive(Clone)]
struct Membership {
    coordinators: Vec<(String, MembershipApi)>,
    guard: RequireCallToken,
    description: WorkerDescription,
    /// The membership now: the coordinator's index, and the session.
    current: Arc<Mutex<Option<(usize, String)>>>,
}

/// A join refused for a reason retrying cannot fix (a wrong token, an address that is not
/// the worker's own, another model under a served name): the worker stops and says why.
fn refused_for_good(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::InvalidArgument
    )
}

impl Membership {
    fn new(
        cfg: &WorkerConfig,
        coordinator_net: ClientNet,
        guard: RequireCallToken,
        shared: &Shared,
    ) -> Result<Self, ServiceError> {
        let token = AttachToken::new(cfg.worker_token.as_deref())
            .map_err(|e| ServiceError::Join(format!("--worker-token: {e}")))?;
        let coordinators = cfg
            .coordinators
            .iter()
            .map(|url| {
                let channel = net::channel(url, &coordinator_net)?;
                Ok((
                    url.clone(),
                    MembershipClient::with_interceptor(channel, token.clone()),
                ))
            })
            .collect::<Result<_, net::NetError>>()?;
        Ok(Self {
            coordinators,
            guard,
            description: shared.description.clone(),
            current: Arc::default(),
        })
    }

    /// Joins, keeps the membership alive, joins again when it is lost — until a coordinator
    /// refuses this worker for good, which it returns.
    async fn stay_joined(self) -> ServiceError {
        loop {
            let (index, session, every) = match self.join().await {
                Ok(joined) => joined,
                Err(e) => return e,
            };
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((index, session.clone()));
            self.beat(index, &session, every).await;
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Tries each coordinator in turn until one accepts, waiting longer between rounds.
    async fn join(&self) -> Result<(usize, String, Duration), ServiceError> {
        let mut wait = Duration::from_millis(250);
        let mut told = false;
        loop {
            // A fresh call token for each membership: whoever held the last one cannot call.
            let call_token = format!(
                "{:032x}{:032x}",
                rand::random::<u128>(),
                rand::random::<u128>()
            );
            self.guard.set(&call_token);
            for (index, (url, client)) in self.coordinators.iter().enumerate() {
                let request = JoinRequest {
                    worker: Some(self.description.clone()),
                    call_token: call_token.clone(),
                };
                let answer = tokio::time::timeout(JOIN_TIMEOUT, client.clone().join(request)).await;
                let status = match answer {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        tracing::info!(coordinator = %url, "joined the cluster");
                        crate::status!(
                            "worker {} joined coordinator {url}",
                            self.description.worker_id
                        );
                        let every = Duration::from_millis(u64::from(r.heartbeat_ms.max(100)));
                        return Ok((index, r.session, every));
                    }
                    Ok(Err(status)) => status,
                    Err(_) => Status::deadline_exceeded("no answer"),
                };
                if refused_for_good(status.code()) {
                    return Err(ServiceError::Join(format!(
                        "coordinator {url} refused this worker: {}",
                        status.message()
                    )));
                }
                if !told {
                    tracing::warn!(coordinator = %url, "cannot join yet ({}); retrying", status.message());
                }
            }
            told = true;
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(JOIN_WAIT_MAX);
        }
    }

    /// Sends heartbeats until the membership is lost: the coordinator forgot it (it
    /// restarted), stopped leading, or has not answered for the membership's lifetime.
    async fn beat(&self, index: usize, session: &str, every: Duration) {
        let (url, client) = &self.coordinators[index];
        let request = HeartbeatRequest {
            worker_id: self.description.worker_id.clone(),
            session: session.to_string(),
        };
        let mut answered = Instant::now();
        loop {
            tokio::time::sleep(every).await;
            let answer =
                tokio::time::timeout(every * 2, client.clone().heartbeat(request.clone())).await;
            match answer {
                Ok(Ok(_)) => answered = Instant::now(),
                Ok(Err(s)) if matches!(s.code(), Code::NotFound | Code::Unavailable) => {
                    tracing::warn!(coordinator = %url, "membership lost ({}); joining again", s.message());
                    return;
                }
                _ if answered.elapsed() > every * 4 => {
                    tracing::warn!(coordinator = %url, "the coordinator stopped answering; joining again");
                    return;
                }
                _ => {}
            }
        }
    }

    /// Ends the membership now (a clean shutdown), if there is one.
    async fn leave(&self) {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some((index, session)) = current else {
            return;
        };
        let request = HeartbeatRequest {
            worker_id: self.description.worker_id.clone(),
            session,
        };
        let mut client = self.coordinators[index].1.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.leave(request)).await;
    }
}

/// The device's memory in bytes, 0 when it cannot be told: the machine's memory for `cpu`,
/// the GPU's as `nvidia-smi` reports it for `cuda:N`.
fn device_memory(device: &str) -> u64 {
    if device.trim().eq_ignore_ascii_case("cpu") {
        let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        return info
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024);
    }
    let ordinal = device.trim().strip_prefix("cuda:").unwrap_or("0");
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.total",
            "--format=csv,noheader,nounits",
            "-i",
            ordinal,
        ])
        .output();
    out.ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |mib| mib << 20)
}

struct WorkerService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn describe(
        &self,
        _req: Request<DescribeRequest>,
    ) -> Result<Response<WorkerDescription>, Status> {
        Ok(Response::new(self.shared.description.clone()))
    }

    async fn run_tasks(
        &self,
        req: Request<RunTasksRequest>,
    ) -> Result<Response<RunTasksResponse>, Status> {
        let refs = req.into_inner().tasks;
        let mut results = Vec::with_capacity(refs.len());
        for r in refs {
            let task: Task = match serde_json::from_str(&r.task_json) {
                Ok(t) => t,
                Err(e) => {
                    self.shared.metrics.task("malformed", "refused", 0.0, 0);
                    results.push(TaskResult {
                        error: format!("malformed task: {e}"),
                        ..Default::default()
                    });
                    continue;
                }
            };
            let kind = task.kind.name();
            let (result, outcome) = self.run_one(&r.model, task).await;
            let evaluations = u64::from(result.evaluations);
            (self.shared.metrics).task(kind, outcome, result.seconds, evaluations);
            results.push(result);
        }
        Ok(Response::new(RunTasksResponse { results }))
    }
}

impl WorkerService {
    /// Runs one task of `model` (when this worker serves it and the task's keys pass), with
    /// its outcome for the metrics: `ok`, `failed` or `refused`.
    async fn run_one(&self, model: &str, task: Task) -> (TaskResult, &'static str) {
        let mut result = TaskResult {
            job: task.job.clone(),
            id: task.id.clone(),
            ..Default::default()
        };
        if model != self.shared.model_name {
            result.retryable = true;
            result.error = format!(
                "worker {} serves model {:?}, not {model:?}",
                self.shared.id, self.shared.model_name
            );
            return (result, "refused");
        }
        if let Err(why) = check_task_keys(&task) {
            tracing::warn!(task = %task.id, "refused a task: {why}");
            result.error = format!("refused: {why}");
            return (result, "refused");
        }
        let id = task.id.clone();
        let shared = self.shared.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let with_loras = shared.lora_model(&task)?;
            let backend = match &with_loras {
                Some(m) => tasks::Backend::Model(m),
                None => shared.served.backend(),
            };
            tasks::execute_counted(
                backend,
                &GuardedStore::new(&shared.store, &task),
                &shared.cache,
                &task,
                &shared.device_turn,
            )
            .map_err(|e| (e.to_string(), retryable(&e)))
        })
        .await;
        match outcome {
            Ok(Ok(ran)) => {
                result.ok = true;
                result.seconds = ran.held.as_secs_f64();
                result.evaluations = u32::try_from(ran.evaluations).unwrap_or(u32::MAX);
                return (result, "ok");
            }
            Ok(Err((e, retry))) => {
                result.retryable = retry;
                result.error = e;
                tracing::warn!(task = %id, "task failed: {}", result.error);
            }
            Err(panic) => result.error = format!("task {id} panicked: {panic}"),
        }
        (result, "failed")
    }
}

/// A task may touch only one step (or stage) of its own job: every key it names lies under
/// that job's per-step or per-stage keys, its outputs in the same step or stage as its input.
/// No task can write a job's record, spec, embeddings or checkpoints, or another job's keys.
pub fn check_task_keys(task: &Task) -> Result<(), String> {
    use keys::Scratch;
    let job_ok = (1..=128).contains(&task.job.len())
        && task
            .job
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-:".contains(c));
    if !job_ok {
        return Err(format!("{:?} is not a job id", task.job));
    }
    let place = |key: &str| {
        keys::scratch_of(&task.job, key)
            .ok_or_else(|| format!("{key} is not a step or stage key of job {}", task.job))
    };
    let same = |input: &str, outputs: &[Option<&String>]| -> Result<Scratch, String> {
        let at = place(input)?;
        for key in outputs.iter().flatten() {
            if place(key)? != at {
                return Err(format!("{key} does not belong to the step of {input}"));
            }
        }
        Ok(at)
    };
    match &task.kind {
        TaskKind::EncodePrompt { .. } => Ok(()),
        TaskKind::Denoise(d) => {
            let outputs = [
                Some(&d.output_cond),
                d.output_uncond.as_ref(),
                d.camap_capture.as_ref(),
            ];
            let at = same(&d.input, &outputs)?;
            let map_ok = d
                .camap_inject
                .as_ref()
                .is_none_or(|m| matches!(place(&m.key), Ok(Scratch::Stage(_))));
            match at {
                Scratch::Step(..) if map_ok => Ok(()),
                _ => Err(format!(
                    "denoising task {} names keys outside one step",
                    task.id
                )),
            }
        }
        TaskKind::Decode { input, output }
        | TaskKind::Encode { input, output, .. }
        | TaskKind::EncodeTile { input, output } => match same(input, &[Some(output)])? {
            Scratch::Stage(_) => Ok(()),
            Scratch::Step(..) => Err(format!("VAE task {} names keys outside a stage", task.id)),
        },
    }
}

/// The key whose existence says the task's results are still wanted: its input (deleted when
/// the coordinator has merged the step), or for prompt encoding the job's spec.
pub fn guard_key(task: &Task) -> String {
    match &task.kind {
        TaskKind::EncodePrompt { .. } => keys::spec(&task.job),
        TaskKind::Denoise(d) => d.input.clone(),
        TaskKind::Decode { input, .. }
        | TaskKind::Encode { input, .. }
        | TaskKind::EncodeTile { input, .. } => input.clone(),
    }
}

/// Store failures may pass (Redis restarting, a step's input not there yet on a replica);
/// a computation that failed fails again.
fn retryable(e: &TaskError) -> bool {
    matches!(
        e,
        TaskError::Store {
            source: StoreError::Unavailable(_) | StoreError::Missing(_),
            ..
        }
    )
}

/// The store as a task sees it: writes land only while the task's [`guard_key`] exists.
pub struct GuardedStore<'a> {
    inner: &'a RedisStore,
    guard: String,
}

impl<'a> GuardedStore<'a> {
    pub fn new(inner: &'a RedisStore, task: &Task) -> Self {
        Self {
            inner,
            guard: guard_key(task),
        }
    }
}

impl Store for GuardedStore<'_> {
    fn put(&self, key: &str, value: &[u8]) -> tessera_store::Result<()> {
        if !Store::put_guarded(self.inner, &self.guard, key, value)? {
            tracing::debug!(
                key,
                "result no longer wanted (step already merged); dropped"
            );
        }
        Ok(())
    }
    fn get(&self, key: &str) -> tessera_store::Result<Option<Vec<u8>>> {
        Store::get(self.inner, key)
    }
    fn delete(&self, key: &str) -> tessera_store::Result<()> {
        Store::delete(self.inner, key)
    }
    fn delete_prefix(&self, prefix: &str) -> tessera_store::Result<usize> {
        Store::delete_prefix(self.inner, prefix)
    }
    fn keys(&self, prefix: &str) -> tessera_store::Result<Vec<String>> {
        Store::keys(self.inner, prefix)
    }
    fn put_guarded(&self, guard: &str, key: &str, value: &[u8]) -> tessera_store::Result<bool> {
        Store::put_guarded(self.inner, guard, key, value)
    }
    fn exists(&self, key: &str) -> tessera_store::Result<bool> {
        Store::exists(self.inner, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::task::DenoiseTask;

    fn denoise(job: &str, input: String, output: String) -> Task {
        Task {
            job: job.into(),
            id: "s1:t2:task0".into(),
            kind: TaskKind::Denoise(DenoiseTask {
                timestep: 1.0,
                input,
                output_cond: output,
                output_uncond: None,
                size_conditioning: [128, 128],
                freeu: false,
                dilation: 1,
                scale_fusion: None,
                camap_inject: None,
                camap_capture: None,
            }),
        }
    }

    #[test]
    fn tasks_may_touch_only_one_step_of_their_own_job() {
        let j = "abc:i0";
        let ok = denoise(
            j,
            keys::task(j, 1, 2, 0, "in"),
            keys::task(j, 1, 2, 0, "out"),
        );
        assert!(check_task_keys(&ok).is_ok());
        for (input, output) in [
            (keys::task(j, 1, 2, 0, "in"), keys::embedding(j, "cond")),
            (keys::task(j, 1, 2, 0, "in"), keys::task(j, 1, 3, 0, "out")),
            (
                keys::task(j, 1, 2, 0, "in"),
                keys::task("other:i0", 1, 2, 0, "out"),
            ),
            (keys::spec(j), keys::task(j, 1, 2, 0, "out")),
            (keys::task(j, 1, 2, 0, "in"), keys::job_record("abc")),
        ] {
            let bad = denoise(j, input.clone(), output.clone());
            assert!(check_task_keys(&bad).is_err(), "{input} -> {output}");
        }
        let vae = |input: String, output: String| Task {
            job: j.into(),
            id: "vae".into(),
            kind: TaskKind::Decode { input, output },
        };
        let (i, o) = (
            keys::stage(j, 0, "vae:a:in"),
            keys::stage(j, 0, "vae:a:out"),
        );
        assert!(check_task_keys(&vae(i.clone(), o)).is_ok());
        assert!(check_task_keys(&vae(i, keys::checkpoint(j, 0, 1, "latent"))).is_err());
        let mut odd = ok.clone();
        odd.job = "a*".into();
        assert!(check_task_keys(&odd).is_err());
        odd.job = "a{0}".into();
        assert!(check_task_keys(&odd).is_err());
        // The right name under another hash tag (another bucket, so another Redis Cluster
        // slot than its input's) is not the step's key.
        let out = keys::task(j, 1, 2, 0, "out");
        let (name, _) = out.split_once('{').unwrap();
        let moved = format!("{name}{}", keys::bucket_tag(0));
        let moved = if moved == out {
            format!("{name}{}", keys::bucket_tag(1))
        } else {
            moved
        };
        let bad = denoise(j, keys::task(j, 1, 2, 0, "in"), moved);
        assert!(check_task_keys(&bad).is_err());
    }

    #[test]
    fn advertised_address_follows_the_listener() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            advertised_url(local, "http://10.0.0.1:7070", false),
            "http://127.0.0.1:5000"
        );
        let any: SocketAddr = "0.0.0.0:5001".parse().unwrap();
        let url = advertised_url(any, "127.0.0.1:7070", true);
        assert_eq!(url, "https://127.0.0.1:5001");
    }
}
