//! The worker process of a cluster (`tessera worker`): loads one model, serves the `Worker`
//! gRPC service, and announces itself in Redis with a heartbeat so coordinators find it.
//!
//! Tasks name their tensors by store key: the worker reads inputs from Redis and writes
//! outputs there. Outputs are written only while the task's input still exists, so a result
//! that arrives after the coordinator merged and cleared its step cannot leave keys behind.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tessera_core::plan::ArchInfo;
use tessera_core::task::{Task, TaskKind};
use tessera_proto::auth::RequireToken;
use tessera_proto::net;
use tessera_proto::v1::worker_server::{Worker, WorkerServer};
use tessera_proto::v1::{
    DescribeRequest, ModelDescription, RunTasksRequest, RunTasksResponse, TaskResult,
    WorkerDescription,
};
use tessera_store::{keys, RedisOptions, RedisStore, Store, StoreError};
use tonic::{Request, Response, Status};

use crate::device::{compute_dtype, open_device};
use crate::model::arch::arch_info;
use crate::model::diffusion::DiffusionModel;
use crate::simulate::SimulatedModel;
use crate::tasks::{self, TaskError};

/// How often a worker refreshes its membership key, and how long the key outlives a silent
/// worker: a dead worker is noticed within `HEARTBEAT_TTL`.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(1000);
pub const HEARTBEAT_TTL: Duration = Duration::from_millis(4000);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("loading the model from {path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("the gRPC server stopped: {0}")]
    Serve(String),
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
    /// The coordinator, for the advertised address and a reachability check in the log.
    pub coordinator: String,
    pub redis_url: String,
    pub token: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA for checking the coordinator's certificate (only used for the reachability check).
    pub tls_ca: Option<PathBuf>,
    pub tasks_per_call: u32,
    /// **Benchmark double** (`--simulate-eval-ms`): load no weights and answer every task after
    /// this many milliseconds per training-size evaluation with CFG (see [`crate::simulate`]).
    /// `None`, the default, runs the real model.
    pub simulate_eval_ms: Option<f64>,
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
    camaps: tasks::CamapCache,
    model_name: String,
    store: RedisStore,
    description: WorkerDescription,
    /// One task computes on the device at a time; the store reads and writes of the others
    /// (of the coordinator's second call) overlap it.
    device_turn: std::sync::Mutex<()>,
}

/// Runs a worker until `shutdown` resolves, then withdraws its membership key.
pub async fn serve(
    cfg: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let device = open_device(&cfg.device)?;
    let weight_bytes = if device.is_cpu() { 4 } else { 2 };
    let arch = arch_info(&cfg.model_dir, weight_bytes).map_err(|e| ServiceError::Model {
        path: cfg.model_dir.clone(),
        message: e.to_string(),
    })?;
    let redis = RedisOptions {
        url_from: Some("--redis URL or the TESSERA_REDIS variable".into()),
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
        None => advertised_url(local, &cfg.coordinator, tls),
    };

    let served = match cfg.simulate_eval_ms {
        Some(ms) => {
            tracing::warn!(
                eval_ms = ms,
                "BENCHMARK DOUBLE: no weights loaded; tasks are simulated, outputs meaningless"
            );
            Served::Simulated(SimulatedModel::from_dir(&cfg.model_dir, ms).map_err(|e| {
                ServiceError::Model {
                    path: cfg.model_dir.clone(),
                    message: e.to_string(),
                }
            })?)
        }
        None => {
            tracing::info!(model = %cfg.model_dir.display(), device = %cfg.device, "loading the model");
            let started = Instant::now();
            let dir = cfg.model_dir.clone();
            let model = tokio::task::spawn_blocking(move || {
                let dtype = compute_dtype(&device);
                DiffusionModel::load(&dir, &device, dtype)
            })
            .await
            .map_err(|e| ServiceError::Model {
                path: cfg.model_dir.clone(),
                message: e.to_string(),
            })?
            .map_err(|e| ServiceError::Model {
                path: cfg.model_dir.clone(),
                message: e.to_string(),
            })?;
            tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded");
            Served::Model(Box::new(model))
        }
    };

    let id = worker_id(local);
    let dtype = match &served {
        Served::Model(m) => m.dtype,
        Served::Simulated(_) => crate::simulate::GPU_DTYPE,
    };
    let description = describe(&id, &address, &cfg, &arch, dtype);
    let shared = Arc::new(Shared {
        id: id.clone(),
        served,
        camaps: tasks::CamapCache::default(),
        model_name: cfg.model_name.clone(),
        store: store.clone(),
        description,
        device_turn: Default::default(),
    });

    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone()));
    tokio::spawn(check_coordinator(cfg.clone()));

    let token = RequireToken::new(cfg.token.as_deref());
    let tls = cfg.tls_cert.as_deref().zip(cfg.tls_key.as_deref());
    let router = tessera_proto::server::router::<WorkerServer<WorkerService>>(tls, &token).await?;
    match cfg.simulate_eval_ms {
        Some(ms) => eprintln!(
            "worker {id} serving model {:?} on {address} as a BENCHMARK DOUBLE ({ms} ms per \
             evaluation, no weights, meaningless outputs)",
            cfg.model_name
        ),
        None => eprintln!(
            "worker {id} serving model {:?} on {address} (device {})",
            cfg.model_name, cfg.device
        ),
    }
    let result = router
        .add_service(WorkerServer::with_interceptor(
            WorkerService {
                shared: shared.clone(),
            },
            token,
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    heartbeat.abort();
    // Leave at once rather than when the key expires, so no new work is sent here.
    let _ = shared.store.delete_async(&keys::worker(&id)).await;
    result.map_err(|e| ServiceError::Serve(e.to_string()))
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
    dtype: candle_core::DType,
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
        }],
        device: cfg.device.clone(),
        free_memory_bytes: 0,
        tasks_per_call: cfg.tasks_per_call.max(1),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Refreshes the membership key; the store retries through Redis outages by itself.
async fn heartbeat_loop(shared: Arc<Shared>) {
    let key = keys::worker(&shared.id);
    let value = shared.description.encode_to_vec();
    let mut announced = false;
    loop {
        match shared.store.put_ex(&key, &value, HEARTBEAT_TTL).await {
            Ok(()) if !announced => {
                tracing::info!(worker = %shared.id, "joined the cluster");
                announced = true;
            }
            Ok(()) => {}
            Err(e) => tracing::warn!("heartbeat failed (retrying): {e}"),
        }
        tokio::time::sleep(HEARTBEAT_EVERY).await;
    }
}

/// Tells the operator early whether the coordinator can be reached, retrying with backoff.
async fn check_coordinator(cfg: WorkerConfig) {
    let netcfg = net::ClientNet {
        ca: cfg.tls_ca.clone(),
        connect_timeout: Some(Duration::from_secs(3)),
    };
    let Ok(channel) = net::channel(&cfg.coordinator, &netcfg) else {
        tracing::warn!("--coordinator {:?} is not a usable URL", cfg.coordinator);
        return;
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut wait = Duration::from_millis(500);
    loop {
        let req = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        match client.check(req).await {
            Ok(_) => {
                tracing::info!("coordinator {} is reachable", cfg.coordinator);
                return;
            }
            Err(e) => {
                tracing::warn!(
                    "coordinator {} not reachable yet ({}); retrying in {:?}",
                    cfg.coordinator,
                    e.message(),
                    wait
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
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
                    results.push(TaskResult {
                        job: String::new(),
                        id: String::new(),
                        ok: false,
                        error: format!("malformed task: {e}"),
                        retryable: false,
                        seconds: 0.0,
                    });
                    continue;
                }
            };
            let mut result = TaskResult {
                job: task.job.clone(),
                id: task.id.clone(),
                ok: true,
                error: String::new(),
                retryable: false,
                seconds: 0.0,
            };
            if r.model != self.shared.model_name {
                result.ok = false;
                result.retryable = true;
                result.error = format!(
                    "worker {} serves model {:?}, not {:?}",
                    self.shared.id, self.shared.model_name, r.model
                );
            } else {
                let id = task.id.clone();
                let shared = self.shared.clone();
                let outcome = tokio::task::spawn_blocking(move || {
                    tasks::execute(
                        shared.served.backend(),
                        &GuardedStore::new(&shared.store, &task),
                        &shared.camaps,
                        &task,
                        &shared.device_turn,
                    )
                })
                .await;
                match outcome {
                    Ok(Ok(held)) => result.seconds = held.as_secs_f64(),
                    Ok(Err(e)) => {
                        result.ok = false;
                        result.retryable = retryable(&e);
                        result.error = e.to_string();
                        tracing::warn!(task = %id, "task failed: {e}");
                    }
                    Err(panic) => {
                        result.ok = false;
                        result.error = format!("task {id} panicked: {panic}");
                    }
                }
            }
            results.push(result);
        }
        Ok(Response::new(RunTasksResponse { results }))
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
