//! The cluster coordinator (`tessera coordinator`): the client-facing gRPC service, the
//! Membership service workers join through, the job runner, the worker pool, and the lock
//! that makes one coordinator at a time run jobs. All job state is in Redis, so a restart (or
//! a standby taking over) resumes every job where its last checkpoint left it.
//!
//! A coordinator's life: it serves at once, as a standby (health NOT_SERVING, calls answered
//! UNAVAILABLE) until it holds the lock; then it leads, every write fenced by its lock token;
//! it stops when asked (SIGTERM: streams end, job threads stop at their next task boundary,
//! the lock is released, all within seconds) or when it finds the lock taken by another (it
//! stops its job threads at once and exits with an error, so a supervisor restarts it as a
//! standby).

pub mod admission;
pub mod jobs;
pub mod lock;
pub mod membership;
pub mod outputs;
pub mod pace;
pub mod pool;
pub mod runner;
pub mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_proto::auth::{BadToken, RequireToken};
use tessera_proto::net::{self, ClientNet};
use tessera_proto::v1::coordinator_server::CoordinatorServer;
use tessera_proto::v1::membership_server::MembershipServer;
use tessera_store::{keys, RedisOptions, RedisStore, StoreError};
use tonic::service::interceptor::InterceptedService;
use tonic_health::server::HealthReporter;

use jobs::Jobs;
use lock::Leadership;
use membership::{Members, MembershipService};
use pool::{Pool, PoolOptions};
use runner::{Runner, RunnerOptions};
use service::CoordinatorService;

use crate::dashboard;

/// How long a stopping coordinator waits for its job threads to stop.
const JOBS_STOP: Duration = Duration::from_secs(10);
/// How long open calls (a fetch in progress) may finish once the coordinator stops.
const CALLS_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Token(#[from] BadToken),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("the gRPC server stopped: {0}")]
    Serve(String),
    #[error("{0}")]
    Config(String),
    #[error(
        "lost the coordinator lock ({0}): stopped running jobs; restart this coordinator (it \
         comes back as a standby)"
    )]
    LostLock(String),
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub redis_url: String,
    /// CA of Redis' certificate, for a `rediss://` URL to a server with a private CA.
    pub redis_ca: Option<PathBuf>,
    /// The clients' credential: required on every call of the client API.
    pub token: Option<String>,
    /// The workers' credential: required on every call of the Membership service. Never the
    /// clients' token.
    pub worker_token: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA of the workers' certificates, when they serve TLS.
    pub worker_ca: Option<PathBuf>,
    pub job_ttl: Duration,
    pub max_jobs: usize,
    /// Most jobs waiting in the queue; a submission beyond is refused.
    pub max_queued: u64,
    pub lease: Duration,
    /// Where finished images are written (one folder per job) and served from by FetchResult.
    pub output_dir: PathBuf,
    /// Directories (canonical) under which clients may have copies written (`--output-dir`).
    pub allowed_output_dirs: Vec<PathBuf>,
    /// Who is told when a job ends (`--notify`, `--notify-attempts`).
    pub notifier: crate::notify::Notifier,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (`--metrics`), behind `token`.
    pub metrics: Option<SocketAddr>,
    /// The web dashboard (`--http`), behind the same token and TLS; off when `None`.
    pub http: Option<crate::dashboard::DashboardConfig>,
}

/// Each party holds its own credential: with a client token there must be a worker token,
/// and not the same one.
fn check_credentials(cfg: &CoordinatorConfig) -> Result<(), CoordinatorError> {
    let set = |t: &Option<String>| t.as_deref().filter(|t| !t.is_empty()).map(str::to_string);
    match (set(&cfg.token), set(&cfg.worker_token)) {
        (Some(_), None) => Err(CoordinatorError::Config(
            "--token is set but --worker-token is not: workers join with a credential of \
             their own; give the coordinator and its workers --worker-token (or \
             TESSERA_WORKER_TOKEN)"
                .into(),
        )),
        (Some(c), Some(w)) if c == w => Err(CoordinatorError::Config(
            "--worker-token is the same as --token: clients and workers must hold different \
             credentials"
                .into(),
        )),
        (client, workers) => {
            if !cfg.listen.ip().is_loopback() {
                if client.is_none() {
                    tracing::warn!(
                        "no --token: anyone who reaches {} can submit and cancel jobs",
                        cfg.listen
                    );
                }
                if workers.is_none() {
                    tracing::warn!(
                        "no --worker-token: anyone who reaches {} can join as a worker",
                        cfg.listen
                    );
                }
            }
            Ok(())
        }
    }
}

/// The gRPC server, running on its own task until [`Server::stop`].
struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    health: HealthReporter,
}

impl Server {
    /// Stops accepting calls, lets open ones finish for [`CALLS_GRACE`], then drops them.
    async fn stop(self) -> Result<(), CoordinatorError> {
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(CALLS_GRACE, &mut task).await {
            Ok(Ok(Ok(()))) | Err(_) => {
                task.abort();
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(CoordinatorError::Serve(e.to_string())),
            Ok(Err(e)) => Err(CoordinatorError::Serve(e.to_string())),
        }
    }

    async fn serving(&self, serving: bool) {
        tessera_proto::server::set_serving::<CoordinatorServer<CoordinatorService>>(
            &self.health,
            serving,
        )
        .await;
    }
}

/// The gRPC server and the dashboard, stopped together.
struct Servers {
    grpc: Server,
    dashboard: Option<dashboard::Dashboard>,
}

impl Servers {
    async fn stop(self) -> Result<(), CoordinatorError> {
        if let Some(d) = self.dashboard {
            d.stop().await;
        }
        self.grpc.stop().await
    }

    async fn serving(&self, serving: bool) {
        self.grpc.serving(serving).await;
    }
}

/// Starts serving on `listener` at once, as a standby until `leader` leads: health, the
/// client API (behind the client token) and Membership (behind the worker token).
async fn start_server(
    cfg: &CoordinatorConfig,
    listener: tokio::net::TcpListener,
    leader: Arc<Leadership>,
    members: Members,
    worker_net: ClientNet,
) -> Result<Server, CoordinatorError> {
    let token = RequireToken::new(cfg.token.as_deref());
    let worker_token = RequireToken::new(cfg.worker_token.as_deref());
    let tls = cfg.tls_cert.as_deref().zip(cfg.tls_key.as_deref());
    let (router, health) =
        tessera_proto::server::router::<CoordinatorServer<CoordinatorService>>(tls, &token, false)
            .await?;
    let clients = InterceptedService::new(
        CoordinatorServer::new(CoordinatorService {
            leader: leader.clone(),
            max_queued: cfg.max_queued,
        })
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20),
        token,
    );
    let workers = InterceptedService::new(
        MembershipServer::new(MembershipService {
            members,
            leader,
            worker_net,
        }),
        worker_token,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = router.add_service(clients).add_service(workers);
    let task = tokio::spawn(serving.serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Server { stop, task, health })
}

/// Starts `GET /metrics` on `--metrics` (behind the client token), when asked for.
async fn serve_metrics(cfg: &CoordinatorConfig) -> Result<(), CoordinatorError> {
    let Some(addr) = cfg.metrics else {
        return Ok(());
    };
    let listener = tessera_worker::metrics::bind("--metrics", addr)
        .await
        .map_err(|e| CoordinatorError::Listen {
            addr: format!("--metrics {addr}"),
            message: e.message,
        })?;
    let shown = listener.local_addr().map_or(addr, |a| a);
    let router = crate::metrics::router(cfg.token.as_deref());
    tessera_worker::metrics::spawn_serve(listener, router);
    tessera_worker::status!("coordinator metrics on http://{shown}/metrics");
    Ok(())
}

/// Runs the coordinator until `shutdown` resolves (or another coordinator takes the lock).
/// Jobs still running then are resumed by the next coordinator started on the same Redis.
pub async fn serve(
    cfg: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    check_credentials(&cfg)?;
    let redis = RedisOptions {
        url_from: Some("--redis URL or the TESSERA_REDIS variable".into()),
        ca: cfg.redis_ca.clone(),
        ..RedisOptions::default()
    };
    let store = RedisStore::connect(&cfg.redis_url, redis).await?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| CoordinatorError::Listen {
            addr: cfg.listen.to_string(),
            message: e.to_string(),
        })?;
    let local = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Listen {
            addr: cfg.listen.to_string(),
            message: e.to_string(),
        })?;
    let worker_net = ClientNet {
        ca: cfg.worker_ca.clone(),
        connect_timeout: Some(Duration::from_secs(3)),
        call_timeout: None,
        ca_flag: "--tls-ca",
    };
    let pool = Pool::new(
        PoolOptions {
            lease: cfg.lease,
            net: worker_net.clone(),
        },
        store.clone(),
    );
    let members = Members::new(pool.clone());
    tokio::spawn(members.clone().expire());
    let leader = Leadership::new();
    serve_metrics(&cfg).await?;
    let dashboard = match &cfg.http {
        Some(http) => Some(dashboard::start(&cfg, http, leader.clone(), members.clone()).await?),
        None => None,
    };
    let server = start_server(&cfg, listener, leader.clone(), members, worker_net).await?;
    let server = Servers {
        grpc: server,
        dashboard,
    };
    tessera_worker::status!("coordinator listening on {local}");

    tokio::pin!(shutdown);
    let holder = format!(
        "{local}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    );
    let token = tokio::select! {
        token = lock::acquire(&store, &holder) => token?,
        _ = &mut shutdown => return server.stop().await,
    };
    let fenced = store.fenced(keys::COORDINATOR_LOCK, &token, lock::LOCK_TTL);
    // On a Redis Cluster the fence is copied into every bucket before anything is written,
    // so the previous holder's writes are refused on every shard from here on.
    fenced.arm_fence().await?;
    let runner = Runner::new(
        Jobs {
            store: fenced.clone(),
        },
        pool,
        RunnerOptions {
            job_ttl: cfg.job_ttl,
            max_jobs: cfg.max_jobs.max(1),
            output_dir: cfg.output_dir.clone(),
            allowed_output_dirs: cfg.allowed_output_dirs.clone(),
            notifier: cfg.notifier.clone(),
        },
    );
    leader.lead(runner.clone());
    tokio::spawn(runner.clone().run());
    server.serving(true).await;
    tessera_worker::status!("coordinator serving on {local} (lock {token})");

    let lost = tokio::select! {
        lost = lock::hold(&fenced, &token, || runner.store_lost()) => Some(lost),
        _ = &mut shutdown => None,
    };
    // No new work, streams end, job threads stop at their next task boundary.
    leader.stop();
    server.serving(false).await;
    runner.halt();
    if let Some(why) = &lost {
        tracing::error!("lost the coordinator lock: {why}; stopping");
        tessera_worker::status!("lost the coordinator lock: {why}; stopping job threads");
    } else {
        tessera_worker::status!(
            "stopping: job threads first (their checkpoints stand), then the lock"
        );
    }
    let started = Instant::now();
    while runner.running_jobs() > 0 && started.elapsed() < JOBS_STOP {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await?;
    match lost {
        None => {
            lock::release(&store.with_retry_for(Duration::from_secs(3)), &token).await;
            tessera_worker::status!("coordinator stopped");
            Ok(())
        }
        Some(why) => Err(CoordinatorError::LostLock(why.to_string())),
    }
}
