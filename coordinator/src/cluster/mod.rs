//! The cluster coordinator (`tessera coordinator`): the client-facing gRPC service, the job
//! runner, the worker pool and membership, all state in Redis so that a restart resumes
//! every job where its last checkpoint left it.

pub mod admission;
pub mod jobs;
pub mod membership;
pub mod pace;
pub mod pool;
pub mod runner;
pub mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tessera_proto::auth::{BadToken, RequireToken};
use tessera_proto::net::{self, ClientNet};
use tessera_proto::v1::coordinator_server::CoordinatorServer;
use tessera_store::{RedisOptions, RedisStore, StoreError};

use jobs::Jobs;
use pool::{Pool, PoolOptions};
use runner::{Runner, RunnerOptions};
use service::CoordinatorService;

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
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub redis_url: String,
    pub token: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA of the workers' certificates, when they serve TLS.
    pub worker_ca: Option<PathBuf>,
    pub job_ttl: Duration,
    pub max_jobs: usize,
    pub lease: Duration,
    /// Where finished images are written (one folder per job) and served from by FetchResult.
    pub output_dir: PathBuf,
}

/// Runs the coordinator until `shutdown` resolves. Jobs still running then are resumed by the
/// next coordinator started on the same Redis.
pub async fn serve(
    cfg: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let redis = RedisOptions {
        url_from: Some("--redis URL or the TESSERA_REDIS variable".into()),
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
    let holder = format!("{local}-{}", std::process::id());
    membership::acquire_lock(&store, &holder).await?;
    let lock = tokio::spawn(membership::hold_lock(store.clone(), holder.clone()));

    let pool = Pool::new(PoolOptions {
        lease: cfg.lease,
        net: ClientNet {
            ca: cfg.worker_ca.clone(),
            connect_timeout: Some(Duration::from_secs(3)),
        },
        token: cfg.token.clone(),
    })?;
    // Know the workers before resuming jobs, so resumed work is dispatched at once.
    if let Ok(live) = membership::live_workers(&store).await {
        pool.update_members(live);
    }
    tokio::spawn(membership::follow(store.clone(), pool.clone()));
    let runner = Runner::new(
        Jobs {
            store: store.clone(),
        },
        pool,
        RunnerOptions {
            job_ttl: cfg.job_ttl,
            max_jobs: cfg.max_jobs.max(1),
            output_dir: cfg.output_dir.clone(),
        },
    );
    tokio::spawn(runner.clone().run());

    let token = RequireToken::new(cfg.token.as_deref());
    let tls = cfg.tls_cert.as_deref().zip(cfg.tls_key.as_deref());
    let router =
        tessera_proto::server::router::<CoordinatorServer<CoordinatorService>>(tls, &token).await?;
    let service = tonic::service::interceptor::InterceptedService::new(
        CoordinatorServer::new(CoordinatorService { runner })
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20),
        token.clone(),
    );
    eprintln!("coordinator listening on {local}");
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = lock => {}
        }
    };
    let result = router
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    membership::release_lock(&store, &holder).await;
    result.map_err(|e| CoordinatorError::Serve(e.to_string()))
}
